"""The shapes world: determinism, layout, words checked against scenes, GenEval rules, detector exactness, build CLI."""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_process import shapes_world as sw
from data_process.shapes.detect import connected_components, quantize
from data_process.shapes.geometry import NUMBER_WORDS, plural, robust_relations
from data_process.shapes_world import (
    BACKGROUND, COLORS, PALETTE, SHAPES, TAGS, Detection, Scene, ShapeObject, ShapesWorld, detect, evaluate_geneval,
    relative_position, score_geneval,
)

REPO = Path(__file__).resolve().parents[1]
N_SCENES = 300


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(seed=0, image_size=64)


@pytest.fixture(scope="module")
def scenes(world: ShapesWorld) -> list[Scene]:
    return [world.scene(i) for i in range(N_SCENES)]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _multiset(items) -> collections.Counter:
    return collections.Counter((o.shape, o.color) for o in items)


# ------------------------------------------------------------------------------------------------ palette
def test_palette_is_separated_and_background_is_no_colour():
    rgb = np.array([PALETTE[c] for c in COLORS], dtype=float)
    pair = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(COLORS)) * 1e9
    assert pair.min() > 90
    assert np.linalg.norm(rgb - np.array(BACKGROUND), axis=-1).min() > 100
    assert tuple(BACKGROUND) not in {tuple(v) for v in PALETTE.values()}


def test_antialiased_edges_never_quantise_to_a_third_colour():
    t = np.linspace(0, 1, 257)[None, :, None]
    for i, c in enumerate(COLORS):
        blend = (np.array(PALETTE[c])[None, None] * (1 - t) + np.array(BACKGROUND)[None, None] * t).astype(np.uint8)
        labels = quantize(blend)
        assert set(np.unique(labels).tolist()) <= {i, -1}, c
        assert labels[0, 0] == i and labels[0, -1] == -1


# ------------------------------------------------------------------------------------------------ scenes
def test_same_seed_same_pixels_and_words_in_any_call_order(world: ShapesWorld):
    other = ShapesWorld(seed=0, image_size=64)
    order = [17, 3, 29, 0, 11]
    later = {i: other.scene(i) for i in order}
    for i in sorted(order):
        a, b = world.scene(i), later[i]
        assert a == b
        assert np.array_equal(np.asarray(world.render(a)), np.asarray(other.render(b)))
        assert world.captions(a) == other.captions(b) and world.caption(a) == other.caption(b)
        assert world.vqa(a) == other.vqa(b) and world.geneval_metadata(a) == other.geneval_metadata(b)
    assert world.text_corpus(20) == other.text_corpus(20)
    assert world.text_corpus(5, start=10) == other.text_corpus(20)[10:15]


def test_different_index_or_seed_gives_different_scenes(world: ShapesWorld, scenes: list[Scene]):
    layouts = [tuple(scene.objects) for scene in scenes]
    assert len(set(layouts)) == len(layouts)
    other = ShapesWorld(seed=1)
    assert sum(other.scene(i).objects == scenes[i].objects for i in range(50)) == 0


def test_objects_do_not_overlap_and_pixels_outside_boxes_are_background(world: ShapesWorld, scenes: list[Scene]):
    for scene in scenes:
        boxes = [o.box for o in scene.objects]
        for i, a in enumerate(boxes):
            assert min(a) >= world.border and max(a[2], a[3]) <= 64 - world.border
            assert a[2] - a[0] == a[3] - a[1] >= world.min_side
            for b in boxes[i + 1:]:
                gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
                assert gap >= world.margin
        pixels = np.asarray(world.render(scene))
        inside = np.zeros((64, 64), dtype=bool)
        for x0, y0, x1, y1 in boxes:
            inside[y0:y1, x0:x1] = True
        assert (pixels[~inside] == np.array(BACKGROUND, dtype=np.uint8)).all()


def test_scene_structure_matches_its_tag(scenes: list[Scene]):
    tags = collections.Counter(s.tag for s in scenes)
    assert set(tags) == set(TAGS) and min(tags.values()) > N_SCENES / 12
    for s in scenes:
        n, shapes = len(s.objects), {o.shape for o in s.objects}
        assert 1 <= n <= 4
        if s.tag in ("single_object", "colors"):
            assert n == 1
        elif s.tag == "counting":
            assert 2 <= n <= 4 and len(shapes) == 1
        else:
            assert n == 2 and len(shapes) == 2
        if s.tag == "color_attr":
            assert s.objects[0].color != s.objects[1].color
        if s.tag == "position":
            assert len(s.relations(s.objects[0], s.objects[1])) == 1
    counts = collections.Counter(len(s.objects) for s in scenes)
    assert set(counts) == {1, 2, 3, 4}


def test_bad_scene_fields_are_named():
    with pytest.raises(ValueError, match="ShapeObject.color: 'teal'"):
        ShapeObject("circle", "teal", (0, 0, 10, 10))
    with pytest.raises(ValueError, match="ShapeObject.shape"):
        ShapeObject("star", "red", (0, 0, 10, 10))
    with pytest.raises(ValueError, match="leaves the 64px image"):
        Scene((ShapeObject("circle", "red", (60, 0, 70, 10)),), 64, 0)
    with pytest.raises(ValueError, match="seed"):
        ShapesWorld(seed=-1)


# ------------------------------------------------------------------------------------------------ words
def test_captions_mention_true_colours_shapes_and_counts(world: ShapesWorld, scenes: list[Scene]):
    shape_words = {s: {s, plural(s)} for s in SHAPES}
    for scene in scenes:
        caps = world.captions(scene)
        assert len(caps) >= 4 and len(set(caps)) == len(caps)
        assert world.caption(scene) in caps
        present_shapes = {o.shape for o in scene.objects}
        present_colors = {o.color for o in scene.objects}
        for k, cap in enumerate(caps):
            words = _words(cap)
            for s in SHAPES:
                assert bool(words & shape_words[s]) == (s in present_shapes), (cap, scene)
            mentioned_colors = words & set(COLORS)
            assert mentioned_colors <= present_colors, (cap, scene)
            if k > 0:  # the first is the GenEval prompt, which names colours only for colour tags
                assert mentioned_colors == present_colors, (cap, scene)
        n = len(scene.objects)
        if n > 1:
            assert NUMBER_WORDS[n] in _words(" ".join(caps))
        if scene.tag == "position":
            a, b = scene.objects
            (rel,) = relative_position(a.box, b.box)
            assert f"{a.name} {rel} {'an' if b.color[0] in 'aeiou' else 'a'} {b.name}" in " ".join(caps).lower()
        for k, color, shape in ((c, o.color, o.shape) for o in scene.objects for c in [scene.count(o.shape, o.color)]):
            if k > 1:
                assert f"{NUMBER_WORDS[k]} {color} {plural(shape)}" in caps[1]


def _answer(scene: Scene, question: str) -> str:
    """An independent reading of every question template, answered from the scene."""
    q = question.removeprefix("<image>\n")
    cols, shp = "|".join(COLORS), "|".join(SHAPES)
    plural_to_shape = {plural(s): s for s in SHAPES}
    if q == "How many objects are there?":
        return str(len(scene.objects))
    if m := re.fullmatch(rf"How many (?:({cols}) )?(\w+) are (?:there|in the image)\?", q):
        return str(scene.count(shape=plural_to_shape[m[2]], color=m[1]))
    if m := re.fullmatch(rf"What color (?:is the ({shp})|are the (\w+))\?", q):
        shape = m[1] or plural_to_shape[m[2]]
        (color,) = {o.color for o in scene.objects if o.shape == shape}
        return color
    if m := re.fullmatch(rf"What shape is the ({cols}) object\?", q):
        (obj,) = [o for o in scene.objects if o.color == m[1]]
        return obj.shape
    if m := re.fullmatch(rf"Is there an? ({cols}) ({shp})\?", q):
        return "yes" if scene.count(shape=m[2], color=m[1]) else "no"

    def find(ref: str) -> ShapeObject:
        (obj,) = [o for o in scene.objects if ref in (o.shape, o.name) and
                  (ref == o.name or scene.count(shape=o.shape) == 1)]
        return obj

    ref = rf"((?:(?:{cols}) )?(?:{shp}))"
    if m := re.fullmatch(rf"Where is the {ref} relative to the {ref}\?", q):
        (rel,) = relative_position(find(m[1]).box, find(m[2]).box)
        return rel.removesuffix(" of")
    if m := re.fullmatch(rf"Is the {ref} (left of|right of|above|below) the {ref}\?", q):
        return "yes" if m[2] in relative_position(find(m[1]).box, find(m[3]).box) else "no"
    raise AssertionError(f"unknown question template: {question!r}")


def test_vqa_answers_are_right_and_yes_no_is_balanced(world: ShapesWorld, scenes: list[Scene]):
    answers = collections.Counter()
    kinds = collections.Counter()
    for scene in scenes:
        row = sw.vqa_row(world, scene)
        conv = row["conversations"]
        assert "".join(t["value"] for t in conv).count("<image>") == 1 and conv[0]["value"].startswith("<image>\n")
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        for q, a in world.vqa(scene):
            assert _answer(scene, q) == a, (q, a, scene)
            answers[a] += 1
            kinds[q.split()[0]] += 1
    assert 0.35 < answers["yes"] / (answers["yes"] + answers["no"]) < 0.65
    assert {"How", "What", "Is", "Where"} <= set(kinds)


def test_text_corpus_is_plain_varied_text(world: ShapesWorld):
    corpus = world.text_corpus(200)
    assert len(corpus) == 200 and all(isinstance(t, str) and t.strip() and "\n" not in t for t in corpus)
    assert len(set(corpus)) > 120
    vocab = _words(" ".join(corpus))
    assert set(SHAPES) | set(COLORS) <= vocab and {"left", "above", "how", "many"} <= vocab


# ------------------------------------------------------------------------------------------------ GenEval
def _check_metadata(meta: dict, scene: Scene) -> None:
    assert list(meta) == ["tag", "include", "exclude", "prompt"] and meta["tag"] == scene.resolved_tag()
    words = _words(meta["prompt"])
    for i, req in enumerate(meta["include"]):
        assert scene.count(shape=req["class"], color=req.get("color")) == req["count"]
        assert req["class"] in words or plural(req["class"]) in words
        if "color" in req:
            assert req["color"] in words
        if "position" in req:
            rel, j = req["position"]
            assert j < i and rel in meta["prompt"]
    if meta["tag"] == "counting":
        assert meta["exclude"] == [{"class": meta["include"][0]["class"], "count": len(scene.objects) + 1}]
        assert NUMBER_WORDS[len(scene.objects)] in words
    else:
        assert meta["exclude"] == []


def test_geneval_metadata_is_consistent_and_scores_its_own_render(world: ShapesWorld, scenes: list[Scene]):
    for scene in scenes:
        meta = world.geneval_metadata(scene)
        _check_metadata(meta, scene)
        ok, reasons = evaluate_geneval(detect(world.render(scene)), meta)
        assert ok, (reasons, scene)


def test_heldout_prompts_come_from_their_own_stream(world: ShapesWorld, scenes: list[Scene]):
    prompts = world.geneval_prompts(20, split="heldout")
    assert [p["tag"] for p in prompts] == [t for t in TAGS for _ in range(20)]
    train_layouts = {tuple(s.objects) for s in scenes}
    for k, tag in enumerate(TAGS):
        for j in range(0, 20, 4):
            scene = world.heldout_scene(tag, j)
            assert tuple(scene.objects) not in train_layouts
            assert prompts[20 * k + j] == world.geneval_metadata(scene)
            assert score_geneval(world.render(scene), prompts[20 * k + j])
    train = world.geneval_prompts(3, split="train")
    assert all(any(m == world.geneval_metadata(s) for s in scenes) for m in train)
    with pytest.raises(ValueError, match="split"):
        world.geneval_prompts(1, split="test")


def _first(scenes: list[Scene], tag: str, pred=lambda s: True) -> Scene:
    return next(s for s in scenes if s.tag == tag and pred(s))


def _replace(scene: Scene, objects: list[ShapeObject]) -> Scene:
    return Scene(tuple(objects), scene.image_size, scene.index, scene.tag)


def test_scorer_rejects_wrong_colour_count_class_and_position(world: ShapesWorld, scenes: list[Scene]):
    def score(scene: Scene, meta: dict) -> bool:
        return score_geneval(world.render(scene), meta)

    s = _first(scenes, "color_attr")
    meta = world.geneval_metadata(s)
    wrong = next(c for c in COLORS if c not in (s.objects[0].color, s.objects[1].color))
    assert score(s, meta)
    assert not score(_replace(s, [ShapeObject(s.objects[0].shape, wrong, s.objects[0].box), s.objects[1]]), meta)
    swapped = [ShapeObject(s.objects[0].shape, s.objects[1].color, s.objects[0].box),
               ShapeObject(s.objects[1].shape, s.objects[0].color, s.objects[1].box)]
    assert not score(_replace(s, swapped), meta)  # colours bound to the wrong objects

    s = _first(scenes, "counting", lambda s: len(s.objects) >= 3)
    meta = world.geneval_metadata(s)
    assert score(s, meta)
    assert not score(_replace(s, list(s.objects[:-1])), meta)  # one too few
    more = world.geneval_metadata(_replace(s, list(s.objects[:-1])))
    assert not score(s, more)  # one too many: GenEval's exclude clause

    s = _first(scenes, "two_object")
    meta = world.geneval_metadata(s)
    other = next(sh for sh in SHAPES if sh not in (s.objects[0].shape, s.objects[1].shape))
    assert not score(_replace(s, [s.objects[0], ShapeObject(other, s.objects[1].color, s.objects[1].box)]), meta)

    s = _first(scenes, "position")
    meta = world.geneval_metadata(s)
    a, b = s.objects
    mirrored = [ShapeObject(a.shape, a.color, b.box), ShapeObject(b.shape, b.color, a.box)]
    assert score(s, meta) and not score(_replace(s, mirrored), meta)


def test_relative_position_follows_geneval_rule():
    assert relative_position((0, 0, 10, 10), (30, 0, 40, 10)) == {"left of"}
    assert relative_position((30, 40, 40, 50), (30, 0, 40, 10)) == {"below"}
    assert relative_position((0, 0, 10, 10), (30, 30, 40, 40)) == {"left of", "above"}  # diagonal: both
    assert relative_position((0, 0, 10, 10), (1, 1, 11, 11)) == set()  # within 0.1 x (summed extents)
    # The shrink is 0.1 * (10 + 10) = 2 px on x: dx = (3 - 2) / |(3, 1)| = 0.32 < 0.5 -> no relation...
    assert relative_position((0, 0, 10, 10), (3, 1, 13, 11)) == set()
    # ...while a 6 px offset leaves (6 - 2) / 6 = 0.67 > 0.5.
    assert relative_position((6, 0, 16, 10), (0, 0, 10, 10)) == {"right of"}
    assert robust_relations((0, 0, 10, 10), (30, 0, 40, 10)) == {"left of"}


def test_geneval_rules_on_detections():
    det = lambda shape, color, box, score=0.9: Detection(shape, color, box, score)  # noqa: E731
    meta = {"tag": "color_attr", "include": [{"class": "circle", "count": 1, "color": "red"}], "exclude": []}
    # Colour is checked on the most confident circle only, as GenEval does.
    assert evaluate_geneval([det("circle", "red", (0, 0, 9, 9), 0.95), det("circle", "blue", (20, 0, 29, 9), 0.9)], meta)[0]
    ok, reasons = evaluate_geneval([det("circle", "blue", (0, 0, 9, 9), 0.95), det("circle", "red", (20, 0, 29, 9), 0.9)], meta)
    assert not ok and reasons == ["expected red circle>=1, found 0 red"]
    pos = {"tag": "position", "include": [{"class": "square", "count": 1},
                                          {"class": "circle", "count": 1, "position": ["left of", 0]}]}
    assert evaluate_geneval([det("square", "red", (40, 0, 50, 10)), det("circle", "red", (0, 0, 10, 10))], pos)[0]
    ok, reasons = evaluate_geneval([det("square", "red", (0, 0, 10, 10)), det("circle", "red", (40, 0, 50, 10))], pos)
    assert not ok and reasons == ["expected circle left of target, found right of"]
    ok, reasons = evaluate_geneval([det("circle", "red", (0, 0, 10, 10))], pos)
    assert reasons == ["expected square>=1, found 0", "no target for circle to be left of"]
    excl = {"tag": "counting", "include": [{"class": "square", "count": 1}], "exclude": [{"class": "square", "count": 2}]}
    assert not evaluate_geneval([det("square", "red", (0, 0, 9, 9)), det("square", "red", (20, 0, 29, 9))], excl)[0]
    with pytest.raises(ValueError, match=r"metadata.include\[0\].position"):
        evaluate_geneval([], {"include": [{"class": "circle", "count": 1, "position": ["left of", 0]}]})


# ------------------------------------------------------------------------------------------------ detector
def _reference_components(labels: np.ndarray) -> list[tuple[int, frozenset]]:
    """Plain 8-connected flood fill, one pixel at a time: the slow, obviously right labelling."""
    h, w = labels.shape
    seen = np.zeros_like(labels, dtype=bool)
    out = []
    for y in range(h):
        for x in range(w):
            if labels[y, x] < 0 or seen[y, x]:
                continue
            lab, stack, pix = labels[y, x], [(y, x)], set()
            seen[y, x] = True
            while stack:
                cy, cx = stack.pop()
                pix.add((cy, cx))
                for ny in range(max(0, cy - 1), min(h, cy + 2)):
                    for nx in range(max(0, cx - 1), min(w, cx + 2)):
                        if not seen[ny, nx] and labels[ny, nx] == lab:
                            seen[ny, nx] = True
                            stack.append((ny, nx))
            out.append((int(lab), frozenset(pix)))
    return out


def test_run_union_find_components_equal_flood_fill():
    rng = np.random.default_rng(0)
    for density in (0.3, 0.55, 0.8):
        labels = np.where(rng.random((24, 31)) < density, rng.integers(0, 3, (24, 31)), -1)
        ours = {(lab, frozenset((r, c) for r, s, e in runs for c in range(s, e)))
                for lab, runs in connected_components(labels)}
        assert ours == set(_reference_components(labels))


@pytest.mark.parametrize("side", [13, 14, 17, 22, 30])
def test_every_shape_and_colour_is_classified_at_every_size(side: int):
    for shape in SHAPES:
        for color in COLORS:
            scene = Scene((ShapeObject(shape, color, (5, 7, 5 + side, 7 + side)),), 64, 0)
            (d,) = detect(ShapesWorld().render(scene))
            assert (d.shape, d.color) == (shape, color)
            assert max(abs(p - q) for p, q in zip(d.box, scene.objects[0].box)) <= 1


def test_detector_ignores_specks_and_empty_images(world: ShapesWorld, scenes: list[Scene]):
    assert detect(Image.new("RGB", (64, 64), BACKGROUND)) == []
    scene = scenes[0]
    pixels = np.asarray(world.render(scene)).copy()
    free = [(y, x) for y in range(0, 64, 5) for x in range(0, 64, 5)
            if not any(o.box[0] - 3 <= x < o.box[2] + 3 and o.box[1] - 3 <= y < o.box[3] + 3 for o in scene.objects)]
    for k, (y, x) in enumerate(free[:8]):
        pixels[y:y + 2, x:x + 2] = PALETTE[COLORS[k % len(COLORS)]]  # 4-pixel specks < min_area
    assert _multiset(detect(Image.fromarray(pixels))) == _multiset(scene.objects)


def test_detector_accuracy_on_fresh_images():
    res = sw.measure_detector(num_images=200, seed=4242)
    assert res["accuracy"] >= 0.99 and res["count_accuracy"] >= 0.99, res["failures"]
    assert res["geneval_self"] >= 0.99
    noisy = sw.measure_detector(num_images=100, seed=4243, noise_std=10.0, blur_radius=0.7)
    assert noisy["accuracy"] >= 0.97, noisy["failures"]


@pytest.mark.parametrize("image_size", [32, 128])
def test_other_image_sizes_stay_exact(image_size: int):
    res = sw.measure_detector(num_images=40, seed=11, image_size=image_size)
    assert res["accuracy"] == 1.0 and res["geneval_self"] == 1.0, res["failures"]


# ------------------------------------------------------------------------------------------------ build CLI
def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_writes_every_file_resumes_and_is_deterministic(tmp_path: Path):
    out = tmp_path / "shapes"
    res = sw.build(str(out), num_images=20, seed=3, image_size=64, geneval_per_tag=2)
    assert res["rendered"] == 20
    lines = {name: (out / name).read_text().splitlines() for name in
             ("captions.jsonl", "vqa.jsonl", "text.jsonl", "geneval/evaluation_metadata.jsonl",
              "geneval/train_metadata.jsonl")}
    assert {k: len(v) for k, v in lines.items()} == {
        "captions.jsonl": 20, "vqa.jsonl": 20, "text.jsonl": 10, "geneval/evaluation_metadata.jsonl": 12,
        "geneval/train_metadata.jsonl": 20}
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(20)]
    world = ShapesWorld(seed=3)
    cap = json.loads(lines["captions.jsonl"][12])
    assert cap["id"] == "shapes-000012" and cap["image"] == "images/000012.png"
    assert cap["caption"] in cap["captions"] and Scene.from_dict(cap["scene"]) == world.scene(12)
    with Image.open(out / cap["image"]) as im:
        assert im.mode == "RGB" and np.array_equal(np.asarray(im), np.asarray(world.render(world.scene(12))))
    vqa = json.loads(lines["vqa.jsonl"][12])
    assert vqa["id"] == "shapes-000012" and vqa["images"] == ["images/000012.png"]
    assert json.loads(lines["text.jsonl"][1]) == {"id": "shapes-text-000001", "text": world.text_corpus(1, start=1)[0]}
    assert [json.loads(x) for x in lines["geneval/evaluation_metadata.jsonl"]] == world.geneval_prompts(2)
    info = json.loads((out / "world.json").read_text())
    assert info["complete"] and (info["seed"], info["image_size"], info["num_images"]) == (3, 64, 20)
    assert info["palette"]["red"] == list(PALETTE["red"]) and info["shapes"] == list(SHAPES)
    assert "datasets:" in (out / "data_config.yaml").read_text()

    before = _snapshot(out)
    (out / "images" / "000007.png").unlink()
    (out / "vqa.jsonl").write_text("truncated\n")
    assert sw.build(str(out), num_images=20, seed=3, image_size=64, geneval_per_tag=2)["rendered"] == 1
    assert _snapshot(out) == before
    with pytest.raises(ValueError, match=r"world.json: seed: the existing build has 3"):
        sw.build(str(out), num_images=20, seed=4)


def test_build_output_loads_through_the_data_config(tmp_path: Path):
    from data_process.converters import WorkItem, iter_items
    from data_process.data_config import load_data_config

    sw.build(str(tmp_path), num_images=6, seed=0, geneval_per_tag=1)
    config = load_data_config(tmp_path / "data_config.yaml")
    assert [d.name for d in config.datasets] == ["shapes_captions", "shapes_vqa", "shapes_text"]
    counts = {}
    for spec in config.datasets:
        items = list(iter_items(spec))
        assert all(isinstance(it, WorkItem) for it in items), items
        assert all(Path(src.path).is_file() for it in items for src in it.images)
        counts[spec.name] = len(items)
    assert counts == {"shapes_captions": 6, "shapes_vqa": 6, "shapes_text": 3}


def test_cli_build_and_detector_accuracy(tmp_path: Path):
    script = str(REPO / "data_process" / "shapes_world.py")
    subprocess.run([sys.executable, script, "build", "--out_dir", str(tmp_path / "o"), "--num_images", "4",
                    "--seed", "0", "--image_size", "64", "--geneval_per_tag", "1"], check=True, capture_output=True)
    assert len((tmp_path / "o" / "captions.jsonl").read_text().splitlines()) == 4
    run = subprocess.run([sys.executable, script, "detector_accuracy", "--num_images", "20", "--seed", "7"],
                         check=True, capture_output=True, text=True)
    assert re.search(r"detector accuracy 1\.0000", run.stdout), run.stdout
