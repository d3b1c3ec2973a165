"""`UniXConfig`: Qwen2's config plus the modality layout and the joint vocabulary (DESIGN.md sections 2 and 4).

One config class serves the four variants on either backbone; the per-layer architecture is *data*: ``layer_kinds``
is derived from ``variant`` and its size fields in ``__post_init__``, validated, and saved in ``config.json`` so
that a checkpoint states exactly which layers carry a vision branch. Layers read ``config.layer_kinds[layer_idx]``;
nothing else in the model branches on layer indices.

Layer kinds:
    ``shared``     one stock decoder layer (of ``backbone``) for every token (dense, Uni-X middle layers, MoE
                   non-expert layers)
    ``separated``  Uni-X two-end layer: text and vision each have their own attention projections, norms and FFN;
                   attention visibility follows ``all_modal_visible`` (0: same modality of the same document only,
                   1: every token of the document)
    ``mot``        Mixture-of-Transformers layer: like ``separated`` but always globally visible
    ``moe``        shared attention and norms, FFN hard-routed by modality (text FFN / vision FFN)
    ``share_ffn``  Uni-X middle layer with ``add_share_ffn=1`` (the reference's ``UniShareQwen3MLP``): shared attention
                   and norms; text tokens get text FFN + shared FFN, vision tokens vision FFN + shared FFN

Backbones (``backbone``): every layer kind is built from the stock decoder layer of one transformers model family.
    ``qwen2``  ``Qwen2DecoderLayer``: q/k/v projections with bias (Qwen2, Qwen2.5 checkpoints)
    ``qwen3``  ``Qwen3DecoderLayer``: no q/k/v bias (``attention_bias``), per-head RMSNorm of q and k (``q_norm``,
               ``k_norm``) before RoPE, ``head_dim`` free of ``hidden_size / num_attention_heads`` (Qwen3
               checkpoints, and the reference Uni-X, which loads Qwen2.5 weights into Qwen3 classes)
The config class stays ``Qwen2Config``'s subclass for both: the fields Qwen3 adds (``head_dim``,
``attention_bias``) are declared here, and nothing else in Qwen3's config differs for full attention.

Vocabulary fields (``image_offset``, ``image_level_sizes``, ``vision_start_token_id``, ``vision_end_token_id``,
``image_max_grid``: the layout table is in ``modeling/vocab.py``) are
placeholders in the tiny preset: the training code overwrites them from the text tokenizer (``len(tokenizer)``, the
vision special-token ids) and the image tokenizer (codebook sizes) before building the model, then sets
``vocab_size = max(vocab_size, code_vocab.total_vocab_size)``; ``UniXConfig.with_vocab`` does exactly that.
"""

from __future__ import annotations

import warnings
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import Qwen2Config

from modeling.vocab import CodeVocab

VARIANTS = ("dense", "uni_x", "mot", "moe")
LEGACY_VARIANT = "unix"  # the pre-rename spelling of "uni_x", still read from old config.json files
LEGACY_MODEL_TYPE = "unix_qwen2"  # the pre-rename model_type, loaded by `LegacyUniXConfig`
LAYER_KINDS = ("shared", "separated", "mot", "moe", "share_ffn")
MOT_STYLES = ("ours", "reference")
BACKBONES = ("qwen2", "qwen3")


def derive_layer_kinds(
    variant: str, num_layers: int, vision_encode_layers: int, vision_decode_layers: int, moe_every_k: int,
    add_share_ffn: int = 0,
) -> list[str]:
    """Expand the variant's size fields into one kind per layer.

    >>> derive_layer_kinds("uni_x", 5, 2, 1, 1)
    ['separated', 'separated', 'shared', 'shared', 'separated']
    >>> derive_layer_kinds("uni_x", 4, 1, 1, 1, add_share_ffn=1)   # the reference's middle layers [N, L-M)
    ['separated', 'share_ffn', 'share_ffn', 'separated']
    >>> derive_layer_kinds("moe", 4, 0, 0, 2)   # every k-th layer, counting from 1: layers 2 and 4
    ['shared', 'moe', 'shared', 'moe']
    """
    if variant == "dense":
        return ["shared"] * num_layers
    if variant == "mot":
        return ["mot"] * num_layers
    if variant == "moe":
        return ["moe" if (i + 1) % moe_every_k == 0 else "shared" for i in range(num_layers)]
    middle = num_layers - vision_encode_layers - vision_decode_layers
    middle_kind = "share_ffn" if add_share_ffn else "shared"
    return ["separated"] * vision_encode_layers + [middle_kind] * middle + ["separated"] * vision_decode_layers


@strict(accept_kwargs=True)
class UniXConfig(Qwen2Config):
    r"""Qwen2 config for the Uni-X model family.

    Args (beyond `Qwen2Config`):
        variant: ``dense`` | ``uni_x`` | ``mot`` | ``moe``.
        vision_encode_layers / vision_decode_layers: Uni-X only; number of first / last layers with a vision branch.
        ffn_vision_size: FFN width of the vision branches: Uni-X separated layers, MoT layers, MoE experts, and with
            ``add_share_ffn=1`` the middle layers' vision FFN (``None`` -> ``intermediate_size``). With
            ``add_share_ffn=1`` the separated layers' vision FFN is ``intermediate_size`` (the reference's stock
            Qwen3 vision layers) and ``0`` means "no vision FFN in the middle layers" (the reference's meaning).
        ffn_share_size: the reference's meaning: width of the shared FFN that ``add_share_ffn=1`` adds to every middle
            layer, for every token (``None`` -> ``intermediate_size``; ``0``: none). Unused without
            ``add_share_ffn``. Text FFNs are always ``intermediate_size``.
        add_share_ffn: Uni-X only; 1: the middle (shared) layers ``[vision_encode_layers, L - vision_decode_layers)``
            become ``share_ffn`` layers (the reference's ``UniShareQwen3MLP``): text tokens -> text FFN + shared FFN,
            vision tokens -> vision FFN + shared FFN; attention and norms stay shared.
        mot_style: MoT only. ``ours``: per-modality q/k/v/o, norms and FFN. ``reference``: the reference's MoT
            baseline (its ``mot_qwen.py``): per-modality q/k/v (and Qwen3 q/k norms) and FFN, but ONE
            ``input_layernorm``/``post_attention_layernorm`` and the text ``o_proj`` for every token.
        all_modal_visible: Uni-X separated layers: 0 attend within the token's own modality, 1 to the whole document.
        moe_every_k: MoE only; layer ``i`` (0-based) is an expert layer iff ``(i + 1) % moe_every_k == 0``.
        image_offset, image_level_sizes, vision_start_token_id, vision_end_token_id, image_max_grid: the joint
            vocabulary layout (see `modeling.vocab.CodeVocab`; ``image_max_grid`` size tags follow the codes).
        backbone: ``qwen2`` | ``qwen3``: the stock decoder layer every layer kind is built from (module docstring).
        head_dim: attention head width (``None`` -> ``hidden_size // num_attention_heads``, Qwen2's rule; Qwen3
            checkpoints state it).
        attention_bias: ``qwen3`` only: bias on q/k/v/o (Qwen3 checkpoints: false). ``qwen2`` always has q/k/v bias.
        layer_kinds: derived; if given (from a saved config.json) it must equal the derived list.
    """

    model_type = "uni_x_qwen2"

    # Qwen2.5's text vocabulary (151,665 ids) plus Chameleon's 8,192 codes: the default must be self-consistent
    # because transformers instantiates a default config (e.g. for diffs when saving).
    vocab_size: int = 151665 + 8192
    variant: str = "uni_x"
    vision_encode_layers: int = 0
    vision_decode_layers: int = 0
    ffn_vision_size: int | None = None
    ffn_share_size: int | None = None
    all_modal_visible: int = 0
    moe_every_k: int = 1
    add_share_ffn: int = 0
    mot_style: str = "ours"
    image_offset: int = 151665
    image_level_sizes: list[int] | tuple[int, ...] = (8192,)
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    image_max_grid: int = 0
    layer_kinds: list[str] | None = None
    backbone: str = "qwen2"
    head_dim: int | None = None
    attention_bias: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._validate_uni_x_fields()

    def _validate_uni_x_fields(self) -> None:
        """Cross-field rules; every message names the fields involved."""
        if self.variant == LEGACY_VARIANT:
            warnings.warn(f"UniXConfig: variant={LEGACY_VARIANT!r} is deprecated, read as 'uni_x' (re-save the "
                          "checkpoint to update config.json)", FutureWarning, stacklevel=3)
            self.variant = "uni_x"
        if self.variant not in VARIANTS:
            raise ValueError(f"UniXConfig: unknown variant={self.variant!r}; choose one of {VARIANTS}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"UniXConfig: unknown backbone={self.backbone!r}; choose one of {BACKBONES}")
        if self.backbone == "qwen2" and self.attention_bias:
            raise ValueError("UniXConfig: attention_bias=True is a qwen3 field; backbone='qwen2' always has q/k/v "
                             "bias and no o_proj bias (Qwen2Attention)")
        if self.head_dim is None:
            # stored, not left None: the stock attention reads getattr(config, "head_dim", ...) and would get None
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim <= 0:
            raise ValueError(f"UniXConfig: head_dim={self.head_dim} must be positive")
        for name in ("vision_encode_layers", "vision_decode_layers", "image_offset"):
            if getattr(self, name) < 0:
                raise ValueError(f"UniXConfig: {name}={getattr(self, name)} must be >= 0")
        if self.add_share_ffn not in (0, 1):
            raise ValueError(f"UniXConfig: add_share_ffn={self.add_share_ffn} must be 0 or 1")
        if self.add_share_ffn and self.variant != "uni_x":
            raise ValueError(f"UniXConfig: add_share_ffn=1 is a Uni-X field (it changes the middle layers) but "
                             f"variant={self.variant!r}")
        for name in ("ffn_vision_size", "ffn_share_size"):
            value = getattr(self, name)
            # 0 = "no such FFN" exists only in the reference's share-FFN layers
            if value is not None and (value < 0 or (value == 0 and not self.add_share_ffn)):
                raise ValueError(f"UniXConfig: {name}={value} must be positive or None (-> intermediate_size); 0 "
                                 "(no such FFN) only with add_share_ffn=1")
        if self.add_share_ffn and self.ffn_vision_size == 0 and self.ffn_share_size == 0:
            raise ValueError("UniXConfig: add_share_ffn=1 with ffn_vision_size=0 and ffn_share_size=0 leaves vision "
                             "tokens of the middle layers without any FFN; give one of them a width")
        if self.mot_style not in MOT_STYLES:
            raise ValueError(f"UniXConfig: unknown mot_style={self.mot_style!r}; choose one of {MOT_STYLES}")
        if self.mot_style != "ours" and self.variant != "mot":
            raise ValueError(f"UniXConfig: mot_style={self.mot_style!r} is a MoT field but variant={self.variant!r}")
        if self.variant == "uni_x":
            separated = self.vision_encode_layers + self.vision_decode_layers
            if separated > self.num_hidden_layers:
                raise ValueError(
                    f"UniXConfig: vision_encode_layers + vision_decode_layers = {separated} separated layers exceed "
                    f"num_hidden_layers={self.num_hidden_layers}"
                )
        elif self.vision_encode_layers or self.vision_decode_layers:
            raise ValueError(
                f"UniXConfig: vision_encode_layers/vision_decode_layers are Uni-X fields but variant={self.variant!r}"
            )
        if getattr(self, "use_sliding_window", False):
            # Qwen2's sliding window is not implemented by our attention paths (packed, per-modality, cached);
            # accepting it would silently train full attention.
            raise ValueError(
                f"UniXConfig: use_sliding_window=True (sliding_window={getattr(self, 'sliding_window', None)}, "
                f"max_window_layers={getattr(self, 'max_window_layers', None)}) is not supported: every layer uses "
                "full causal attention within the document; set use_sliding_window=false"
            )
        if self.all_modal_visible not in (0, 1):
            raise ValueError(f"UniXConfig: all_modal_visible={self.all_modal_visible} must be 0 or 1")
        if self.moe_every_k < 1:
            raise ValueError(f"UniXConfig: moe_every_k={self.moe_every_k} must be >= 1")
        self.image_level_sizes = [int(s) for s in self.image_level_sizes]
        vocab = self.code_vocab  # CodeVocab range-checks offsets, sizes and the vision special ids
        if vocab.total_vocab_size > self.vocab_size:
            raise ValueError(
                f"UniXConfig: vocab_size={self.vocab_size} does not cover the image codes: image_offset="
                f"{self.image_offset} + sum(image_level_sizes)={vocab.num_image_tokens} + 2 * image_max_grid="
                f"{2 * vocab.max_grid} = {vocab.total_vocab_size}"
            )
        derived = derive_layer_kinds(self.variant, self.num_hidden_layers, self.vision_encode_layers,
                                     self.vision_decode_layers, self.moe_every_k, self.add_share_ffn)
        if self.layer_kinds is not None and list(self.layer_kinds) != derived:
            raise ValueError(
                f"UniXConfig: layer_kinds={list(self.layer_kinds)} disagrees with the kinds derived from variant="
                f"{self.variant!r} and its size fields: {derived}"
            )
        self.layer_kinds = derived

    # ------------------------------------------------------------------ helpers
    @property
    def code_vocab(self) -> CodeVocab:
        """The code id <-> token id mapping this model was built for."""
        try:
            return CodeVocab(
                int(self.image_offset),
                tuple(self.image_level_sizes),
                int(self.vision_start_token_id),
                int(self.vision_end_token_id),
                int(self.image_max_grid),
            )
        except ValueError as e:
            raise ValueError(f"UniXConfig: invalid vocabulary fields (image_offset, image_level_sizes, "
                             f"vision_start_token_id, vision_end_token_id, image_max_grid): {e}") from e

    @property
    def vision_ffn_size(self) -> int:
        """Width of the vision FFN of MoT / MoE / share-FFN layers (0: none, share-FFN layers only)."""
        return self.intermediate_size if self.ffn_vision_size is None else self.ffn_vision_size

    @property
    def separated_vision_ffn_size(self) -> int:
        """Width of the Uni-X separated layers' vision FFN: ``ffn_vision_size``, except with ``add_share_ffn=1``,
        where ``ffn_vision_size`` is the middle layers' vision FFN and the two ends are stock-width (the reference)."""
        return self.intermediate_size if self.add_share_ffn else self.vision_ffn_size

    @property
    def share_ffn_size(self) -> int:
        """Width of the shared FFN of ``share_ffn`` layers (0: none)."""
        return self.intermediate_size if self.ffn_share_size is None else self.ffn_share_size

    @property
    def has_same_modality_layers(self) -> bool:
        """True iff some layer restricts attention to the query's own modality (Uni-X, all_modal_visible=0)."""
        return "separated" in self.layer_kinds and not self.all_modal_visible

    def with_vocab(self, vocab: CodeVocab) -> "UniXConfig":
        """Return a copy whose vocabulary fields follow ``vocab`` (what training does at build time)."""
        return UniXConfig.from_dict_with_vocab(self.to_dict(), vocab)

    @classmethod
    def from_dict_with_vocab(cls, d: dict, vocab: CodeVocab) -> "UniXConfig":
        """Build from a config dict (ours, or a Qwen2 source's) with the vocabulary fields of ``vocab`` applied.

        The vocabulary is applied before construction: the dict's own image fields may not fit its vocabulary yet
        (placeholders, or none at all in a Qwen2 config), which ``__init__`` would reject.
        """
        d = {k: v for k, v in d.items() if k not in ("model_type", "transformers_version", "architectures")}
        d.update(
            image_offset=vocab.image_offset,
            image_level_sizes=list(vocab.level_sizes),
            vision_start_token_id=vocab.vision_start_id,
            vision_end_token_id=vocab.vision_end_id,
            image_max_grid=vocab.max_grid,
            vocab_size=max(d["vocab_size"], vocab.total_vocab_size),
        )
        return cls(**d)


class LegacyUniXConfig(UniXConfig):
    """Reads checkpoints saved before the rename (``model_type="unix_qwen2"``); saves them as ``uni_x_qwen2``."""

    model_type = LEGACY_MODEL_TYPE

    def __post_init__(self, **kwargs):
        warnings.warn(f"model_type={LEGACY_MODEL_TYPE!r} is deprecated: it loads as {UniXConfig.model_type!r}; "
                      "re-save the checkpoint (save_pretrained) to update config.json", FutureWarning, stacklevel=3)
        super().__post_init__(**kwargs)

    def to_dict(self) -> dict:
        """As `UniXConfig` writes it: the current model_type and class names (``save_pretrained`` records the
        in-memory class, ``LegacyUniXForCausalLM``, in ``architectures``), so a re-saved checkpoint is a current one."""
        d = super().to_dict()
        d["model_type"] = UniXConfig.model_type
        if d.get("architectures"):
            d["architectures"] = [name.removeprefix("Legacy") for name in d["architectures"]]
        return d


Variant = Literal["dense", "uni_x", "mot", "moe"]
Backbone = Literal["qwen2", "qwen3"]
__all__ = ["UniXConfig", "LegacyUniXConfig", "derive_layer_kinds", "VARIANTS", "LAYER_KINDS", "BACKBONES", "MOT_STYLES",
           "Variant", "Backbone"]
