"""Qwen2/Qwen2.5/Qwen3 checkpoint -> any variant (dense, Uni-X, MoT, MoE), and back where that is defined.

    python modeling/conversion.py --src <qwen dir> --dst <dir> --variant uni_x \\
        --vision_encode_layers 9 --vision_decode_layers 5 --num_image_tokens 8192 [--tokenizer_dir <dir>]
    python modeling/conversion.py --from_config configs/model/tiny_uni_x.json --dst <dir>   # random init
    python modeling/conversion.py --src <mot/moe/dense dir> --dst <dir> --to_dense          # back to Qwen2/Qwen3

Backbone (``UniXConfig.backbone``): a Qwen2/Qwen2.5 source (``model_type="qwen2"``) gives ``qwen2``, a Qwen3 source
gives ``qwen3``; both are exact (the converted model equals its source on text). ``--backbone qwen3`` with a Qwen2.5
source is the reference Uni-X's move (it loads Qwen2.5 weights into transformers' Qwen3 classes): the q/k/v biases
are dropped and the new per-head q/k norms start at ones, so the result is NO LONGER the source model (measured on a
tiny random model: every logit moves); the conversion logs that it changes the function and by how much the dropped
biases weighed. Qwen3 -> ``qwen2`` has no such move and is refused.

The reference's released Uni-X checkpoints (its own layout, ``vision_encode_layers`` / ``vision_decode_layers``
module lists) import with ``import_reference`` and export back with ``export_reference`` (see those functions).

Initialisation (DESIGN.md section 4), ``init_vision_with_text`` (the reference's name): 1 (this toolkit's default)
makes every vision branch a copy of the text layer at the same depth (layer i -> encode layer i; layer L-M+i ->
decode layer i, which IS layer L-M+i; MoT/MoE/share-FFN: the vision experts copy the text ones); a vision FFN of
another width cannot be copied and keeps its random init (the log says so). 0 leaves every vision weight at its
random init (transformers' ``_init_weights``: normal, std ``initializer_range``), which is what the reference gets by
default (its ``init_vision_with_text=0`` loads a Qwen2.5 checkpoint into its classes and leaves the missing vision
weights random) and always for its MoT/MoE baselines; ``mot_style="reference"`` therefore defaults to 0. The shared
FFN of ``add_share_ffn=1`` has no text counterpart: it always starts random, as in the reference.

New vocabulary rows (image codes, size tags, padding) are initialised as the reference does, by transformers'
``resize_token_embeddings(..., mean_resizing=True)`` itself: sampled from a multivariate normal with the mean of the
old rows and ``1e-9`` times their covariance (transformers' scaling: the new rows sit at the mean, each slightly
different), for the input embedding and an untied ``lm_head`` alike; tied embeddings (Qwen2.5-0.5B..3B) stay tied.
Sampling is seeded (``seed``), so a conversion is reproducible. Two layouts of the rows (``vocab_layout``):

    ``compact`` (default)  the text rows ``[0, image_offset)`` are kept and are the "old rows"; everything from
                           ``image_offset`` on is new (Qwen2.5's 271 unused spare rows past ``len(tokenizer)`` are
                           replaced), ``vocab_size = round_up(total_vocab_size, pad_to_multiple_of)``: Qwen2.5 +
                           8,192 codes -> 159,857 ids -> 159,872 rows.
    ``reference``          the reference's ``resize_token_embeddings(config.vocab_size + num_codes)``: every source row
                           is kept and is an "old row", new rows are appended after them, and codes still start at
                           ``image_offset``, so codes 0..270 of Qwen2.5 land on its spare rows (the reference notes
                           this itself): 151,936 + 8,192 = 160,128 rows, the count of its released checkpoints.

Rows in ``[total_vocab_size, vocab_size)`` (the padding) are no token: training never has them as targets and
decoding must ban them (as it bans text ids in image mode and codes in text mode).
Consequences pinned by tests: a converted checkpoint equals its base on text-only input, and MoT/MoE with copied
experts equal the converted dense model on any input.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
from huggingface_hub import save_torch_state_dict
from loguru import logger
from tqdm import tqdm
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from modeling import UniXConfig, UniXForCausalLM, build_model
from modeling.vocab import VISION_END, VISION_START, CodeVocab

QWEN25_VISION_START, QWEN25_VISION_END = 151652, 151653
# source model_type -> (stock CausalLM class, its config class, the backbone it converts to)
SOURCE_FAMILIES: dict[str, tuple[type[PreTrainedModel], type[PretrainedConfig], str]] = {
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, "qwen2"),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, "qwen3"),
}
BACKBONE_CAUSAL_LM = {backbone: (cls, cfg_cls) for cls, cfg_cls, backbone in SOURCE_FAMILIES.values()}
QKV_BIAS_DROPPED = (
    "backbone qwen2 -> qwen3 (the reference's Qwen2.5-into-Qwen3 move): the q/k/v biases are dropped and the per-head "
    "q/k norms start at ones, so the converted model is NOT the source model (its outputs differ on every input)"
)
UNI_X_TO_DENSE_UNDEFINED = (
    "Uni-X -> dense text model is not defined: the separated layers' text branches were trained with the vision "
    "branches beside them (and, with all_modal_visible=1, attending to vision keys), so a model without them is "
    "not the trained model on any input with images. Evaluate text directly with the Uni-X checkpoint: "
    "HFLM(pretrained=model) and from_pretrained work unchanged."
)


def _vocab_from_args(
    tokenizer_dir: str | None, image_offset: int | None, level_sizes: list[int],
    vision_start_token_id: int, vision_end_token_id: int,
) -> tuple[CodeVocab, object | None]:
    """``image_offset = len(tokenizer)`` (and the vision special ids) from a tokenizer dir, else from the flags."""
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        missing = [t for t in (VISION_START, VISION_END) if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
            logger.info("added {} to the tokenizer", missing)
        return CodeVocab.from_tokenizer(tokenizer, level_sizes), tokenizer
    if image_offset is None:
        raise ValueError("give --tokenizer_dir (image_offset = len(tokenizer)) or --image_offset explicitly")
    try:
        return CodeVocab(image_offset, tuple(level_sizes), vision_start_token_id, vision_end_token_id), None
    except ValueError as e:  # e.g. Qwen2.5's default vision ids with a smaller tokenizer
        raise ValueError(f"{e}; pass --vision_start_token_id/--vision_end_token_id (defaults are Qwen2.5's "
                         f"{QWEN25_VISION_START}/{QWEN25_VISION_END}) or --tokenizer_dir") from e


VOCAB_LAYOUTS = ("compact", "reference")


def joint_vocab_rows(source_rows: int, vocab: CodeVocab, layout: str = "compact",
                     pad_to_multiple_of: int = 64) -> tuple[int, int]:
    """``(rows kept from the source, vocab_size)`` of a converted model (layouts in the module docstring).

    >>> qwen25 = CodeVocab(151665, (8192,), 151652, 151653)
    >>> joint_vocab_rows(151936, qwen25), joint_vocab_rows(151936, qwen25, "reference")
    ((151665, 159872), (151936, 160128))
    """
    if layout not in VOCAB_LAYOUTS:
        raise ValueError(f"vocab_layout={layout!r}: choose one of {VOCAB_LAYOUTS}")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} must be >= 1 (1: no padding)")
    if source_rows < vocab.image_offset:
        raise ValueError(f"the source has {source_rows} embedding rows but image_offset={vocab.image_offset} "
                         "(len(tokenizer)): the tokenizer has ids the checkpoint has no rows for")
    if layout == "compact":
        kept, rows = vocab.image_offset, vocab.total_vocab_size
    else:
        kept, rows = source_rows, source_rows + vocab.total_vocab_size - vocab.image_offset
    return kept, -(-rows // pad_to_multiple_of) * pad_to_multiple_of


@torch.no_grad()
def _init_vocabulary_rows(model: UniXForCausalLM, source_state: dict, kept: int, seed: int) -> None:
    """Source rows ``[0, kept)`` into the embedding (and untied head), new rows by transformers' mean resizing.

    Shrinking to ``kept`` rows and growing back with ``resize_token_embeddings(mean_resizing=True)`` makes the kept
    rows exactly the "old rows" whose mean and covariance transformers samples from, and resizes a tied or untied
    head as transformers does.
    """
    vocab_size = model.config.vocab_size
    model.resize_token_embeddings(kept)
    embed = source_state["model.embed_tokens.weight"]
    model.get_input_embeddings().weight.copy_(embed[:kept])
    if not model.config.tie_word_embeddings:
        model.get_output_embeddings().weight.copy_(source_state.get("lm_head.weight", embed)[:kept])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.resize_token_embeddings(vocab_size, mean_resizing=True)


def source_backbone(src_config: PretrainedConfig) -> str:
    """The backbone a source checkpoint converts to exactly (``qwen2`` for Qwen2/Qwen2.5, ``qwen3`` for Qwen3)."""
    if src_config.model_type not in SOURCE_FAMILIES:
        raise ValueError(f"source model_type={src_config.model_type!r} is not supported: conversion reads "
                         f"{sorted(SOURCE_FAMILIES)} checkpoints (Qwen2, Qwen2.5, Qwen3)")
    return SOURCE_FAMILIES[src_config.model_type][2]


def load_source(src: str, dtype: str = "auto") -> PreTrainedModel:
    """A local Qwen2/Qwen2.5/Qwen3 checkpoint with its stock transformers class (chosen by its ``model_type``)."""
    config = AutoConfig.from_pretrained(src)
    source_backbone(config)  # a clear error for other families
    return SOURCE_FAMILIES[config.model_type][0].from_pretrained(src, dtype=dtype)


def uni_x_config_from_qwen(src_config: PretrainedConfig, vocab: CodeVocab, vocab_layout: str = "compact",
                           pad_to_multiple_of: int = 64, backbone: str | None = None, **fields) -> UniXConfig:
    """A `UniXConfig` with the source's architecture, our fields, and the vocabulary of `joint_vocab_rows`.

    ``backbone``: None follows the source (exact); ``"qwen3"`` with a Qwen2 source is the reference's move (module
    docstring): the head width stays the source's (``hidden_size // num_attention_heads``), no attention bias.
    """
    own = source_backbone(src_config)
    backbone = backbone or own
    if (own, backbone) == ("qwen3", "qwen2"):
        raise ValueError("backbone='qwen2' from a Qwen3 source is not defined: Qwen2 has no per-head q/k norms to "
                         "hold the source's q_norm/k_norm; convert with backbone='qwen3' (the default for it)")
    d = src_config.to_dict()
    for key in ("layer_types", "auto_map"):  # per-family keys: our layer kinds are derived from our fields
        d.pop(key, None)
    d["backbone"] = backbone
    if own == "qwen2":  # Qwen2 configs state no head width; Qwen3Config's default (128) must not slip in
        d["head_dim"] = src_config.hidden_size // src_config.num_attention_heads
        d["attention_bias"] = False
    d.update({k: v for k, v in fields.items() if v is not None})
    d["vocab_size"] = joint_vocab_rows(src_config.vocab_size, vocab, vocab_layout, pad_to_multiple_of)[1]
    return UniXConfig.from_dict_with_vocab(d, vocab)


def _drop_qkv_biases(body: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference's Qwen2.5 -> Qwen3 move: Qwen3 attention has no q/k/v bias; say loudly what that costs."""
    biases = {k: v for k, v in body.items() if k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))}
    largest = max((float(v.abs().max()) for v in biases.values()), default=0.0)
    logger.warning("{}; dropped {} bias tensors (largest |bias| {:.4g})", QKV_BIAS_DROPPED, len(biases), largest)
    return {k: v for k, v in body.items() if k not in biases}


def default_init_vision_with_text(config: UniXConfig) -> int:
    """This toolkit copies the text weights into the vision branches (1); the reference's MoT baseline starts them at
    random (0), so ``mot_style="reference"`` defaults to that."""
    return 0 if config.mot_style == "reference" else 1


@torch.no_grad()
def convert_qwen(source: PreTrainedModel, config: UniXConfig, vocab_layout: str = "compact",
                 seed: int = 0, init_vision_with_text: int | None = None) -> UniXForCausalLM:
    """Build a ``config.variant`` model initialised from an in-memory Qwen2/Qwen3 model (see the module docstring);
    ``config`` comes from `uni_x_config_from_qwen` with the same ``vocab_layout``; ``init_vision_with_text``: None ->
    `default_init_vision_with_text`."""
    model = UniXForCausalLM(config).to(source.dtype)
    state = source.state_dict()
    embed_key, head_key = "model.embed_tokens.weight", "lm_head.weight"
    body = {k: v for k, v in state.items() if k not in (embed_key, head_key)}
    moved = source_backbone(source.config) != config.backbone  # qwen2 -> qwen3 (the reverse is refused earlier)
    if moved:
        body = _drop_qkv_biases(body)
    missing, unexpected = model.load_state_dict(body, strict=False)
    if unexpected:
        raise ValueError(f"source keys with no place in the {config.variant} model: {unexpected[:5]}")
    head_norms = []
    if moved:  # the new q/k norms start as the identity scale (the reference's Qwen3 init), stated, not assumed
        params = dict(model.named_parameters())
        head_norms = [k for k in missing if k.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight"))]
        for k in head_norms:
            params[k].fill_(1.0)
    kept, _ = joint_vocab_rows(state[embed_key].shape[0], config.code_vocab, vocab_layout)
    _init_vocabulary_rows(model, state, kept, seed)
    if init_vision_with_text is None:
        init_vision_with_text = default_init_vision_with_text(config)
    copied = copy_vision_branches(model) if init_vision_with_text else set()
    left_random = [k for k in missing if k not in copied and k not in (embed_key, head_key) and k not in head_norms]
    if left_random:
        why = ("init_vision_with_text=0" if not init_vision_with_text
               else "no text counterpart of that shape (another FFN width, or the shared FFN)")
        logger.warning("{} vision/shared-FFN parameters keep their random init ({}): {}", len(left_random), why,
                       left_random[:4])
    logger.info("converted {} -> {} on backbone {} (layer kinds {}), vocab {} -> {}", source.config.model_type,
                config.variant, config.backbone, config.layer_kinds, source.config.vocab_size, config.vocab_size)
    return model


@torch.no_grad()
def copy_vision_branches(model: UniXForCausalLM) -> set[str]:
    """Vision branch of layer i <- text branch of layer i (same depth), where the shapes match: the reference's
    ``init_vision_weights`` (``init_vision_with_text=1``); returns the names of copied parameters."""
    copied = set()
    for pair in vision_text_pairs(model):
        if pair.text.shape == pair.vision.shape:
            pair.vision.copy_(pair.text)
            copied.add(pair.vision_name)
    return copied


class BranchPair(NamedTuple):
    """A vision-branch (or vision-expert) parameter and the text/shared parameter it mirrors, with full names."""

    layer: int
    vision_name: str  # e.g. model.layers.0.vision.self_attn.q_proj.weight, model.layers.1.vision_mlp.up_proj.weight
    text_name: str  # e.g. model.layers.0.self_attn.q_proj.weight, model.layers.1.mlp.up_proj.weight
    text: torch.nn.Parameter
    vision: torch.nn.Parameter


def vision_text_pairs(model: UniXForCausalLM) -> Iterator[BranchPair]:
    """Every vision branch/expert parameter with its text counterpart: the one pairing of the two branches, used by
    conversion (copying, the exact-export check) and by ``tools/analyze_model_grad.py`` (naming the branches)."""
    for i, layer in enumerate(model.model.layers):
        for vision_name in ("vision", "vision_mlp"):
            branch = getattr(layer, vision_name, None)
            if branch is None:
                continue
            text_params = dict(layer.named_parameters())
            for name, param in branch.named_parameters():
                text_name = name if vision_name == "vision" else f"mlp.{name}"
                yield BranchPair(i, f"model.layers.{i}.{vision_name}.{name}", f"model.layers.{i}.{text_name}",
                                 text_params[text_name], param)


@torch.no_grad()
def to_dense_qwen(model: UniXForCausalLM) -> PreTrainedModel:
    """Export a plain Qwen2 / Qwen3 model (the backbone's family) where that is exact: dense, or MoT/MoE whose experts
    all equal the text ones.

    Uni-X -> dense raises `UNI_X_TO_DENSE_UNDEFINED` (the reason is in the message).
    """
    config = model.config
    if config.variant == "uni_x" and (config.vision_encode_layers or config.vision_decode_layers):
        raise ValueError(UNI_X_TO_DENSE_UNDEFINED)
    if config.add_share_ffn:
        raise ValueError("add_share_ffn=1 -> dense is not defined: every token of the middle layers adds the shared "
                         "FFN (share_mlp), which a dense Qwen layer has no place for")
    differing = [pair.vision_name for pair in vision_text_pairs(model)
                 if pair.text.shape != pair.vision.shape or not torch.equal(pair.text, pair.vision)]
    if differing:
        raise ValueError(f"{config.variant} -> dense is only exact when every vision expert equals its text "
                         f"counterpart; {len(differing)} differ, e.g. {differing[:3]}")
    d = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "layer_kinds", "variant",
                "vision_encode_layers", "vision_decode_layers", "ffn_vision_size", "ffn_share_size",
                "all_modal_visible", "moe_every_k", "image_offset", "image_level_sizes", "image_max_grid", "backbone",
                "add_share_ffn", "mot_style"):
        d.pop(key, None)
    if config.backbone == "qwen2":  # Qwen2's config has no such fields; its head width is hidden / heads
        d.pop("head_dim", None)
        d.pop("attention_bias", None)
    causal_lm, config_class = BACKBONE_CAUSAL_LM[config.backbone]
    dense = causal_lm(config_class(**d)).to(model.dtype)
    state = {k: v for k, v in model.state_dict().items() if ".vision." not in k and ".vision_mlp." not in k}
    dense.load_state_dict(state, strict=not config.tie_word_embeddings)
    return dense


# ------------------------------------------------------------------------------------------------------------------
# The reference's own Uni-X layout (its modeling/uni_x_qwen3.py, `UniQwen3ForCausalLM`): read and written here.
#
#   reference key                                  this toolkit's key
#   model.layers.{i}.*                             model.layers.{i}.*              (text / shared layer i, Qwen3)
#   model.vision_encode_layers.{i}.*   (i < N)     model.layers.{i}.vision.*
#   model.vision_decode_layers.{j}.*   (j < M)     model.layers.{L-M+j}.vision.*
#   model.embed_tokens / model.norm / lm_head      the same (lm_head absent when tied, as transformers saves it)
#   model.layers.{l}.mlp.share_{g,u,d}_proj.*      model.layers.{l}.share_mlp.{g,u,d}_proj.*   (add_share_ffn=1,
#   model.layers.{l}.mlp.vision_{g,u,d}_proj.*     model.layers.{l}.vision_mlp.{g,u,d}_proj.*   middle layers l)
#
# Its config is a Qwen3Config (model_type "qwen3") plus the fields of its `CustomConfigMixin.set_extra_args`; the
# vision FFN of its Uni-X separated layers is a stock Qwen3DecoderLayer of `intermediate_size`; its `ffn_vision_size`
# and `ffn_share_size` are the widths of the middle layers' vision / shared FFN when `add_share_ffn=1` (unused
# otherwise), exactly our fields' meaning with add_share_ffn=1. One embedding table of Qwen2.5's 151,936 rows + 8,192 codes = 160,128 rows, image code
# c at id real_text_vocab_size + c = 151,665 + c (our ``vocab_layout="reference"``), tied input/output embeddings.
REFERENCE_ARCHITECTURES = ("UniQwen3ForCausalLM", "UniQwen3ForCausalLMInference")
REFERENCE_FIELDS = ("num_vision_encode_layers", "num_vision_decode_layers", "vision_vocab_size", "all_modal_visible",
                    "real_text_vocab_size", "vision_start_id", "add_sep_for_vis", "vis_sep_tokens", "vis_sep_lens",
                    "skip_connection_loc", "add_share_ffn", "ffn_share_size", "ffn_vision_size", "use_share_attn",
                    "use_share_ffn", "attn_v_q_heads", "decoder_sparse_step")
# fields an import must find at these values: anything else is an architecture this layout cannot hold
REFERENCE_REQUIRED_VALUES = {
    "all_modal_visible": (0, "the reference's Uni-X trains and infers with same-modality attention only"),
    "skip_connection_loc": (-1, "a vision skip connection (the reference's own inference refuses it too)"),
    "add_sep_for_vis": (0, "separator tokens counted as vision tokens (a vision rule CodeVocab does not have)"),
}
# what `export_reference` writes for the fields its Uni-X layers do not read (the reference's argument defaults)
REFERENCE_UNUSED_DEFAULTS = {"add_sep_for_vis": 0, "vis_sep_tokens": "<|vision_pad|>", "vis_sep_lens": "8",
                             "skip_connection_loc": -1, "add_share_ffn": 0, "use_share_attn": 1, "use_share_ffn": 1,
                             "attn_v_q_heads": 4, "decoder_sparse_step": 2}
_REFERENCE_BRANCH = re.compile(r"^model\.vision_(encode|decode)_layers\.(\d+)\.(.+)$")
_OUR_BRANCH = re.compile(r"^model\.layers\.(\d+)\.vision\.(.+)$")
_REFERENCE_SHARE_MLP = re.compile(r"^(model\.layers\.\d+)\.mlp\.(share|vision)_(gate|up|down)_proj\.(.+)$")
_OUR_SHARE_MLP = re.compile(r"^(model\.layers\.\d+)\.(share|vision)_mlp\.(gate|up|down)_proj\.(.+)$")


def reference_key_to_ours(key: str, num_layers: int, num_decode: int) -> str:
    """One reference parameter name in this toolkit's layout (table above).

    >>> reference_key_to_ours("model.vision_decode_layers.1.mlp.up_proj.weight", 36, 6)
    'model.layers.31.vision.mlp.up_proj.weight'
    >>> reference_key_to_ours("model.layers.20.mlp.share_up_proj.weight", 36, 6)
    'model.layers.20.share_mlp.up_proj.weight'
    """
    share = _REFERENCE_SHARE_MLP.match(key)
    if share is not None:
        return f"{share.group(1)}.{share.group(2)}_mlp.{share.group(3)}_proj.{share.group(4)}"
    m = _REFERENCE_BRANCH.match(key)
    if m is None:
        return key
    kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
    layer = j if kind == "encode" else num_layers - num_decode + j
    return f"model.layers.{layer}.vision.{rest}"


def ours_key_to_reference(key: str, num_layers: int, num_decode: int) -> str:
    """The inverse of `reference_key_to_ours` (a vision branch in the last ``num_decode`` layers is a decode layer).

    >>> ours_key_to_reference("model.layers.31.vision.mlp.up_proj.weight", 36, 6)
    'model.vision_decode_layers.1.mlp.up_proj.weight'
    >>> ours_key_to_reference("model.layers.20.vision_mlp.up_proj.weight", 36, 6)
    'model.layers.20.mlp.vision_up_proj.weight'
    """
    share = _OUR_SHARE_MLP.match(key)
    if share is not None:
        return f"{share.group(1)}.mlp.{share.group(2)}_{share.group(3)}_proj.{share.group(4)}"
    m = _OUR_BRANCH.match(key)
    if m is None:
        return key
    layer, rest = int(m.group(1)), m.group(2)
    first_decode = num_layers - num_decode
    if layer >= first_decode:
        return f"model.vision_decode_layers.{layer - first_decode}.{rest}"
    return f"model.vision_encode_layers.{layer}.{rest}"


def read_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved checkpoint directory: ``model.safetensors``, its sharded index, or
    ``pytorch_model.bin`` (loaded with ``weights_only=True``)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in tqdm(shards, desc=f"reading {directory.name}", disable=len(shards) < 2):
            state.update(load_file(directory / shard))
        return state
    if (directory / "model.safetensors").is_file():
        return load_file(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").is_file():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _read_config_json(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: not found ({directory} is not a checkpoint directory)") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from e


def uni_x_config_from_reference(ref: dict, vision_end_token_id: int, where: str = "config.json") -> UniXConfig:
    """Our `UniXConfig` for a reference Uni-X config dict: ``backbone="qwen3"``, ``variant="uni_x"``, the same
    separated layers, same-modality attention, separated vision FFNs as wide as the text ones, its vocabulary, and
    its ``add_share_ffn`` with its ``ffn_vision_size`` / ``ffn_share_size`` (same meaning here) when set."""
    architectures = ref.get("architectures") or []
    if ref.get("model_type") != "qwen3" or not set(architectures) & set(REFERENCE_ARCHITECTURES):
        raise ValueError(f"{where}: model_type={ref.get('model_type')!r}, architectures={architectures}: not the "
                         f"reference's Uni-X (model_type 'qwen3', architectures one of {REFERENCE_ARCHITECTURES})")
    missing = [k for k in ("num_vision_encode_layers", "num_vision_decode_layers", "vision_vocab_size",
                           "real_text_vocab_size", "vision_start_id") if k not in ref]
    if missing:
        raise ValueError(f"{where}: missing the reference field(s) {missing}")
    for name, (value, meaning) in REFERENCE_REQUIRED_VALUES.items():
        if ref.get(name, value) != value:
            raise ValueError(f"{where}: {name}={ref[name]!r} is not supported by this import (only {value!r}): "
                             f"{meaning}")
    d = {k: v for k, v in ref.items() if k not in REFERENCE_FIELDS}
    for key in ("model_type", "architectures", "transformers_version", "layer_types", "auto_map"):
        d.pop(key, None)
    if "torch_dtype" in d:  # transformers 4.x's name of the field
        d.setdefault("dtype", d.pop("torch_dtype"))
    try:
        vocab = CodeVocab(int(ref["real_text_vocab_size"]), (int(ref["vision_vocab_size"]),),
                          int(ref["vision_start_id"]), vision_end_token_id)
        share = int(ref.get("add_share_ffn", 0) or 0)
        d.update(backbone="qwen3", variant="uni_x", vision_encode_layers=int(ref["num_vision_encode_layers"]),
                 vision_decode_layers=int(ref["num_vision_decode_layers"]), all_modal_visible=0, add_share_ffn=share,
                 # without add_share_ffn the reference's widths are unused (its default 2048 is carried along)
                 ffn_vision_size=int(ref["ffn_vision_size"]) if share else None,
                 ffn_share_size=int(ref["ffn_share_size"]) if share else None,
                 head_dim=ref.get("head_dim", 128), attention_bias=ref.get("attention_bias", False))
        return UniXConfig.from_dict_with_vocab(d, vocab)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def reference_config_from_ours(config: UniXConfig) -> dict:
    """The reference's config dict for one of our checkpoints (the exact cases of `export_reference`)."""
    problems = []
    if config.backbone != "qwen3":
        problems.append(f"backbone={config.backbone!r} (the reference's Uni-X is Qwen3: convert with backbone=qwen3)")
    if config.variant != "uni_x" or config.all_modal_visible:
        problems.append(f"variant={config.variant!r}, all_modal_visible={config.all_modal_visible} (the reference "
                        "holds Uni-X with same-modality attention only)")
    if config.separated_vision_ffn_size != config.intermediate_size:
        problems.append(f"separated vision FFN width {config.separated_vision_ffn_size} != intermediate_size="
                        f"{config.intermediate_size} (its separated layers are stock Qwen3 layers)")
    vocab = config.code_vocab
    if len(vocab.level_sizes) != 1 or vocab.max_grid:
        problems.append(f"image_level_sizes={list(vocab.level_sizes)}, image_max_grid={vocab.max_grid} (the reference "
                        "knows one codebook and no size tags)")
    if problems:
        raise ValueError("not exportable to the reference layout: " + "; ".join(problems))
    d = config.to_dict()
    for key in ("variant", "vision_encode_layers", "vision_decode_layers", "ffn_vision_size", "ffn_share_size",
                "all_modal_visible", "moe_every_k", "image_offset", "image_level_sizes", "vision_start_token_id",
                "vision_end_token_id", "image_max_grid", "layer_kinds", "backbone", "transformers_version",
                "add_share_ffn", "mot_style"):
        d.pop(key, None)
    rope = dict(config.rope_parameters)
    d.update(REFERENCE_UNUSED_DEFAULTS)
    d.update(
        model_type="qwen3", architectures=[REFERENCE_ARCHITECTURES[0]],
        num_vision_encode_layers=config.vision_encode_layers, num_vision_decode_layers=config.vision_decode_layers,
        vision_vocab_size=vocab.level_sizes[0], all_modal_visible=0, real_text_vocab_size=vocab.image_offset,
        vision_start_id=vocab.vision_start_id, add_share_ffn=config.add_share_ffn,
        # unused by the reference without add_share_ffn: written as the real width of its vision layers
        ffn_share_size=config.share_ffn_size if config.add_share_ffn else config.intermediate_size,
        ffn_vision_size=config.vision_ffn_size if config.add_share_ffn else config.intermediate_size,
        # transformers 4.x (the reference pins 4.53) reads these two; 5.x reads rope_parameters
        rope_theta=rope["rope_theta"], rope_scaling=None if rope.get("rope_type", "default") == "default" else rope,
    )
    return d


def _expected_shapes(config: UniXConfig) -> dict[str, torch.Size]:
    """Parameter names and shapes of our model for ``config``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = UniXForCausalLM(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # transformers saves tied weights once
    return shapes


def _check_keys(got: dict[str, torch.Tensor], want: dict[str, torch.Size], where: str,
                source_names: dict[str, str] | None = None) -> None:
    """Every parameter present with its shape, nothing left over; the message names the keys (leftovers by their
    name in the source file, ``source_names``)."""
    missing = sorted(set(want) - set(got))
    unexpected = sorted((source_names or {}).get(k, k) for k in set(got) - set(want))
    shapes = [f"{k}: {tuple(got[k].shape)} vs {tuple(want[k])}" for k in sorted(set(got) & set(want))
              if got[k].shape != want[k]]
    if missing or unexpected or shapes:
        raise ValueError(f"{where}: the weights do not fit the layout: missing {missing[:6]} ({len(missing)}), "
                         f"unexpected {unexpected[:6]} ({len(unexpected)}), shape mismatches {shapes[:6]}")


def _require_new_dir(dst: str | Path) -> Path:
    """Checked before any work (reading a 3B checkpoint takes minutes): ``dst`` must be new or empty."""
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not an empty directory: choose a new directory")
    return dst


def _write_checkpoint_dir(dst: str | Path, write: Callable[[Path], None]) -> str:
    """Run ``write(tmp_dir)`` and move the result to ``dst`` in one rename: an interrupted import leaves no
    half-written checkpoint behind (a leftover ``<dst>.partial`` is removed by the next run)."""
    dst = _require_new_dir(dst)
    tmp = dst.with_name(dst.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    if dst.exists():
        dst.rmdir()
    os.replace(tmp, dst)
    return str(dst)


def _write_inference_spec(directory: Path, tokenizer, vocab: CodeVocab, template_name: str,
                          vqgan_path: str | None, grid: tuple[int, int]) -> None:
    """``uni_x_inference.json`` for an imported checkpoint, so that ``load_pipeline`` renders its prompts and draws
    its images as the reference did (chat format ``template_name``, Chameleon's VQGAN, its code grid).

    The schema lives in ``uni_arch``; it is imported here, at call time only, because an imported checkpoint is not
    usable without it (``modeling`` still imports nothing of ``uni_arch`` at import time)."""
    from uni_arch.train.inference_spec import ImageTokenizerRef, InferenceSpec
    from uni_arch.train.templates import SampleBuilder

    ref = None
    if vqgan_path is not None:
        from modeling.vq import load_image_tokenizer

        vq = load_image_tokenizer("chameleon", vqgan_path)
        ref = ImageTokenizerRef("chameleon", str(Path(vqgan_path).resolve()), vq.checkpoint_hash)
        grid = vq.native_grid
    builder = SampleBuilder(tokenizer, vocab, template_name=template_name, ignore_instruction=True)
    InferenceSpec.from_builder(builder, ref, grid, variant="uni_x", imported_from="reference Uni-X layout").save(
        directory)


def import_reference(
    src: str,
    dst: str,
    tokenizer_dir: str | None = None,
    template_name: str = "reference",
    vqgan_path: str | None = None,
    grid: tuple[int, int] = (32, 32),
) -> str:
    """The reference's Uni-X checkpoint (e.g. its released Uni-X-3B) -> this toolkit's layout in ``dst``.

    The weights are renamed (table above), never changed: the result computes what the reference's inference model
    (``UniQwen3ForCausalLMInference``) computes, with and without the KV cache. ``dst`` gets ``config.json``
    (``backbone=qwen3``, ``variant=uni_x``), the weights, the text tokenizer and ``uni_x_inference.json``.

    Args:
        src: the reference checkpoint directory (config.json with its fields, safetensors, the Qwen2.5 tokenizer).
        dst: a new (or empty) directory.
        tokenizer_dir: the text tokenizer (default: ``src``); ``len(tokenizer)`` must be its real_text_vocab_size.
        template_name: the chat format recorded for inference (``configs/chat_templates/<name>.yaml``).
        vqgan_path: Chameleon's VQGAN directory (``vqgan.ckpt`` + ``vqgan.yaml``), recorded with its weights hash;
            None records no image tokenizer (pass ``image_tokenizer_path=`` to ``load_pipeline`` later).
        grid: the code grid to draw without a VQGAN (the reference: 512 px / 16 = 32 x 32).
    """
    _require_new_dir(dst)
    ref = _read_config_json(src)
    where = str(Path(src) / "config.json")
    tokenizer_src = tokenizer_dir or src
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_src)
    if VISION_END not in tokenizer.get_vocab():
        raise ValueError(f"{tokenizer_src}: the tokenizer has no {VISION_END} token")
    config = uni_x_config_from_reference(ref, tokenizer.convert_tokens_to_ids(VISION_END), where)
    try:
        found = CodeVocab.from_tokenizer(tokenizer, config.code_vocab.level_sizes)
    except ValueError as e:
        raise ValueError(f"{tokenizer_src}: the tokenizer does not fit {where}: {e}") from e
    if found != config.code_vocab:
        raise ValueError(f"{where}: real_text_vocab_size={ref['real_text_vocab_size']}, vision_start_id="
                         f"{ref['vision_start_id']} but the tokenizer in {tokenizer_src} gives image_offset="
                         f"{found.image_offset}, vision_start_id={found.vision_start_id}: use the checkpoint's "
                         "tokenizer")
    num_layers, num_decode = config.num_hidden_layers, config.vision_decode_layers
    source = read_state_dict(src)
    names = {reference_key_to_ours(k, num_layers, num_decode): k for k in source}
    state = {ours: source[k] for ours, k in names.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # a tied head saved anyway is the embedding itself
    _check_keys(state, _expected_shapes(config), f"{src} (reference layout: {num_layers} layers, "
                                                 f"{config.vision_encode_layers} + {num_decode} separated)", names)

    def write(tmp: Path) -> None:
        save_torch_state_dict(state, tmp)
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_inference_spec(tmp, tokenizer, config.code_vocab, template_name, vqgan_path, tuple(grid))

    out = _write_checkpoint_dir(dst, write)
    logger.info("imported the reference Uni-X checkpoint {} -> {} ({} tensors, layer kinds {})", src, out,
                len(state), config.layer_kinds)
    return out


TOKENIZER_FILE_PREFIXES = ("tokenizer", "special_tokens_map", "vocab.", "merges.", "added_tokens", "chat_template")


def export_reference(src: str, dst: str) -> str:
    """One of our Uni-X checkpoints (``backbone=qwen3``, same-modality attention, separated FFNs of
    ``intermediate_size``, one codebook; ``add_share_ffn`` either way) -> the reference's layout in ``dst`` (config with its fields, renamed weights, the tokenizer)."""
    _require_new_dir(dst)
    config = UniXConfig.from_pretrained(src)
    ref = reference_config_from_ours(config)
    num_layers, num_decode = config.num_hidden_layers, config.vision_decode_layers
    ours = read_state_dict(src)
    if config.tie_word_embeddings:
        ours.pop("lm_head.weight", None)
    _check_keys(ours, _expected_shapes(config), src)
    state = {ours_key_to_reference(k, num_layers, num_decode): v for k, v in ours.items()}
    tokenizer_files = [p for p in Path(src).iterdir() if p.name.startswith(TOKENIZER_FILE_PREFIXES)]

    def write(tmp: Path) -> None:
        save_torch_state_dict(state, tmp)
        (tmp / "config.json").write_text(json.dumps(ref, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for path in tokenizer_files:
            shutil.copy2(path, tmp / path.name)

    out = _write_checkpoint_dir(dst, write)
    logger.info("exported {} to the reference layout in {}", src, out)
    return out


def resolve_moe_every_k(moe_every_k: int | None, decoder_sparse_step: int | None) -> int:
    """Our ``moe_every_k`` from it or the reference's ``decoder_sparse_step`` (same rule: expert layer iff
    ``(i + 1) % k == 0``, its ``DecoderLayer``); both given and different is an error; neither -> 1."""
    if moe_every_k is not None and decoder_sparse_step is not None and moe_every_k != decoder_sparse_step:
        raise ValueError(f"moe_every_k={moe_every_k} and decoder_sparse_step={decoder_sparse_step} are the same knob "
                         "(the reference's name and ours): give one")
    return next((k for k in (moe_every_k, decoder_sparse_step) if k is not None), 1)


def convert(
    dst: str,
    src: str | None = None,
    variant: str = "uni_x",
    vision_encode_layers: int = 0,
    vision_decode_layers: int = 0,
    num_image_tokens: int = 8192,
    image_level_sizes: list[int] | None = None,
    tokenizer_dir: str | None = None,
    image_offset: int | None = None,
    vision_start_token_id: int = QWEN25_VISION_START,
    vision_end_token_id: int = QWEN25_VISION_END,
    ffn_vision_size: int | None = None,
    all_modal_visible: int = 0,
    moe_every_k: int | None = None,
    decoder_sparse_step: int | None = None,
    add_share_ffn: int = 0,
    ffn_share_size: int | None = None,
    mot_style: str = "ours",
    init_vision_with_text: int | None = None,
    from_config: str | None = None,
    to_dense: bool = False,
    dtype: str = "auto",
    vocab_layout: str = "compact",
    pad_to_multiple_of: int = 64,
    seed: int = 0,
    backbone: str | None = None,
) -> str:
    """Write a checkpoint to ``dst`` that loads with ``from_pretrained``; returns ``dst``.

    Args:
        src: a local Qwen2/Qwen2.5/Qwen3 checkpoint dir (or, with ``to_dense``, one of ours).
        num_image_tokens / image_level_sizes: codebook size (single level) or sizes per level.
        tokenizer_dir: sets image_offset = len(tokenizer) and the vision token ids; else use ``image_offset``.
        from_config: build a random-init model from this UniXConfig JSON instead of converting (tiny presets).
        to_dense: export a dense Qwen2 from a dense/MoT/MoE checkpoint (exact cases only).
        vocab_layout: ``compact`` or ``reference`` rows for the new ids (module docstring).
        pad_to_multiple_of: ``vocab_size`` is rounded up to a multiple of this (1: no padding rows).
        seed: seeds the sampling of the new rows.
        backbone: None follows the source (exact); ``qwen3`` with a Qwen2/Qwen2.5 source is the reference's move,
            which changes the function (module docstring; logged as a warning).
        moe_every_k / decoder_sparse_step: MoE: layer i is an expert layer iff (i + 1) % k == 0; the reference's
            name and our own mean the same (default 1; the reference's default is 2); give one.
        add_share_ffn / ffn_share_size / ffn_vision_size: the reference's shared-FFN middle layers (`UniXConfig`).
        mot_style: ``ours`` or ``reference`` (the reference's MoT baseline, `modeling.modeling_mot`).
        init_vision_with_text: 1 copy the text weights into the vision branches, 0 leave them random (module
            docstring); None: 1, except 0 for ``mot_style="reference"``.
    """
    moe_every_k = resolve_moe_every_k(moe_every_k, decoder_sparse_step)
    if from_config is not None:
        model = build_model(UniXConfig.from_json_file(from_config))
    elif src is None:
        raise ValueError("give --src <checkpoint dir> or --from_config <json>")
    elif to_dense:
        model = to_dense_qwen(UniXForCausalLM.from_pretrained(src, dtype=dtype))
    else:
        source = load_source(src, dtype)
        vocab, tokenizer = _vocab_from_args(tokenizer_dir, image_offset, list(image_level_sizes or [num_image_tokens]),
                                 vision_start_token_id, vision_end_token_id)
        config = uni_x_config_from_qwen(
            source.config, vocab, variant=variant, vision_encode_layers=vision_encode_layers,
            vision_decode_layers=vision_decode_layers, ffn_vision_size=ffn_vision_size,
            all_modal_visible=all_modal_visible, moe_every_k=moe_every_k, vocab_layout=vocab_layout,
            pad_to_multiple_of=pad_to_multiple_of, backbone=backbone, add_share_ffn=add_share_ffn,
            ffn_share_size=ffn_share_size, mot_style=mot_style,
        )
        model = convert_qwen(source, config, vocab_layout, seed, init_vision_with_text)
        if tokenizer is not None:  # with the vision tokens if they had to be added
            tokenizer.save_pretrained(dst)
    Path(dst).mkdir(parents=True, exist_ok=True)  # only now: a failed conversion leaves nothing behind
    model.save_pretrained(dst)
    logger.info("wrote {} ({} parameters) to {}", type(model).__name__, sum(p.numel() for p in model.parameters()),
                os.path.abspath(dst))
    return dst


if __name__ == "__main__":
    import sys

    import fire

    # `conversion.py --src ... --dst ...` converts as before; a first word import_reference / export_reference runs
    # that function instead
    COMMANDS = {"import_reference": import_reference, "export_reference": export_reference}
    fire.Fire(COMMANDS if len(sys.argv) > 1 and sys.argv[1] in COMMANDS else convert)
