"""Evaluate every experiment of ``evaluation/exp.py`` on every benchmark it lists, then tabulate and plot.

    python evaluation/eval_template.py                                   # everything in EXPERIMENTS
    python evaluation/eval_template.py --only shapes-tiny-uni-x --eval_type shapes,text --limit 4   # a quick look
    python evaluation/eval_template.py --model_path outputs/my-run       # any exp.py key, for the selected ones

How each kind of benchmark runs (registry and kinds: ``evaluation/benchmarks/__init__.py``):

* text-to-image (``shapes``, ``geneval``, ``dpg_bench``): every image first, then scoring. One generating process
  per device of ``t2i_devices`` (each loads the checkpoint on its device and draws its shard); with one device, in
  this process. Images already on disk are skipped and scores already in ``results.jsonl`` are kept, so a run that
  was interrupted, rerun, draws and scores nothing twice.
* visual understanding (``vis_und``, ``shapes_vqa``; DPG-Bench's judge when no other is given): one API server per
  device of ``vis_und_server_devices`` started in the background (``tools/bench_server.ServerProcess``, a free
  loopback port, ``/health`` awaited), ``vis_und_api_nproc`` parallel clients spread over them, and the servers
  stopped on success and on failure. Answers are appended as they come (a rerun asks nothing twice).
* text: lm-eval in this process on the loaded model (a rerun of the same request scores nothing).

Outputs: ``<out_dir>/<experiment>/<benchmark>/`` with the images or answers, per-sample scores and
``results.json`` (settings: sampling, CFG, seeds, checkpoint hash, scorer and weight hashes; ``headline``: the
numbers of the summary); ``<out_dir>/summary.md`` and ``summary.csv`` (every headline of every experiment on disk)
and ``<out_dir>/charts/<benchmark>.png`` (``draw_pics/eval_charts.py``).

Bad experiments (unknown keys, missing paths) stop the run before any work, naming the experiment and the key
(exit status 2); so does a missing checkpoint, with the command that makes the default one.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import multiprocessing
import runpy
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from loguru import logger

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.benchmarks import REGISTRY, get_benchmark  # noqa: E402
from evaluation.exp import Experiment, ExperimentError, parse_experiments  # noqa: E402

EXIT_BAD_CONFIG = 2


# --------------------------------------------------------------------------------------------- experiments
def _names(value: str | Sequence[str] | None) -> list[str] | None:
    """``"a,b"`` or fire's ``("a", "b")`` -> ``["a", "b"]``."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return [v.strip() for v in items if v.strip()]


def load_experiments(exp_file: str | None = None, only: str | Sequence[str] | None = None,
                     eval_type: str | Sequence[str] | None = None, **overrides: Any) -> list[Experiment]:
    """The validated experiments of ``exp_file`` (default ``evaluation/exp.py``), selected and overridden."""
    if exp_file is None:
        from evaluation.exp import EXPERIMENTS as raw
    else:
        if not Path(exp_file).is_file():
            raise ExperimentError(f"--exp_file: {exp_file} does not exist")
        raw = runpy.run_path(exp_file).get("EXPERIMENTS")
        if not isinstance(raw, list):
            raise ExperimentError(f"{exp_file}: EXPERIMENTS: must be a list of dicts")
    if eval_type is not None:
        overrides["eval_type"] = eval_type
    lists = {f.name for f in dataclasses.fields(Experiment) if "list[" in str(f.type)}
    for key in lists & set(overrides):  # --t2i_devices cuda:0,cuda:1 (fire gives a str or a tuple)
        if isinstance(overrides[key], (str, tuple)):
            overrides[key] = _names(overrides[key])
    return parse_experiments(raw, list(REGISTRY), overrides, _names(only))


# ---------------------------------------------------------------------------------------------- machinery
class Models:
    """The checkpoint loaded at most once per experiment and device, on first use (a run whose images are all on
    disk and whose only other benchmarks are served loads none)."""

    def __init__(self, experiment: Experiment):
        self.exp = experiment
        self._loaded: dict[str, Any] = {}

    def get(self, device: str | None = None) -> Any:
        from evaluation.uni_infer import UniInfer

        device = device or self.exp.t2i_devices[0]
        if device not in self._loaded:
            self._loaded[device] = UniInfer.from_checkpoint(self.exp.model_path, device=device)
        return self._loaded[device]


def _generation_worker(name: str, experiment: dict[str, Any], out_dir: str, limit: int | None, device: str,
                       rank: int, world: int) -> None:
    """One device's share of a text-to-image benchmark, in its own process."""
    from uni_arch.log_setup import setup_logging

    setup_logging(rank, tag="device", all_ranks=True)
    from evaluation.uni_infer import UniInfer

    exp = Experiment(**experiment)
    bench = get_benchmark(name)(exp, out_dir, limit)
    bench.generate(UniInfer.from_checkpoint(exp.model_path, device=device), rank, world)


def generate_images(name: str, bench: Any, exp: Experiment, out_dir: Path, limit: int | None, models: Models) -> None:
    """All images of a text-to-image benchmark: in process on one device, one spawned process per device else."""
    devices = exp.t2i_devices
    if bench.pending() == 0:  # a rerun: no model to load
        logger.info(f"{exp.name} / {name}: every image is on disk")
        return
    if len(devices) == 1:
        bench.generate(models.get(devices[0]), 0, 1)
        return
    ctx = multiprocessing.get_context("spawn")  # fork would copy a loaded model and CUDA state
    procs = [ctx.Process(target=_generation_worker, name=f"generate-{name}-{d}",
                         args=(name, exp.to_dict(), str(out_dir), limit, d, rank, len(devices)))
             for rank, d in enumerate(devices)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    finally:
        for p in procs:  # interrupted: do not leave generating children behind
            if p.is_alive():
                p.terminate()
                p.join()
    failed = [f"{d} (exit {p.exitcode})" for d, p in zip(devices, procs) if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"{name}: image generation failed on {', '.join(failed)}; its log is above. Images "
                           f"written so far are kept: rerun to finish")


@contextlib.contextmanager
def servers(exp: Experiment) -> Iterator[list[str]]:
    """One API server per device of ``vis_und_server_devices``, started together; all stopped on exit, whatever
    happened inside."""
    from tools.bench_server import ServerProcess

    flags: dict[str, Any] = {"max_batch_rows": exp.vis_und_max_batch_size, "served_model_name": exp.name,
                             "max_queue": max(64, 2 * exp.vis_und_api_nproc)}
    if exp.vis_und_threads:
        flags["threads"] = exp.vis_und_threads
    started: list[Any] = []
    try:
        for device in exp.vis_und_server_devices:
            started.append(ServerProcess(exp.model_path, wait=False, device=device, **flags))
        for server in started:
            server.wait(timeout_s=600.0)
        logger.info(f"{exp.name}: {len(started)} server(s) up: {', '.join(s.url for s in started)}")
        yield [s.url for s in started]
    finally:
        for server in started:
            server.close()
        if started:
            logger.info(f"{exp.name}: server(s) stopped")


def run_benchmark(name: str, exp: Experiment, out_root: Path, limit: int | None, models: Models) -> dict[str, Any]:
    """One benchmark of one experiment, driven by its kind."""
    out_dir = out_root / exp.name / name
    out_dir.mkdir(parents=True, exist_ok=True)
    bench = get_benchmark(name)(exp, out_dir, limit)
    t0 = time.perf_counter()
    if bench.kind == "t2i":
        generate_images(name, bench, exp, out_dir, limit, models)
        if getattr(bench, "needs_server", False) and not exp.dpg_bench_judge_url:
            with servers(exp) as urls:
                results = bench.score(urls)
        else:
            results = bench.score()
    elif bench.kind == "vqa" and bench.pending() == 0:  # a rerun: score the answers on disk, start no server
        logger.info(f"{exp.name} / {name}: every question is answered on disk; no server started")
        results = bench.run([])
    elif bench.kind == "vqa":
        with servers(exp) as urls:
            results = bench.run(urls)
    else:
        results = bench.run(models.get())
    logger.info(f"{exp.name} / {name}: done in {time.perf_counter() - t0:.1f} s: "
                + ", ".join(f"{k} {v:.4g}" for k, v in results.get("headline", {}).items()))
    return results


# ---------------------------------------------------------------------------------------------- summary
def collect_headlines(out_root: Path) -> list[dict[str, Any]]:
    """``[{experiment, benchmark, metric, value}]`` from every ``<out_root>/<exp>/<benchmark>/results.json``."""
    rows = []
    for path in sorted(out_root.glob("*/*/results.json")):
        try:
            headline = json.loads(path.read_text(encoding="utf-8")).get("headline") or {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid json ({e.msg}); delete it to score again") from e
        rows += [{"experiment": path.parent.parent.name, "benchmark": path.parent.name, "metric": k, "value": v}
                 for k, v in headline.items()]
    return rows


def write_summary(out_root: Path, rows: Sequence[dict[str, Any]]) -> dict[str, Path]:
    """``summary.csv`` (one row per number) and ``summary.md`` (per benchmark: experiments x metrics)."""
    from data_process.schema import atomic_write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["experiment", "benchmark", "metric", "value"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_root / "summary.csv", buf.getvalue())
    lines = ["# Evaluation summary", ""]
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        mine = [r for r in rows if r["benchmark"] == bench]
        metrics = list(dict.fromkeys(r["metric"] for r in mine))
        lines += [f"## {bench}", "", "| experiment | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
        for exp in dict.fromkeys(r["experiment"] for r in mine):
            values = {r["metric"]: r["value"] for r in mine if r["experiment"] == exp}
            lines.append(f"| {exp} | " + " | ".join(f"{values[m]:.4g}" if m in values else "-" for m in metrics)
                         + " |")
        lines.append("")
    atomic_write_text(out_root / "summary.md", "\n".join(lines))
    return {"csv": out_root / "summary.csv", "md": out_root / "summary.md"}


# ---------------------------------------------------------------------------------------------- entry point
def main(only: str | Sequence[str] | None = None, eval_type: str | Sequence[str] | None = None,
         limit: int | None = None, out_dir: str = "outputs/eval", exp_file: str | None = None,
         charts: bool = True, **overrides: Any) -> dict[str, Any]:
    """Run the selected experiments x benchmarks, then write the summary and charts.

    Args:
        only: experiment name(s) to run (``a,b``); default all of ``EXPERIMENTS``.
        eval_type: benchmark name(s) (``shapes,text``), replacing each selected experiment's ``eval_type``.
        limit: at most N items per benchmark (per tag and pair split for GenEval-style suites, documents per lm-eval
            task, questions per VQA set): a quick or CI run. Outputs go to the same folders; nothing is redone.
        out_dir: where results go (``<out_dir>/<experiment>/<benchmark>``).
        exp_file: another python file defining ``EXPERIMENTS`` (default ``evaluation/exp.py``).
        charts: draw ``<out_dir>/charts/<benchmark>.png``.
        overrides: any experiment key (``--model_path DIR``), applied to every selected experiment.
    """
    from uni_arch.log_setup import setup_logging

    setup_logging(0)
    try:
        experiments = load_experiments(exp_file, only, eval_type, **overrides)
    except ExperimentError as e:
        logger.error(str(e))
        sys.exit(EXIT_BAD_CONFIG)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        logger.error(f"--limit: must be a positive integer, got {limit!r}")
        sys.exit(EXIT_BAD_CONFIG)
    out_root = Path(out_dir)
    t0 = time.perf_counter()
    for exp in experiments:
        models = Models(exp)
        for name in exp.eval_type:
            run_benchmark(name, exp, out_root, limit, models)
    rows = collect_headlines(out_root)
    paths = write_summary(out_root, rows)
    if charts:
        from draw_pics.eval_charts import draw_charts

        paths["charts"] = draw_charts(paths["csv"], out_root / "charts")
    logger.info(f"evaluation finished in {time.perf_counter() - t0:.1f} s; summary: {paths['md']}\n"
                + paths["md"].read_text(encoding="utf-8"))
    return {k: str(v) for k, v in paths.items()}


def usage() -> str:
    """``--help``: fire cannot show it for a ``**overrides`` signature (it would take ``help`` as an override)."""
    from dataclasses import fields

    from evaluation.exp import Experiment

    keys = ", ".join(sorted(f.name for f in fields(Experiment)))
    return (f"python evaluation/eval_template.py [--only NAME[,NAME]] [--eval_type TYPE[,TYPE]] [--limit N] "
            f"[--out_dir DIR] [--exp_file FILE] [--charts false] [--<experiment key> VALUE ...]\n\n{main.__doc__}\n"
            f"    Experiment keys (evaluation/exp.py): {keys}\n")


if __name__ == "__main__":
    if {"--help", "-h"} & set(sys.argv[1:]):
        print(usage())
        sys.exit(0)
    import fire

    fire.Fire(main, serialize=lambda _: None)  # the summary is logged; do not print the return value
