"""Qwen2/Qwen2.5 checkpoint -> any variant (dense, Uni-X, MoT, MoE), and back where that is defined.

    python modeling/conversion.py --src <qwen dir> --dst <dir> --variant uni_x \\
        --vision_encode_layers 9 --vision_decode_layers 5 --num_image_tokens 8192 [--tokenizer_dir <dir>]
    python modeling/conversion.py --from_config configs/model/tiny_uni_x.json --dst <dir>   # random init
    python modeling/conversion.py --src <mot/moe/dense dir> --dst <dir> --to_dense          # back to Qwen2

Initialisation (DESIGN.md section 4): every vision branch is a copy of the text layer at the same depth (layer i ->
encode layer i; layer L-M+i -> decode layer i, which IS layer L-M+i; MoT/MoE: the vision experts copy the text
ones). A vision FFN of another width cannot be copied: it keeps its random init and the log says so. Image codes
get embedding (and, if untied, output) rows of their own starting at ``image_offset``, initialised to the mean of
the text rows; Qwen2.5's spare rows past ``len(tokenizer)`` are overwritten by codes, and ``vocab_size`` grows to at
least ``image_offset + num codes``. Tied embeddings (Qwen2.5-0.5B..3B) stay tied.
Consequences pinned by tests: a converted checkpoint equals its base on text-only input, and MoT/MoE with copied
experts equal the converted dense model on any input.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from loguru import logger
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from modeling import UniXConfig, UniXForCausalLM, build_model
from modeling.vocab import VISION_END, VISION_START, CodeVocab

QWEN25_VISION_START, QWEN25_VISION_END = 151652, 151653
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


def _expand_rows(old_VD: torch.Tensor, new_VD: torch.Tensor, vocab: CodeVocab) -> None:
    """Copy the source rows, then give image codes mean-initialised rows of their own (in place, no grad)."""
    start, end = vocab.image_token_range
    keep = min(old_VD.shape[0], new_VD.shape[0])
    new_VD[:keep] = old_VD[:keep]
    new_VD[start:end] = old_VD[:start].float().mean(0).to(new_VD.dtype)


def uni_x_config_from_qwen(src_config: Qwen2Config, vocab: CodeVocab, **fields) -> UniXConfig:
    """A `UniXConfig` with the source's architecture, our fields, and a vocabulary covering the image codes."""
    d = src_config.to_dict()
    for key in ("layer_types", "auto_map"):  # Qwen2-only keys: our layer kinds are derived from our fields
        d.pop(key, None)
    d.update({k: v for k, v in fields.items() if v is not None})
    return UniXConfig.from_dict_with_vocab(d, vocab)


@torch.no_grad()
def convert_qwen(source: Qwen2ForCausalLM, config: UniXConfig) -> UniXForCausalLM:
    """Build a ``config.variant`` model initialised from an in-memory Qwen2 model (see the module docstring)."""
    model = UniXForCausalLM(config).to(source.dtype)
    state = source.state_dict()
    embed_key, head_key = "model.embed_tokens.weight", "lm_head.weight"
    body = {k: v for k, v in state.items() if k not in (embed_key, head_key)}
    missing, unexpected = model.load_state_dict(body, strict=False)
    if unexpected:
        raise ValueError(f"source keys with no place in the {config.variant} model: {unexpected[:5]}")
    _expand_rows(state[embed_key], model.model.embed_tokens.weight, config.code_vocab)
    if not config.tie_word_embeddings:
        _expand_rows(state.get(head_key, state[embed_key]), model.lm_head.weight, config.code_vocab)
    copied = _copy_vision_branches(model, config)
    left_random = [k for k in missing if k not in copied and k not in (embed_key, head_key)]
    if left_random:
        logger.warning("{} vision parameters keep their random init (FFN width {} != text width {}): {}",
                       len(left_random), config.vision_ffn_size, config.share_ffn_size, left_random[:4])
    logger.info("converted Qwen2 -> {} (layer kinds {}), vocab {} -> {}", config.variant, config.layer_kinds,
                source.config.vocab_size, config.vocab_size)
    return model


def _copy_vision_branches(model: UniXForCausalLM, config: UniXConfig) -> set[str]:
    """Vision branch of layer i <- text branch of layer i (same depth); returns the names of copied parameters."""
    copied = set()
    for full_name, text_param, param in _vision_text_pairs(model):
        if text_param.shape == param.shape:
            param.copy_(text_param)
            copied.add(full_name)
    return copied


def _vision_text_pairs(model: UniXForCausalLM):
    """Yield ``(vision parameter name, text counterpart, vision parameter)`` for every vision branch/expert."""
    for i, layer in enumerate(model.model.layers):
        for vision_name in ("vision", "vision_mlp"):
            branch = getattr(layer, vision_name, None)
            if branch is None:
                continue
            text_params = dict(layer.named_parameters())
            for name, param in branch.named_parameters():
                text_name = name if vision_name == "vision" else f"mlp.{name}"
                yield f"model.layers.{i}.{vision_name}.{name}", text_params[text_name], param


@torch.no_grad()
def to_dense_qwen(model: UniXForCausalLM) -> Qwen2ForCausalLM:
    """Export a plain Qwen2 model where that is exact: dense, or MoT/MoE whose experts all equal the text ones.

    Uni-X -> dense raises `UNI_X_TO_DENSE_UNDEFINED` (the reason is in the message).
    """
    config = model.config
    if config.variant == "uni_x" and (config.vision_encode_layers or config.vision_decode_layers):
        raise ValueError(UNI_X_TO_DENSE_UNDEFINED)
    differing = [full_name for full_name, text_param, param in _vision_text_pairs(model)
                 if text_param.shape != param.shape or not torch.equal(text_param, param)]
    if differing:
        raise ValueError(f"{config.variant} -> dense is only exact when every vision expert equals its text "
                         f"counterpart; {len(differing)} differ, e.g. {differing[:3]}")
    d = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "layer_kinds", "variant",
                "vision_encode_layers", "vision_decode_layers", "ffn_vision_size", "ffn_share_size",
                "all_modal_visible", "moe_every_k", "image_offset", "image_level_sizes"):
        d.pop(key, None)
    d["intermediate_size"] = config.share_ffn_size
    dense = Qwen2ForCausalLM(Qwen2Config(**d)).to(model.dtype)
    state = {k: v for k, v in model.state_dict().items() if ".vision." not in k and ".vision_mlp." not in k}
    dense.load_state_dict(state, strict=not config.tie_word_embeddings)
    return dense


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
    moe_every_k: int = 1,
    from_config: str | None = None,
    to_dense: bool = False,
    dtype: str = "auto",
) -> str:
    """Write a checkpoint to ``dst`` that loads with ``from_pretrained``; returns ``dst``.

    Args:
        src: a local Qwen2/Qwen2.5 checkpoint dir (or, with ``to_dense``, one of ours).
        num_image_tokens / image_level_sizes: codebook size (single level) or sizes per level.
        tokenizer_dir: sets image_offset = len(tokenizer) and the vision token ids; else use ``image_offset``.
        from_config: build a random-init model from this UniXConfig JSON instead of converting (tiny presets).
        to_dense: export a dense Qwen2 from a dense/MoT/MoE checkpoint (exact cases only).
    """
    if from_config is not None:
        model = build_model(UniXConfig.from_json_file(from_config))
    elif src is None:
        raise ValueError("give --src <checkpoint dir> or --from_config <json>")
    elif to_dense:
        model = to_dense_qwen(UniXForCausalLM.from_pretrained(src, dtype=dtype))
    else:
        source = Qwen2ForCausalLM.from_pretrained(src, dtype=dtype)
        vocab, tokenizer = _vocab_from_args(tokenizer_dir, image_offset, list(image_level_sizes or [num_image_tokens]),
                                 vision_start_token_id, vision_end_token_id)
        config = uni_x_config_from_qwen(
            source.config, vocab, variant=variant, vision_encode_layers=vision_encode_layers,
            vision_decode_layers=vision_decode_layers, ffn_vision_size=ffn_vision_size,
            all_modal_visible=all_modal_visible, moe_every_k=moe_every_k,
        )
        model = convert_qwen(source, config)
        if tokenizer is not None:  # with the vision tokens if they had to be added
            tokenizer.save_pretrained(dst)
    Path(dst).mkdir(parents=True, exist_ok=True)  # only now: a failed conversion leaves nothing behind
    model.save_pretrained(dst)
    logger.info("wrote {} ({} parameters) to {}", type(model).__name__, sum(p.numel() for p in model.parameters()),
                os.path.abspath(dst))
    return dst


if __name__ == "__main__":
    import fire

    fire.Fire(convert)
