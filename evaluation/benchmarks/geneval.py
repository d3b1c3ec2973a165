"""GenEval (Ghosh et al., 2023): object-focused text-to-image scoring, on transformers' Mask2Former and CLIP.

The official scorer (djghosh13/geneval ``evaluation/evaluate_images.py``) needs mmdet 2.x, which no longer installs;
this module runs the same rules on transformers' own classes, loaded from local paths:

* detection: ``Mask2FormerForUniversalSegmentation`` (a COCO instance checkpoint) through
  ``Mask2FormerImageProcessorPil.post_process_instance_segmentation`` with ``return_binary_maps``, which is mmdet's
  Mask2Former instance head: top ``num_queries`` (query, class) pairs, score = class probability x mean mask
  probability inside the mask, masks free to overlap. Boxes are the masks' extents. One small difference: HF
  thresholds the mask at 384x384 and resizes it (nearest) to the image, mmdet resizes the logits first; a box can
  move by a pixel or two. (HF's post-processing assumes the unpadded input is square, as generated images are);
* colour: ``CLIPModel`` (ViT-L/14 in real use) zero-shot over GenEval's ten colours with its three prompt templates
  averaged per colour (clip_benchmark's classifier), on each object's crop with everything outside its mask painted
  ``#999`` grey (the official ``bgcolor``); ``CLIPImageProcessorPil`` is open_clip's OpenAI transform (bicubic
  resize of the short side to 224, centre crop, the OpenAI mean/std);
* rules: a detection counts above 0.3 (0.9 for ``counting`` prompts, where Mask2Former's duplicate low-confidence
  boxes would inflate counts), at most 16 per class, most confident first (no NMS, the official default); the
  include/exclude, count, colour and position rules are :func:`data_process.shapes.detect.evaluate_geneval`, the one
  copy shared with the shapes world, with ``Detection.shape`` as the class name.

The transformers image processors need torchvision by default, which does not import beside this CPU torch: the
``...ImageProcessorPil`` classes are loaded explicitly (DESIGN.md section 9).

Layout on disk (the official one, so the official scorer also runs on it)::

    <out>/00000/metadata.jsonl          the prompt's metadata line
    <out>/00000/samples/0000.png ...    n_samples images
    <out>/results.jsonl                 one verdict per image (filename, tag, prompt, correct, reason, metadata,
                                        details), ``metadata`` and ``details`` as JSON strings like the official file
    <out>/results.json                  the summary: per-tag accuracy, overall = unweighted mean over the tags

Not copied from GenEval; rules matched to its code. Metadata: ``prompts/evaluation_metadata.jsonl`` of
djghosh13/geneval (553 prompts, MIT).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np
from loguru import logger
from PIL import Image
from tqdm import tqdm

from data_process.schema import atomic_write_text, iter_jsonl, read_jsonl_log
from data_process.shapes.detect import Detection, evaluate_geneval
from data_process.shapes.geometry import COLORS, GENEVAL_POSITION_THRESHOLD

TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
# The official zero-shot colour prompts, averaged per colour ("{color}" and "{object}" are filled in).
COLOR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {color} {object}", "a photo of a {color}-colored {object}", "a photo of a {color} object")
# COCO names in Mask2Former/detectron2 configs that GenEval's object_names.txt spells differently.
COCO_TO_GENEVAL: dict[str, str] = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
DEFAULT_BGCOLOR = "#999999"  # the official scorer's ``bgcolor`` option default ("#999")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SAMPLE_RE = re.compile(r"\d+\.png")


# ------------------------------------------------------------------------------------------------ metadata
class GenEvalMetadataError(ValueError):
    """A bad metadata line; the message is ``file:line: field: problem``."""


def _check_requirement(req: Any, where: str, key: str, i: int) -> None:
    name = f"{key}[{i}]"
    if not isinstance(req, dict):
        raise GenEvalMetadataError(f"{where}: {name}: expected an object, got {req!r}")
    if not isinstance(req.get("class"), str) or not req["class"]:
        raise GenEvalMetadataError(f"{where}: {name}.class: expected a class name (str), got {req.get('class')!r}")
    count = req.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise GenEvalMetadataError(f"{where}: {name}.count: expected an int >= 1, got {count!r}")
    if "color" in req and req["color"] not in COLORS:
        raise GenEvalMetadataError(f"{where}: {name}.color: expected one of {list(COLORS)}, got {req['color']!r}")
    if "position" in req:
        pos = req["position"]
        if key != "include":
            raise GenEvalMetadataError(f"{where}: {name}.position: only include clauses have a position")
        if not (isinstance(pos, list) and len(pos) == 2 and pos[0] in RELATIONS and isinstance(pos[1], int)
                and not isinstance(pos[1], bool) and 0 <= pos[1] < i):
            raise GenEvalMetadataError(f"{where}: {name}.position: expected [relation in {list(RELATIONS)}, index of "
                                       f"an earlier include], got {pos!r}")


def validate_metadata(meta: Any, where: str = "<metadata>") -> dict[str, Any]:
    """Check one GenEval metadata object (``tag``, ``prompt``, ``include`` [{class, count, color?, position?}],
    optional ``exclude``); returns it. Errors name ``where`` and the field, so a bad line is found at once."""
    if not isinstance(meta, dict):
        raise GenEvalMetadataError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    for key in ("tag", "prompt"):
        if not isinstance(meta.get(key), str) or not meta[key].strip():
            raise GenEvalMetadataError(f"{where}: {key}: expected a non-empty string, got {meta.get(key)!r}")
    if not isinstance(meta.get("include"), list) or not meta["include"]:
        raise GenEvalMetadataError(f"{where}: include: expected a non-empty list, got {meta.get('include')!r}")
    if not isinstance(meta.get("exclude", []), list):
        raise GenEvalMetadataError(f"{where}: exclude: expected a list, got {meta['exclude']!r}")
    for key in ("include", "exclude"):
        for i, req in enumerate(meta.get(key, [])):
            _check_requirement(req, where, key, i)
    return meta


def load_metadata(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The prompts of an ``evaluation_metadata.jsonl`` (one JSON object a line; blank lines skipped), validated;
    malformed JSON raises ``data_process.schema.RecordError`` and a bad field :class:`GenEvalMetadataError`, both
    ``ValueError``s naming the file and line."""
    out = [validate_metadata(meta, f"{path}:{lineno}") for lineno, meta in iter_jsonl(path)]
    if not out:
        raise GenEvalMetadataError(f"{path}: no prompts")
    return out


# ---------------------------------------------------------------------------------------------- generation
def prompt_dir(out_dir: str | os.PathLike, index: int) -> Path:
    """``<out>/<5-digit index>``, the official folder of prompt ``index`` (its line in the metadata file)."""
    return Path(out_dir) / f"{index:05d}"


def sample_path(out_dir: str | os.PathLike, index: int, i: int) -> Path:
    return prompt_dir(out_dir, index) / "samples" / f"{i:04d}.png"


def _read_prompt_metadata(folder: Path) -> dict[str, Any]:
    path = folder / "metadata.jsonl"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise GenEvalMetadataError(f"{path}:{e.lineno}: <json>: malformed ({e.msg})") from e
    return validate_metadata(meta, f"{path}:1")


def missing_samples(out_dir: str | os.PathLike, metadata: Sequence[dict[str, Any]], n_samples: int) -> list[int]:
    """Indices of the prompts whose folder lacks ``metadata.jsonl`` or any of its ``n_samples`` images (resume).

    A folder holding another prompt's metadata is an error, not a skip: reusing an output folder with another
    metadata file would otherwise mix two benchmarks' images silently.
    """
    todo = []
    for index, meta in enumerate(metadata):
        folder = prompt_dir(out_dir, index)
        if not (folder / "metadata.jsonl").is_file():
            todo.append(index)
            continue
        on_disk = _read_prompt_metadata(folder)
        if on_disk != meta:
            raise ValueError(f"{folder / 'metadata.jsonl'} holds {on_disk['prompt']!r} but metadata line {index + 1} "
                             f"is {meta['prompt']!r}: this folder was generated from another metadata file; use "
                             f"another output folder")
        if not all(sample_path(out_dir, index, i).is_file() for i in range(n_samples)):
            todo.append(index)
    return todo


def write_prompt_samples(out_dir: str | os.PathLike, index: int, metadata_line: dict[str, Any],
                         images: Sequence[Image.Image]) -> Path:
    """Write one prompt's folder (``metadata.jsonl`` + ``samples/0000.png``...) under a temporary name, then rename
    it into place, so an interrupted run never leaves a half-written prompt that looks done. An existing incomplete
    folder is replaced."""
    final = prompt_dir(out_dir, index)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "samples").mkdir(parents=True)
    try:
        (tmp / "metadata.jsonl").write_text(json.dumps(metadata_line) + "\n", encoding="utf-8")
        for i, image in enumerate(images):
            image.save(tmp / "samples" / f"{i:04d}.png")
        if final.exists():  # an incomplete earlier try: swap it out, then drop it
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# generate_fn(prompts, n, numbers): n images per prompt; numbers[j] is prompt j's stable number (its line in the
# metadata), from which the caller derives the prompt's seeds.
GenerateFn = Callable[[list[str], int, list[int]], list[list[Image.Image]]]


def generate(generate_fn: GenerateFn, metadata: Sequence[dict[str, Any]], out_dir: str | os.PathLike,
             n_samples: int = 4, batch_prompts: int = 8, indices: Sequence[int] | None = None) -> list[int]:
    """Draw ``n_samples`` images for every prompt not yet complete on disk, ``batch_prompts`` prompts per call of
    ``generate_fn(prompts, n, numbers) -> one list of n PIL images per prompt`` (``numbers``: the prompts' lines in
    ``metadata``, for per-prompt seeds; model-agnostic: the orchestrator passes a
    closure around ``UniInfer.generate_images``). ``indices``: only these prompts (a subset for ``--limit``, or one
    device's shard), still in the folders of their line in ``metadata``. Returns the indices written."""
    if n_samples < 1 or batch_prompts < 1:
        raise ValueError(f"n_samples and batch_prompts must be >= 1, got {n_samples=}, {batch_prompts=}")
    todo = missing_samples(out_dir, metadata, n_samples)
    if indices is not None:
        wanted = set(indices)
        todo = [i for i in todo if i in wanted]
    asked = len(metadata) if indices is None else len(set(indices))
    if len(todo) < asked:
        logger.info(f"geneval: {asked - len(todo)} of {asked} prompts already on disk in {out_dir}")
    with tqdm(total=len(todo), desc="geneval generate", unit="prompt") as bar:
        for start in range(0, len(todo), batch_prompts):
            chunk = todo[start:start + batch_prompts]
            images = generate_fn([metadata[i]["prompt"] for i in chunk], n_samples, list(chunk))
            if len(images) != len(chunk) or any(len(imgs) != n_samples for imgs in images):
                raise ValueError(f"generate_fn returned {[len(x) for x in images]} images for {len(chunk)} prompts; "
                                 f"expected {n_samples} each")
            for index, imgs in zip(chunk, images):
                write_prompt_samples(out_dir, index, metadata[index], imgs)
            bar.update(len(chunk))
    return todo


# -------------------------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Instance:
    """One detector output before the rules: ``label`` a GenEval class name, ``box`` (x0, y0, x1, y1) in pixels,
    ``mask`` (H, W) bool over the whole image (None: colour is read from the box crop alone)."""

    label: str
    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class GenEvalRules:
    """The official scorer's options (``--options threshold=... counting_threshold=...``) at their defaults."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    position_threshold: float = GENEVAL_POSITION_THRESHOLD


@dataclass(frozen=True)
class Verdict:
    """One image's score: ``reason`` lists the failed clauses, one a line (empty when correct); ``details`` maps
    each class to its kept boxes as ``[x0, y0, x1, y1, score]``, as the official file does."""

    correct: bool
    reason: str
    details: dict[str, list[list[float]]]


ColorFn = Callable[[str, list[Instance]], list[str]]  # (class name, instances) -> one of COLORS per instance


def select_instances(instances: Iterable[Instance], tag: str, rules: GenEvalRules = GenEvalRules()
                     ) -> dict[str, list[Instance]]:
    """Per class, the detections GenEval keeps: score strictly above the threshold (``counting_threshold`` for
    ``counting`` prompts), most confident first, at most ``max_objects``."""
    cut = rules.counting_threshold if tag == "counting" else rules.threshold
    by_class: dict[str, list[Instance]] = {}
    for inst in sorted(instances, key=lambda d: -d.score):
        kept = by_class.setdefault(inst.label, [])
        if inst.score > cut and len(kept) < rules.max_objects:
            kept.append(inst)
    return {k: v for k, v in by_class.items() if v}


def judge(instances: Iterable[Instance], metadata: dict[str, Any], color_fn: ColorFn,
          rules: GenEvalRules = GenEvalRules()) -> Verdict:
    """GenEval's verdict on one image's detections.

    Colour is asked of ``color_fn`` only for what the official scorer classifies: the most confident ``count``
    detections of a class that an include clause wants in a colour (the only ones the colour rule reads), so a
    CLIP call is spent per needed object, not per detection. The rules themselves are
    :func:`~data_process.shapes.detect.evaluate_geneval`.
    """
    kept = select_instances(instances, metadata["tag"], rules)
    n_colored: dict[str, int] = {}
    for req in metadata["include"]:
        if "color" in req:
            n_colored[req["class"]] = max(n_colored.get(req["class"], 0), req["count"])
    detections = []
    for cls, insts in kept.items():
        colors = color_fn(cls, insts[:n_colored[cls]]) if cls in n_colored else []
        for j, inst in enumerate(insts):
            detections.append(Detection(cls, colors[j] if j < len(colors) else "", inst.box, inst.score))
    correct, reasons = evaluate_geneval(detections, metadata, rules.position_threshold)
    details = {cls: [[*map(float, inst.box), float(inst.score)] for inst in insts] for cls, insts in kept.items()}
    return Verdict(correct, "\n".join(reasons), details)


# ------------------------------------------------------------------------------------------------- scorer
def weights_hash(path: str | os.PathLike, length: int = 12) -> str:
    """Short sha256 of a model folder's weight files (one file: its own hash, as ``file_hash``), for results."""
    from modeling.vq.base import file_hash

    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path}: no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    if len(files) == 1:
        return file_hash(files[0], length)
    joined = "\n".join(f"{p.name}:{file_hash(p, 64)}" for p in files)
    return hashlib.sha256(joined.encode()).hexdigest()[:length]


def geneval_name(label: str) -> str:
    """A detector label in GenEval's spelling (lower case, spaces, GenEval's names for mouse/remote/keyboard)."""
    name = " ".join(label.lower().replace("_", " ").replace("-", " ").split())
    return COCO_TO_GENEVAL.get(name, name)


class Scorer(Protocol):
    """What :func:`score_folder` needs; ``describe()`` (optional) goes into the summary."""

    def __call__(self, image: Image.Image, metadata: dict[str, Any]) -> Verdict: ...


class GenEvalScorer:
    """Mask2Former detections + CLIP colours + GenEval's rules, on one device, one image at a time.

    Build with :meth:`from_paths`; text embeddings of the colour prompts are computed once per class and kept.
    """

    def __init__(self, detector: Any, detector_processor: Any, clip: Any, clip_processor: Any, tokenizer: Any, *,
                 rules: GenEvalRules = GenEvalRules(), bgcolor: str = DEFAULT_BGCOLOR, device: str = "cpu",
                 sources: dict[str, Any] | None = None):
        self.detector, self.detector_processor = detector, detector_processor
        self.clip, self.clip_processor, self.tokenizer = clip, clip_processor, tokenizer
        self.rules, self.bgcolor, self.device = rules, bgcolor, device
        self.sources = sources or {}
        self.labels = [geneval_name(detector.config.id2label[i]) for i in range(len(detector.config.id2label))]
        self._color_classifiers: dict[str, Any] = {}

    @classmethod
    def from_paths(cls, detector_path: str | os.PathLike, clip_path: str | os.PathLike, device: str | None = None,
                   rules: GenEvalRules = GenEvalRules(), bgcolor: str = DEFAULT_BGCOLOR) -> "GenEvalScorer":
        """Load a Mask2Former COCO instance checkpoint and a CLIP checkpoint (with its tokenizer) from local folders
        (``device`` default: cuda when available)."""
        import torch
        from transformers import (AutoTokenizer, CLIPImageProcessorPil, CLIPModel, Mask2FormerForUniversalSegmentation,
                                  Mask2FormerImageProcessorPil)

        for name, p in (("detector_path", detector_path), ("clip_path", clip_path)):
            if not Path(p).is_dir():
                raise FileNotFoundError(f"geneval {name}: {p} is not a local model folder (a COCO instance "
                                        f"Mask2Former for detector_path, CLIP ViT-L/14 for clip_path)")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        detector = Mask2FormerForUniversalSegmentation.from_pretrained(detector_path).eval().to(device)
        clip = CLIPModel.from_pretrained(clip_path).eval().to(device)
        sources = {
            "detector": {"path": str(detector_path), "class": type(detector).__name__,
                         "weights_sha256": weights_hash(detector_path)},
            "clip": {"path": str(clip_path), "class": type(clip).__name__, "weights_sha256": weights_hash(clip_path)},
        }
        return cls(detector, Mask2FormerImageProcessorPil.from_pretrained(detector_path), clip,
                   CLIPImageProcessorPil.from_pretrained(clip_path), AutoTokenizer.from_pretrained(clip_path),
                   rules=rules, bgcolor=bgcolor, device=device, sources=sources)

    def describe(self) -> dict[str, Any]:
        """Everything that decides a verdict, for the results file."""
        return {**self.sources, "rules": asdict(self.rules), "bgcolor": self.bgcolor,
                "color_templates": list(COLOR_TEMPLATES), "colors": list(COLORS), "device": str(self.device)}

    def detect(self, image: Image.Image) -> list[Instance]:
        """Instance candidates with full-image masks, down to the lowest threshold any tag uses (the rules apply the
        exact, strict, per-tag one): the processor builds one full-size mask per kept query, 100 of them at 0."""
        import torch

        image = image.convert("RGB")
        inputs = self.detector_processor(images=image, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            outputs = self.detector(**inputs)
        result = self.detector_processor.post_process_instance_segmentation(
            outputs, threshold=min(self.rules.threshold, self.rules.counting_threshold),
            target_sizes=[image.size[::-1]], return_binary_maps=True)[0]
        out = []
        for k, info in enumerate(result["segments_info"]):
            mask_HW = result["segmentation"][k].bool().cpu().numpy()
            ys, xs = np.nonzero(mask_HW)
            box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            out.append(Instance(self.labels[info["label_id"]], box, float(info["score"]), mask_HW))
        return out

    def _color_classifier(self, class_name: str) -> Any:
        """(10, D) unit text embeddings: per colour, the mean of its normalised template embeddings, renormalised."""
        import torch
        import torch.nn.functional as F

        if class_name not in self._color_classifiers:
            texts = [t.format(color=c, object=class_name) for c in COLORS for t in COLOR_TEMPLATES]
            tokens = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                emb_TD = F.normalize(self.clip.get_text_features(**tokens).pooler_output.float(), dim=-1)
            emb_CKD = emb_TD.view(len(COLORS), len(COLOR_TEMPLATES), -1)  # (colour, template, dim)
            self._color_classifiers[class_name] = F.normalize(emb_CKD.mean(1), dim=-1)
        return self._color_classifiers[class_name]

    def classify_colors(self, image: Image.Image, class_name: str, instances: list[Instance]) -> list[str]:
        """CLIP's colour for each instance: the box crop of the image with everything outside the mask grey."""
        import torch
        import torch.nn.functional as F

        if not instances:
            return []
        rgb = image.convert("RGB")
        blank = Image.new("RGB", rgb.size, self.bgcolor)
        crops = []
        for inst in instances:
            masked = rgb if inst.mask is None else Image.composite(rgb, blank, Image.fromarray(inst.mask))
            crops.append(masked.crop(tuple(round(v) for v in inst.box)))
        pixels = self.clip_processor(images=crops, return_tensors="pt")["pixel_values"].to(self.device)
        with torch.inference_mode():
            feats_ND = F.normalize(self.clip.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)
        return [COLORS[i] for i in (feats_ND @ self._color_classifier(class_name).T).argmax(1).tolist()]

    def __call__(self, image: Image.Image, metadata: dict[str, Any]) -> Verdict:
        return judge(self.detect(image), metadata, lambda cls, insts: self.classify_colors(image, cls, insts),
                     self.rules)


# ------------------------------------------------------------------------------------------ results files
def append_jsonl(f: Any, record: dict[str, Any]) -> None:
    """One line in one write, flushed and fsynced: a kill loses at most this line, which the reader then drops."""
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def list_samples(out_dir: str | os.PathLike) -> list[tuple[Path, list[Path]]]:
    """``[(prompt folder, its sample images)]`` as the official scorer finds them (digit folders, ``\\d+.png``)."""
    out = []
    for folder in sorted(p for p in Path(out_dir).iterdir() if p.is_dir() and p.name.isdigit()):
        samples = folder / "samples"
        images = sorted(p for p in samples.iterdir() if p.is_file() and SAMPLE_RE.fullmatch(p.name)) \
            if samples.is_dir() else []
        out.append((folder, images))
    return out


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The official summary (``summary_scores.py``): per-tag accuracy in order of first appearance, overall = the
    unweighted mean of the tags' accuracies (not of the images), image and prompt rates (a prompt is correct when
    any of its images is)."""
    if not results:
        raise ValueError("no GenEval results to summarize")
    tags: dict[str, list[bool]] = {}
    prompts: dict[str, bool] = {}
    for r in results:
        tags.setdefault(r["tag"], []).append(bool(r["correct"]))
        prompts[r["metadata"]] = prompts.get(r["metadata"], False) or bool(r["correct"])
    per_tag = {t: {"accuracy": sum(v) / len(v), "correct": sum(v), "images": len(v)} for t, v in tags.items()}
    return {
        "overall": float(np.mean([s["accuracy"] for s in per_tag.values()])),
        "tags": per_tag,
        "tags_missing": [t for t in TAGS if t not in tags],
        "images": len(results),
        "prompts": len(prompts),
        "correct_images": sum(bool(r["correct"]) for r in results) / len(results),
        "correct_prompts": sum(prompts.values()) / len(prompts),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as the official script prints it."""
    lines = [f"Total images: {summary['images']}", f"Total prompts: {summary['prompts']}",
             f"% correct images: {summary['correct_images']:.2%}",
             f"% correct prompts: {summary['correct_prompts']:.2%}", "", "Task breakdown"]
    lines += [f"{t:<16} = {s['accuracy']:.2%} ({s['correct']} / {s['images']})" for t, s in summary["tags"].items()]
    if summary["tags_missing"]:
        lines.append(f"(no images for {', '.join(summary['tags_missing'])})")
    lines += ["", f"Overall score (avg. over tasks): {summary['overall']:.5f}"]
    return "\n".join(lines)


def score_folder(out_dir: str | os.PathLike, scorer: Scorer, results_name: str = "results.jsonl",
                 summary_name: str | None = "results.json") -> dict[str, Any]:
    """Score every sample under ``out_dir`` not yet in ``results.jsonl`` (appended one line per image as it is
    scored: a rerun scores nothing twice), then summarize the images present and write ``results.json``.

    ``filename`` is relative to ``out_dir`` (the folder can move without losing the scores). The summary carries
    ``scorer.describe()`` (model paths, weight hashes, rules) when the scorer has one.
    """
    out_dir = Path(out_dir)
    results_path = out_dir / results_name
    done = {r["filename"]: r for r in read_jsonl_log(results_path)}
    present: list[str] = []
    todo: list[tuple[Path, dict[str, Any]]] = []
    known = getattr(scorer, "labels", None)
    for folder, images in list_samples(out_dir):
        meta = _read_prompt_metadata(folder)
        unknown = sorted({r["class"] for r in meta["include"] + meta.get("exclude", [])} - set(known or ()))
        if known is not None and unknown:  # else every such prompt would fail quietly as "found 0"
            raise ValueError(f"{folder / 'metadata.jsonl'}: classes {unknown} are not among the detector's labels "
                             f"(GenEval spelling): is it a COCO instance checkpoint?")
        for image_path in images:
            rel = image_path.relative_to(out_dir).as_posix()
            present.append(rel)
            if rel not in done:
                todo.append((image_path, meta))
    if not present:
        raise FileNotFoundError(f"{out_dir}: no samples (<5-digit folder>/samples/<n>.png); generate first")
    logger.info(f"geneval: {len(present)} images in {out_dir}, {len(present) - len(todo)} already scored")
    with open(results_path, "a", encoding="utf-8") as f:
        for image_path, meta in tqdm(todo, desc="geneval score", unit="img"):
            with Image.open(image_path) as im:
                verdict = scorer(im.convert("RGB"), meta)
            rec = {"filename": image_path.relative_to(out_dir).as_posix(), "tag": meta["tag"],
                   "prompt": meta["prompt"], "correct": bool(verdict.correct), "reason": verdict.reason,
                   "metadata": json.dumps(meta), "details": json.dumps(verdict.details)}
            append_jsonl(f, rec)
            done[rec["filename"]] = rec
    summary = summarize([done[name] for name in present])
    describe = getattr(scorer, "describe", None)
    summary = {"benchmark": "geneval", **summary, "results_file": results_name,
               "scorer": describe() if callable(describe) else type(scorer).__name__}
    logger.info("GenEval summary\n" + format_summary(summary))
    if summary_name:
        atomic_write_text(out_dir / summary_name, json.dumps(summary, indent=2) + "\n")
    return summary
