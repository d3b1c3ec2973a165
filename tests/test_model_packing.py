"""Packed rows == each document alone (logits and gradients), for every variant and attention implementation."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.model_fixtures import VARIANTS, VISION_START, documents, image_ids, pack, text_ids, tiny_model

IMPLEMENTATIONS = ["eager", "sdpa", "uni_x_packed"]


def _weighted_sum(logits: torch.Tensor, seed: int) -> torch.Tensor:
    """A loss whose gradient touches every logit with a different weight (so misrouted tokens show up)."""
    g = torch.Generator().manual_seed(seed)
    return (logits * torch.randn(logits.shape, generator=g)).sum()


def _reference(name: str, docs, backbone: str):
    """Per-document forward/backward with eager attention: logits per doc and summed gradients."""
    model = tiny_model(name, "eager", backbone=backbone)
    logits, grads = [], None
    for i, doc in enumerate(docs):
        model.zero_grad()
        out = model(torch.tensor([doc]), use_cache=False).logits[0]
        _weighted_sum(out, seed=i).backward()
        logits.append(out.detach())
        step = {n: p.grad.clone() for n, p in model.named_parameters()}
        grads = step if grads is None else {n: grads[n] + step[n] for n in grads}
    return logits, grads


@pytest.mark.parametrize("name", list(VARIANTS))
def test_packed_row_equals_documents_alone(name, backbone):
    docs = documents()
    ref_logits, ref_grads = _reference(name, docs, backbone)
    for attn in IMPLEMENTATIONS:
        model = tiny_model(name, attn, backbone=backbone)
        out = model(**pack(docs), use_cache=False).logits[0]
        pieces = out.split([len(d) for d in docs])
        for i, (got, want) in enumerate(zip(pieces, ref_logits)):
            assert (got - want).abs().max() < 1e-5, f"{name}/{attn}: document {i} logits differ"
        sum(_weighted_sum(p, seed=i) for i, p in enumerate(pieces)).backward()
        for n, p in model.named_parameters():
            # float32 summation order differs between a packed row and documents alone: a few ulp of the largest
            # entry (Qwen3's q/k norms give embedding gradients up to ~135, where one ulp is ~1.5e-5)
            atol = max(1e-5, 1e-6 * float(ref_grads[n].abs().max()))
            torch.testing.assert_close(p.grad, ref_grads[n], atol=atol, rtol=1e-4, msg=f"{name}/{attn}: grad {n}")


def test_separated_layer_without_all_modal_visible_hides_other_modality(backbone):
    """Sanity of the reference itself: with all_modal_visible=0 a text token's first-layer output ignores the image."""
    g = torch.Generator().manual_seed(3)
    prefix = [VISION_START] + image_ids(5, g)
    tail = text_ids(4, g)
    model = tiny_model("uni_x_amv0", "eager", backbone=backbone)
    h_a = model(torch.tensor([prefix + tail]), use_cache=False, output_hidden_states=True).hidden_states[1]
    prefix_b = [VISION_START] + image_ids(5, g)
    h_b = model(torch.tensor([prefix_b + tail]), use_cache=False, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(h_a[0, -4:], h_b[0, -4:])
    assert (h_a[0, 1:6] - h_b[0, 1:6]).abs().max() > 1e-3  # the image tokens themselves did change


def test_attention_mask_with_cu_seq_lens_raises(backbone):
    model = tiny_model("uni_x_amv0", backbone=backbone)
    batch = pack(documents())
    with pytest.raises(ValueError, match="must not carry an attention_mask"):
        model(**batch, attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False)


def test_packed_row_with_cache_raises(backbone):
    model = tiny_model("dense", backbone=backbone)
    with pytest.raises(ValueError, match="use_cache=False"):
        model(**pack(documents()), use_cache=True)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("attn", ["eager", "sdpa", "uni_x_packed"])
def test_left_padded_batch_equals_unpadded(name, attn, backbone):
    docs = documents()[2:4]  # two mixed prompts of different lengths
    model = tiny_model(name, attn, backbone=backbone)
    width = max(len(d) for d in docs)
    ids = torch.tensor([[0] * (width - len(d)) + d for d in docs])
    mask = torch.tensor([[0] * (width - len(d)) + [1] * len(d) for d in docs])
    out = model(ids, attention_mask=mask, use_cache=False).logits
    for row, doc in enumerate(docs):
        alone = model(torch.tensor([doc]), use_cache=False).logits[0]
        assert (out[row, width - len(doc):] - alone).abs().max() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn varlen needs a GPU")
def test_flash_varlen_equals_sdpa_on_gpu(backbone):
    pytest.importorskip("flash_attn")
    docs = documents()
    model = tiny_model("uni_x_amv0", "sdpa", backbone=backbone).cuda().to(torch.bfloat16)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in pack(docs).items()}
    ref = model(**batch, use_cache=False).logits
    model.set_attn_implementation("uni_x_fa_varlen")
    torch.testing.assert_close(model(**batch, use_cache=False).logits, ref, atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn varlen needs a GPU")
def test_fp32_model_under_bf16_autocast_runs_flash_and_fp32_alone_stays_exact_on_gpu(backbone):
    """flash-attn rejects fp32: under bf16 autocast q/k/v are cast (RoPE upcasts them to fp32), without autocast an
    fp32 model keeps the exact sdpa loop (see `modeling.attention.flash_plan`)."""
    pytest.importorskip("flash_attn")
    model = tiny_model("uni_x_amv0", "sdpa", backbone=backbone).cuda()
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in pack(documents()).items()}
    ref = model(**batch, use_cache=False).logits
    model.set_attn_implementation("uni_x_packed")
    torch.testing.assert_close(model(**batch, use_cache=False).logits, ref, atol=1e-5, rtol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = model(**batch, use_cache=False).logits
    torch.testing.assert_close(got.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_uni_x_fa_varlen_without_flash_attn_names_the_package_and_the_fallback(backbone):
    model = tiny_model("uni_x_amv0", "uni_x_fa_varlen", backbone=backbone)
    with pytest.raises(ImportError, match=r"flash-attn.*requirements-gpu\.txt.*uni_x_packed"):
        model(**pack(documents()), use_cache=False)
