"""The packed-attention kernel choice (flash-attn vs the sdpa loop) and the dtype cast around flash-attn.

flash-attn only runs on CUDA and fails on fp32 inputs; the decision is a pure function, so it is pinned here on
CPU, and the cast around the kernel is checked with a stand-in kernel that insists on a half dtype.
"""

from __future__ import annotations

import pytest
import torch

import modeling.attention as attention
from modeling.attention import FLASH_ATTENTION, flash_plan
from tests.model_fixtures import documents, pack, tiny_model

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.mark.parametrize(
    "device, dtype, flash, autocast, weights, want",
    [
        ("cpu", BF16, True, None, BF16, ("sdpa", None)),  # flash-attn is CUDA only
        ("cuda", BF16, False, None, BF16, ("sdpa", None)),  # not installed
        ("cuda", BF16, True, None, BF16, ("flash", None)),  # already half: no cast
        ("cuda", F16, True, None, F32, ("flash", None)),
        ("cuda", F32, True, BF16, F32, ("flash", BF16)),  # fp32 model under bf16 autocast (RoPE upcasts q/k)
        ("cuda", F32, True, F16, BF16, ("flash", F16)),  # autocast wins over the weights, as in transformers
        ("cuda", F32, True, None, BF16, ("flash", BF16)),  # fp32 activations (e.g. fp32 norms) in a bf16 model
        ("cuda", F32, True, None, F32, ("sdpa", None)),  # an fp32 model asked for fp32: the exact loop
    ],
)
def test_flash_plan(device, dtype, flash, autocast, weights, want):
    assert flash_plan(device, dtype, flash, autocast, weights) == want


def test_flash_plan_required_refuses_fp32_with_a_remedy():
    with pytest.raises(ValueError, match=rf"{FLASH_ATTENTION}.*float16/bfloat16 only.*dtype=torch.bfloat16"):
        flash_plan("cuda", F32, True, None, F32, required=True)
    assert flash_plan("cuda", F32, True, BF16, F32, required=True) == ("flash", BF16)


def test_flash_path_casts_inputs_to_half_and_the_output_back(monkeypatch):
    """An fp32 model whose plan says flash+bf16: the kernel sees bf16 q/k/v and the layer gets fp32 back."""
    seen = []

    def fake_flash(query, key, value, scaling, dropout, cu_seq_lens, max_len):
        seen.append((query.dtype, key.dtype, value.dtype))
        if query.dtype not in (torch.float16, torch.bfloat16):  # what flash-attn itself does with fp32
            raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
        return query[0].transpose(0, 1)[None]  # [1, T, H, D]

    monkeypatch.setattr(attention, "_flash_varlen", fake_flash)
    monkeypatch.setattr(attention, "flash_plan", lambda *args, **kw: ("flash", BF16))
    model = tiny_model("uni_x_amv0", "uni_x_packed")
    logits = model(**pack(documents()), use_cache=False).logits
    assert seen and all(dtypes == (BF16, BF16, BF16) for dtypes in seen)
    assert logits.dtype == F32 and torch.isfinite(logits).all()


def test_flash_plan_reads_the_layer_weights_and_autocast(monkeypatch):
    """The arguments the forward hands to `flash_plan`: the layer's weight dtype and the autocast state."""
    calls = []

    def spy(device, dtype, flash, autocast, weights, required=False):
        calls.append((device, dtype, autocast, weights, required))
        return "sdpa", None

    monkeypatch.setattr(attention, "flash_plan", spy)
    model = tiny_model("dense", "uni_x_fa_varlen")
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: True)
    model(**pack(documents()), use_cache=False)
    with torch.autocast("cpu", dtype=BF16):
        model(**pack(documents()), use_cache=False)
    assert calls[0] == ("cpu", F32, None, F32, True)
    assert calls[-1][2] == BF16
