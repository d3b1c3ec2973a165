"""Everything the shapes world says in words: captions, VQA pairs, GenEval metadata and text-only sentences.

All functions are pure: the randomness they need comes in as a ``numpy.random.Generator`` that the caller derives
from ``(seed, stream, index)``, so every string is a deterministic function of the scene and the world seed.
Spelling follows GenEval (``color``), so that training captions and evaluation prompts share words.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_process.shapes.geometry import (
    BACKGROUND_NAME, COLORS, INVERSE_RELATION, NUMBER_WORDS, RELATIONS, SHAPES, article, plural, robust_relations,
)
from data_process.shapes.scene import Scene, ShapeObject, group_objects

QA = tuple[str, str]
_SHORT_RELATION = {"left of": "left", "right of": "right", "above": "above", "below": "below"}


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _noun_phrase(n: int, color: str | None, shape: str) -> str:
    """``a red circle`` / ``three red circles`` / ``a circle``."""
    words = f"{color} " if color else ""
    if n == 1:
        return f"{article(words or shape)} {words}{shape}"
    return f"{NUMBER_WORDS[n]} {words}{plural(shape)}"


def describe(objects: tuple[ShapeObject, ...] | list[ShapeObject]) -> str:
    """Every object with its colour, grouped: ``two red circles and a blue circle``."""
    return _join([_noun_phrase(n, c, s) for n, c, s in group_objects(objects)])


# --------------------------------------------------------------------------------------------- GenEval
def geneval_metadata(scene: Scene) -> dict[str, Any]:
    """The scene as one line of GenEval's ``evaluation_metadata.jsonl`` (keys: tag, include, exclude, prompt).

    Follows GenEval's prompt generator: ``position`` lists the reference object first and the subject second with
    ``"position": [relation, 0]``; ``counting`` excludes ``count + 1``; only ``colors``/``color_attr`` name colours.
    """
    tag, objs = scene.resolved_tag(), scene.objects
    a = objs[0]
    exclude: list[dict[str, Any]] = []
    if tag == "single_object":
        include = [{"class": a.shape, "count": 1}]
        prompt = f"a photo of {_noun_phrase(1, None, a.shape)}"
    elif tag == "colors":
        include = [{"class": a.shape, "count": 1, "color": a.color}]
        prompt = f"a photo of {_noun_phrase(1, a.color, a.shape)}"
    elif tag == "counting":
        n = len(objs)
        include = [{"class": a.shape, "count": n}]
        exclude = [{"class": a.shape, "count": n + 1}]
        prompt = f"a photo of {_noun_phrase(n, None, a.shape)}"
    else:
        if len(objs) != 2 or objs[0].shape == objs[1].shape:
            raise ValueError(f"scene {scene.index}: tag {tag!r} needs two objects of different shapes")
        b = objs[1]
        if tag == "two_object":
            include = [{"class": a.shape, "count": 1}, {"class": b.shape, "count": 1}]
            prompt = f"a photo of {_noun_phrase(1, None, a.shape)} and {_noun_phrase(1, None, b.shape)}"
        elif tag == "color_attr":
            include = [{"class": a.shape, "count": 1, "color": a.color}, {"class": b.shape, "count": 1, "color": b.color}]
            prompt = f"a photo of {_noun_phrase(1, a.color, a.shape)} and {_noun_phrase(1, b.color, b.shape)}"
        else:  # position
            rels = scene.relations(a, b)
            if len(rels) != 1:
                raise ValueError(f"scene {scene.index}: position scene needs exactly one relation, got {sorted(rels)}")
            rel = rels.pop()
            include = [{"class": b.shape, "count": 1}, {"class": a.shape, "count": 1, "position": [rel, 0]}]
            prompt = f"a photo of {_noun_phrase(1, None, a.shape)} {rel} {_noun_phrase(1, None, b.shape)}"
    return {"tag": tag, "include": include, "exclude": exclude, "prompt": prompt}


# --------------------------------------------------------------------------------------------- captions
def _region(obj: ShapeObject, image_size: int) -> str:
    cx, cy = (obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2
    col = ("left", "", "right")[min(2, int(3 * cx / image_size))]
    row = ("top", "", "bottom")[min(2, int(3 * cy / image_size))]
    return " ".join(w for w in (row, col) if w) or "center"


def captions(scene: Scene) -> list[str]:
    """Several phrasings of the scene; the first is its GenEval prompt, all others name every colour and shape."""
    objs, n = scene.objects, len(scene.objects)
    desc = describe(objs)
    out = [geneval_metadata(scene)["prompt"], f"a photo of {desc}", f"{_cap(desc)} on a {BACKGROUND_NAME} background.",
           f"There {'is' if group_objects(objs)[0][0] == 1 else 'are'} {desc}.",  # agrees with the first noun
           f"{_cap(NUMBER_WORDS[n])} {'object' if n == 1 else 'objects'}: {desc}."]
    shapes = {o.shape for o in objs}
    if n == 1:
        out.append(f"{_cap(desc)} in the {_region(objs[0], scene.image_size)} of the picture.")
    elif len(shapes) == 1:
        shape = objs[0].shape
        groups = group_objects(objs)
        if len(groups) > 1:
            out.append(f"{_cap(NUMBER_WORDS[n])} {plural(shape)}: " + _join([f"{NUMBER_WORDS[k]} {c}" for k, c, _ in groups]) + ".")
    if n == 2 and objs[0].name != objs[1].name:  # "the red circle is left of the red circle" names nothing
        a, b = objs
        rels = robust_relations(a.box, b.box)
        if rels:
            rel = " and ".join(sorted(rels))
            inv = " and ".join(sorted(INVERSE_RELATION[r] for r in rels))
            out.append(f"{_cap(_noun_phrase(1, a.color, a.shape))} {rel} {_noun_phrase(1, b.color, b.shape)}.")
            out.append(f"The {b.name} is {inv} the {a.name}.")
    return list(dict.fromkeys(out))  # drop exact repeats, keep order


def choose_caption(scene: Scene, rng: np.random.Generator, geneval_prob: float = 0.3) -> str:
    """One caption per image: the GenEval-style prompt with ``geneval_prob`` (so training prompts cover the
    evaluation phrasing), else a uniform pick among the other phrasings."""
    caps = captions(scene)
    if len(caps) == 1 or rng.random() < geneval_prob:
        return caps[0]
    return caps[1 + int(rng.integers(len(caps) - 1))]


# --------------------------------------------------------------------------------------------- VQA
def _reference(scene: Scene, obj: ShapeObject) -> str | None:
    """``circle`` when the shape is unique, ``red circle`` when colour+shape is, else None (ambiguous)."""
    if scene.count(shape=obj.shape) == 1:
        return obj.shape
    if scene.count(shape=obj.shape, color=obj.color) == 1:
        return obj.name
    return None


def _count_questions(scene: Scene, rng: np.random.Generator) -> list[QA]:
    qs: list[QA] = [("How many objects are there?", str(len(scene.objects)))]
    for n, c, s in group_objects(scene.objects):
        qs.append((f"How many {c} {plural(s)} are there?", str(n)))
    for s in sorted({o.shape for o in scene.objects}):
        qs.append((f"How many {plural(s)} are there?", str(scene.count(shape=s))))
    absent = [s for s in SHAPES if scene.count(shape=s) == 0]
    if absent:
        s = absent[int(rng.integers(len(absent)))]
        qs.append((f"How many {plural(s)} are in the image?", "0"))
    return qs


def _attribute_questions(scene: Scene) -> list[QA]:
    qs: list[QA] = []
    for s in sorted({o.shape for o in scene.objects}):
        colors = {o.color for o in scene.objects if o.shape == s}
        if len(colors) == 1:
            q = f"What color is the {s}?" if scene.count(shape=s) == 1 else f"What color are the {plural(s)}?"
            qs.append((q, colors.pop()))
    for c in sorted({o.color for o in scene.objects}):
        if scene.count(color=c) == 1:
            qs.append((f"What shape is the {c} object?", next(o.shape for o in scene.objects if o.color == c)))
    return qs


def _existence_question(scene: Scene, rng: np.random.Generator, exclude_pairs: frozenset | tuple = ()) -> QA:
    """Balanced yes/no: a present colour+shape, or an absent one (half of them one colour off a present one);
    an absent pair is never one of ``exclude_pairs`` (the world's held-out pairs must not be named in training)."""
    if rng.random() < 0.5:
        o = scene.objects[int(rng.integers(len(scene.objects)))]
        return f"Is there {_noun_phrase(1, o.color, o.shape)}?", "yes"
    absent = [(c, s) for s in SHAPES for c in COLORS
              if scene.count(shape=s, color=c) == 0 and (c, s) not in exclude_pairs]
    near = [(c, s) for c, s in absent if scene.count(shape=s) > 0]
    pool = near if near and rng.random() < 0.5 else absent
    c, s = pool[int(rng.integers(len(pool)))]
    return f"Is there {_noun_phrase(1, c, s)}?", "no"


def _position_questions(scene: Scene, rng: np.random.Generator) -> list[QA]:
    qs: list[QA] = []
    objs = scene.objects
    for i, a in enumerate(objs):
        for b in objs[i + 1:]:
            ra, rb = _reference(scene, a), _reference(scene, b)
            rels = robust_relations(a.box, b.box)
            if ra is None or rb is None or not rels:
                continue
            if rng.random() < 0.5:  # ask about either object of the pair
                a, b, ra, rb, rels = b, a, rb, ra, {INVERSE_RELATION[r] for r in rels}
            if len(rels) == 1:
                qs.append((f"Where is the {ra} relative to the {rb}?", _SHORT_RELATION[next(iter(rels))]))
            rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
            qs.append((f"Is the {ra} {rel} the {rb}?", "yes" if rel in rels else "no"))
    return qs


def vqa(scene: Scene, rng: np.random.Generator, exclude_pairs: frozenset | tuple = ()) -> list[QA]:
    """3 to 4 question/answer pairs for one multi-turn conversation: a count, an attribute (colour or shape), an
    existence yes/no and, when two objects can be named unambiguously and their relation is clear, a position.
    ``exclude_pairs``: (colour, shape) pairs no question may name (the world's held-out pairs)."""
    pick = lambda items: items[int(rng.integers(len(items)))]  # noqa: E731 - local one-liner
    out = [pick(_count_questions(scene, rng))]
    attrs = _attribute_questions(scene)
    if attrs:
        out.append(pick(attrs))
    out.append(_existence_question(scene, rng, exclude_pairs))
    pos = _position_questions(scene, rng)
    if pos:
        out.append(pick(pos))
    return out


# --------------------------------------------------------------------------------------------- plain text
_SHAPE_FACTS: dict[str, tuple[str, ...]] = {
    "circle": ("A circle is round and has no corners.", "A circle looks the same from every side.",
               "A circle fills about three quarters of the square around it."),
    "square": ("A square has four equal sides and four corners.", "A square fills the whole box around it.",
               "A square turned on its corner looks like a diamond."),
    "triangle": ("A triangle has three sides and three corners.", "This triangle points up, with a flat base at the bottom.",
                 "A triangle fills half of the box around it."),
    "diamond": ("A diamond has four corners: top, right, bottom and left.", "A diamond is a square turned on its corner.",
                "A diamond fills half of the box around it."),
}
_COLOR_FACTS: tuple[str, ...] = (
    "Orange is a mix of red and yellow.", "Green is a mix of blue and yellow.", "Purple is a mix of red and blue.",
    "Pink is a light red.", "Brown is a dark orange.", "Black is the darkest color and white is the lightest.",
    "The background of every picture is gray, which is not one of the ten colors.",
    "The ten colors are " + _join(list(COLORS)) + ".", "The shapes are " + _join([plural(s) for s in SHAPES]) + ".",
)


def text_sentence(rng: np.random.Generator, scene: Scene) -> str:
    """One plain sentence about the world: a fact, a counting or relation rule, or a described ``scene``."""
    kind = int(rng.integers(7))
    s1, s2 = rng.choice(len(SHAPES), size=2, replace=False)
    s1, s2 = SHAPES[s1], SHAPES[s2]
    c1, c2 = COLORS[int(rng.integers(len(COLORS)))], COLORS[int(rng.integers(len(COLORS)))]
    if kind == 0:
        facts = _SHAPE_FACTS[s1]
        return facts[int(rng.integers(len(facts)))]
    if kind == 1:
        return _COLOR_FACTS[int(rng.integers(len(_COLOR_FACTS)))]
    if kind == 2:
        rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
        return f"If the {c1} {s1} is {rel} the {c2} {s2}, then the {c2} {s2} is {INVERSE_RELATION[rel]} the {c1} {s1}."
    if kind == 3:
        a, b = int(rng.integers(1, 6)), int(rng.integers(1, 5))
        return f"{_cap(_noun_phrase(a, c1, s1))} and {_noun_phrase(b, c1, s1)} make {NUMBER_WORDS[a + b]} {c1} {plural(s1)}."
    if kind == 4:
        return captions(scene)[1 + int(rng.integers(len(captions(scene)) - 1))]
    if kind == 5:
        q, a = vqa(scene, rng)[0]
        verb = "is" if len(scene.objects) == 1 else "are"
        return f"{_cap(describe(scene.objects))} {verb} shown. {q} The answer is {a}."
    a, b = int(rng.integers(0, 5)), int(rng.integers(0, 5))
    cmp = "more" if a > b else "fewer" if a < b else "as many"
    tail = "as" if a == b else "than"
    return f"With {NUMBER_WORDS[a]} {plural(s1)} and {NUMBER_WORDS[b]} {plural(s2)}, there are {cmp} {plural(s1)} {tail} {plural(s2)}."
