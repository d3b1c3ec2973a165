"""The orchestrator's adapters for the public benchmarks: an experiment's settings -> the benchmark modules' calls.

Each class only reads its files, calls :mod:`.geneval`, :mod:`.dpg_bench`, :mod:`.vis_und` or :mod:`.text` and adds
the settings and a ``headline`` to ``results.json``; the rules live in those modules. Kinds and the methods the
orchestrator calls are described in ``evaluation/benchmarks/__init__.py``.
"""

from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path
from typing import Any, Sequence

from data_process.schema import atomic_write_text
from evaluation.exp import Experiment, checkpoint_hash


def server_ask_fn(base_urls: Sequence[str], model: str, max_tokens: int) -> Any:
    """A ``vis_und`` ask function (``openai_ask_fn``) spread over the servers round-robin (one per device)."""
    from evaluation.benchmarks.vis_und import openai_ask_fn

    return round_robin([openai_ask_fn(url, model, max_tokens=max_tokens) for url in base_urls])


def pending(items: Sequence[Any], answers_path: Path) -> int:
    """How many ``items`` have no reply in ``answers_path`` yet (``vis_und.run_vqa``'s resumable answers file):
    with none, the orchestrator starts no server."""
    from data_process.schema import read_jsonl_log

    done = {str(rec.get("index")) for rec in read_jsonl_log(answers_path)} if answers_path.is_file() else set()
    return sum(str(it.index) not in done for it in items)


def round_robin(asks: Sequence[Any]) -> Any:
    """One ask function that hands successive calls to ``asks`` in turn (thread-safe). With no server at all (every
    question already answered) it refuses to be called."""
    if not asks:
        def no_server(*args: Any, **kwargs: Any) -> str:
            raise RuntimeError("no server was started: every question was answered on disk")
        return no_server
    if len(asks) == 1:
        return asks[0]
    turn, lock = itertools.cycle(range(len(asks))), threading.Lock()

    def ask(image: Any, prompt: str, options: dict[str, str] | None = None) -> str:
        with lock:
            k = next(turn)
        return asks[k](image, prompt, options)

    return ask


def t2i_generate_fn(infer: Any, exp: Experiment):
    """``generate_fn(prompts, n, numbers)`` for the GenEval/DPG modules: the experiment's CFG, sampling and seed;
    image ``i`` of prompt number ``p`` is seeded ``exp.seed + p * n + i`` (``evaluation.exp.SEEDS_RULE``): two prompts with
    the same text (the shapes suite has some) get different images, and a prompt's images do not depend on the
    batch, the device shard or an earlier interrupted run."""
    sampling = exp.sampling()

    def draw(prompts: list[str], n: int, numbers: list[int]) -> list[list[Any]]:
        seeds = [exp.seed + p * n for p in numbers]
        out = infer.generate_images(prompts, n, seed=seeds, cfg_scale=exp.cfg, sampling=sampling)
        return [[g.image for g in imgs] for imgs in out]

    return draw


def _finish(out: Path, results: dict[str, Any], headline: dict[str, float], settings: dict[str, Any]) -> dict:
    results = {**results, "headline": headline, "settings": {**results.get("settings", {}), **settings}}
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    return results


class GenEvalBenchmark:
    """GenEval: the official metadata, layout and rules (``geneval.py``); ``--limit N``: N prompts per tag."""

    kind = "t2i"

    def __init__(self, experiment: Experiment, out_dir: str | Path, limit: int | None = None):
        from evaluation.benchmarks import geneval

        self.exp, self.out, self.limit = experiment, Path(out_dir), limit
        self.metadata = geneval.load_metadata(experiment.geneval_prompts_path)
        taken: dict[str, int] = {}
        self.indices = []
        for i, meta in enumerate(self.metadata):
            if limit is None or taken.get(meta["tag"], 0) < limit:
                taken[meta["tag"]] = taken.get(meta["tag"], 0) + 1
                self.indices.append(i)

    def pending(self) -> int:
        from evaluation.benchmarks import geneval

        return len(set(geneval.missing_samples(self.out, self.metadata, self.exp.n_samples)) & set(self.indices))

    def generate(self, infer: Any, rank: int = 0, world: int = 1) -> int:
        from evaluation.benchmarks import geneval

        return len(geneval.generate(t2i_generate_fn(infer, self.exp), self.metadata, self.out, self.exp.n_samples,
                                    self.exp.t2i_batch_prompts, indices=self.indices[rank::world]))

    def score(self) -> dict[str, Any]:
        from evaluation.benchmarks import geneval

        scorer = geneval.GenEvalScorer.from_paths(self.exp.geneval_detector_path, self.exp.geneval_clip_path)
        summary = geneval.score_folder(self.out, scorer)
        headline = {"overall": summary["overall"], **{t: s["accuracy"] for t, s in summary["tags"].items()}}
        return _finish(self.out, summary, headline, {**self.exp.t2i_settings(), "limit": self.limit,
                                                     "prompts_path": str(self.exp.geneval_prompts_path)})


class DPGBenchmark:
    """DPG-Bench: 2x2 grids, then every question asked of the judge (``dpg_bench.py``); ``--limit N``: N prompts.

    The judge is ``dpg_bench_judge_url`` / ``dpg_bench_judge_model``; without a URL the orchestrator serves this
    experiment's own checkpoint and passes its address to :meth:`score`."""

    kind = "t2i"
    needs_server = True  # when no judge URL is given: the orchestrator starts this checkpoint's server for scoring

    def __init__(self, experiment: Experiment, out_dir: str | Path, limit: int | None = None):
        from evaluation.benchmarks import dpg_bench

        self.exp, self.out, self.limit = experiment, Path(out_dir), limit
        prompts = dpg_bench.load_prompts(experiment.dpg_bench_prompts_path)
        self.questions = dpg_bench.load_questions(experiment.dpg_bench_questions_path)
        ids = sorted((k for k in prompts if k in self.questions), key=dpg_bench.item_order)
        self.item_ids = ids[:limit] if limit is not None else ids
        self.prompts = {k: prompts[k] for k in self.item_ids}

    def pending(self) -> int:
        from evaluation.benchmarks import dpg_bench

        return sum(not dpg_bench.grid_path(self.out, k).is_file() for k in self.item_ids)

    def generate(self, infer: Any, rank: int = 0, world: int = 1) -> int:
        from evaluation.benchmarks import dpg_bench

        mine = {k: self.prompts[k] for k in self.item_ids[rank::world]}
        return len(dpg_bench.generate(t2i_generate_fn(infer, self.exp), mine, self.out, self.exp.t2i_batch_prompts))

    def score(self, base_urls: Sequence[str] = ()) -> dict[str, Any]:
        from evaluation.benchmarks import dpg_bench

        url = self.exp.dpg_bench_judge_url or (base_urls[0] if base_urls else None)
        if url is None:
            raise ValueError(f"experiment {self.exp.name!r}: dpg_bench_judge_url: no judge (and no server started)")
        model = self.exp.dpg_bench_judge_model or self.exp.name
        judge, info = dpg_bench.openai_judge(url, model)
        summary = dpg_bench.score_folder(self.out, self.questions, judge, item_ids=self.item_ids,
                                         parallel=self.exp.vis_und_api_nproc, judge_info=info)
        headline = {"overall": summary["overall"]}
        return _finish(self.out, summary, headline, {**self.exp.t2i_settings(), "limit": self.limit})


class VisUndBenchmark:
    """MME / POPE / MMBench from VLMEvalKit TSVs through the servers (``vis_und.py``); ``--limit N``: N rows each.
    Each benchmark writes ``<out>/<benchmark>/``; ``<out>/results.json`` gathers their headlines."""

    kind = "vqa"

    def __init__(self, experiment: Experiment, out_dir: str | Path, limit: int | None = None):
        from evaluation.benchmarks.vis_und import load_tsv

        self.exp, self.out, self.limit = experiment, Path(out_dir), limit
        self.items = {b: load_tsv(p, b)[:limit] if limit is not None else load_tsv(p, b)
                      for b, p in experiment.vis_und_data.items()}

    def pending(self) -> int:
        return sum(pending(items, self.out / bench / "answers.jsonl") for bench, items in self.items.items())

    def run(self, base_urls: Sequence[str]) -> dict[str, Any]:
        from evaluation.benchmarks.vis_und import run_vqa

        ask = server_ask_fn(base_urls, self.exp.name, self.exp.vis_und_max_tokens)
        settings = {"servers": list(base_urls), "model": self.exp.name, "max_tokens": self.exp.vis_und_max_tokens,
                    "sampling": "greedy (temperature 0)", "checkpoint": str(Path(self.exp.model_path).resolve()),
                    "checkpoint_sha256": checkpoint_hash(self.exp.model_path), "limit": self.limit}
        headline: dict[str, float] = {}
        per: dict[str, Any] = {}
        for bench, items in self.items.items():
            res = run_vqa(items, ask, self.out / bench, parallel=self.exp.vis_und_api_nproc, settings=settings)
            m = per[bench] = res["metrics"]
            if bench == "mme":
                headline.update(mme_perception=m["perception"], mme_cognition=m["cognition"])
            elif bench == "pope":
                headline.update(pope_accuracy=m["overall"]["accuracy"], pope_f1=m["overall"]["f1"])
            else:
                headline.update(mmbench_circular=m["circular"])
        return _finish(self.out, {"benchmark": "vis_und", "metrics": per}, headline, settings)


class TextBenchmark:
    """lm-eval in process on the loaded model (``text.py``); ``--limit N``: N documents per task."""

    kind = "text"

    def __init__(self, experiment: Experiment, out_dir: str | Path, limit: int | None = None):
        self.exp, self.out, self.limit = experiment, Path(out_dir), limit

    def run(self, infer: Any) -> dict[str, Any]:
        from evaluation.benchmarks.text import run_text

        pipe = infer.pipe
        settings = {"checkpoint": str(Path(self.exp.model_path).resolve()),
                    "checkpoint_sha256": checkpoint_hash(self.exp.model_path)}
        results = run_text(pipe.model, pipe.tokenizer, pipe.code_vocab, tasks=self.exp.text_tasks, out_dir=self.out,
                           limit=self.limit, num_fewshot=self.exp.text_num_fewshot,
                           batch_size=self.exp.text_batch_size, settings=settings)
        headline = {}
        for task, metrics in results["results"].items():
            for key, value in metrics.items():
                name = key.split(",")[0]  # lm-eval's "acc,none" -> "acc"
                if isinstance(value, float) and "stderr" not in name:  # not alias, sample_len
                    headline[f"{task}_{name}"] = float(value)
        return _finish(self.out, results, headline, settings)
