"""Loss-layer CPU benchmark: peak memory and time of one forward+backward (``python tools/bench.py loss``).

The layer that issue 13 is about: the final hidden states of one packed row ``[row, hidden]`` projected onto the
vocabulary by the head ``[vocab, hidden]``, the shifted per-modality cross-entropy of the trainer, and the backward
of the optimised loss (sum / number of targets) into the hidden states and the head. Cases:

* ``plain`` -- ``modality_losses(hidden @ head.T, ...)``, today's trainer path: the row's float32 logits, the
  log-softmax and their gradients all exist at once.
* ``chunked`` -- ``chunked_modality_losses`` (``loss_chunk_size``): gradients computed chunk by chunk in the
  forward, no recomputation (``uni_arch/train/chunked_loss.py``).
* ``checkpoint`` -- the alternative the chunked loss did not take: the plain loss per chunk under
  ``torch.utils.checkpoint``, whose backward recomputes each chunk's logits (measured here, not shipped).

Method: every case runs in a fresh spawned process (peak RSS is per process): inputs built, one small untimed
warm-up, then ``repeats`` timed forward+backward iterations; memory is the peak RSS those iterations add over the
RSS after set-up (``tools.bench_model.peak_rss_growth_mib``: Linux ``VmHWM`` reset after set-up); time is the median
iteration, as wall clock and as the process's CPU time (with ``threads=1`` the CPU time is the figure to compare on
a shared machine: other jobs stretch the wall clock, not the CPU time, up to cache effects). A case whose estimated need exceeds the available memory is skipped with the reason, not run into the
OOM killer (the plain path needs about three ``row x vocab`` float32 tensors at once).
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import statistics
import time

from loguru import logger

CASES = ("plain", "chunked", "checkpoint")
TEXT_IDS = 151_643  # the Qwen2.5 layout of modeling/vocab.py: text, specials, then 8,192 codes from 151,665
IMAGE_OFFSET, NUM_CODES, VISION_START, VISION_END = 151_665, 8192, 151_652, 151_653


def _inputs(row: int, vocab: int, hidden: int, seed: int = 0):
    """Hidden states, head and labels of one packed row: prompts ignored (~20%), text and image-code targets."""
    import torch

    from modeling.vocab import IGNORE_INDEX, CodeVocab

    g = torch.Generator().manual_seed(seed)
    hidden_BTD = torch.randn(1, row, hidden, generator=g).requires_grad_()
    head_VD = (torch.randn(vocab, hidden, generator=g) * hidden ** -0.5).requires_grad_()
    labels = torch.randint(0, min(TEXT_IDS, vocab), (1, row), generator=g)
    if vocab >= IMAGE_OFFSET + NUM_CODES:  # the second half of the row is an image block
        labels[0, row // 2:] = torch.randint(IMAGE_OFFSET, IMAGE_OFFSET + NUM_CODES, (row - row // 2,), generator=g)
    labels[torch.rand(1, row, generator=g) < 0.2] = IGNORE_INDEX
    code_vocab = CodeVocab(image_offset=min(IMAGE_OFFSET, vocab - NUM_CODES), level_sizes=(NUM_CODES,),
                           vision_start_id=VISION_START if vocab > VISION_END else 0,
                           vision_end_id=VISION_END if vocab > VISION_END else 1)
    return hidden_BTD, head_VD, labels, code_vocab


def _checkpointed_parts(hidden_BTD, head_VD, labels, code_vocab, chunk_size: int):
    """The plain per-modality loss per chunk under ``torch.utils.checkpoint`` (recompute in the backward)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from uni_arch.train.trainer import modality_losses

    def chunk_loss(h_BCD, w_VD, labels_BC):
        return modality_losses(h_BCD @ w_VD.T, labels_BC, code_vocab)["loss_sum"]

    # chunks overlap by one token: the last position of a chunk predicts the first label of the next
    row = hidden_BTD.shape[1]
    total = hidden_BTD.new_zeros(())
    for start in range(0, row - 1, chunk_size):
        end = min(start + chunk_size + 1, row)
        total = total + checkpoint(chunk_loss, hidden_BTD[:, start:end], head_VD, labels[:, start:end],
                                   use_reentrant=False)
    return {"loss_sum": total, "num_targets": (labels[:, 1:] != -100).sum()}


def _step(case: str, inputs, chunk_size: int) -> float:
    """One forward+backward of the optimised loss; returns the loss (to check the cases agree)."""
    from uni_arch.train.trainer import chunked_modality_losses, modality_losses

    hidden_BTD, head_VD, labels, code_vocab = inputs
    hidden_BTD.grad = head_VD.grad = None
    if case == "plain":
        parts = modality_losses(hidden_BTD @ head_VD.T, labels, code_vocab)
    elif case == "chunked":
        parts = chunked_modality_losses(hidden_BTD, head_VD, labels, code_vocab, chunk_size)
    else:
        parts = _checkpointed_parts(hidden_BTD, head_VD, labels, code_vocab, chunk_size)
    loss = parts["loss_sum"] / parts["num_targets"]
    loss.backward()
    return float(loss.detach())


def _child(case: str, settings: dict) -> dict:
    """Fresh process: warm up on a small row, then time ``repeats`` iterations and measure their peak RSS growth."""
    import torch

    from tools.bench_model import peak_rss_growth_mib

    try:  # if memory runs out after all, the kernel's OOM killer takes this process, not a neighbour's job
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    torch.set_num_threads(settings["threads"])
    _step(case, _inputs(64, 2 * NUM_CODES, settings["hidden"]), 16)  # kernels and allocator warmed on a small problem
    inputs = _inputs(settings["row"], settings["vocab"], settings["hidden"])
    times, cpu_times, losses = [], [], []

    def iterations():
        for _ in range(settings["repeats"]):
            start, cpu_start = time.perf_counter(), time.process_time()
            losses.append(_step(case, inputs, settings["chunk_size"]))
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)

    peak = peak_rss_growth_mib(iterations)
    grad_norm = float(inputs[0].grad.norm()) + float(inputs[1].grad.norm())
    return dict(case=case, seconds_median=round(statistics.median(times), 2), times=[round(t, 2) for t in times],
                cpu_seconds_median=round(statistics.median(cpu_times), 2),
                peak_rss_delta_mib=peak, loss=losses[-1], grad_norm_sum=grad_norm)


def _need_bytes(case: str, row: int, vocab: int, hidden: int, chunk_size: int) -> int:
    """Rough peak of a case, for the skip check: float32 [tokens, vocab] tensors alive at once, plus the head's
    gradient and the fp32 accumulator of the chunked path."""
    tokens = row if case == "plain" else min(chunk_size, row)
    logit_tensors = {"plain": 3, "chunked": 1, "checkpoint": 3}[case]
    return 4 * (logit_tensors * tokens * vocab + 2 * vocab * hidden)


def _run_case(case: str, settings: dict) -> dict:
    import psutil

    need, available = _need_bytes(case, **{k: settings[k] for k in ("row", "vocab", "hidden", "chunk_size")}), \
        psutil.virtual_memory().available
    if need * 1.1 > available:
        reason = f"skipped: needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"
        logger.warning(f"{case}: {reason}")
        return dict(case=case, skipped=reason)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        try:
            result = pool.submit(_child, case, settings).result()
        except concurrent.futures.process.BrokenProcessPool:  # the OOM killer, most likely
            return dict(case=case, skipped="the process died (out of memory?)")
    logger.info("{case}: {seconds_median} s wall, {cpu_seconds_median} s CPU, +{peak_rss_delta_mib} MiB", **result)
    return result


def _table(rows: list[dict], settings: dict) -> str:
    ref = next((r for r in rows if r["case"] == "plain" and "skipped" not in r), None)
    lines = [f"one forward+backward of the per-modality loss: row {settings['row']:,} x vocab {settings['vocab']:,} x "
             f"hidden {settings['hidden']}, chunk {settings['chunk_size']}, {settings['threads']} thread(s), CPU",
             f"{'case':<12}{'wall s':>8}{'CPU s':>8}{'CPU vs plain':>14}{'peak MiB':>10}{'plain / this':>14}"
             f"{'loss':>10}"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['case']:<12}{r['skipped']}")
            continue
        t_ratio = f"{r['cpu_seconds_median'] / ref['cpu_seconds_median']:.2f}" if ref else "-"
        m_ratio = f"{ref['peak_rss_delta_mib'] / max(r['peak_rss_delta_mib'], 1e-9):.1f}x" if ref else "-"
        lines.append(f"{r['case']:<12}{r['seconds_median']:>8.1f}{r['cpu_seconds_median']:>8.1f}{t_ratio:>14}"
                     f"{r['peak_rss_delta_mib']:>10.0f}{m_ratio:>14}{r['loss']:>10.5f}")
    lines.append("CPU s = process CPU time of the iteration (with 1 thread, robust to a shared machine's load; wall "
                 "s is not); peak MiB = peak-RSS growth of the iteration in a fresh process")
    return "\n".join(lines)


def main(
    vocab: int = 160_128,
    row: int = 8192,
    hidden: int = 256,
    chunk_size: int = 1024,
    threads: int = 2,
    repeats: int = 1,
    cases: str = ",".join(CASES),
    json_out: str | None = None,
) -> None:
    """Run the cases, print the table; optionally write ``json_out``. The defaults (issue 13's figures) need about
    16 GiB free for the plain case and take a few minutes on one core.

    Args:
        vocab: vocabulary (head rows).
        row: tokens of the packed row.
        hidden: hidden size.
        chunk_size: tokens per chunk (chunked and checkpoint cases).
        threads: torch threads.
        repeats: timed iterations per case (the median is reported; memory is their peak).
        cases: comma-separated subset of plain, chunked, checkpoint.
        json_out: also write the report as json here.
    """
    names = [c.strip() for c in str(cases).split(",") if c.strip()]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise ValueError(f"cases: unknown {unknown}; known: {', '.join(CASES)}")
    settings = dict(vocab=vocab, row=row, hidden=hidden, chunk_size=chunk_size, threads=threads, repeats=repeats)
    load = os.getloadavg()
    rows = [_run_case(case, settings) for case in names]
    report = {"settings": settings, "loadavg_before": load, "loadavg_after": os.getloadavg(), "cases": rows,
              "memory": "peak RSS growth of the timed iterations in a fresh process (VmHWM reset after set-up)"}
    print(f"load average before: {load[0]:.2f}, after: {report['loadavg_after'][0]:.2f} (shared machine: timings "
          f"are noisy)\n" + _table(rows, settings))  # the table is this tool's output
    if json_out:
        from data_process.schema import atomic_write_text

        atomic_write_text(json_out, json.dumps(report, indent=2))
