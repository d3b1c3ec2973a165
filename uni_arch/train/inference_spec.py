"""``uni_x_inference.json``: what a checkpoint needs to be *used*, written next to its weights at every save.

A checkpoint directory holds the model (``config.json`` + weights, with the code vocabulary in the config) and the
text tokenizer (the Trainer saves its ``processing_class``). What it did not hold, and inference must not guess:
which image tokenizer made the codes (kind, path and the hash of its weights), the code grid images were drawn on,
and how prompts were rendered (the chat format itself, not the name of a file that may change later, the system
prompt, size tags, the native grid). :class:`InferenceSpec` owns that schema; ``UniTrainer.save_model`` writes it
into every checkpoint (final and ``checkpoint-N/``, any engine, from the process that writes the weights) and
``evaluation.pipeline.load_pipeline`` rebuilds the training renderer from it, so a prompt at inference is byte for
byte a training prompt.

Cost: one extra load of the image tokenizer at the start of a run, for its hash and native grid (the shapes VQ:
milliseconds; Chameleon's VQGAN: a few seconds).
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from data_process.schema import atomic_write_text
from modeling.vocab import CodeVocab
from uni_arch.train.templates import ChatFormat, SampleBuilder

INFERENCE_SPEC_NAME = "uni_x_inference.json"
SPEC_VERSION = 1


@dataclass(frozen=True)
class ImageTokenizerRef:
    """Which image tokenizer made the codes: ``kind`` (``modeling.vq`` registry name), local ``path``, weights hash."""

    kind: str
    path: str
    hash: str


@dataclass
class InferenceSpec:
    """The schema of ``uni_x_inference.json`` (see the module docstring); ``version`` guards future changes."""

    code_vocab: dict[str, Any]  # CodeVocab.to_dict(); must equal the model config's code_vocab
    chat_format: dict[str, Any]  # ChatFormat.to_dict(): the roles, instructions and questions themselves
    chat_template_jinja: str  # the same format for tokenizer.apply_chat_template
    system_prompt: str | None  # the resolved one (the run's argument, else the format's default)
    size_tags: bool
    ignore_instruction: bool
    fixed_grid: list[int] | None = None
    image_tokenizer: ImageTokenizerRef | None = None  # None: trained on codes alone (no decoder known)
    grid: list[int] | None = None  # default code grid to draw (the image tokenizer's native grid)
    version: int = SPEC_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance (run name, variant, ...)

    # ------------------------------------------------------------------------------------------ build
    @classmethod
    def from_builder(cls, builder: SampleBuilder, image_tokenizer: ImageTokenizerRef | None = None,
                     grid: tuple[int, int] | None = None, **extra: Any) -> "InferenceSpec":
        """Everything :meth:`sample_builder` needs to render exactly as ``builder`` does."""
        return cls(
            code_vocab=builder.code_vocab.to_dict(),
            chat_format=builder.format.to_dict(),
            chat_template_jinja=builder.format.jinja_path().read_text(encoding="utf-8")
            if builder.format.jinja_path().is_file() else "",
            system_prompt=builder.system_prompt,
            size_tags=bool(builder.size_tags),
            ignore_instruction=bool(builder.ignore_instruction),
            fixed_grid=list(builder.fixed_grid) if builder.fixed_grid is not None else None,
            image_tokenizer=image_tokenizer,
            grid=list(grid) if grid is not None else None,
            extra=extra,
        )

    def sample_builder(self, tokenizer, code_vocab: CodeVocab | None = None, *, source: str = INFERENCE_SPEC_NAME,
                       system_prompt: str | None = None, size_tags: bool | None = None,
                       chat_format: ChatFormat | None = None) -> SampleBuilder:
        """The training renderer, rebuilt from this spec (``system_prompt`` / ``size_tags`` / ``chat_format``
        override it)."""
        return SampleBuilder(
            tokenizer, code_vocab if code_vocab is not None else CodeVocab.from_dict(self.code_vocab),
            ignore_instruction=self.ignore_instruction,
            size_tags=self.size_tags if size_tags is None else size_tags,
            fixed_grid=tuple(self.fixed_grid) if self.fixed_grid is not None else None,
            system_prompt=self.system_prompt if system_prompt is None else system_prompt,
            chat_format=chat_format or ChatFormat.from_dict(self.chat_format, source=f"{source}: chat_format"),
        )

    # ------------------------------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, directory: str | Path) -> Path:
        """Write ``<directory>/uni_x_inference.json`` atomically (a killed save never leaves half a file)."""
        path = Path(directory) / INFERENCE_SPEC_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "InferenceSpec":
        """Read and validate ``<directory>/uni_x_inference.json``; errors name the file and the field."""
        path = Path(directory) / INFERENCE_SPEC_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {directory} is not a checkpoint saved by this toolkit's trainer (every save "
                f"writes it); pass the settings explicitly (image_tokenizer=, image_tokenizer_path=, ...) or re-save")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object")
        if raw.get("version") != SPEC_VERSION:
            raise ValueError(f"{path}: version={raw.get('version')!r}; this toolkit reads version {SPEC_VERSION}")
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        unknown, missing = sorted(set(raw) - known), sorted(required - set(raw))
        if unknown or missing:
            raise ValueError(f"{path}: unknown field(s) {unknown}, missing field(s) {missing}")
        if raw.get("image_tokenizer") is not None:
            ref = raw["image_tokenizer"]
            if not isinstance(ref, dict) or set(ref) != {"kind", "path", "hash"}:
                raise ValueError(f"{path}: field image_tokenizer must be null or {{kind, path, hash}}, got {ref!r}")
            raw["image_tokenizer"] = ImageTokenizerRef(**ref)
        try:
            CodeVocab.from_dict(raw["code_vocab"])
            ChatFormat.from_dict(raw["chat_format"], source=f"{path}: chat_format")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: field {'code_vocab' if 'CodeVocab' in str(e) else 'chat_format'}: {e}") from e
        for name in ("grid", "fixed_grid"):
            value = raw.get(name)
            if value is not None and (not isinstance(value, list) or len(value) != 2
                                      or not all(isinstance(x, int) and x > 0 for x in value)):
                raise ValueError(f"{path}: field {name} must be null or [h, w] of positive integers, got {value!r}")
        return cls(**raw)
