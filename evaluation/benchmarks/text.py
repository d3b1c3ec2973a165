"""Text benchmarks: lm-eval in process on the in-memory model, scored over the text vocabulary only.

Why a model class of our own: lm-eval 0.4.13's ``HFLM`` takes ``log_softmax`` over the model's whole output, image
codes included (``tests/test_model_lm_eval.py`` pins that). A unified model puts probability on image ids, so its
text log-likelihoods come out too low by a per-token amount that depends on how much it likes images, and
multiple-choice answers of different token lengths are compared unfairly. ``UniXLM`` (registered with lm-eval as
``uni_x``) is ``HFLM`` with two overrides: ``_model_call`` returns the logits of text ids only
(``[..., :image_offset]``), and generation suppresses every id ``>= image_offset``. Nothing else changes, so every
lm-eval task type (``multiple_choice``, ``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``) works.

Tasks: the default run uses the local YAML tasks in ``evaluation/tasks/`` (``DEFAULT_TASKS``: ``shapes_facts``,
36 multiple-choice completions of facts the shapes world's text corpus states, so the embedded default checkpoint
has something to know; measured on ``outputs/shapes-tiny-uni-x`` after ``bash train.sh``: acc 0.306, acc_norm
0.333, chance 0.26, in 2 s on one thread), because machines may be offline. lm-eval resolves a relative
``data_files`` path against the *current directory*; ``run_text`` resolves those of the tasks under ``include_path``
against the YAML's own folder (and hands lm-eval the resolved config), so the toolkit runs from any directory.
The reference list is one override away when the Hub's datasets are reachable (or cached)::

    run_text(model, tokenizer, code_vocab, tasks=REFERENCE_TASKS, out_dir=...)   # mmlu, arc_*, boolq, winogrande

(in the orchestrator, the same names as an experiment's text task list). lm-eval's own API reaches the class
by name once this module is imported: ``lm_eval.simple_evaluate(model="uni_x",
model_args="pretrained=outputs/shapes-tiny-uni-x", tasks=resolve_tasks(["shapes_facts"]), ...)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from loguru import logger
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from data_process.schema import atomic_path, atomic_write_text

TASK_DIR = Path(__file__).resolve().parents[1] / "tasks"
DEFAULT_TASKS: tuple[str, ...] = ("shapes_facts",)
REFERENCE_TASKS: tuple[str, ...] = ("mmlu", "arc_easy", "arc_challenge", "boolq", "winogrande")


@register_model("uni_x")
class UniXLM(HFLM):
    """lm-eval's HF model on a Uni-X (or any unified) checkpoint, with scores and generations over text ids only.

    ``pretrained``: an in-memory model (then give ``tokenizer``) or a checkpoint directory this toolkit saved
    (loaded with ``evaluation.pipeline.load_pipeline``). ``image_offset``: the first image id; default
    ``model.config.image_offset``. Other keyword arguments are ``HFLM``'s (``batch_size``, ``max_length`` ...).
    """

    def __init__(self, pretrained: Any, tokenizer: Any = None, image_offset: int | None = None, **kwargs: Any):
        if isinstance(pretrained, (str, Path)):
            from evaluation.pipeline import load_pipeline

            pipe = load_pipeline(pretrained, **{k: kwargs.pop(k) for k in ("dtype",) if k in kwargs},
                                 **({"device": kwargs["device"]} if kwargs.get("device") else {}))
            pretrained, tokenizer = pipe.model, tokenizer or pipe.tokenizer
            image_offset = image_offset if image_offset is not None else pipe.code_vocab.image_offset
        if tokenizer is None:
            raise ValueError("UniXLM: an in-memory model needs its tokenizer= (the text tokenizer saved with it)")
        offset = image_offset if image_offset is not None else getattr(pretrained.config, "image_offset", None)
        if offset is None or not 0 < int(offset) <= pretrained.config.vocab_size:
            raise ValueError(f"UniXLM: image_offset={offset!r} must be in (0, vocab_size="
                             f"{pretrained.config.vocab_size}]: pass image_offset= (the first image id, "
                             f"len(tokenizer) in this toolkit)")
        self.image_offset = int(offset)
        kwargs.setdefault("backend", "causal")
        kwargs.setdefault("device", str(next(pretrained.parameters()).device))
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        # the one change to scoring: lm-eval's log_softmax then normalises over text ids only
        return super()._model_call(inps, attn_mask, labels)[..., : self.image_offset]

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any):
        banned = range(self.image_offset, self.model.config.vocab_size)  # image codes: never text
        generation_kwargs["suppress_tokens"] = sorted(set(generation_kwargs.get("suppress_tokens") or []) | set(banned))
        return super()._model_generate(context, max_length, stop, **generation_kwargs)


# ------------------------------------------------------------------------------------------------ tasks
def local_tasks(include_path: str | Path = TASK_DIR) -> dict[str, Path]:
    """Task name -> YAML file for the tasks under ``include_path`` (lm-eval's own YAML reader)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    out = {}
    for path in sorted(Path(include_path).rglob("*.yaml")):
        cfg = load_yaml(path, resolve_func=False)
        if isinstance(cfg.get("task"), str):
            out[cfg["task"]] = path
    return out


def _resolve_files(files: Any, base: Path) -> Any:
    """``data_files`` (a path, a list, or split -> path(s)) with relative local paths made absolute from ``base``."""
    if isinstance(files, dict):
        return {k: _resolve_files(v, base) for k, v in files.items()}
    if isinstance(files, (list, tuple)):
        return [_resolve_files(v, base) for v in files]
    if isinstance(files, str) and "://" not in files and not Path(files).is_absolute():
        return str(base / files)
    return files


def task_config(path: str | Path) -> dict[str, Any]:
    """A local task's config as lm-eval reads it, with ``dataset_kwargs.data_files`` resolved against the YAML's
    folder; a data file that is missing is an error naming the task file."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(path).resolve()
    cfg = load_yaml(path, resolve_func=True)
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    if "data_files" in kwargs:
        kwargs["data_files"] = _resolve_files(kwargs["data_files"], path.parent)
        files = kwargs["data_files"]
        flat = [files] if isinstance(files, str) else list(files.values()) if isinstance(files, dict) else list(files)
        for f in (x for v in flat for x in ([v] if isinstance(v, str) else v)):
            if "://" not in f and "*" not in f and not Path(f).exists():
                raise FileNotFoundError(f"{path}: dataset_kwargs.data_files names {f}, which does not exist")
        cfg["dataset_kwargs"] = kwargs
    return cfg


def resolve_tasks(tasks: Sequence[str], include_path: str | Path = TASK_DIR) -> list[str | dict[str, Any]]:
    """Local task names -> their resolved configs; other names (lm-eval's own tasks) pass through."""
    local = local_tasks(include_path)
    return [task_config(local[t]) if t in local else t for t in tasks]


# ------------------------------------------------------------------------------------------------ running
def run_text(model: Any, tokenizer: Any, code_vocab: Any, tasks: Sequence[str] = DEFAULT_TASKS,
             out_dir: str | Path = "outputs/eval/text", limit: int | float | None = None,
             include_path: str | Path = TASK_DIR, num_fewshot: int | None = None, batch_size: int = 1,
             bootstrap_iters: int = 1000, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on the in-memory ``model`` through ``UniXLM`` (image offset from ``code_vocab``).

    Writes ``results.json`` (lm-eval's per-task metrics, task versions and sample counts, the request and
    ``settings``, e.g. the checkpoint hash) and ``samples_<task>.jsonl`` (each document's arguments, scores and
    metrics) under ``out_dir``. A rerun with the same request finds ``results.json`` and scores nothing again.
    """
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    request = {"tasks": list(tasks), "limit": limit, "num_fewshot": num_fewshot,
               "include_path": str(Path(include_path).resolve()), "settings": settings or {}}
    done = out / "results.json"
    if done.exists():
        previous = json.loads(done.read_text(encoding="utf-8"))
        if previous.get("request") == json.loads(json.dumps(request, default=str)):
            logger.info(f"{done}: these tasks are already scored; nothing to do")
            return previous
        logger.info(f"{done}: written for another request; scoring again")
    lm = UniXLM(pretrained=model, tokenizer=tokenizer, image_offset=code_vocab.image_offset, batch_size=batch_size)
    specs = resolve_tasks(tasks, include_path)
    # indexing lm-eval's own thousands of task files takes seconds: only when a task is one of them
    manager = TaskManager(include_path=str(include_path), include_defaults=any(isinstance(t, str) for t in specs))
    raw = evaluator.simple_evaluate(model=lm, tasks=specs, num_fewshot=num_fewshot, limit=limit,
                                    task_manager=manager, log_samples=True, bootstrap_iters=bootstrap_iters)
    for task, samples in raw.get("samples", {}).items():
        with atomic_path(out / f"samples_{task}.jsonl") as tmp, tmp.open("w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s, ensure_ascii=False, default=str) + "\n")
    results = {"results": raw["results"], "groups": raw.get("groups", {}), "versions": raw.get("versions", {}),
               "n-samples": raw.get("n-samples", {}), "model": {"lm_eval_model": "uni_x",
                                                                "image_offset": code_vocab.image_offset},
               "request": request}
    atomic_write_text(done, json.dumps(results, indent=2, ensure_ascii=False, default=str))
    for task, metrics in raw["results"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k)
        logger.info(f"text {task}: {shown}")
    return json.loads(json.dumps(results, default=str))
