"""Training-pipeline benchmark (``python tools/bench.py train``): token utilisation and Trainer throughput.

Two worlds, each measured in the same run:

* ``shapes`` -- the encoded shapes world (``data/shapes_codes``; skipped with a note when it is not encoded). Its
  samples are all ~280-335 tokens, so padding wastes only ~20% and packing buys little: an honest number for
  that data.
* ``mixed`` -- the synthetic ``mixed`` corpus (``uni_arch.train.synthetic.mixed_records``): 70% text documents of
  log-normal length (median ~100 tokens, tail to ~1500), 30% image documents of 32x32 = 1024 codes plus a caption
  (the proportions of ``tools/bench_model.py``), the mixed length distribution of real pretraining data, where
  padded batches waste most.

Per world, two tables:

1. **Token utilisation per packing mode** (the pure packer, no model): real tokens / compute capacity of the very
   samples the run trains on. Mode 0 pads consecutive batches of the mode-0 batch size; modes 1 and 2 fill rows.
2. **Trainer throughput, mode 2 vs mode 0**: the real ``UniTrainer`` (``make_trainer``, the entry point's own
   builders) on a Uni-X model of the tiny shape (``configs/model/tiny_uni_x.json``: hidden 256, 4 layers),
   ``steps`` optimizer steps per mode after ``warmup`` untimed ones. Mode 2 = one packed row of ``seq_len`` per step
   through ``uni_x_packed`` per-document attention (the trainer's default for packed rows); mode 0 = padded batches
   through sdpa with the padding ``attention_mask`` (the standard padded path). Throughput is REAL (non-padding)
   tokens/s: ``trainer`` is the trainer's own ``tokens_per_second`` metric (one log per step); ``wall`` is real
   tokens over the wall time between the ends of the first and last timed steps (a callback), which also counts
   the forward pass, data loading and logging.

Fairness: both modes render the same records with the same seed into the same samples and the Trainer's sampler
shuffles both with the same seed; the model, optimiser, learning rate and thread count are the same. By default
the mode-0 batch size is chosen per world so that a step sees about as many real tokens as a packed row
(``round(seq_len * mode-2 utilisation / mean sample length)``: 17 shapes samples, 10 mixed ones), so both modes
do the same work per optimizer step and neither gains from a batch size that suits the CPU better; pass
``batch_size`` to fix it instead. Nothing in mode 0 is sorted or bucketed by length: that would be a different
sampler, not the padded baseline.

Timings on a shared 2-core machine are noisy and pessimistic; compare ratios taken in the same run (``threads=1``
when the machine is loaded: two threads competing with other jobs swing a single mode by up to 10x, one thread
keeps the ratio stable). Results go to ``outputs/bench_train.json``.

Measured (``python tools/bench.py train --threads 1``, 2-core CPU shared with other jobs, load average ~3.3,
real tokens/s trainer metric / wall clock; 1 min 55 s for the whole command)::

    world   samples mean bs0 util0 util2  mode2 tok/s  mode0 tok/s  ratio trainer  ratio wall  util ratio
    shapes    10000  241  17 0.725 0.988    4457/2991    3096/2022          1.44x       1.48x       1.36x
    mixed      2000  401  10 0.396 1.000    4334/2920    1388/934           3.12x       3.13x       2.52x

On the mixed corpus the gain beyond the utilisation ratio is attention: a padded batch attends over its longest
sample (~1,100-1,500 tokens) for every row, the packed path only within each document. With two threads on a
loaded machine the same command gave 1.46x / 9.1x in one run and 0.30x / 0.85x in another: trust ``threads=1``.
The trainer's ``tokens_per_second`` starts its clock after the first forward of a logging window, so with one log
per step it leaves the forward out; the ``wall`` column counts it.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from loguru import logger
from transformers import TrainerCallback

from uni_arch.train.packing import pack, padded_utilisation, utilisation

ROOT = Path(__file__).resolve().parents[1]
SHAPES_MANIFEST = "data/shapes_codes/manifest.json"
SHAPES_DATA = "data/shapes_codes/shapes_captions:0.5,data/shapes_codes/shapes_vqa:0.3,data/shapes_codes/shapes_text:0.2"
WORLDS = ("shapes", "mixed")


class _StepClock(TrainerCallback):
    """Wall-clock time at the end of every optimizer step (the trainer's metric starts its clock mid-step)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def utilisation_row(lengths: list[int], seq_len: int, batch_size: int) -> dict[str, float]:
    """Real tokens / capacity of ``lengths`` in mode 0 (padded batches of ``batch_size``) and modes 1 and 2."""
    row = {"mode0_padded": padded_utilisation(lengths, batch_size)}
    for mode in (1, 2):
        row[f"mode{mode}"] = utilisation(pack(lengths, seq_len, mode).rows, seq_len)
    return row


def _world_args(world: str, tmp: Path, n_records: int) -> list[str] | None:
    """Train arguments of a world's data, tokenizers and model config; None when the world is not available."""
    if world == "shapes":
        if not (ROOT / SHAPES_MANIFEST).is_file():
            return None
        return ["--data_path", SHAPES_DATA, "--tokenizer_path", "data/shapes/tokenizer",
                "--image_tokenizer_path", "data/shapes/vq", "--model_config", "configs/model/tiny_uni_x.json"]
    if world == "mixed":
        from uni_arch.train.synthetic import make_world

        tiny = json.loads((ROOT / "configs/model/tiny_uni_x.json").read_text(encoding="utf-8"))
        paths = make_world(tmp / "mixed", n_records=n_records, grid=(32, 32), codebook=512, corpus="mixed",
                           hidden_size=tiny["hidden_size"], layers=tiny["num_hidden_layers"],
                           heads=tiny["num_attention_heads"])
        return [arg for k, v in paths.items() for arg in (f"--{k}", v)]
    raise ValueError(f"unknown world {world!r}: expected one of {WORLDS}")


def _sample_lengths(base: list[str], tmp: Path) -> list[int]:
    """Token lengths of the rendered samples, through the entry point's own builders (mode 0: one sample a row)."""
    from uni_arch.train import builders
    from uni_arch.train.args import parse_args

    model_args, data_args, training_args = parse_args(base + ["--output_dir", str(tmp / "lengths"),
                                                              "--use_data_packing", "0"])
    _, _, ds = builders.build_data(model_args, data_args, training_args)
    return [len(r["input_ids"]) for r in ds.rows]


def _throughput(base: list[str], mode: int, batch_size: int, steps: int, warmup: int, out: Path) -> dict:
    from uni_arch.train.args import parse_args
    from uni_arch.train.hf_trainer import make_trainer

    extra = ["--use_data_packing", str(mode), "--max_steps", str(warmup + steps), "--logging_steps", "1",
             "--output_dir", str(out / f"mode{mode}"), "--per_device_train_batch_size", str(1 if mode else batch_size)]
    trainer = make_trainer(*parse_args(base + extra))
    clock = _StepClock()
    trainer.add_callback(clock)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "tokens_per_second" in h][warmup:]
    if len(logs) != steps or len(clock.ends) != warmup + steps:
        raise RuntimeError(f"mode {mode}: expected {steps} timed steps, got {len(logs)} logs and "
                           f"{len(clock.ends)} step ends (too few rows for warmup + steps?)")
    # one log per step: real tokens of the step and real tokens / time; aggregate as total / total time
    tokens = sum(h["real_tokens"] for h in logs)
    seconds = sum(h["real_tokens"] / h["tokens_per_second"] for h in logs)
    wall = clock.ends[-1] - clock.ends[warmup - 1] if warmup else float("nan")
    return {"tokens_per_second": tokens / seconds, "wall_tokens_per_second": tokens / wall, "real_tokens": tokens,
            "real_tokens_per_step": tokens / steps, "seconds": seconds, "wall_seconds": wall,
            "token_utilisation": sum(h["token_utilisation"] for h in logs) / len(logs), "steps": len(logs),
            "batch_size": 1 if mode else batch_size}


def bench_world(world: str, tmp: Path, *, seq_len: int, batch_size: int | None, steps: int, warmup: int,
                n_records: int) -> dict | None:
    """Utilisation and mode 2 vs mode 0 throughput of one world; None when the world is not available."""
    data = _world_args(world, tmp, n_records)
    if data is None:
        return None
    base = data + ["--use_cpu", "true", "--model_max_length", str(seq_len), "--report_to", "none",
                   "--save_strategy", "no", "--write_loss_curves", "false", "--learning_rate", "1e-3"]
    lengths = _sample_lengths(base, tmp / world)
    mean = statistics.fmean(lengths)
    mode2_util = utilisation(pack(lengths, seq_len, 2).rows, seq_len)
    bs = batch_size or max(1, round(seq_len * mode2_util / mean))
    result = {"samples": len(lengths), "mean_length": mean, "median_length": statistics.median(lengths),
              "max_length": max(lengths), "batch_size_mode0": bs,
              "token_utilisation": utilisation_row(lengths, seq_len, bs)}
    speed = {f"mode{m}": _throughput(base, m, bs, steps, warmup, tmp / world) for m in (2, 0)}
    for key in ("tokens_per_second", "wall_tokens_per_second"):
        speed[f"mode2_over_mode0_{key}"] = speed["mode2"][key] / speed["mode0"][key]
    # what utilisation alone explains; the rest is compute per capacity token (padded attention is quadratic in the
    # longest sample of the batch, the packed path's in each document)
    speed["mode2_over_mode0_utilisation"] = speed["mode2"]["token_utilisation"] / speed["mode0"]["token_utilisation"]
    result["throughput"] = speed
    return result


def _table(results: dict[str, dict | None], seq_len: int, threads: int, steps: int, warmup: int) -> str:
    lines = [f"seq_len={seq_len}, {threads} thread(s), {steps} timed steps after {warmup} warm-up; real tokens/s "
             "(trainer = UniTrainer tokens_per_second, wall = step-end wall clock)",
             f"{'world':8s} {'samples':>7s} {'mean':>6s} {'bs0':>4s} {'util0':>6s} {'util2':>6s} "
             f"{'mode2 tok/s':>17s} {'mode0 tok/s':>17s} {'ratio trainer':>13s} {'ratio wall':>10s} "
             f"{'util ratio':>10s}"]
    for world, r in results.items():
        if r is None:
            lines.append(f"{world:8s} skipped: {SHAPES_MANIFEST} not found (encode the shapes world first)")
            continue
        s, u = r["throughput"], r["token_utilisation"]
        lines.append(
            f"{world:8s} {r['samples']:7d} {r['mean_length']:6.0f} {r['batch_size_mode0']:4d} "
            f"{s['mode0']['token_utilisation']:6.3f} {s['mode2']['token_utilisation']:6.3f} "
            f"{s['mode2']['tokens_per_second']:8.0f}/{s['mode2']['wall_tokens_per_second']:<8.0f} "
            f"{s['mode0']['tokens_per_second']:8.0f}/{s['mode0']['wall_tokens_per_second']:<8.0f} "
            f"{s['mode2_over_mode0_tokens_per_second']:12.2f}x {s['mode2_over_mode0_wall_tokens_per_second']:9.2f}x "
            f"{s['mode2_over_mode0_utilisation']:9.2f}x")
        lines.append(f"{'':8s} packer utilisation: " + "  ".join(f"{k}={v:.4f}" for k, v in u.items()))
    return "\n".join(lines)


def main(seq_len: int = 4096, batch_size: int | None = None, steps: int = 8, warmup: int = 2, threads: int = 2,
         worlds: str = "shapes,mixed", n_records: int = 2000, out: str = "outputs/bench_train.json") -> None:
    """Utilisation and Trainer throughput, mode 2 vs mode 0, on each world (see the module docstring).

    Args:
        seq_len: packed row length (and the model's max length).
        batch_size: mode-0 samples per step; None matches the real tokens of a packed row per world.
        steps: timed optimizer steps per mode.
        warmup: untimed steps per mode before timing.
        threads: torch threads (1 on a loaded machine keeps the ratio stable).
        worlds: comma-separated: ``shapes`` (needs data/shapes_codes) and/or ``mixed``.
        n_records: records of the synthetic mixed world.
        out: the json report.
    """
    from uni_arch.log_setup import setup_logging

    setup_logging(0, "WARNING")
    torch.set_num_threads(threads)
    names = [w.strip() for w in (worlds.split(",") if isinstance(worlds, str) else worlds) if w.strip()]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = {w: bench_world(w, Path(tmp), seq_len=seq_len, batch_size=batch_size, steps=steps, warmup=warmup,
                                  n_records=n_records) for w in names}
    report = {"seq_len": seq_len, "threads": threads, "steps": steps, "warmup": warmup,
              "seconds": time.perf_counter() - started, "worlds": results}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2))
    logger.warning("\n" + _table(results, seq_len, threads, steps, warmup))  # WARNING: the level this tool's sink shows

