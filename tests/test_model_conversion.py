"""Qwen2 checkpoint -> variants: text-only logits preserved; MoT/MoE with copied experts equal dense everywhere."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from modeling.conversion import convert, to_dense_qwen
from tests.model_fixtures import NUM_CODES, TEXT_VOCAB, VISION_END, VISION_START, documents

SOURCE_VOCAB = 128  # like Qwen2.5: spare rows [96, 128) past the tokenizer's 96 ids; codes take [96, 160)


def _source(tmp_path, tied: bool) -> str:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=SOURCE_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = Qwen2ForCausalLM(cfg)
    path = tmp_path / f"qwen_tied{int(tied)}"
    model.save_pretrained(path)
    return str(path)


def _convert(src: str, dst, variant: str, **kw):
    convert(dst=str(dst), src=src, variant=variant, num_image_tokens=NUM_CODES, image_offset=TEXT_VOCAB,
            vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, **kw)
    return AutoModelForCausalLM.from_pretrained(dst, attn_implementation="eager")


@pytest.mark.parametrize("tied", [True, False])
def test_converted_uni_x_equals_source_on_text(tmp_path, tied):
    src = _source(tmp_path, tied)
    base = Qwen2ForCausalLM.from_pretrained(src, attn_implementation="eager")
    uni_x = _convert(src, tmp_path / "uni_x", "uni_x", vision_encode_layers=1, vision_decode_layers=2)
    assert uni_x.config.vocab_size == TEXT_VOCAB + NUM_CODES and uni_x.config.tie_word_embeddings == tied
    ids = torch.tensor([documents()[0] + documents()[4]])  # text only
    want = base(ids, use_cache=False).logits[..., :TEXT_VOCAB]
    got = uni_x(ids, use_cache=False).logits
    assert (got[..., :TEXT_VOCAB] - want).abs().max() < 1e-5
    emb = uni_x.get_input_embeddings().weight
    torch.testing.assert_close(emb[TEXT_VOCAB], emb[:TEXT_VOCAB].mean(0))  # image rows: mean of the text rows


@pytest.mark.parametrize("variant, kw", [("mot", {}), ("moe", {"moe_every_k": 2}),
                                         ("uni_x", {"vision_encode_layers": 2, "vision_decode_layers": 2,
                                                   "all_modal_visible": 1})])
def test_copied_experts_equal_dense_on_any_input(tmp_path, variant, kw):
    src = _source(tmp_path, tied=True)
    dense = _convert(src, tmp_path / "dense", "dense")
    other = _convert(src, tmp_path / variant, variant, **kw)
    ids = torch.tensor([sum(documents(), [])])  # text, image and mixed tokens
    assert (other(ids, use_cache=False).logits - dense(ids, use_cache=False).logits).abs().max() < 1e-5


def test_narrower_vision_ffn_is_left_random_and_logged(tmp_path):
    from loguru import logger

    messages = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        model = _convert(_source(tmp_path, True), tmp_path / "moe", "moe", ffn_vision_size=48)
    finally:
        logger.remove(sink)
    assert any("keep their random init" in m for m in messages)
    assert model.model.layers[0].vision_mlp.up_proj.weight.shape == (48, 32)


def test_reverse_conversion(tmp_path):
    src = _source(tmp_path, tied=False)
    mot = _convert(src, tmp_path / "mot", "mot")
    dense = to_dense_qwen(mot)
    ids = torch.tensor([sum(documents(), [])])
    torch.testing.assert_close(dense(ids, use_cache=False).logits, mot(ids, use_cache=False).logits)
    uni_x = _convert(src, tmp_path / "uni_x", "uni_x", vision_encode_layers=1, vision_decode_layers=1)
    with pytest.raises(ValueError, match="not defined"):
        to_dense_qwen(uni_x)
    with torch.no_grad():
        mot.model.layers[0].vision.mlp.up_proj.weight.add_(1.0)
    with pytest.raises(ValueError, match="only exact when every vision expert equals"):
        to_dense_qwen(mot)


def test_model_from_config_alone(tmp_path):
    from pathlib import Path

    cfg = Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny_uni_x.json"
    convert(dst=str(tmp_path / "tiny"), from_config=str(cfg))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    assert model.config.layer_kinds == ["separated", "shared", "shared", "separated"]


def test_vision_ids_outside_a_small_vocabulary_fail_before_writing(tmp_path):
    src = _source(tmp_path, True)
    with pytest.raises(ValueError, match="vision_start_token_id.*--tokenizer_dir"):
        convert(dst=str(tmp_path / "out"), src=src, num_image_tokens=NUM_CODES, image_offset=TEXT_VOCAB)
    assert not (tmp_path / "out").exists()
