"""Qwen2/Qwen3 checkpoint -> variants: text-only logits preserved; MoT/MoE with copied experts equal dense
everywhere; the reference's Qwen2.5-into-Qwen3 move is explicit and changes the function."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from modeling.conversion import convert, to_dense_qwen
from tests.model_fixtures import NUM_CODES, TEXT_VOCAB, VISION_END, VISION_START, documents

SOURCE_VOCAB = 128  # like Qwen2.5: spare rows [96, 128) past the tokenizer's 96 ids; codes take [96, 160)
SOURCE_FAMILIES = {"qwen2": (Qwen2ForCausalLM, Qwen2Config, {}),
                   "qwen3": (Qwen3ForCausalLM, Qwen3Config, {"head_dim": 16})}  # Qwen3: heads wider than 32 / 4


def _source(tmp_path, tied: bool, family: str = "qwen2") -> str:
    torch.manual_seed(0)
    causal_lm, config_class, extra = SOURCE_FAMILIES[family]
    cfg = config_class(vocab_size=SOURCE_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, **extra)
    model = causal_lm(cfg)
    with torch.no_grad():  # non-trivial q/k/v biases (Qwen2) and q/k norms (Qwen3): both must reach the result
        for name, p in model.named_parameters():
            if name.endswith(("_proj.bias", "_norm.weight")):
                p.add_(torch.randn_like(p) * 0.5)
    path = tmp_path / f"{family}_tied{int(tied)}"
    model.save_pretrained(path)
    return str(path)


def _convert(src: str, dst, variant: str, **kw):
    convert(dst=str(dst), src=src, variant=variant, num_image_tokens=NUM_CODES, image_offset=TEXT_VOCAB,
            vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, **kw)
    return AutoModelForCausalLM.from_pretrained(dst, attn_implementation="eager")


@pytest.mark.parametrize("family", list(SOURCE_FAMILIES))
@pytest.mark.parametrize("tied", [True, False])
def test_converted_uni_x_equals_source_on_text(tmp_path, tied, family):
    src = _source(tmp_path, tied, family)
    base = AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager")
    uni_x = _convert(src, tmp_path / "uni_x", "uni_x", vision_encode_layers=1, vision_decode_layers=2)
    assert uni_x.config.backbone == family  # the source's own family: exact
    # 96 text ids + 64 codes = 160, padded to a multiple of 64
    assert uni_x.config.vocab_size == 192 and uni_x.config.tie_word_embeddings == tied
    assert uni_x.get_input_embeddings().weight.shape[0] == uni_x.get_output_embeddings().weight.shape[0] == 192
    ids = torch.tensor([documents()[0] + documents()[4]])  # text only
    want = base(ids, use_cache=False).logits[..., :TEXT_VOCAB]
    got = uni_x(ids, use_cache=False).logits
    assert (got[..., :TEXT_VOCAB] - want).abs().max() < 1e-5


@pytest.mark.parametrize("variant, kw", [("mot", {}), ("moe", {"moe_every_k": 2}),
                                         ("uni_x", {"vision_encode_layers": 2, "vision_decode_layers": 2,
                                                   "all_modal_visible": 1})])
@pytest.mark.parametrize("family", list(SOURCE_FAMILIES))
def test_copied_experts_equal_dense_on_any_input(tmp_path, variant, kw, family):
    src = _source(tmp_path, tied=True, family=family)
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


@pytest.mark.parametrize("family", list(SOURCE_FAMILIES))
def test_reverse_conversion(tmp_path, family):
    src = _source(tmp_path, tied=False, family=family)
    mot = _convert(src, tmp_path / "mot", "mot")
    dense = to_dense_qwen(mot)
    assert isinstance(dense, SOURCE_FAMILIES[family][0])
    ids = torch.tensor([sum(documents(), [])])
    torch.testing.assert_close(dense(ids, use_cache=False).logits, mot(ids, use_cache=False).logits)
    uni_x = _convert(src, tmp_path / "uni_x", "uni_x", vision_encode_layers=1, vision_decode_layers=1)
    with pytest.raises(ValueError, match="not defined"):
        to_dense_qwen(uni_x)
    with torch.no_grad():
        mot.model.layers[0].vision.mlp.up_proj.weight.add_(1.0)
    with pytest.raises(ValueError, match="only exact when every vision expert equals"):
        to_dense_qwen(mot)


def test_qwen25_into_qwen3_is_explicit_and_changes_the_function(tmp_path):
    """The reference's move: Qwen2.5 weights in Qwen3 layers. Biases dropped, q/k norms at ones, a logged warning
    that the model is no longer its source; the result is exactly a stock Qwen3 holding the bias-free weights."""
    from loguru import logger

    src = _source(tmp_path, tied=True, family="qwen2")
    base = Qwen2ForCausalLM.from_pretrained(src, attn_implementation="eager")
    messages = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        moved = _convert(src, tmp_path / "moved", "uni_x", vision_encode_layers=1, vision_decode_layers=1,
                         backbone="qwen3")
    finally:
        logger.remove(sink)
    assert any("NOT the source model" in m and "dropped 12 bias tensors" in m for m in messages), messages
    assert moved.config.backbone == "qwen3" and moved.config.head_dim == 8  # the source's width, not Qwen3's 128
    names = dict(moved.named_parameters())
    assert not [n for n in names if n.endswith("_proj.bias")]
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in names.items() if n.endswith(("q_norm.weight",
                                                                                           "k_norm.weight")))
    ids = torch.tensor([documents()[0] + documents()[4]])  # text only
    got = moved(ids, use_cache=False).logits[..., :TEXT_VOCAB]
    assert (got - base(ids, use_cache=False).logits[..., :TEXT_VOCAB]).abs().max() > 1e-2  # a different function
    stock = Qwen3ForCausalLM(Qwen3Config(**{**base.config.to_dict(), "model_type": "qwen3", "head_dim": 8,
                                            "attention_bias": False})).eval()
    stock.set_attn_implementation("eager")
    missing, unexpected = stock.load_state_dict(base.state_dict(), strict=False)
    assert {k.rsplit(".", 2)[-2] for k in missing} == {"q_norm", "k_norm"} and all("bias" in k for k in unexpected)
    want = stock(ids, use_cache=False).logits[..., :TEXT_VOCAB]
    assert (got - want).abs().max() < 1e-5


def test_qwen3_into_qwen2_is_refused(tmp_path):
    with pytest.raises(ValueError, match="backbone='qwen2' from a Qwen3 source is not defined"):
        _convert(_source(tmp_path, tied=True, family="qwen3"), tmp_path / "out", "dense", backbone="qwen2")
    assert not (tmp_path / "out").exists()


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


STAT_TEXT, STAT_CODES, STAT_DIM = 1000, 2000, 64


def _anisotropic_rows(n: int, gen: torch.Generator) -> torch.Tensor:
    """Rows with a non-zero mean and a strongly non-isotropic covariance (scales 0.1..3 in a random basis)."""
    basis, _ = torch.linalg.qr(torch.randn(STAT_DIM, STAT_DIM, generator=gen))
    scale = torch.linspace(0.1, 3.0, STAT_DIM)
    return torch.randn(STAT_DIM, generator=gen) + (torch.randn(n, STAT_DIM, generator=gen) * scale) @ basis


def _stat_source(tied: bool, spare: int = 24) -> Qwen2ForCausalLM:
    """A 64-d Qwen2 with 1,000 text rows and ``spare`` unused rows (like Qwen2.5's) of known statistics."""
    gen = torch.Generator().manual_seed(0)
    cfg = Qwen2Config(vocab_size=STAT_TEXT + spare, hidden_size=STAT_DIM, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(_anisotropic_rows(cfg.vocab_size, gen))
        if not tied:
            model.get_output_embeddings().weight.copy_(_anisotropic_rows(cfg.vocab_size, gen) * 0.5 - 1)
    return model


def _convert_in_memory(source, layout: str = "compact", seed: int = 0):
    from modeling.conversion import convert_qwen, uni_x_config_from_qwen
    from modeling.vocab import CodeVocab

    vocab = CodeVocab(STAT_TEXT, (STAT_CODES,), VISION_START, VISION_END)
    config = uni_x_config_from_qwen(source.config, vocab, vocab_layout=layout, variant="dense")
    return convert_qwen(source, config, layout, seed)


def _covariance(rows: torch.Tensor) -> torch.Tensor:
    centered = rows.double() - rows.double().mean(0)
    return centered.T @ centered / rows.shape[0]


@pytest.mark.parametrize("tied", [True, False])
def test_new_rows_follow_transformers_mean_resizing(tied):
    """Image-code rows are transformers' mean resizing of the text rows: each row different, sampled around the
    text rows' mean with 1e-9 times their covariance, for the embedding and an untied head; vocab padded to 64."""
    source = _stat_source(tied)
    model = _convert_in_memory(source)
    assert model.config.vocab_size == 3008 and model.config.vocab_size % 64 == 0  # 1,000 + 2,000 -> 3,008
    pairs = [(source.get_input_embeddings().weight, model.get_input_embeddings().weight)]
    if not tied:
        pairs.append((source.get_output_embeddings().weight, model.get_output_embeddings().weight))
    else:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for old, new in pairs:
        old_rows, new_rows = old[:STAT_TEXT].detach(), new[STAT_TEXT:].detach()
        torch.testing.assert_close(new[:STAT_TEXT], old_rows, atol=0, rtol=0)  # text rows untouched
        assert new_rows.shape[0] == 2008 and torch.unique(new_rows, dim=0).shape[0] == 2008  # not all one vector
        mean_error = (new_rows.double().mean(0) - old_rows.double().mean(0)).abs().max()
        assert mean_error < 1e-4, mean_error
        want = 1e-9 * _covariance(old_rows)
        rel = torch.linalg.matrix_norm(_covariance(new_rows) - want) / torch.linalg.matrix_norm(want)
        assert rel < 0.3, f"sample covariance is {rel:.2f} (relative Frobenius) away from 1e-9 * the old covariance"
        assert not torch.equal(new[STAT_TEXT:STAT_TEXT + 24], old[STAT_TEXT:])  # spare rows replaced (compact)


def test_new_rows_are_reproducible_by_seed():
    source = _stat_source(tied=True)
    first, again, other = (_convert_in_memory(source, seed=s).get_input_embeddings().weight for s in (0, 0, 1))
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    assert not torch.equal(other[STAT_TEXT:], first[STAT_TEXT:])


def test_reference_layout_keeps_every_source_row_and_appends():
    """The reference's resize_token_embeddings(source rows + codes): spare rows kept, new rows after them, and
    Qwen2.5 + 8,192 codes gives its 160,128 rows (the compact default gives 159,872)."""
    from modeling.conversion import joint_vocab_rows
    from modeling.vocab import CodeVocab

    qwen25 = CodeVocab(151665, (8192,), 151652, 151653)
    assert joint_vocab_rows(151936, qwen25, "reference") == (151936, 160128)
    assert joint_vocab_rows(151936, qwen25, "compact") == (151665, 159872)
    assert joint_vocab_rows(151936, qwen25, "compact", pad_to_multiple_of=1) == (151665, 159857)
    with pytest.raises(ValueError, match="vocab_layout='tight'"):
        joint_vocab_rows(151936, qwen25, "tight")
    source = _stat_source(tied=True)
    model = _convert_in_memory(source, layout="reference")
    old, new = source.get_input_embeddings().weight, model.get_input_embeddings().weight
    assert new.shape[0] == model.config.vocab_size == 3072  # 1,024 + 2,000 = 3,024 -> 3,072
    torch.testing.assert_close(new[:1024], old, atol=0, rtol=0)
    mean_error = (new[1024:].double().mean(0) - old.double().mean(0)).abs().max()
    assert mean_error < 1e-4 and torch.unique(new[1024:], dim=0).shape[0] == 3072 - 1024
