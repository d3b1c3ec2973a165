"""``load_pipeline(checkpoint, **overrides)``: model + text tokenizer + image tokenizer + the training renderer.

Everything comes from the checkpoint directory: the weights and ``config.json`` (with the code vocabulary), the
text tokenizer the Trainer saved there, and ``uni_x_inference.json`` (``uni_arch.train.inference_spec``: the image
tokenizer's kind/path/hash, the code grid, the chat format, system prompt and size tags). Explicit arguments
override what the checkpoint says. Before anything is generated the parts are checked against each other, and a
disagreement is an error naming both sides: the text tokenizer must give the model's code vocabulary (image ids
start at ``len(tokenizer)``), and the image tokenizer's levels and codebook sizes must be the model's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from modeling.vocab import CodeVocab
from uni_arch.train.args import DataArguments, ModelArguments
from uni_arch.train.builders import build_inference_spec
from uni_arch.train.inference_spec import INFERENCE_SPEC_NAME, InferenceSpec
from uni_arch.train.templates import ChatFormat, SampleBuilder

OVERRIDES = ("image_tokenizer", "image_tokenizer_path", "tokenizer_path", "grid", "system_prompt", "size_tags",
             "template_dir", "template_name", "device", "dtype", "attn_implementation")


def spec_from_run_args(directory: str | Path, tokenizer, code_vocab: CodeVocab) -> InferenceSpec:
    """Rebuild the spec of a final checkpoint saved before ``uni_x_inference.json`` existed, from its
    ``run_args.json`` (relative paths in it are the training run's: resolved against the current directory)."""
    path = Path(directory) / "run_args.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        groups = []
        for key, group in (("model", ModelArguments), ("data", DataArguments)):
            known = {f.name for f in fields(group)}
            groups.append(group(**{k: v for k, v in raw[key].items() if k in known}))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: cannot rebuild {INFERENCE_SPEC_NAME} from it ({type(e).__name__}: {e})") from e
    return build_inference_spec(groups[0], groups[1], tokenizer, code_vocab)


@dataclass
class Pipeline:
    """A loaded checkpoint ready to generate: what :class:`evaluation.uni_infer.UniInfer` holds."""

    model: Any  # UniXForCausalLM, eval mode
    tokenizer: Any  # the text tokenizer (fast)
    image_tokenizer: Any | None  # modeling.vq ImageTokenizer, or None (codes cannot be decoded / images encoded)
    builder: SampleBuilder  # the training renderer with the checkpoint's settings
    code_vocab: CodeVocab
    grid: tuple[int, int] | None  # default code grid to draw
    checkpoint: str
    settings: dict[str, Any]  # what was used (spec + overrides), recorded with every result

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def levels(self, grid: tuple[int, int] | None = None) -> list[int]:
        """Per-position codebook level of an image of ``grid`` (default: the checkpoint's grid)."""
        grid = self.resolve_grid(grid)
        if self.image_tokenizer is not None:
            return self.image_tokenizer.code_levels(grid).tolist()
        return [0] * (grid[0] * grid[1])  # codes only: a single-level layout is all the vocabulary can say

    def resolve_grid(self, grid: tuple[int, int] | None) -> tuple[int, int]:
        grid = grid if grid is not None else self.grid
        if grid is None:
            raise ValueError(f"{self.checkpoint}: no code grid known (no image tokenizer recorded): pass grid=(h, w)")
        return int(grid[0]), int(grid[1])


def check_image_tokenizer(image_tokenizer, code_vocab: CodeVocab, grid: tuple[int, int], where: str) -> None:
    """The image tokenizer must produce exactly the model's code vocabulary (levels and codebook sizes)."""
    sizes = tuple(int(s) for s in image_tokenizer.level_sizes)
    if sizes != tuple(code_vocab.level_sizes):
        raise ValueError(
            f"{where}: the image tokenizer {image_tokenizer.tokenizer_id} has codebook levels {list(sizes)} but the "
            f"model's code vocabulary (config.code_vocab) has levels {list(code_vocab.level_sizes)}: use the image "
            f"tokenizer the model was trained with")
    used = set(image_tokenizer.code_levels(grid).tolist())
    if not used <= set(range(len(code_vocab.level_sizes))):
        raise ValueError(f"{where}: the image tokenizer's grid {grid} uses levels {sorted(used)} but the model has "
                         f"{len(code_vocab.level_sizes)} level(s)")


def _check_text_tokenizer(tokenizer, code_vocab: CodeVocab, where: str) -> None:
    try:
        got = CodeVocab.from_tokenizer(tokenizer, code_vocab.level_sizes, code_vocab.max_grid)
    except ValueError as e:
        raise ValueError(f"{where}: the text tokenizer does not fit the model: {e}") from e
    if got != code_vocab:
        raise ValueError(f"{where}: the text tokenizer gives the code vocabulary {got.to_dict()} but the model's "
                         f"config.code_vocab is {code_vocab.to_dict()}: use the tokenizer saved with the checkpoint")


def load_pipeline(checkpoint: str | Path, **overrides: Any) -> Pipeline:
    """Load a checkpoint saved by this toolkit's trainer; ``overrides`` (see ``OVERRIDES``) beat the checkpoint.

    ``image_tokenizer`` / ``image_tokenizer_path``: another image tokenizer (its hash may differ from the recorded
    one: a warning; its vocabulary may not: an error). ``tokenizer_path``: another text tokenizer. ``grid``: the
    default code grid. ``system_prompt`` / ``size_tags``: renderer settings. ``template_dir`` / ``template_name``:
    render with a chat format file instead of the checkpoint's copy. ``device``, ``dtype`` (e.g. ``"bfloat16"``),
    ``attn_implementation`` (default ``sdpa``).
    """
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise TypeError(f"load_pipeline: unknown override(s) {unknown}; known: {', '.join(OVERRIDES)}")
    from transformers import AutoConfig, AutoModelForCausalLM

    import modeling  # noqa: F401  registers uni_x_qwen2 with the Auto classes
    from data_process.text_tokenizer import load_text_tokenizer
    from modeling.vq import load_image_tokenizer

    checkpoint = str(checkpoint)
    code_vocab = AutoConfig.from_pretrained(checkpoint).code_vocab
    tokenizer = load_text_tokenizer(overrides.get("tokenizer_path") or checkpoint)
    _check_text_tokenizer(tokenizer, code_vocab, checkpoint)
    if not (Path(checkpoint) / INFERENCE_SPEC_NAME).is_file() and (Path(checkpoint) / "run_args.json").is_file():
        logger.warning(f"{checkpoint} has no {INFERENCE_SPEC_NAME} (saved before checkpoints carried it): "
                       f"rebuilding it from run_args.json (the image tokenizer's hash is today's, it cannot be checked)")
        spec = spec_from_run_args(checkpoint, tokenizer, code_vocab)
    else:
        spec = InferenceSpec.load(checkpoint)
    if CodeVocab.from_dict(spec.code_vocab) != code_vocab:
        raise ValueError(f"{checkpoint}: {INFERENCE_SPEC_NAME} was written for the code vocabulary {spec.code_vocab} "
                         f"but config.code_vocab is {code_vocab.to_dict()}: the file belongs to another run")
    dtype = overrides.get("dtype") or "float32"
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype,
        attn_implementation=overrides.get("attn_implementation") or "sdpa")
    model.to(overrides.get("device") or "cpu").eval()

    ref = spec.image_tokenizer
    kind = overrides.get("image_tokenizer") or (ref.kind if ref else None)
    path = overrides.get("image_tokenizer_path") or (ref.path if ref else None)
    image_tokenizer = None
    grid = tuple(overrides["grid"]) if overrides.get("grid") is not None else (tuple(spec.grid) if spec.grid else None)
    if kind and path:
        if not Path(path).exists():
            raise FileNotFoundError(f"{checkpoint}: image tokenizer {path} ({kind}) recorded in uni_x_inference.json "
                                    f"does not exist here: pass image_tokenizer_path=<its local copy>")
        image_tokenizer = load_image_tokenizer(kind, path).to(model.device).eval()
        if ref is not None and image_tokenizer.checkpoint_hash != ref.hash:
            msg = (f"{checkpoint}: image tokenizer {path} has weights hash {image_tokenizer.checkpoint_hash}, the "
                   f"checkpoint was trained with {ref.hash} ({ref.path})")
            if "image_tokenizer_path" not in overrides:
                raise ValueError(msg + ": the file changed since training; pass image_tokenizer_path to use it anyway")
            logger.warning(msg)
        grid = grid or image_tokenizer.native_grid
        check_image_tokenizer(image_tokenizer, code_vocab, grid, checkpoint)

    builder_kwargs = {k: overrides[k] for k in ("system_prompt", "size_tags") if overrides.get(k) is not None}
    if overrides.get("template_dir") or overrides.get("template_name"):
        builder_kwargs["chat_format"] = ChatFormat.load(overrides.get("template_dir"),
                                                        overrides.get("template_name") or "chatml")
    builder = spec.sample_builder(tokenizer, code_vocab, source=f"{checkpoint}/uni_x_inference.json", **builder_kwargs)
    settings = {**spec.to_dict(), "overrides": {k: str(v) for k, v in overrides.items()},
                "grid": list(grid) if grid else None, "checkpoint": str(Path(checkpoint).resolve())}
    logger.info(f"loaded {checkpoint}: {type(model).__name__} variant={getattr(model.config, 'variant', '?')}, "
                f"image tokenizer {image_tokenizer.tokenizer_id if image_tokenizer else None}, grid {grid}")
    return Pipeline(model, tokenizer, image_tokenizer, builder, code_vocab, grid, checkpoint, settings)
