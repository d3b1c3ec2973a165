"""Benchmarks of the evaluation orchestrator (``evaluation/eval_template.py``), one module each, imported lazily.

``geneval`` and ``dpg_bench`` (text-to-image), ``vis_und`` (MME, POPE, MMBench through the API server), ``text``
(lm-eval in process) and ``shapes`` (the embedded default).
"""
