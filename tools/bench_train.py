"""Training-pipeline benchmark (``python tools/bench.py train``): token utilisation and Trainer throughput.

Two tables from one command:

1. **Token utilisation per packing mode** (the pure packer, no model): real tokens / compute capacity for the
   shapes world's rendered samples (or the synthetic world when ``data/shapes_codes`` is absent) and for a mixed
   log-normal length distribution. Mode 0 pads consecutive batches of ``batch_size`` samples; modes 1 and 2 fill
   rows of ``seq_len``.
2. **Trainer throughput, mode 2 vs mode 0 on the same data in one run**: the real ``UniTrainer`` on the tiny Uni-X
   model (``configs/model/tiny_unix.json``), ``steps`` optimizer steps per mode after ``warmup`` untimed ones.
   Mode 2 = one packed row of ``seq_len`` per step (``unix_packed`` per-document attention); mode 0 = padded
   batches of ``batch_size`` samples (sdpa with the padding mask). Reports REAL (non-padding) tokens/s, measured
   by the trainer's own ``tokens_per_second`` metric, and the ratio.

Timings on a shared 2-core machine are noisy and pessimistic; compare ratios taken in the same run.
Results go to ``outputs/bench_train.json``.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import torch
from loguru import logger

from uni_arch.train.packing import pack, padded_utilisation, utilisation

ROOT = Path(__file__).resolve().parents[1]
SHAPES_DATA = "data/shapes_codes/shapes_captions:0.5,data/shapes_codes/shapes_vqa:0.3,data/shapes_codes/shapes_text:0.2"


def _mixed_lengths(n: int, seed: int, max_len: int) -> list[int]:
    """Text of log-normal length mixed with image documents (a 16x16 grid block plus a caption)."""
    rng = random.Random(seed)
    return [min(max_len, int(rng.lognormvariate(4.5, 1.0)) + 1) if rng.random() < 0.5 else 258 + rng.randint(8, 40)
            for _ in range(n)]


def utilisation_table(lengths_by_name: dict[str, list[int]], seq_len: int, batch_size: int) -> dict[str, dict]:
    table = {}
    for name, lengths in lengths_by_name.items():
        table[name] = {"mode0_padded": padded_utilisation(lengths, batch_size)}
        for mode in (1, 2):
            table[name][f"mode{mode}"] = utilisation(pack(lengths, seq_len, mode).rows, seq_len)
    return table


def _data_args(world: dict[str, str] | None) -> list[str]:
    if world is None:
        return ["--data_path", SHAPES_DATA, "--tokenizer_path", "data/shapes/tokenizer",
                "--image_tokenizer_path", "data/shapes/vq", "--model_config", "configs/model/tiny_unix.json"]
    return [arg for k, v in world.items() for arg in (f"--{k}", v)]


def _throughput(base: list[str], mode: int, seq_len: int, batch_size: int, steps: int, warmup: int, out: Path) -> dict:
    from uni_arch.train.args import parse_args
    from uni_arch.train.hf_trainer import make_trainer

    extra = ["--use_data_packing", str(mode), "--max_steps", str(warmup + steps), "--logging_steps", "1",
             "--output_dir", str(out / f"mode{mode}"), "--per_device_train_batch_size", str(1 if mode else batch_size)]
    trainer = make_trainer(*parse_args(base + extra))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "tokens_per_second" in h][warmup:]
    # one log per step: real tokens of the step and real tokens / wall time; aggregate as total / total time
    tokens = sum(h["real_tokens"] for h in logs)
    seconds = sum(h["real_tokens"] / h["tokens_per_second"] for h in logs)
    return {"tokens_per_second": tokens / seconds if seconds else float("nan"), "real_tokens": tokens, "seconds": seconds,
            "token_utilisation": sum(h["token_utilisation"] for h in logs) / max(len(logs), 1), "steps": len(logs)}


def main(seq_len: int = 4096, batch_size: int = 8, steps: int = 10, warmup: int = 2, threads: int = 2,
         synthetic: bool | None = None, out: str = "outputs/bench_train.json") -> None:
    """Run both tables; ``synthetic=None`` uses the shapes world when it is encoded, else the synthetic world."""
    from uni_arch.log_setup import setup_logging
    from uni_arch.train import builders
    from uni_arch.train.args import parse_args

    setup_logging(0, "WARNING")
    torch.set_num_threads(threads)
    if synthetic is None:
        synthetic = not (ROOT / "data/shapes_codes/manifest.json").is_file()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        world = None
        if synthetic:
            from uni_arch.train.synthetic import make_world

            world = make_world(tmp_path / "world", n_records=1500, grid=(16, 16), codebook=512, hidden_size=256,
                               layers=4, heads=4)
        base = _data_args(world) + ["--use_cpu", "true", "--model_max_length", str(seq_len), "--report_to", "none",
                                    "--save_strategy", "no", "--write_loss_curves", "false", "--learning_rate", "1e-3"]
        # table 1: lengths of the very samples the run trains on
        model_args, data_args, training_args = parse_args(base + ["--output_dir", str(tmp_path / "u"),
                                                                  "--use_data_packing", "0"])
        tok = builders.build_tokenizer(model_args)
        vocab = builders.build_code_vocab(model_args, tok)
        ds = builders.build_train_dataset(data_args, training_args, builders.build_sample_builder(data_args, tok, vocab),
                                          vocab)
        lengths = [len(r["input_ids"]) for r in ds.rows]
        name = "synthetic_world" if synthetic else "shapes_world"
        util = utilisation_table({name: lengths, "mixed_lognormal": _mixed_lengths(len(lengths), 0, seq_len)},
                                 seq_len, batch_size)
        # table 2: throughput, same data, one run
        speed = {f"mode{m}": _throughput(base, m, seq_len, batch_size, steps, warmup, tmp_path) for m in (2, 0)}
    speed["mode2_over_mode0"] = speed["mode2"]["tokens_per_second"] / speed["mode0"]["tokens_per_second"]
    result = {"data": name, "seq_len": seq_len, "batch_size_mode0": batch_size, "threads": threads,
              "token_utilisation": util, "throughput": speed}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    lines = [f"token utilisation (seq_len={seq_len}, mode 0 batches of {batch_size}):"]
    for data, row in util.items():
        lines.append(f"  {data:18s} " + "  ".join(f"{k}={v:.4f}" for k, v in row.items()))
    lines.append(f"trainer throughput on {name} (real tokens/s, {threads} threads, {steps} steps after {warmup} warm-up):")
    for m in ("mode2", "mode0"):
        lines.append(f"  {m}: {speed[m]['tokens_per_second']:.0f} tok/s (utilisation {speed[m]['token_utilisation']:.3f})")
    lines.append(f"  mode 2 / mode 0 = {speed['mode2_over_mode0']:.2f}x")
    logger.warning("\n" + "\n".join(lines))  # WARNING: the level this tool's sink shows
