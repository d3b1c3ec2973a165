"""KV-cache decoding == full forward for every variant, across a text -> image boundary; `generate` works."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from tests.model_fixtures import VARIANTS, VISION_END, VISION_START, image_ids, text_ids, tiny_model


def _sequence() -> list[int]:
    g = torch.Generator().manual_seed(5)
    return text_ids(5, g) + [VISION_START] + image_ids(6, g) + [VISION_END] + text_ids(3, g)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("attn", ["eager", "uni_x_packed"])
def test_prefill_then_token_by_token_equals_full_forward(name, attn, backbone):
    seq = _sequence()
    model = tiny_model(name, attn, backbone=backbone)
    with torch.no_grad():
        full = model(torch.tensor([seq]), use_cache=False).logits[0]
        prefill = 4  # ends inside the text prompt: decoding crosses text -> image -> text
        cache = DynamicCache(config=model.config)
        out = model(torch.tensor([seq[:prefill]]), past_key_values=cache, use_cache=True)
        steps = [out.logits[0]]
        for tok in seq[prefill:]:
            out = model(torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[0])
    assert (torch.cat(steps) - full).abs().max() < 1e-5


def _greedy_by_full_forwards(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids


@pytest.mark.parametrize("name", list(VARIANTS))
def test_generate_greedy_equals_argmax_of_full_forwards(name, backbone):
    g = torch.Generator().manual_seed(7)
    prompt = text_ids(4, g) + [VISION_START]  # a text-to-image prompt: the first new token is a vision position
    model = tiny_model(name, "sdpa", backbone=backbone)
    got = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert got[0].tolist() == _greedy_by_full_forwards(model, prompt, 8)


@pytest.mark.parametrize("name", ["uni_x_amv0", "mot"])
def test_generate_left_padded_batch_equals_each_prompt(name, backbone):
    """CFG batches a conditional and an unconditional prompt of different lengths, left-padded."""
    g = torch.Generator().manual_seed(9)
    prompts = [text_ids(6, g) + [VISION_START], text_ids(2, g) + [VISION_START]]
    model = tiny_model(name, "sdpa", backbone=backbone)
    ids = torch.tensor([[0] * (7 - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (7 - len(p)) + [1] * len(p) for p in prompts])
    got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert got[row, -6:].tolist() == alone[0, -6:].tolist()
