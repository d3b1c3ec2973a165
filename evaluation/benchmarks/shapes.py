"""The shapes benchmarks (the embedded default): the shapes GenEval suite and the shapes VQA set.

**Shapes GenEval** (``ShapesGenEval``, registered as ``shapes``). Held-out prompts of the checkpoint's shapes world
(``ShapesWorld.heldout_scene(tag, k)`` for k < ``shapes_per_tag`` per GenEval tag, as GenEval metadata lines) are
drawn through :func:`evaluation.benchmarks.geneval.generate` (the official layout) and scored through
:func:`~evaluation.benchmarks.geneval.score_folder` with :class:`ShapesScorer`: the shapes detector and the same
:func:`~data_process.shapes.detect.evaluate_geneval` rules as GenEval. The detector's connected components cannot
duplicate an object, so GenEval's confidence cut-offs (0.3, 0.9 for counting: Mask2Former's duplicates) are not
applied; the detector's own ``min_score`` is (``data_process/shapes/detect.py``). Beside the model, two references
on the very same scenes, scored the same way:

* ``ground_truth``: the rendered scenes (the detector and rules agree with the world: 1.0);
* ``vq_recon``: the scenes through the checkpoint's image tokenizer and back (the tokenizer's ceiling: no model
  that draws through these codes can score higher, up to sampling luck).

When the world holds (colour, shape) pairs out of training (``world.json``: ``heldout_pairs``), ``shapes_unseen_per
_pair`` extra ``colors`` prompts per held-out pair join the suite and every figure is also reported for prompts that
name a held-out pair (``unseen``) and the others (``seen``): a prompt is unseen when one of its include clauses asks
for a held-out colour on a held-out shape.

Layout: ``<out>/model``, ``<out>/ground_truth``, ``<out>/vq_recon`` (each GenEval's layout with its
``results.jsonl`` and ``results.json``) and ``<out>/results.json`` (all three, per tag and split, with settings).

**Shapes VQA** (``ShapesVQA``, ``shapes_vqa``). Scenes of another world seed (``shapes_vqa_seed``, never the
training world's), each with its 3-4 questions from the world's VQA generator (``data_process/shapes/text.py``),
asked through the API server with :func:`evaluation.benchmarks.vis_und.run_vqa` (resumable answers, samples,
results). Each question is asked in its conversation as training rendered it (``data_process/shapes_world.py``
``vqa_row``): the picture and ``"\n" + first question`` in the first user turn (the chat template joins parts, so
the model reads ``<image>\nHow many circles are there?``), then the earlier questions with their reference answers,
then the question. Asking every question alone in a first turn (``vis_und.openai_ask_fn``'s layout) is off the
training layout, where the first question is always a count: measured on ``outputs/shapes-tiny-uni-x`` (200
questions) the model then answered a number to everything (count 84%, every other type 0%). Scored by exact
match of the short answer, per question type.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from loguru import logger
from PIL import Image
from tqdm import tqdm

from data_process.schema import atomic_write_text, read_jsonl_log
from data_process.shapes import SHAPES, TAGS, Scene, ShapeObject, ShapesWorld
from data_process.shapes.detect import (DEFAULT_AMBIGUITY_RATIO, DEFAULT_COLOR_TOLERANCE, DEFAULT_MIN_SCORE, detect,
                                        evaluate_geneval)
from evaluation.benchmarks import geneval
from evaluation.exp import Experiment, checkpoint_hash

REFERENCES: tuple[str, ...] = ("ground_truth", "vq_recon")
SOURCES: tuple[str, ...] = ("model",) + REFERENCES
_DETECTOR_FILES = ("detect.py", "geometry.py")  # what decides a shapes verdict


# ---------------------------------------------------------------------------------------------- the world
def load_world(folder: str | Path) -> ShapesWorld:
    """The world a build folder describes (its ``world.json``)."""
    path = Path(folder) / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no shapes world here (`bash train.sh` or `python "
                                f"data_process/shapes_world.py build` makes one)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid json ({e.msg})") from e
    return ShapesWorld.from_info(info, str(path))


def suite_scenes(world: ShapesWorld, per_tag: int, unseen_per_pair: int = 4) -> list[Scene]:
    """The suite's scenes: ``per_tag`` held-out scenes per GenEval tag, then ``unseen_per_pair`` single-object
    ``colors`` scenes per held-out pair (the held-out ``colors`` scenes after the first ``per_tag``, each object
    recoloured and reshaped to the pair in its own box: every shape fills a square box)."""
    scenes = [world.heldout_scene(t, k) for t in TAGS for k in range(per_tag)]
    k = per_tag
    for color, shape in world.unseen_pairs:
        for _ in range(unseen_per_pair):
            base = world.heldout_scene("colors", k)
            scenes.append(Scene((ShapeObject(shape, color, base.objects[0].box),), base.image_size, k, "colors"))
            k += 1
    return scenes


def pair_split(metadata: dict[str, Any], unseen_pairs: Sequence[tuple[str, str]]) -> str:
    """``unseen`` when an include clause asks for a held-out (colour, shape) pair, else ``seen``."""
    held = {tuple(p) for p in unseen_pairs}
    named = {(r["color"], r["class"]) for r in metadata["include"] if "color" in r}
    return "unseen" if named & held else "seen"


def subset(metadata: Sequence[dict[str, Any]], unseen_pairs: Sequence[tuple[str, str]],
           limit: int | None) -> list[int]:
    """Indices of the first ``limit`` prompts of each (tag, split) group (all without a limit): every tag and
    split stays present in a small run, and the indices are those of the full list (same folders)."""
    taken: dict[tuple[str, str], int] = defaultdict(int)
    out = []
    for i, meta in enumerate(metadata):
        key = (meta["tag"], pair_split(meta, unseen_pairs))
        if limit is None or taken[key] < limit:
            taken[key] += 1
            out.append(i)
    return out


# ------------------------------------------------------------------------------------------------ scoring
class ShapesScorer:
    """GenEval's verdict on a shapes image: :func:`~data_process.shapes.detect.detect` then ``evaluate_geneval``
    (a :class:`evaluation.benchmarks.geneval.Scorer`)."""

    labels: tuple[str, ...] = SHAPES  # the classes it can find (score_folder refuses prompts of other classes)

    def __init__(self, min_score: float = DEFAULT_MIN_SCORE, color_tolerance: float = DEFAULT_COLOR_TOLERANCE,
                 ambiguity_ratio: float = DEFAULT_AMBIGUITY_RATIO):
        self.settings = {"min_score": min_score, "color_tolerance": color_tolerance,
                         "ambiguity_ratio": ambiguity_ratio}

    def __call__(self, image: Image.Image, metadata: dict[str, Any]) -> geneval.Verdict:
        detections = detect(image, **self.settings)
        correct, reasons = evaluate_geneval(detections, metadata)
        details: dict[str, list[list[float]]] = {}
        for d in detections:
            details.setdefault(d.shape, []).append([*map(float, d.box), float(d.score)])
        return geneval.Verdict(correct, "\n".join(reasons), details)

    def describe(self) -> dict[str, Any]:
        """The detector (no weights: the hash of its source files stands in for them) and its settings."""
        folder = Path(inspect.getfile(detect)).parent  # data_process/shapes/
        digest = hashlib.sha256(b"".join((folder / f).read_bytes() for f in _DETECTOR_FILES)).hexdigest()[:12]
        return {"detector": "data_process.shapes.detect.detect", "rules": "data_process.shapes.detect.evaluate_geneval",
                "source_sha256": digest, "settings": self.settings}


def split_summaries(out_dir: Path, unseen_pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """GenEval's summary of a scored folder per pair split (``seen`` / ``unseen``), from its ``results.jsonl``."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in read_jsonl_log(out_dir / "results.jsonl"):
        if (out_dir / rec["filename"]).is_file():
            groups[pair_split(json.loads(rec["metadata"]), unseen_pairs)].append(rec)
    return {split: geneval.summarize(recs) for split, recs in sorted(groups.items())}


# ---------------------------------------------------------------------------------------------- benchmarks
class ShapesGenEval:
    """The shapes GenEval suite with its two references (module docstring)."""

    kind = "t2i"

    def __init__(self, experiment: Experiment, out_dir: str | Path, limit: int | None = None):
        self.exp, self.out, self.limit = experiment, Path(out_dir), limit
        self.world = load_world(experiment.shapes_world)
        self.scenes = suite_scenes(self.world, experiment.shapes_per_tag, experiment.shapes_unseen_per_pair)
        self.metadata = [self.world.geneval_metadata(s) for s in self.scenes]
        self.indices = subset(self.metadata, self.world.unseen_pairs, limit)

    def pending(self) -> int:
        """Prompts missing an image in any of the three folders (0: the orchestrator loads no model)."""
        missing = set(geneval.missing_samples(self.out / "model", self.metadata, self.exp.n_samples))
        for name in REFERENCES:
            missing |= set(geneval.missing_samples(self.out / name, self.metadata, 1))
        return len(missing & set(self.indices)) + (not (self.out / "vq_recon" / "image_tokenizer.json").is_file())

    def generate(self, infer: Any, rank: int = 0, world: int = 1) -> int:
        """Shard ``rank`` of ``world``: the model's images, then the two references; returns the prompts drawn."""
        from evaluation.benchmarks.runners import t2i_generate_fn

        mine = self.indices[rank::world]
        drawn = geneval.generate(t2i_generate_fn(infer, self.exp), self.metadata, self.out / "model",
                                 self.exp.n_samples, self.exp.t2i_batch_prompts, indices=mine)
        self._references(infer, mine)
        vq = infer.pipe.image_tokenizer  # recorded for results.json: the tokenizer behind vq_recon
        atomic_write_text(self.out / "vq_recon" / "image_tokenizer.json",
                          json.dumps({"tokenizer_id": vq.tokenizer_id, "weights_sha256": vq.checkpoint_hash}) + "\n")
        return len(drawn)

    def _references(self, infer: Any, indices: Sequence[int]) -> None:
        """Ground-truth renders and their VQ round trips, one sample per prompt (both are deterministic)."""
        for name in REFERENCES:
            folder = self.out / name
            todo = sorted(set(geneval.missing_samples(folder, self.metadata, 1)) & set(indices))
            for i in tqdm(todo, desc=f"shapes {name}", unit="prompt", disable=not todo):
                image = self.world.render(self.scenes[i])
                if name == "vq_recon":
                    codes = infer.encode_image(image, f"shapes scene {i}")
                    image = infer.decode_codes([codes.codes], tuple(codes.grid))[0]
                geneval.write_prompt_samples(folder, i, self.metadata[i], [image])

    def score(self) -> dict[str, Any]:
        scorer = ShapesScorer()
        results: dict[str, Any] = {"benchmark": "shapes", "world": self.world.info(),
                                   "unseen_pairs": [list(p) for p in self.world.unseen_pairs],
                                   "prompts": len(self.indices), "limit": self.limit}
        headline: dict[str, float] = {}
        for source in SOURCES:
            summary = geneval.score_folder(self.out / source, scorer)
            results[source] = {"overall": summary["overall"], "tags": summary["tags"], "images": summary["images"],
                               "correct_images": summary["correct_images"]}
            headline[source] = summary["overall"]
            if source == "model":
                headline.update({f"model_{t}": v["accuracy"] for t, v in summary["tags"].items()})
            if self.world.unseen_pairs:
                splits = split_summaries(self.out / source, self.world.unseen_pairs)
                results[source]["splits"] = splits
                for split, s in splits.items():
                    headline[f"{source}_{split}"] = s["overall"]
        results["headline"] = headline
        results["settings"] = {**self.exp.t2i_settings(), "scorer": scorer.describe(),
                               "shapes_per_tag": self.exp.shapes_per_tag,
                               "shapes_unseen_per_pair": self.exp.shapes_unseen_per_pair,
                               "image_tokenizer": json.loads((self.out / "vq_recon" / "image_tokenizer.json")
                                                             .read_text(encoding="utf-8"))}
        atomic_write_text(self.out / "results.json", json.dumps(results, indent=2) + "\n")
        logger.info("shapes GenEval\n" + format_table(results))
        return results


def format_table(results: dict[str, Any]) -> str:
    """Per tag (rows) and source (columns), and the overall row, as markdown."""
    sources = [s for s in SOURCES if s in results]
    lines = ["| tag | " + " | ".join(sources) + " |", "|---" * (len(sources) + 1) + "|"]
    for tag in TAGS:
        cells = [results[s]["tags"].get(tag, {}).get("accuracy") for s in sources]
        lines.append(f"| {tag} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    lines.append("| **overall** | " + " | ".join(f"{results[s]['overall']:.3f}" for s in sources) + " |")
    for split in ("seen", "unseen"):
        if any(split in results[s].get("splits", {}) for s in sources):
            cells = [results[s].get("splits", {}).get(split, {}).get("overall") for s in sources]
            lines.append(f"| {split} pairs | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


QUESTION_TYPES: tuple[tuple[str, str], ...] = (  # (question start, type), first match wins
    ("how many", "count"), ("what color", "color"), ("what shape", "shape"), ("is there", "exists"),
    ("where is", "where"), ("is the", "position_yes_no"))


def question_type(question: str) -> str:
    low = question.lower()
    return next((kind for start, kind in QUESTION_TYPES if low.startswith(start)), "other")


Turns = list[tuple[str, str]]  # (text as sent, reference answer), earlier in the same conversation


def _digest(image: bytes) -> str:
    return hashlib.sha1(bytes(image)).hexdigest()


def vqa_set(world: ShapesWorld, n_scenes: int) -> tuple[list[Any], dict[tuple[str, str], Turns]]:
    """Every question of ``world``'s first ``n_scenes`` training scenes as ``vis_und.VQAItem`` s (short answers;
    ``category`` is the question type), and for each item the turns before it in its conversation (keyed by the
    picture's digest and the item's prompt: the questions of one conversation differ). The first question is sent
    as ``"\n" + question`` after the picture, the others as they are: the training layout (module docstring)."""
    from evaluation.benchmarks.vis_und import VQAItem

    items, earlier = [], {}
    for i in range(n_scenes):
        scene = world.scene(i)
        buf = io.BytesIO()
        world.render(scene).save(buf, format="PNG")
        image, turns = buf.getvalue(), []
        for j, (q, a) in enumerate(world.vqa(scene)):
            text = "\n" + q if j == 0 else q
            items.append(VQAItem(benchmark="shapes_vqa", index=f"{i}-{j}", image=image, question=q, answer=a,
                                 category=question_type(q), source=f"{world!r} scene {i} question {j}",
                                 answer_kind="open", prompt_text=text))
            earlier[(_digest(image), text)] = list(turns)
            turns.append((text, a))
    return items, earlier


def conversation_ask_fn(base_url: str, model: str, max_tokens: int, earlier: dict[tuple[str, str], Turns]) -> Any:
    """A ``vis_und`` ask function that replays the conversation up to the question (earlier questions with their
    reference answers, the picture in the first user turn), greedy, over the OpenAI chat API: the model sees
    exactly what training showed it before that question. (``vis_und.openai_ask_fn`` sends one turn.)"""
    import openai

    from evaluation.benchmarks.vis_und import image_data_url

    base = base_url.rstrip("/")
    client = openai.OpenAI(base_url=base if base.endswith("/v1") else base + "/v1", api_key="none", timeout=600.0,
                           max_retries=2)

    def ask(image: Any, prompt: str, options: dict[str, str] | None = None) -> str:
        turns = earlier[(_digest(image), prompt)]
        picture = {"type": "image_url", "image_url": {"url": image_data_url(image)}}
        messages: list[dict[str, Any]] = []
        for k, (text, answer) in enumerate(turns + [(prompt, None)]):
            content = [picture, {"type": "text", "text": text}] if k == 0 else text
            messages.append({"role": "user", "content": content})
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0.0)
        return reply.choices[0].message.content or ""

    return ask


def vqa_scores(scored: Sequence[Any]) -> dict[str, Any]:
    """Exact-match accuracy (%) over all questions and per question type."""
    by_type: dict[str, list[bool]] = defaultdict(list)
    for s in scored:
        by_type[s.item.category].append(s.correct)
    pct = lambda v: 100.0 * sum(v) / len(v)  # noqa: E731
    return {"accuracy": pct([s.correct for s in scored]), "questions": len(scored),
            "types": {k: {"accuracy": pct(v), "questions": len(v)} for k, v in sorted(by_type.items())}}


class ShapesVQA:
    """The held-out shapes VQA set through the API server (module docstring)."""

    kind = "vqa"

    def __init__(self, experiment: Experiment, out_dir: str | Path, limit: int | None = None):
        self.exp, self.out, self.limit = experiment, Path(out_dir), limit
        train_world = load_world(experiment.shapes_world)  # Experiment.validate checked that the seeds differ
        self.world = ShapesWorld(experiment.shapes_vqa_seed, train_world.image_size, train_world.supersample)
        self.items, self.earlier = vqa_set(self.world, experiment.shapes_vqa_scenes)
        if limit is not None:
            self.items = self.items[:limit]

    def pending(self) -> int:
        from evaluation.benchmarks.runners import pending

        return pending(self.items, self.out / "answers.jsonl")

    def run(self, base_urls: Sequence[str]) -> dict[str, Any]:
        from evaluation.benchmarks.runners import round_robin
        from evaluation.benchmarks.vis_und import run_vqa

        ask = round_robin([conversation_ask_fn(url, self.exp.name, self.exp.vis_und_max_tokens, self.earlier)
                           for url in base_urls])
        settings = {"servers": list(base_urls), "model": self.exp.name, "max_tokens": self.exp.vis_und_max_tokens,
                    "sampling": "greedy (temperature 0)", "turns": "conversation replayed with reference answers",
                    "checkpoint": str(Path(self.exp.model_path).resolve()),
                    "checkpoint_sha256": checkpoint_hash(self.exp.model_path), "world": self.world.info(),
                    "scenes": self.exp.shapes_vqa_scenes, "limit": self.limit}
        results = run_vqa(self.items, ask, self.out, parallel=self.exp.vis_und_api_nproc, settings=settings,
                          scorer=vqa_scores)
        m = results["metrics"]
        results["headline"] = {"accuracy": m["accuracy"], **{t: v["accuracy"] for t, v in m["types"].items()}}
        atomic_write_text(self.out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
        return results
