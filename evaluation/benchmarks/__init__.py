"""Benchmarks of the evaluation orchestrator (``evaluation/eval_template.py``), one module each, imported lazily.

``geneval`` and ``dpg_bench`` (text-to-image), ``vis_und`` (MME, POPE, MMBench through the API server), ``text``
(lm-eval in process), ``shapes`` (the embedded default: the shapes GenEval suite with its two references) and
``shapes_vqa`` (a held-out shapes VQA set through the API server).

``REGISTRY`` maps a name to ``"module:Class"`` (lm-eval's lazy model map): importing this package imports no
benchmark, so the orchestrator starts fast and a benchmark whose dependencies are missing fails only when used.
Each class is built as ``Class(experiment, out_dir, limit)`` and has a ``kind``, which decides how the
orchestrator drives it:

* ``t2i``: ``pending()`` counts the prompts without their images on disk; ``generate(infer, rank, world)`` draws
  this process's share of them (one process per device, shard ``rank`` of ``world``), then ``score()`` scores;
* ``vqa``: ``pending()`` counts the questions without an answer on disk; ``run(base_urls)`` asks them of the API
  servers the orchestrator started (none when nothing is pending) and scores;
* ``text``: ``run(infer)`` runs lm-eval on the loaded model in process.

``score()`` and ``run()`` return the results they wrote to ``<out_dir>/results.json``, whose ``headline`` (metric
-> number) feeds the summary table and charts.
"""

from __future__ import annotations

import importlib
from typing import Any

REGISTRY: dict[str, str] = {
    "shapes": "evaluation.benchmarks.shapes:ShapesGenEval",
    "shapes_vqa": "evaluation.benchmarks.shapes:ShapesVQA",
    "text": "evaluation.benchmarks.runners:TextBenchmark",
    "geneval": "evaluation.benchmarks.runners:GenEvalBenchmark",
    "dpg_bench": "evaluation.benchmarks.runners:DPGBenchmark",
    "vis_und": "evaluation.benchmarks.runners:VisUndBenchmark",
}
KINDS: tuple[str, ...] = ("t2i", "vqa", "text")


def get_benchmark(name: str) -> Any:
    """The benchmark class registered as ``name`` (imported now); an unknown name lists the known ones."""
    if name not in REGISTRY:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(REGISTRY)}")
    module, attr = REGISTRY[name].split(":")
    cls = getattr(importlib.import_module(module), attr)
    if getattr(cls, "kind", None) not in KINDS:
        raise TypeError(f"{REGISTRY[name]}: kind={getattr(cls, 'kind', None)!r} is not one of {', '.join(KINDS)}")
    return cls
