"""Benchmarks (speed and memory live here, never in timed tests).

    python tools/bench.py model   # forward+backward per token: dense vs Uni-X vs MoT vs MoE; packed vs padded
    python tools/bench.py train   # Trainer throughput: packing mode 2 vs mode 0 on the same data
    python tools/bench.py generate   # KV cache vs recompute, batched vs one at a time, the server 16 vs 1 client
    python tools/bench.py loss   # one forward+backward of the loss at vocab 160,128: plain vs chunked vs checkpointed
    python tools/bench.py data --sizes 200000,2000000   # first batch and RSS per rank: map-style vs data_cache_dir
    python tools/bench.py model --help   # each subcommand's own options

Each subcommand is the ``main`` of its own module, imported only when asked for (``bench_train`` imports torch and
transformers). fire is handed that function itself, not a ``**kwargs`` wrapper: a wrapper hides the signature, so
``--help`` reached it as a keyword argument (``TypeError: main() got an unexpected keyword argument 'help'``).
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable

import fire

SUBCOMMANDS = {"model": "tools.bench_model", "train": "tools.bench_train", "generate": "tools.bench_generate",
               "loss": "tools.bench_loss", "data": "tools.bench_data"}  # name -> module with a main()


def subcommand(name: str) -> Callable:
    """The ``main`` of a subcommand's module; unknown names raise listing the known ones."""
    if name not in SUBCOMMANDS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(SUBCOMMANDS)}")
    return importlib.import_module(SUBCOMMANDS[name]).main


def run(argv: list[str] | None = None):
    """``bench.py <name> [options]``: fire on the named subcommand's ``main`` (its options, its ``--help``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        return fire.Fire(subcommand(argv[0]), command=argv[1:], name=argv[0])
    # No or an unknown subcommand: fire lists the subcommands (their docstrings) without importing them.
    return fire.Fire({name: f"see `python tools/bench.py {name} --help`" for name in SUBCOMMANDS}, command=argv,
                     name="bench.py")


if __name__ == "__main__":
    run()
