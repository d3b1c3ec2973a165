"""Benchmarks (speed and memory live here, never in timed tests).

    python tools/bench.py model   # forward+backward per token: dense vs Uni-X vs MoT vs MoE; packed vs padded
    python tools/bench.py train   # Trainer throughput: packing mode 2 vs mode 0 on the same data

Each subcommand lives in its own module and is imported only when asked for.
"""

from __future__ import annotations

import fire


def model(**kwargs):
    """Model-level benchmark; see ``tools/bench_model.py`` for the options."""
    from tools.bench_model import main

    return main(**kwargs)


def train(**kwargs):
    """Training-throughput benchmark; see ``tools/bench_train.py`` for the options."""
    from tools.bench_train import main

    return main(**kwargs)


if __name__ == "__main__":
    fire.Fire({"model": model, "train": train})
