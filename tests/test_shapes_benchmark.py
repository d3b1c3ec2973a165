"""evaluation/benchmarks/shapes.py and the shapes world's compositional split (data_process/shapes).

The scorer must agree with the world (rendered ground truth scores 1.0, a blank picture 0); the split must keep
every held-out (colour, shape) pair out of every training file while leaving every other item as it was; the suite
must report prompts naming a held-out pair apart from the others.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from data_process.shapes import BACKGROUND, TAGS, ShapesWorld
from data_process.shapes_world import build
from evaluation.benchmarks import geneval
from evaluation.benchmarks.shapes import (ShapesScorer, load_world, pair_split, question_type, split_summaries,
                                          subset, suite_scenes, vqa_set)

WORLD = ShapesWorld(seed=0, image_size=64)


def test_scorer_gives_ground_truth_renders_one_and_blank_images_zero():
    scorer = ShapesScorer()
    scenes = [WORLD.heldout_scene(t, k) for t in TAGS for k in range(4)]
    verdicts = [scorer(WORLD.render(s), WORLD.geneval_metadata(s)) for s in scenes]
    assert all(v.correct and v.reason == "" for v in verdicts)
    summary = geneval.summarize([{"tag": s.resolved_tag(), "correct": v.correct, "metadata": str(i)}
                                 for i, (s, v) in enumerate(zip(scenes, verdicts))])
    assert summary["overall"] == 1.0 and set(summary["tags"]) == set(TAGS)
    blank = Image.new("RGB", (64, 64), BACKGROUND)
    misses = [scorer(blank, WORLD.geneval_metadata(s)) for s in scenes]
    assert not any(v.correct for v in misses) and all("found 0" in v.reason for v in misses)
    # details in GenEval's form: class -> [x0, y0, x1, y1, score]
    one = verdicts[0].details
    assert list(one) == [scenes[0].objects[0].shape] and len(one[scenes[0].objects[0].shape][0]) == 5


def test_scorer_applies_the_colour_and_count_rules():
    scene = WORLD.heldout_scene("colors", 0)
    meta = WORLD.geneval_metadata(scene)
    other = next(c for c in ("red", "blue") if c != scene.objects[0].color)
    wrong = {**meta, "include": [{**meta["include"][0], "color": other}]}
    verdict = ShapesScorer()(WORLD.render(scene), wrong)
    assert not verdict.correct and f"expected {other}" in verdict.reason
    counting = WORLD.heldout_scene("counting", 0)
    meta = WORLD.geneval_metadata(counting)
    n = meta["include"][0]["count"]
    too_many = {**meta, "include": [{**meta["include"][0], "count": n + 1}], "exclude": []}
    assert not ShapesScorer()(WORLD.render(counting), too_many).correct


def _pairs_named(text: str, pairs) -> list:
    return [p for p in pairs if f"{p[0]} {p[1]}" in text.lower()]


def test_compositional_split_keeps_held_out_pairs_out_of_every_training_file(tmp_path: Path):
    out = tmp_path / "world"
    build(str(out), num_images=60, seed=0, image_size=32, num_text=60, geneval_per_tag=2, heldout_pairs=3)
    info = json.loads((out / "world.json").read_text())
    held = [tuple(p) for p in info["heldout_pairs"]]
    world = ShapesWorld(seed=0, image_size=32, heldout_pairs=3)
    assert len(held) == 3 and tuple(held) == world.unseen_pairs and load_world(out).unseen_pairs == world.unseen_pairs
    captions = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    for row in captions:
        assert not any((o["color"], o["shape"]) in held for o in row["scene"]["objects"]), row["id"]
        assert not any(_pairs_named(c, held) for c in row["captions"]), row["id"]
    vqa_text = (out / "vqa.jsonl").read_text()
    text = (out / "text.jsonl").read_text()
    assert not _pairs_named(vqa_text, held) and not _pairs_named(text, held)
    # Only the items that would show or name a held-out pair are re-drawn: the rest equal the plain world's.
    plain = ShapesWorld(seed=0, image_size=32)
    same = [world.scene(i) == plain.scene(i) for i in range(60)]
    hit = [any((o.color, o.shape) in held for o in plain.scene(i).objects) for i in range(60)]
    assert any(hit), "the test needs some plain-world scene with a held-out pair"
    assert same == [not h for h in hit]
    plain_text, split_text = plain.text_corpus(60), world.text_corpus(60)
    named = [bool(_pairs_named(t, held)) for t in plain_text]
    assert any(named) and all(a != b for a, b, n in zip(split_text, plain_text, named) if n)
    assert sum(a == b for a, b in zip(split_text, plain_text)) >= 30
    # A build with another split into the same folder is refused (its images would mix two worlds).
    with pytest.raises(ValueError, match="heldout_pairs"):
        build(str(out), num_images=60, seed=0, image_size=32, num_text=60, geneval_per_tag=2, heldout_pairs=2)


def test_default_world_has_no_split_and_reads_old_world_files(tmp_path: Path):
    assert WORLD.unseen_pairs == () and WORLD.info()["heldout_pairs"] == []
    old = {k: v for k, v in WORLD.info().items() if k != "heldout_pairs"}  # written before the split existed
    (tmp_path / "world.json").write_text(json.dumps(old))
    assert load_world(tmp_path).unseen_pairs == ()
    (tmp_path / "world.json").write_text(json.dumps({**old, "heldout_pairs": [["red", "circle"]]}))
    with pytest.raises(ValueError, match="heldout_pairs: recorded"):
        load_world(tmp_path)  # not the pairs seed 0 draws


def test_suite_adds_unseen_prompts_and_reports_splits(tmp_path: Path):
    world = ShapesWorld(seed=0, image_size=32, heldout_pairs=2)
    scenes = suite_scenes(world, per_tag=2, unseen_per_pair=3)
    metadata = [world.geneval_metadata(s) for s in scenes]
    splits = [pair_split(m, world.unseen_pairs) for m in metadata]
    assert len(scenes) == 6 * 2 + 2 * 3 and splits[-6:] == ["unseen"] * 6
    assert {(m["include"][0]["color"], m["include"][0]["class"]) for m in metadata[-6:]} == set(world.unseen_pairs)
    assert pair_split({"include": [{"class": "circle", "count": 1}]}, world.unseen_pairs) == "seen"
    picked = subset(metadata, world.unseen_pairs, limit=1)
    assert [metadata[i]["tag"] for i in picked if splits[i] == "seen"] == list(TAGS)
    assert sum(splits[i] == "unseen" for i in picked) == 1 and subset(metadata, world.unseen_pairs, None) == list(
        range(len(metadata)))
    # Scored ground truth: every split of a perfect folder scores 1.0, per split.
    for i in picked:
        geneval.write_prompt_samples(tmp_path, i, metadata[i], [world.render(scenes[i])])
    geneval.score_folder(tmp_path, ShapesScorer())
    by_split = split_summaries(tmp_path, world.unseen_pairs)
    assert set(by_split) == {"seen", "unseen"} and by_split["unseen"]["images"] == 1
    assert by_split["seen"]["overall"] == by_split["unseen"]["overall"] == 1.0


def test_vqa_set_replays_the_training_conversation():
    world = ShapesWorld(seed=1, image_size=32)
    items, earlier = vqa_set(world, 3)
    first = [it for it in items if it.index.endswith("-0")]
    assert len(first) == 3 and all(it.prompt == "\n" + it.question for it in first)
    later = [it for it in items if not it.index.endswith("-0")]
    assert later and all(it.prompt == it.question for it in later)
    scene0 = [it for it in items if it.index.startswith("0-")]
    for j, it in enumerate(scene0):  # each question's history: the questions before it with their answers
        turns = earlier[(hashlib.sha1(it.image).hexdigest(), it.prompt)]
        assert [a for _, a in turns] == [x.answer for x in scene0[:j]]
    assert [q for q, _ in world.vqa(world.scene(0))] == [it.question for it in scene0]
    assert question_type("How many circles are there?") == "count"
    assert question_type("Is the red circle left of the square?") == "position_yes_no"
    assert {it.category for it in items} <= {"count", "color", "shape", "exists", "where", "position_yes_no"}
