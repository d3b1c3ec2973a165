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


def test_min_gap_makes_the_probe_a_gate(monkeypatch, tmp_path):
    import pytest

    from tools import conditioning_probe as cp

    figures = {"own": 0.25, "wrong": 0.2501, "uncond": 0.2502, "wrong_minus_own": 0.0001, "wrong_minus_own_se": 1e-4,
               "uncond_minus_own": 0.0002, "uncond_minus_own_se": 1e-4, "codes_per_image": 64}
    monkeypatch.setattr(cp, "probe", lambda *a, **k: dict(figures))
    assert cp.main("ckpt", out=str(tmp_path / "p.json"))["wrong_minus_own"] == 0.0001  # no gate: figures only
    with pytest.raises(SystemExit, match=r"\+0\.006 nats per image \(\+0\.0001 per code x 64 codes; the gate: >= 0\.25"):
        cp.main("ckpt", out=str(tmp_path / "p.json"), min_gap=0.25)
    assert (tmp_path / "p.json").is_file()  # the figures are written before the verdict
    figures["wrong_minus_own"] = 0.0041  # 0.26 nats per image
    assert cp.main("ckpt", min_gap=0.25)["wrong_minus_own"] == 0.0041
    figures["codes_per_image"] = 32  # the same per-code gap over half the codes: 0.13 nats per image
    with pytest.raises(SystemExit, match="nats per image"):
        cp.main("ckpt", min_gap=0.25)
