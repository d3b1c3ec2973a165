"""Training configuration: three argument groups, a YAML preset and command-line overrides.

Precedence is stated and tested: **dataclass defaults < YAML preset (``--config x.yaml``) < command line**. Every
knob of the reference ``train.sh`` exists under its reference name (``model_spec_module``, ``use_data_packing``,
``unfreeze_keys``, ...). Invalid values and unknown keys -- on the command line or in the YAML -- fail before any
work with a message that names the field (and the YAML file).

Reference values are mapped, not copied blindly:

* ``model_spec_module``: ``x``/``unix`` -> Uni-X (two-end separated layers), ``mot`` -> MoT, ``moe`` -> MoE,
  ``dense`` -> plain Qwen2 with the expanded vocabulary.
* ``custom_cls``: ``uni_qwen`` builds the family class chosen by ``model_spec_module``; ``none`` forces dense.
* ``model_version`` and ``vq_resolution`` are not arguments here: the reference's ``model_version`` picked a LLaVA
  conversation template that its packing collator never reads (its prompts are ``chat_template=reference`` here;
  the decoder is the checkpoint's ``backbone``), and the image resolution is the image tokenizer's own, so a knob
  for either would be accepted and ignored. ``train.sh`` stops with a message when ``MODEL_VERSION``/``VQ_RESOLUTION``
  is set.
* ``add_share_ffn``, ``ffn_share_size``, ``ffn_vision_size``, ``decoder_sparse_step`` (= ``moe_every_k``),
  ``init_vision_with_text`` and ``mot_style`` (ours | reference): the reference's architecture knobs with its meaning
  (`modeling.configuration_uni_x.UniXConfig`); README "Porting from the reference" has the table.
* ``per_device_train_batch_size`` counts packed ROWS here, raw samples per row in the reference: the start-up log
  prints the tokens per step in both readings (`builders.log_batch_size_readings`).
* ``unfreeze_keys``: ``train-all``, or comma-separated name patterns (``fnmatch``, or plain substrings); the
  pattern ``image_embeddings`` trains only the image-code ROWS of the (possibly tied) embedding through a gradient
  mask.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from modeling.vq import IMAGE_TOKENIZERS

SPEC_TO_VARIANT = {"x": "uni_x", "unix": "uni_x", "mot": "mot", "moe": "moe", "dense": "dense"}


def _check_01(name: str, value: int) -> None:
    if value not in (0, 1):
        raise ValueError(f"{name}={value!r} must be 0 or 1")


def _check_fraction(name: str, value: float, low_open: bool = False) -> None:
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok:
        raise ValueError(f"{name}={value!r} must be in {'(0, 1]' if low_open else '[0, 1]'}")


@dataclass
class ModelArguments:
    """What to build: the checkpoint or config, the variant and its separated layers, what trains."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Checkpoint directory to start from (a previous stage, a converted Qwen2.5)."}
    )
    model_config: str | None = field(
        default=None,
        metadata={"help": "Model config json for a fresh random init (e.g. configs/model/tiny_uni_x.json); "
                  "used when model_name_or_path is empty."},
    )
    custom_cls: str = field(
        default="uni_qwen",
        metadata={"help": "uni_qwen: the Uni-X family class; none: plain dense Qwen2.", "choices": ["uni_qwen", "none"]},
    )
    model_spec_module: str = field(
        default="x", metadata={"help": "Architecture variant (x = Uni-X).", "choices": sorted(SPEC_TO_VARIANT)}
    )
    vision_encode_layers: int | None = field(default=None, metadata={"help": "First layers with a vision twin."})
    vision_decode_layers: int | None = field(default=None, metadata={"help": "Last layers with a vision twin."})
    all_modal_visible: int | None = field(
        default=None, metadata={"help": "1: separated layers attend across modalities of a document; 0: same modality only."}
    )
    ffn_vision_size: int | None = field(default=None, metadata={
        "help": "FFN width of the vision branches (separated, MoT, MoE); with add_share_ffn=1 the middle layers' "
                "vision FFN (0: none), the separated ones then being intermediate_size as in the reference."})
    ffn_share_size: int | None = field(default=None, metadata={
        "help": "Reference knob: width of the shared FFN that add_share_ffn=1 adds to the middle layers (0: none); "
                "unused otherwise."})
    add_share_ffn: int | None = field(default=None, metadata={
        "help": "Reference knob, Uni-X: 1 = the middle layers add a shared FFN to each modality's own FFN."})
    moe_every_k: int | None = field(default=None, metadata={"help": "MoE: every k-th layer is modality-routed."})
    decoder_sparse_step: int | None = field(default=None, metadata={
        "help": "Reference knob: the MoE step, same meaning as moe_every_k (give one; the reference's default is 2)."})
    mot_style: str | None = field(default=None, metadata={
        "help": "MoT: ours (per-modality q/k/v/o and norms) or reference (the reference's MoT baseline: shared norms, "
                "the text o_proj for every token).", "choices": [None, "ours", "reference"]})
    unfreeze_keys: str = field(
        default="train-all",
        metadata={"help": "train-all, or comma-separated parameter-name patterns to train (stage 1: "
                  "'vision,image_embeddings')."},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention backend; empty = the model's recommended one for packed rows."}
    )
    tokenizer_path: str | None = field(
        default=None, metadata={"help": "Text tokenizer: a directory or 'qwen2.5'. Empty = model_name_or_path."}
    )
    image_tokenizer: str = field(
        default="shapes", metadata={"help": "Image tokenizer kind (for the code vocabulary).",
                                    "choices": list(IMAGE_TOKENIZERS)}
    )
    image_tokenizer_path: str | None = field(
        default=None, metadata={"help": "Image tokenizer checkpoint; empty = image_level_sizes or the model's config."}
    )
    image_level_sizes: str | None = field(
        default=None, metadata={"help": "Codebook size per level ('8192' or '64,256') when no image tokenizer "
                                "checkpoint is given (saves loading the VQ just for its sizes)."}
    )

    @property
    def variant(self) -> str:
        return "dense" if self.custom_cls == "none" else SPEC_TO_VARIANT[self.model_spec_module]

    @property
    def level_sizes(self) -> list[int] | None:
        """``image_level_sizes`` parsed ("8192" or "512,512"); None when not given."""
        if self.image_level_sizes is None:
            return None
        try:
            return [int(x) for x in str(self.image_level_sizes).split(",")]
        except ValueError as e:
            raise ValueError(f"image_level_sizes={self.image_level_sizes!r} must be comma-separated integers") from e

    def __post_init__(self) -> None:
        if not self.model_name_or_path and not self.model_config:
            raise ValueError("model_name_or_path and model_config are both empty: give a checkpoint or a config json")
        for name in ("vision_encode_layers", "vision_decode_layers", "moe_every_k", "decoder_sparse_step"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name}={value} must be >= 0")
        from modeling.conversion import resolve_moe_every_k

        if self.decoder_sparse_step is not None:  # the reference's name: one field from here on
            self.moe_every_k = resolve_moe_every_k(self.moe_every_k, self.decoder_sparse_step)
        if self.add_share_ffn is not None:
            _check_01("add_share_ffn", self.add_share_ffn)
        for name in ("ffn_vision_size", "ffn_share_size"):
            value = getattr(self, name)
            if value is not None and (value < 0 or (value == 0 and not self.add_share_ffn)):
                raise ValueError(f"{name}={value} must be positive (0, no such FFN, only with add_share_ffn=1)")
        if self.all_modal_visible is not None:
            _check_01("all_modal_visible", self.all_modal_visible)
        if not self.unfreeze_keys.strip():
            raise ValueError("unfreeze_keys is empty: use 'train-all' or name patterns")
        if self.image_level_sizes is not None:
            sizes = self.level_sizes
            if not sizes or min(sizes) <= 0:
                raise ValueError(f"image_level_sizes={self.image_level_sizes!r} must be positive")
        if self.model_spec_module not in SPEC_TO_VARIANT:
            raise ValueError(f"model_spec_module={self.model_spec_module!r} must be one of {sorted(SPEC_TO_VARIANT)}")


@dataclass
class DataArguments:
    """Where the records are and how they become packed rows."""

    data_path: str = field(
        default="data/shapes_codes",
        metadata={"help": "Record files (.jsonl, .parquet), globs or folders; several sources with weights: "
                  "'a/*.jsonl:0.7,b:0.3', or the reference's concatenation 'a^^b' (see percentage)."},
    )
    streaming_data: int = field(default=0, metadata={"help": "1: stream the jsonl shards instead of loading them."})
    data_percentage: float = field(default=1.0, metadata={"help": "Fraction of every source to use, (0, 1]."})
    percentage: str | None = field(
        default=None, metadata={"help": "Reference knob: fraction of every source ('0.5'), or one per '^^' source of "
                                "data_path ('0.5^^1.0'); in place of data_percentage."}
    )
    t2i_ratio: float = field(default=0.5, metadata={"help": "Probability that an image_text record is text-to-image."})
    cfg_dropout: float = field(default=0.1, metadata={"help": "Probability of the unconditional prompt in t2i samples."})
    ignore_instruction: int = field(default=1, metadata={"help": "1: no loss on prompts/instructions."})
    shuffle_seed: int = field(default=218, metadata={"help": "Seed of the record shuffle and sample rendering."})
    model_max_length: int = field(default=2048, metadata={"help": "Row capacity in tokens (packing) / max sample length."})
    use_data_packing: int = field(
        default=2, metadata={"help": "0: pad batches; 1: pretraining packing; 2: SFT packing.", "choices": [0, 1, 2]}
    )
    overlong: str = field(
        default="split", metadata={"help": "Samples longer than a row: split at text or drop.", "choices": ["split", "drop"]}
    )
    packing_buffer: int = field(default=512, metadata={
        "help": "Streaming and data_cache_dir: samples packed together per buffer (the lazy path's window)."})
    data_cache_dir: str | None = field(default=None, metadata={
        "help": "Large corpora: read the records lazily from arrow shards in this directory, validated once (python "
                "-m uni_arch.train.prepare_data, or rank 0 of the first run), and render and pack them on the fly "
                "(uni_arch/train/lazy_dataset.py; needs max_steps). Empty: the map-style or streaming path."})
    prepare_num_proc: int = field(default=1, metadata={
        "help": "data_cache_dir: record files validated in parallel when shards are prepared."})
    skip_bad_records: bool = field(default=False, metadata={"help": "Count and skip malformed records instead of stopping."})
    size_tags: bool = field(default=False, metadata={"help": "Put <height_h><width_w> before the codes."})
    system_prompt: str | None = field(default=None, metadata={"help": "System prompt of conversation samples."})
    template_dir: str | None = field(default=None, metadata={"help": "Chat template directory (default: configs/chat_templates)."})
    chat_template: str = field(default="chatml", metadata={
        "help": "Chat format <template_dir>/<name>.yaml: chatml (Qwen2.5's ChatML), plain (no markup) or reference "
                "(the reference Uni-X's own samples, token for token). Recorded in every checkpoint for inference."})

    def __post_init__(self) -> None:
        _check_01("streaming_data", self.streaming_data)
        _check_01("ignore_instruction", self.ignore_instruction)
        _check_fraction("data_percentage", self.data_percentage, low_open=True)
        if self.percentage is not None and self.data_percentage != 1.0:
            raise ValueError(f"percentage={self.percentage!r} and data_percentage={self.data_percentage} are both set: "
                             "give one (percentage is the reference's name, with one fraction per '^^' source)")
        for value in self.percentages or []:
            _check_fraction("percentage", value, low_open=True)
        _check_fraction("t2i_ratio", self.t2i_ratio)
        _check_fraction("cfg_dropout", self.cfg_dropout)
        if self.use_data_packing not in (0, 1, 2):
            raise ValueError(f"use_data_packing={self.use_data_packing!r} must be 0, 1 or 2")
        if self.model_max_length <= 0:
            raise ValueError(f"model_max_length={self.model_max_length} must be positive")
        if self.data_cache_dir is not None and not str(self.data_cache_dir).strip():
            self.data_cache_dir = None
        if self.data_cache_dir and self.streaming_data:
            raise ValueError(f"data_cache_dir={self.data_cache_dir!r} and streaming_data=1: the lazy path replaces "
                             "streaming; give one")
        if self.prepare_num_proc <= 0:
            raise ValueError(f"prepare_num_proc={self.prepare_num_proc} must be positive")
        if self.packing_buffer <= 0:
            raise ValueError(f"packing_buffer={self.packing_buffer} must be positive")
        if not self.data_path.strip():
            raise ValueError("data_path is empty")
        from uni_arch.train.templates import DEFAULT_TEMPLATE_DIR

        template_dir = Path(self.template_dir) if self.template_dir else DEFAULT_TEMPLATE_DIR
        if not (template_dir / f"{self.chat_template}.yaml").is_file():
            known = sorted(p.stem for p in template_dir.glob("*.yaml")) if template_dir.is_dir() else []
            raise ValueError(f"chat_template={self.chat_template!r}: no {template_dir / (self.chat_template + '.yaml')} "
                             f"(template_dir={str(template_dir)!r} holds {known})")

    @property
    def percentages(self) -> list[float] | None:
        """``percentage`` parsed ('0.5' or '0.5^^1.0'); None when not given."""
        if self.percentage is None:
            return None
        try:
            return [float(x) for x in str(self.percentage).split("^^")]
        except ValueError as e:
            raise ValueError(f"percentage={self.percentage!r} must be fractions joined by '^^' (e.g. 0.5^^1.0)") from e


@dataclass
class UniTrainingArguments(TrainingArguments):
    """HF TrainingArguments with the defaults this pipeline needs and the curve outputs."""

    # A packed row is already a batch (model_max_length tokens); several rows per step are flattened into one.
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Rows per device per micro-step."})
    # Rows are dicts of our own keys; the Trainer must not drop them by the model's forward signature.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep False: the collator owns the keys."})
    # The Uni-X model keeps both branches in the graph on every row (a zero-weighted term when a modality is absent,
    # DESIGN.md section 9), so DDP needs no extra graph traversal; tests/test_distributed.py pins a text-only rank.
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "DDP: search for unused parameters every step (slower; not needed)."}
    )
    warmup_ratio: float | None = field(
        default=None, metadata={"help": "Reference knob: warmup as a fraction of the steps (sets warmup_steps, which "
                                "transformers 5 reads as a ratio when < 1)."}
    )
    init_vision_with_text: int = field(
        default=0, metadata={"help": "Reference knob: 1 = before training, copy every text weight into the vision "
                             "branch at the same depth (its init_vision_weights; here for every variant, where shapes "
                             "match); 0 = keep the loaded/initialised vision weights. Conversion already copies by "
                             "default (modeling/conversion.py --init_vision_with_text)."}
    )
    write_loss_curves: bool = field(
        default=True, metadata={"help": "Write loss_curves.csv/.png (per-modality losses) into output_dir."}
    )
    loss_chunk_size: int = field(
        default=0, metadata={"help": "0: the plain loss (the whole row's [tokens, vocab] float32 logits); N > 0: the "
                             "loss in chunks of N tokens whose logits never coexist (uni_arch/train/chunked_loss.py; "
                             "same values, memory ~ N x vocab x 4 bytes; e.g. 1024). Not with ZeRO-3/FSDP."}
    )

    def __post_init__(self) -> None:
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns=True would drop the packed-row keys; keep it False")
        _check_01("init_vision_with_text", self.init_vision_with_text)
        if self.loss_chunk_size < 0:
            raise ValueError(f"loss_chunk_size={self.loss_chunk_size} must be >= 0 (0 = the plain loss)")
        if self.label_smoothing_factor:  # HF's smoother lives in Trainer.compute_loss, which UniTrainer replaces
            raise ValueError(f"label_smoothing_factor={self.label_smoothing_factor}: not applied by the per-modality "
                             "loss (UniTrainer.compute_loss); leave it at 0")
        if self.warmup_ratio is not None:
            _check_fraction("warmup_ratio", self.warmup_ratio)
            if self.warmup_ratio >= 1.0:
                raise ValueError(f"warmup_ratio={self.warmup_ratio} must be < 1")
            if self.warmup_steps:
                raise ValueError(f"warmup_ratio={self.warmup_ratio} and warmup_steps={self.warmup_steps}: give one")
            self.warmup_steps = self.warmup_ratio
        # Streamed rows differ in length and every rank reads its own shards: accelerate must not fetch batches on
        # rank 0 and concatenate them for dispatch (its default for iterable datasets), which fails on ragged rows.
        if self.accelerator_config is None:
            self.accelerator_config = {"dispatch_batches": False}
        elif isinstance(self.accelerator_config, dict):
            self.accelerator_config.setdefault("dispatch_batches", False)
        super().__post_init__()


ARG_GROUPS = (ModelArguments, DataArguments, UniTrainingArguments)


class UniArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` with a ``--config x.yaml`` preset under the command line."""

    def parse_with_config(self, argv: list[str] | None = None) -> tuple[Any, ...]:
        argv = list(sys.argv[1:] if argv is None else argv)
        config_path, argv = _pop_config(argv)
        if config_path is not None:
            preset = load_yaml_preset(config_path, self.known_fields())
            self._check_choices(preset, config_path)
            self.set_defaults(**preset)
        return self.parse_args_into_dataclasses(args=argv, look_for_args_file=False)

    def _check_choices(self, preset: dict[str, Any], path: str) -> None:
        """argparse checks ``choices`` only on the command line; check the YAML values the same way."""
        for dtype in self.dataclass_types:
            for f in fields(dtype):
                choices = f.metadata.get("choices")
                if choices is not None and f.name in preset and preset[f.name] not in choices:
                    raise ValueError(f"{path}: {f.name}={preset[f.name]!r} must be one of {choices}")

    def known_fields(self) -> set[str]:
        return {f.name for dtype in self.dataclass_types for f in fields(dtype) if f.init}


def _pop_config(argv: list[str]) -> tuple[str | None, list[str]]:
    out, config = [], None
    it = iter(range(len(argv)))
    for i in it:
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config needs a YAML path")
            config = argv[i + 1]
            next(it, None)
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        else:
            out.append(arg)
    return config, out


def load_yaml_preset(path: str | Path, known: set[str]) -> dict[str, Any]:
    """Read a flat YAML preset; unknown keys are an error naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a training preset is a mapping of argument names to values")
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; see `python uni_arch/train/hf_trainer.py --help`")
    return data


def make_parser() -> UniArgumentParser:
    return UniArgumentParser(ARG_GROUPS)


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, UniTrainingArguments]:
    """defaults < YAML (``--config``) < command line; validation errors name the field."""
    return make_parser().parse_with_config(argv)
