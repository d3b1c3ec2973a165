"""The drawing check of evaluation/shapes_t2i.py: verdicts, rates and the table, against an oracle "model" whose
images are rendered by the shapes world itself (so every rate is known in advance)."""

from __future__ import annotations

import re

import pytest

from data_process.shapes import COLORS, SHAPES, Scene, ShapeObject, ShapesWorld
from data_process.shapes.detect import Detection
from evaluation import shapes_t2i
from evaluation.uni_infer import GeneratedImage
from tools.conditioning_probe import photo_caption

WORLD = ShapesWorld(seed=0, image_size=64)
PROMPT_RE = re.compile(r"a photo of an? (\w+) (\w+)")


class OracleInfer:
    """Draws what it is asked for on even seeds and two objects on odd seeds; the unconditional prompt gets one
    red circle on seed 0 and a blue square otherwise. Records the calls so the test can check seeds and batching."""

    def __init__(self):
        self.calls = []

    def generate_images(self, prompts, num_images, *, seed, cfg_scale, sampling, batch_size):
        self.calls.append((list(prompts), num_images, seed, cfg_scale))
        out = []
        for p in prompts:
            drawn = []
            for i in range(num_images):
                s = seed + i
                if p is None:
                    objs = [ShapeObject("circle", "red", (20, 20, 40, 40)) if s == 0 else
                            ShapeObject("square", "blue", (20, 20, 40, 40))]
                else:
                    color, shape = PROMPT_RE.fullmatch(p).groups()
                    objs = [ShapeObject(shape, color, (10, 10, 30, 30))]
                    if s % 2:
                        objs.append(ShapeObject(shape, color, (40, 40, 58, 58)))
                image = WORLD.render(Scene(tuple(objs), 64, 0, "colors"))
                drawn.append(GeneratedImage(image, [], (16, 16), s, p))
            out.append(drawn)
        return out


def test_verdicts_say_how_an_image_misses():
    red_circle = Detection("circle", "red", (0, 0, 10, 10), 0.9)
    blue_circle = Detection("circle", "blue", (20, 20, 30, 30), 0.9)
    assert shapes_t2i.verdicts([red_circle], "red", "circle") == dict(exact=True, one_object=True, color=True, shape=True)
    assert shapes_t2i.verdicts([red_circle, blue_circle], "red", "circle")["exact"] is False
    assert shapes_t2i.verdicts([blue_circle], "red", "circle") == dict(exact=False, one_object=True, color=False,
                                                                       shape=True)
    assert shapes_t2i.verdicts([], "red", "circle") == dict(exact=False, one_object=False, color=False, shape=False)


def test_rates_table_and_control_against_the_oracle():
    infer = OracleInfer()
    pairs = [("red", "circle"), ("orange", "square"), ("white", "diamond")]
    summary, images = shapes_t2i.measure(infer, num_seeds=4, seed=0, cfg_scale=3.0, batch_size=8, pairs=pairs)
    assert summary["red_circle"] == 0.5  # seeds 0 and 2 exact, 1 and 3 draw two objects
    assert summary["pair_mean"] == dict(exact=0.5, one_object=0.5, color=1.0, shape=1.0)
    assert summary["uncond_red_circle"] == 0.25 and summary["uncond_one_object"] == 1.0
    assert summary["table"][photo_caption("orange", "square")]["exact"] == 0.5
    # every prompt drawn with the same seeds; the unconditional prompt is None; two prompts per batch of 8 samples
    prompts = [p for call in infer.calls for p in call[0]]
    assert prompts == [photo_caption(c, s) for c, s in pairs] + [None]
    assert all(call[1:] == (4, 0, 3.0) and len(call[0]) <= 2 for call in infer.calls)
    assert [g.seed for g in images["<unconditional>"]] == [0, 1, 2, 3]


def test_format_table_lists_all_forty_pairs():
    table = {photo_caption(c, s): {"exact": 0.25} for c in COLORS for s in SHAPES}
    summary = {"table": table, "red_circle": 0.25, "uncond_red_circle": 0.0, "uncond_one_object": 0.5,
               "pair_mean": dict(exact=0.25, one_object=0.5, color=0.75, shape=0.5)}
    text = shapes_t2i.format_table(summary)
    assert text.count(" 25% |") == 40  # one cell per pair
    assert all(f"| {c} |" in text for c in COLORS)
    assert "40-pair mean: exact 25.0%" in text


@pytest.mark.parametrize("seeds", [0, -1])
def test_measure_refuses_no_seeds(seeds):
    with pytest.raises(ValueError, match="num_seeds"):
        shapes_t2i.measure(OracleInfer(), num_seeds=seeds)


def test_gate_reasons_name_the_failing_figure():
    summary = {"pair_mean": {"exact": 0.30}, "uncond_red_circle": 0.25}
    assert shapes_t2i.gate_reasons(summary) == []  # no thresholds, no gate
    assert shapes_t2i.gate_reasons(summary, min_pair_exact_pct=25.0, max_uncond_pct=30.0) == []
    reasons = shapes_t2i.gate_reasons(summary, min_pair_exact_pct=40.0, max_uncond_pct=10.0)
    assert reasons[0] == "40-pair mean exact rate 30.0% < 40.0%"
    assert reasons[1].startswith("the unconditional prompt draws one red circle in 25.0% > 10.0%")


class HeldOutOracle(OracleInfer):
    """Like OracleInfer, but a held-out pair is drawn in the wrong colour on every seed (a model that never saw it)."""

    def __init__(self, unseen):
        super().__init__()
        self.unseen = set(unseen)

    def generate_images(self, prompts, num_images, **kw):
        out = super().generate_images(prompts, num_images, **kw)
        for p, drawn in zip(prompts, out):
            if p is not None and tuple(PROMPT_RE.fullmatch(p).groups()) in self.unseen:
                color, shape = PROMPT_RE.fullmatch(p).groups()
                other = "black" if color != "black" else "white"
                for g in drawn:
                    g.image = WORLD.render(Scene((ShapeObject(shape, other, (10, 10, 30, 30)),), 64, 0, "colors"))
        return out


def test_held_out_pairs_are_reported_apart_and_the_gate_reads_the_seen_ones():
    pairs = [("red", "circle"), ("orange", "square"), ("white", "diamond"), ("blue", "triangle")]
    unseen = (("white", "diamond"),)
    summary, _ = shapes_t2i.measure(HeldOutOracle(unseen), num_seeds=4, seed=0, cfg_scale=3.0, batch_size=8,
                                    pairs=pairs, unseen_pairs=unseen)
    assert summary["seen_pair_mean"]["exact"] == 0.5  # the oracle's even seeds, on the three seen pairs
    assert summary["unseen_pair_mean"] == dict(exact=0.0, one_object=1.0, color=0.0, shape=1.0)
    assert summary["pair_mean"]["exact"] == pytest.approx(0.375)  # (3 x 0.5 + 0) / 4
    assert summary["unseen_pairs"] == [["white", "diamond"]]
    assert summary["table"][photo_caption("white", "diamond")]["unseen"] is True
    assert shapes_t2i.gate_reasons(summary, min_pair_exact_pct=45.0) == []  # the all-pair 37.5% would fail
    assert shapes_t2i.gate_reasons(summary, min_pair_exact_pct=55.0) == ["seen-pair mean exact rate 50.0% < 55.0%"]
    text = shapes_t2i.format_table(summary)
    assert "0%* |" in text and "unseen pairs* (1, held out of training): exact 0.0%" in text
    assert "seen pairs (3): exact 50.0%" in text


def test_without_held_out_pairs_the_split_is_absent():
    summary, _ = shapes_t2i.measure(OracleInfer(), num_seeds=2, seed=0, cfg_scale=3.0, batch_size=8,
                                    pairs=[("red", "circle")])
    assert summary["unseen_pair_mean"] is None and summary["seen_pair_mean"] == summary["pair_mean"]
    assert "unseen" not in shapes_t2i.format_table({**summary, "table": summary["table"]})
