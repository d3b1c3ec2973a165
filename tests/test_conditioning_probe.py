"""tools/conditioning_probe.py: the prompts it compares and the codes it scores (no checkpoint needed)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from data_process.shapes import ShapesWorld
from tools.conditioning_probe import code_nll, photo_caption, wrong_caption


def test_own_caption_is_a_training_phrasing_and_wrong_changes_colour_and_shape():
    world = ShapesWorld(seed=0)
    for k in range(60):
        scene = world.heldout_scene("colors", k)
        obj = scene.objects[0]
        own, wrong = photo_caption(obj.color, obj.shape), wrong_caption(scene)
        assert own in world.captions(scene)  # the probe asks in words the model was trained on
        words = wrong.split()
        assert obj.color not in words and obj.shape not in words, (own, wrong)


class _NextTokenOracle(torch.nn.Module):
    """Logits that put ``margin`` on the true next token: the NLL of every scored code is known in closed form."""

    def __init__(self, vocab: int, margin: float):
        super().__init__()
        self.vocab, self.margin = vocab, margin

    def forward(self, input_ids):
        nxt = torch.roll(input_ids, -1, dims=1)
        return SimpleNamespace(logits=self.margin * torch.nn.functional.one_hot(nxt, self.vocab).float())


def test_code_nll_scores_exactly_the_codes_after_the_prompt():
    vocab, margin = 50, 6.0
    oracle = _NextTokenOracle(vocab, margin)
    expected = -math.log(math.exp(margin) / (math.exp(margin) + vocab - 1))
    prompt, codes = [1, 2, 3, 4], [30, 31, 32, 33, 34]
    # an off-by-one slice would score each code against another position's logits: NLL ~ margin + log(vocab)
    assert abs(code_nll(oracle, prompt, codes) - expected) < 1e-5
