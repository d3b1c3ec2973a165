"""Model-level CPU benchmark: forward+backward tokens/s and peak memory (``python tools/bench.py model``).

Two tables from one command:

1. **Variants at equal active parameters**: dense, Uni-X, MoT and MoE built with the same widths, so every token
   runs exactly the same number of parameters (one branch per token); only totals differ. One packed row of
   ``seq_len`` tokens mixing text and image documents, ``uni_x_packed`` attention. Reports tokens/s and the ratio to
   dense measured in the same run (the Uni-X target: at most 10% slower than dense).
2. **Packed vs padded** (dense model, the same documents: text of mixed lengths and ~1,000-token image documents):
   one packed row per bin with ``cu_seq_lens`` and ``uni_x_packed``; the same documents as padded batches (sdpa with
   the padding mask); and transformers' ``DataCollatorWithFlattening`` rows on the stock ``Qwen2ForCausalLM`` (sdpa
   with the block mask transformers builds from ``position_ids``). Reports REAL (non-padding) tokens/s.

Method: ``torch.set_num_threads(threads)``; each case gets ``warmup`` untimed iterations, then the cases of a table
are timed round-robin (``repeats`` rounds, so that load spikes on a shared machine hit every case alike) and the
median iteration time is reported. Memory: each case runs one iteration in a fresh spawned process, and its
peak resident set size (Linux ``VmHWM``, reset after set-up) minus its RSS after the model and inputs were built is
reported: the extra memory of a training iteration (activations, gradients).
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import random
import resource
import statistics
import time
from typing import Callable

from loguru import logger

TEXT_VOCAB = 1024
NUM_CODES = 4096
VISION_START, VISION_END = 3, 4
IMAGE_TOKENS = 1000


def _documents(total: int, seed: int, max_len: int) -> list[list[int]]:
    """Mixed documents: 70% text (16..400 tokens, skewed short), 20% images (start + 998 codes + end = 1,000
    tokens), 10% caption + image."""
    rng = random.Random(seed)

    def text(n):
        return [rng.randrange(16, TEXT_VOCAB) for _ in range(n)]

    def image(n):
        return [VISION_START] + [TEXT_VOCAB + rng.randrange(NUM_CODES) for _ in range(n - 2)] + [VISION_END]

    docs, used = [], 0
    while used < total:
        kind = rng.random()
        if kind < 0.7:
            doc = text(int(16 * 25 ** rng.random()))  # log-uniform in [16, 400)
        elif kind < 0.9:
            doc = image(IMAGE_TOKENS)
        else:
            doc = text(rng.randint(10, 60)) + image(IMAGE_TOKENS)
        doc = doc[:min(max_len, total - used)]  # the last document is cut so that exactly `total` tokens result
        docs.append(doc)
        used += len(doc)
    return docs


def _pack_first_fit(docs: list[list[int]], seq_len: int) -> list[list[list[int]]]:
    """First-fit decreasing bins of whole documents (the benchmark's stand-in for the SFT packer)."""
    bins: list[list[list[int]]] = []
    for doc in sorted(docs, key=len, reverse=True):
        for b in bins:
            if sum(map(len, b)) + len(doc) <= seq_len:
                b.append(doc)
                break
        else:
            bins.append([doc])
    return bins


def _config(variant: str, hidden: int, layers: int):
    from modeling import UniXConfig

    extra = {"uni_x": dict(vision_encode_layers=layers // 3, vision_decode_layers=layers // 3),
             "moe": dict(moe_every_k=2)}.get(variant, {})
    return UniXConfig(
        variant=variant, vocab_size=TEXT_VOCAB + NUM_CODES, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 128, 1),
        image_offset=TEXT_VOCAB, image_level_sizes=[NUM_CODES], vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, max_position_embeddings=4096, **extra,
    )


def _packed_batch(row: list[list[int]]):
    import torch

    lengths = [len(d) for d in row]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    ids = torch.tensor([sum(row, [])])
    return dict(input_ids=ids, labels=ids, position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
                cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths),
                use_cache=False)


def _padded_batches(docs: list[list[int]], batch_size: int):
    import torch

    from modeling.vocab import IGNORE_INDEX

    batches = []
    for i in range(0, len(docs), batch_size):
        group = docs[i:i + batch_size]
        width = max(map(len, group))
        ids = torch.tensor([d + [0] * (width - len(d)) for d in group])
        mask = torch.tensor([[1] * len(d) + [0] * (width - len(d)) for d in group])
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        batches.append(dict(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False))
    return batches


def _flattened_batches(bins: list[list[list[int]]]):
    from transformers import DataCollatorWithFlattening

    collator = DataCollatorWithFlattening()
    out = []
    for row in bins:
        batch = collator([{"input_ids": d} for d in row])
        batch.pop("attention_mask", None)
        out.append(dict(batch, use_cache=False))
    return out


def _build_case(case: dict):
    """Model (train mode), batches and real-token count of one case."""
    import torch

    torch.manual_seed(0)
    from modeling import build_model

    config = _config(case["variant"], case["hidden"], case["layers"])
    if case["mode"] == "flattening":
        from transformers import Qwen2ForCausalLM

        model = Qwen2ForCausalLM(_qwen2_config(config))
        model.set_attn_implementation("sdpa")
    else:
        model = build_model(config, attn_implementation="sdpa" if case["mode"] == "padded" else "uni_x_packed")
    model.train()
    docs = _documents(case["tokens"], case["seed"], case["seq_len"])
    bins = _pack_first_fit(docs, case["seq_len"])
    if case["mode"] == "packed":
        batches = [_packed_batch(row) for row in bins]
    elif case["mode"] == "padded":
        random.Random(case["seed"]).shuffle(docs)
        batches = _padded_batches(docs, case["batch_size"])
    else:
        batches = _flattened_batches(bins)
    return model, batches, sum(map(len, docs))


def _step(model, batches) -> None:
    for batch in batches:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)


def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (Linux), or None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_growth_mib(step: Callable[[], object]) -> float:
    """MiB of peak RSS that ``step()`` adds over the RSS before it: call it in a fresh process, after set-up.

    Linux: the peak is ``VmHWM``, reset to the current RSS through ``/proc/self/clear_refs`` (``ru_maxrss`` would
    be wrong here: it survives ``exec`` and so starts at the parent's peak). Elsewhere: ``ru_maxrss``.
    """
    base = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS watermark to the current RSS
        linux = base is not None
    except OSError:
        linux = False
    if not linux:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    peak = _status_kib("VmHWM") if linux else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round((peak - base) / 1024, 1)


def _peak_memory_child(case: dict) -> float:
    """Child process: MiB of peak RSS added by one training iteration over the post-setup RSS."""
    import torch

    torch.set_num_threads(case["threads"])
    model, batches, _ = _build_case(case)
    return peak_rss_growth_mib(lambda: _step(model, batches))


def _run_all(cases: list[dict], warmup: int, repeats: int, threads: int) -> list[dict]:
    """Time every case round-robin in this process (load spikes on a shared machine hit all cases alike), then
    measure each case's memory in a fresh spawned process (peak RSS is per process)."""
    import torch

    ctx = multiprocessing.get_context("spawn")
    peaks = []
    for case in cases:  # first, while this process is still small
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            peaks.append(pool.submit(_peak_memory_child, case).result())
    torch.set_num_threads(threads)
    built = [_build_case(case) for case in cases]
    for model, batches, _ in built:
        for _ in range(warmup):
            _step(model, batches)
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(repeats):
        for i, (model, batches, _) in enumerate(built):
            start = time.perf_counter()
            _step(model, batches)
            times[i].append(time.perf_counter() - start)
    results = []
    for case, (model, batches, real_tokens), t, peak in zip(cases, built, times, peaks):
        n_params = sum(p.numel() for p in model.parameters())
        vision = sum(p.numel() for n, p in model.named_parameters() if ".vision." in n or ".vision_mlp." in n)
        median = statistics.median(t)
        result = dict(
            case=case["name"], real_tokens=real_tokens, seconds_median=round(median, 3),
            tokens_per_s=round(real_tokens / median, 1), tokens_per_s_best=round(real_tokens / min(t), 1),
            times=[round(x, 3) for x in t],
            peak_rss_delta_mb=peak, total_params=n_params, active_params_per_token=n_params - vision,
            rows=len(batches), padded_tokens=sum(int(b["input_ids"].numel()) for b in batches),
        )
        logger.info("{case}: {tokens_per_s} tok/s (times {times}), +{peak_rss_delta_mb} MiB", **result)
        results.append(result)
    return results


def _qwen2_config(config):
    from transformers import Qwen2Config

    d = {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "max_position_embeddings")}
    return Qwen2Config(**d)


def _table(title: str, rows: list[dict], reference: str) -> str:
    ref_row = next(r for r in rows if r["case"] == reference)
    ref, ref_best = ref_row["tokens_per_s"], ref_row["tokens_per_s_best"]
    lines = [title, f"{'case':<14}{'tok/s':>8}{'vs ' + reference:>10}{'best tok/s':>12}{'best vs':>9}{'peak MiB':>10}"
                    f"{'active':>12}{'total':>12}{'rows':>6}{'slots':>8}"]
    for r in rows:
        lines.append(f"{r['case']:<14}{r['tokens_per_s']:>8.0f}{r['tokens_per_s'] / ref:>10.2f}"
                     f"{r['tokens_per_s_best']:>12.0f}{r['tokens_per_s_best'] / ref_best:>9.2f}"
                     f"{r['peak_rss_delta_mb']:>10.0f}{r['active_params_per_token']:>12,}{r['total_params']:>12,}"
                     f"{r['rows']:>6}{r['padded_tokens']:>8}")
    return "\n".join(lines)


def main(
    seq_len: int = 2048,
    hidden: int = 256,
    layers: int = 6,
    repeats: int = 3,
    warmup: int = 1,
    threads: int = 2,
    packing_tokens: int = 4096,
    batch_size: int = 4,
    variants: bool = True,
    packing: bool = True,
    json_out: str | None = None,
) -> None:
    """Run both tables; print them; optionally write ``json_out``. Defaults finish in about 3 minutes on 2 cores.

    Args:
        seq_len: packed row length (variants table: one row of exactly this many tokens' worth of documents).
        hidden: model width.
        layers: model depth (Uni-X separates layers // 3 at each end; MoE experts every 2nd layer).
        repeats: timed iterations per case; the median is reported.
        warmup: untimed iterations per case.
        threads: torch threads.
        packing_tokens: real tokens of the packed-vs-padded workload.
        batch_size: documents per padded batch.
        variants: run the variants table.
        packing: run the packed-vs-padded table.
        json_out: also write the report as json here.
    """
    common = dict(hidden=hidden, layers=layers, repeats=repeats, warmup=warmup, threads=threads, seed=0,
                  seq_len=seq_len, batch_size=batch_size)
    load = os.getloadavg()
    report: dict = {"settings": common, "loadavg_before": load, "memory": "peak RSS delta of a fresh process "
                    "(ru_maxrss after the timed iterations minus after building model and inputs)"}
    text = [f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (shared machine: timings are noisy)"]
    if variants:
        cases = [dict(common, name=v, variant=v, mode="packed", tokens=seq_len)
                 for v in ("dense", "uni_x", "mot", "moe")]
        rows = _run_all(cases, warmup, repeats, threads)
        report["variants"] = rows
        text.append(_table(f"fwd+bwd on packed rows of <= {seq_len} tokens, equal active params per token", rows,
                           "dense"))
    if packing:
        cases = [dict(common, name=m, variant="dense", mode=m, tokens=packing_tokens)
                 for m in ("packed", "padded", "flattening")]
        rows = _run_all(cases, warmup, repeats, threads)
        report["packing"] = rows
        text.append(_table(f"dense fwd+bwd, same documents ({packing_tokens} real tokens): packed vs padded "
                           f"(batch {batch_size}) vs DataCollatorWithFlattening", rows, "packed"))
    report["loadavg_after"] = os.getloadavg()
    text.append(f"load average after: {report['loadavg_after'][0]:.2f}. tok/s = real tokens / median iteration time; "
                "best = / fastest iteration; peak MiB = peak-RSS growth of one iteration in a fresh process")
    print("\n\n".join(text))  # the table is this tool's output
    if json_out:
        from data_process.schema import atomic_write_text

        atomic_write_text(json_out, json.dumps(report, indent=2))
