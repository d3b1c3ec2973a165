"""Data-pipeline benchmark (``python tools/bench.py data``): start-up and memory against corpus size, loader speed.

Writes a synthetic corpus of ``records`` records in the toolkit's record format (half ``text`` documents of 20-200
words, half ``image_text`` captions with 256-code images, 16x16 of 512 codes) into a temporary directory, in files
of at most ``records_per_file``, then measures:

1. **Time to the first training batch and peak RSS of a rank**, each case in a fresh spawned process (the rank):
   the entry point's own ``make_trainer`` (tokenizer, data, tiny model ``configs/model/tiny_uni_x.json``, Trainer)
   and the first batch of ``trainer.get_train_dataloader()``. Time counts from the process's creation (imports
   included, the same for both); memory is the process's peak RSS (``VmHWM``); row utilisation is real tokens
   over row capacity (old: the whole epoch packed at once; new: its first four windows of ``packing_buffer``
   samples, packed on the fly). Cases: ``old`` -- the map-style
   path (every record validated, rendered and packed into RAM before step 1); ``new`` -- ``--data_cache_dir`` on a
   cache prepared beforehand (``prepare`` row: ``uni_arch.train.prepare_data``'s work, once per corpus, with
   ``prepare_num_proc`` processes). ``old`` runs up to ``old_max_records``; above it the row says what it would
   need, extrapolated from the largest size it ran (its memory grows linearly with the records).
2. **Loader throughput against consumption**: packed rows/s of the lazy stream with ``workers`` worker processes
   (``LazyRowStream.rank_rows``, after a warm-up) against the rows/s of a training step of the tiny model
   (forward, backward, AdamW step of one packed row of ``seq_len``; ``threads`` torch threads), both on this
   machine one after the other.

Prints markdown tables. On a shared 2-core machine timings are noisy; the memory figures are not.

Measured (2026-12-01, 2 cores, ``--sizes 200000`` then ``--sizes 2000000 --previous``): the new path reaches its
first batch in 7.7 s / 8.0 s at 200k / 2M records, with 369 / 370 MiB private memory. Peak RSS is 682 / 1,033 MiB;
the rest is mapped shard pages, i.e. page cache. The old path needs 119.5 s and 2,668 MiB at 200k, and ~20 GiB at
2M, so it was not run there. The loader is 39x the tiny model's consumption.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from loguru import logger

ROOT = Path(__file__).resolve().parents[1]
MODEL_CONFIG = "configs/model/tiny_uni_x.json"
GRID, CODEBOOK = (16, 16), 512


# ------------------------------------------------------------------------------------------ corpus
def _record_pool(seed: int, size: int = 64) -> list[str]:
    """Record json lines with an ``{id}`` placeholder: half text documents, half 256-code image captions."""
    from data_process.schema import ImageCodes, Record
    from uni_arch.train.synthetic import COLOURS, SHAPES, _document

    rng = random.Random(seed)
    pool = []
    for k in range(size):
        if k % 2:
            codes = [rng.randrange(CODEBOOK) for _ in range(GRID[0] * GRID[1])]
            caption = f"a {rng.choice(COLOURS)} {rng.choice(SHAPES)}. {_document(rng, rng.randint(4, 16))}"
            rec = Record(id="ID", type="image_text", text=caption, images=[ImageCodes(codes, GRID, "synthetic@0")])
        else:
            rec = Record(id="ID", type="text", text=_document(rng, rng.randint(20, 200)))
        pool.append(rec.to_json().replace('"id":"ID"', '"id":"{id}"', 1))
    return pool


def write_corpus(root: Path, records: int, records_per_file: int, seed: int = 0) -> Path:
    """``records`` jsonl records in ``ceil(records / records_per_file)`` files under ``root/records``."""
    pool = _record_pool(seed)
    out = root / "records"
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for f in range(math.ceil(records / records_per_file)):
        lo, hi = f * records_per_file, min(records, (f + 1) * records_per_file)
        with open(out / f"part-{f:05d}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(rng.choice(pool).replace("{id}", f"r{i:09d}", 1) + "\n" for i in range(lo, hi))
    return out


def _train_argv(data: Path, tokenizer: Path, out: Path, seq_len: int, cache: Path | None) -> list[str]:
    argv = ["--data_path", str(data), "--tokenizer_path", str(tokenizer), "--image_level_sizes", str(CODEBOOK),
            "--model_config", str(ROOT / MODEL_CONFIG), "--output_dir", str(out), "--use_cpu", "true",
            "--max_steps", "100", "--model_max_length", str(seq_len), "--report_to", "none",
            "--save_strategy", "no", "--write_loss_curves", "false", "--use_data_packing", "2"]
    return argv + (["--data_cache_dir", str(cache)] if cache else [])


# ------------------------------------------------------------------------------------------ children
def _status_mib(*keys: str) -> dict[str, float]:
    """Fields of /proc/self/status in MiB: ``VmHWM`` is the peak RSS; ``RssAnon`` (private memory: what the rank
    allocated) and ``RssFile`` (pages of mapped files: the arrow shards and the libraries) split the current RSS."""
    with open("/proc/self/status") as f:
        fields = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in f if line.split(":")[0] in keys}
    return fields


def _peak_rss_mib() -> float:
    return _status_mib("VmHWM")["VmHWM"]


def _first_batch_child(argv: list[str], throughput: dict | None = None) -> dict:
    """A fresh rank: build everything as the entry point does and draw the first training batch; then, its peak
    RSS taken, optionally the throughput measurement (:func:`_throughput`) on the same trainer."""
    import psutil
    import torch

    from uni_arch.log_setup import setup_logging
    from uni_arch.train.args import parse_args
    from uni_arch.train.hf_trainer import make_trainer

    torch.set_num_threads(1)
    setup_logging(0, "WARNING")
    trainer = make_trainer(*parse_args(argv))
    batch = next(iter(trainer.get_train_dataloader()))
    mem = _status_mib("VmHWM", "RssAnon", "RssFile")
    out = {"seconds": time.time() - psutil.Process().create_time(), "peak_rss_mib": mem["VmHWM"],
           "anon_rss_mib": mem["RssAnon"], "file_rss_mib": mem["RssFile"], "batch_tokens": int(batch["input_ids"].numel())}
    # packed-row utilisation (after the peak RSS is taken): the old path's whole-epoch packing, the new path's
    # bounded windows (the first four)
    stream = getattr(trainer.train_dataset, "lazy_stream", None)
    rows = trainer.train_dataset.rows if stream is None else [r for j in range(4) for r in stream.window_rows(j)]
    capacity = int(argv[argv.index("--model_max_length") + 1])
    out["utilisation"] = sum(len(r["input_ids"]) for r in rows) / (len(rows) * capacity)
    if throughput is not None:
        out["throughput"] = _throughput(trainer, **throughput)
    return out


def _prepare_child(argv: list[str], num_proc: int) -> dict:
    import psutil

    from uni_arch.log_setup import setup_logging
    from uni_arch.train import prepare_data
    from uni_arch.train.args import parse_args

    setup_logging(0, "WARNING")
    counts = prepare_data.main(*parse_args(argv + ["--prepare_num_proc", str(num_proc)]))
    return {"seconds": time.time() - psutil.Process().create_time(), "peak_rss_mib": _peak_rss_mib(),
            "records": sum(counts["sources"].values())}


def _throughput(trainer, workers: int, windows: int, steps: int, threads: int) -> dict:
    """Loader rows/s of the trainer's lazy stream with ``workers`` processes over ``windows`` whole windows (after
    the first, which starts the workers), then the rows/s of training steps of its model on rows of that stream."""
    import torch

    from uni_arch.train.data_collator import META_KEYS
    from uni_arch.train.trainer import modality_losses

    torch.set_num_threads(threads)
    stream = trainer.train_dataset.lazy_stream
    it = iter(stream.window_loader(0, 1, workers, windows=windows + 1))  # the loader of LazyRowStream.rank_rows
    rows = list(next(it))  # workers started, first window rendered
    start = time.perf_counter()
    timed = [row for window in it for row in window]
    loader_rows_s = len(timed) / (time.perf_counter() - start)
    del it
    model = trainer.model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times, cpu = [], []
    for k, row in enumerate((rows + timed)[: steps + 1]):
        batch = trainer.data_collator([row])
        t, c = time.perf_counter(), time.process_time()
        labels = batch.pop("labels")
        for key in META_KEYS:
            batch.pop(key)
        parts = modality_losses(model(**batch, use_cache=False).logits, labels, trainer.code_vocab)
        (parts["loss_sum"] / parts["num_targets"]).backward()
        optim.step()
        optim.zero_grad()
        if k:  # the first step warms the kernels and the allocator
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    step_rows_s = len(times) / sum(times)
    return {"loader_rows_s": loader_rows_s, "train_rows_s": step_rows_s, "ratio": loader_rows_s / step_rows_s,
            "train_cpu_s_per_row": sum(cpu) / len(cpu), "rows": len(timed), "windows": windows, "steps": len(times),
            "workers": workers, "threads": threads,
            "utilisation": sum(len(r["input_ids"]) for r in timed) / (len(timed) * stream.seq_len)}


def _in_child(fn, *args) -> dict:
    """Run ``fn`` in a fresh spawned process (its own peak RSS); a death (OOM killer) is reported, not raised."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        try:
            return pool.submit(fn, *args).result()
        except concurrent.futures.process.BrokenProcessPool:
            return {"skipped": "the process died (out of memory?)"}


# ------------------------------------------------------------------------------------------- report
def _tables(results: list[dict], throughput: dict | None) -> str:
    lines = [f"load average {os.getloadavg()[0]:.2f} (a shared machine stretches the times, not the memory)", "",
             "| records | pipeline | time to first batch (s) | peak RSS per rank (MiB) | of it private / mapped files "
             "(MiB) | row utilisation | note |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for case in ("prepare", "old", "new"):
            c = r.get(case)
            if c is None:
                continue
            name = {"prepare": "prepare once (new)", "old": "old: map-style", "new": "new: data_cache_dir"}[case]
            if "skipped" in c:
                lines.append(f"| {r['records']:,} | {name} | - | - | - | - | {c['skipped']} |")
                continue
            note = f"{c['records']:,} records, {c['num_proc']} process(es)" if case == "prepare" else (
                f"median of {len(c['repeats'])} ranks: {', '.join(f'{t:.1f}' for t in c['repeats'])} s" if "repeats" in c else "")
            util = f"{c['utilisation']:.4f}" if "utilisation" in c else ""
            split = f"{c['anon_rss_mib']:.0f} / {c['file_rss_mib']:.0f}" if "anon_rss_mib" in c else ""
            lines.append(f"| {r['records']:,} | {name} | {c['seconds']:.1f} | {c['peak_rss_mib']:.0f} | {split} | {util} "
                         f"| {note} |")
    news = [r["new"] for r in results if "skipped" not in r.get("new", {"skipped": 1})]
    if len(news) > 1:
        a, b = news[0], news[-1]
        private = (f", private memory x{b['anon_rss_mib'] / a['anon_rss_mib']:.2f}" if "anon_rss_mib" in a and
                   "anon_rss_mib" in b else "")
        lines.append(f"\nnew path, largest / smallest corpus: time x{b['seconds'] / a['seconds']:.2f}, "
                     f"peak RSS x{b['peak_rss_mib'] / a['peak_rss_mib']:.2f}{private} (goal: within 1.2). Mapped-file "
                     "pages are the shard pages the first window's random reads (and the kernel's read-ahead) touched: "
                     "page cache, shared by the ranks of a node and dropped under memory pressure")
    if throughput and "skipped" not in throughput:
        t = throughput
        lines += ["", "| loader workers | packed rows/s (loader) | rows/s of a tiny-model train step | loader / model "
                  "| row utilisation |", "|---|---|---|---|---|",
                  f"| {t['workers']} | {t['loader_rows_s']:.1f} | {t['train_rows_s']:.2f} ({t['threads']} thread(s)) "
                  f"| {t['ratio']:.1f}x | {t['utilisation']:.4f} |",
                  f"\n({t['rows']} rows of {t['windows']} windows timed; a train step took {t['train_cpu_s_per_row']:.2f} "
                  "CPU-s per row)"]
    return "\n".join(lines)


def main(records: int = 2000, sizes: str | None = None, cases: str = "old,new", old_max_records: int = 400_000,
         records_per_file: int = 50_000, prepare_num_proc: int = 2, seq_len: int = 2048, throughput: bool = True,
         workers: int = 2, windows: int = 4, steps: int = 3, threads: int = 2, json_out: str | None = None,
         previous: str | None = None, repeats: int = 3) -> None:
    """Measure (see the module docstring) and print the tables.

    Args:
        records: corpus size when ``sizes`` is not given (the small default runs in seconds).
        sizes: comma-separated corpus sizes, e.g. ``200000,2000000`` (issue 13's figures).
        cases: comma-separated subset of ``old`` and ``new``.
        old_max_records: the largest corpus the old path is run on (memory grows with it).
        records_per_file: records per jsonl file of the synthetic corpus.
        prepare_num_proc: processes that prepare the cache.
        seq_len: packed row length (``model_max_length``).
        throughput: also measure loader rows/s against the tiny model's consumption (on the largest corpus).
        workers: loader worker processes of the throughput measurement.
        windows: windows (``packing_buffer`` samples each) timed in the loader measurement.
        steps: timed training steps of the tiny model.
        threads: torch threads of the tiny model's steps.
        json_out: also write the results as json here.
        previous: the ``json_out`` of an earlier run (e.g. ``--sizes 200000``) whose rows come first in the table and
            whose old-path measurement the estimate above ``old_max_records`` starts from (two runs of a few
            minutes each instead of one long one).
        repeats: fresh ranks timed on the new path per corpus size; the table shows the median.
    """
    from uni_arch.log_setup import setup_logging
    from uni_arch.train.synthetic import write_tokenizer

    setup_logging(0, "WARNING")
    # fire hands "a,b" over as a tuple, a single value as a number or a string
    counts = [int(x) for x in (sizes if isinstance(sizes, (list, tuple)) else str(sizes).split(","))] if sizes \
        else [int(records)]
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    names = {str(c).strip() for c in (cases if isinstance(cases, (list, tuple)) else str(cases).split(",")) if str(c).strip()}
    if names - {"old", "new"}:
        raise ValueError(f"cases: unknown {sorted(names - {'old', 'new'})}; known: old, new")
    results, throughput_result, old_per_record = [], None, None
    if previous:
        results = json.loads(Path(previous).read_text(encoding="utf-8"))["results"]
        old_per_record = next((_old_reference(r) for r in reversed(results) if _old_reference(r)), None)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tmp = Path(tmp)
        tokenizer = tmp / "tokenizer"
        write_tokenizer(tokenizer)
        for n in counts:
            root = tmp / f"n{n}"
            started = time.perf_counter()
            data = write_corpus(root, n, records_per_file)
            logger.warning(f"{n:,} records written in {time.perf_counter() - started:.1f} s")
            row: dict = {"records": n}
            cache = root / "cache"
            if "new" in names:
                row["prepare"] = _in_child(_prepare_child, _train_argv(data, tokenizer, root / "p", seq_len, cache),
                                           prepare_num_proc) | {"num_proc": prepare_num_proc}
                measure = dict(workers=workers, windows=windows, steps=steps, threads=threads)
                argv = _train_argv(data, tokenizer, root / "n", seq_len, cache)
                # a few seconds, most of them imports: the median of `repeats` fresh ranks, so that noise of a
                # second or two on a shared machine does not read as growth with the corpus
                runs = [_in_child(_first_batch_child, argv, None) for _ in range(repeats - 1)]
                runs.append(_in_child(_first_batch_child, argv, measure if throughput and n == counts[-1] else None))
                throughput_result = runs[-1].pop("throughput", throughput_result)
                timed = sorted((r for r in runs if "seconds" in r), key=lambda r: r["seconds"])
                row["new"] = (timed[len(timed) // 2] | {"repeats": [round(r["seconds"], 2) for r in timed]}) if timed \
                    else runs[-1]
                logger.warning(f"{n:,}: prepare {row['prepare']}, new {row['new']}")
            if "old" in names:
                if n <= old_max_records:
                    row["old"] = _in_child(_first_batch_child, _train_argv(data, tokenizer, root / "o", seq_len, None))
                    old_per_record = _old_reference(row) or old_per_record
                    logger.warning(f"{n:,}: old {row['old']}")
                else:
                    row["old"] = {"skipped": _old_estimate(old_per_record, n, old_max_records)}
            results.append(row)
            if n != counts[-1]:
                shutil.rmtree(root, ignore_errors=True)  # disk: the next corpus is 10x larger
    print(_tables(results, throughput_result))  # the table is this tool's output
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps({"results": results, "throughput": throughput_result,
                                              "loadavg": os.getloadavg()}, indent=2))


def _old_reference(row: dict) -> tuple[float, float, int, float] | None:
    """(peak RSS, seconds, records, the new path's RSS: what does not grow with the corpus) of a measured old row."""
    old = row.get("old", {})
    if "peak_rss_mib" not in old:
        return None
    return old["peak_rss_mib"], old["seconds"], row["records"], row.get("new", {}).get("peak_rss_mib", 0.0)


def _old_estimate(measured: tuple[float, float, int, float] | None, n: int, cap: int) -> str:
    """Why the old path is not run at ``n`` records, with what it would need: its growth over the new path's
    memory (the part that does not depend on the corpus) scaled linearly from the largest size it ran."""
    if measured is None:
        return f"not run above old_max_records={cap:,}"
    rss, seconds, at, base = measured
    need = base + (rss - base) * n / at
    return (f"not run (old_max_records={cap:,}): it holds every record and rendered sample in RAM; linear from "
            f"{at:,} records it would need ~{need / 1024:.1f} GiB and ~{seconds * n / at:.0f} s per rank before step 1")
