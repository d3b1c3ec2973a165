"""DPG-Bench (ELLA, Hu et al., 2024): dense-prompt text-to-image scoring by a VQA judge with question dependencies.

Inputs, from local paths: the prompts folder (``dpg_bench/prompts/<item_id>.txt``, 1,065 prompts, Apache-2.0,
TencentQQGYLab/ELLA) and the question csv (``dpg_bench.csv``: ``item_id``, ``proposition_id``, ``dependency``,
``tuple``, ``question_natural_language``, ...; ``dependency`` lists parent proposition ids, ``0`` = none).

Generation draws 4 images per prompt and saves them as one 2x2 grid ``<out>/images/<item_id>.png`` (written to a
temporary name and renamed: resumable), the layout ELLA's ``compute_dpg_bench.py`` reads (``--pic-num 4``).

Scoring, ELLA's rules (re-implemented, not copied):

* every question is asked of every crop of the grid separately; a crop's answer scores 1 when it says yes;
* dependencies, in csv order: a question scores 0 when any parent's score *so far* is 0 (parents come first, so a
  failed grandparent zeroes the whole chain);
* crop score = mean over the prompt's questions, prompt score = mean over its 4 crops, overall = 100 x mean over
  prompts;
* category scores pool the questions' raw answers (before dependencies, as ELLA does), by the ``tuple`` column's
  category (``"entity - whole (dog)"`` -> detailed ``entity - whole``, broad ``entity``), x100.

Where ELLA's script differs from its evident intent, this module takes the intent and says so:

* ELLA skips the csv's first data row (``if i == 0: continue`` after the header); every row is read here;
* ELLA's category scores read only the last crop (its ``qid2scores_orig`` is copied inside the crop loop);
  ``category_crops="all"`` (default) pools all 4 crops (same expectation, a quarter of the variance);
  ``category_crops="last"`` reproduces ELLA exactly.

The judge is any VQA model behind the OpenAI chat API (``vis_und.openai_ask_fn``: the crop as a ``data:`` URL;
this toolkit's own server included) or any callable with the same ``(image, prompt, options) -> reply``
signature; replies are read by ``vis_und.extract_answer`` ("Yes." / "no" / "Yes, there is ..."). ELLA used
mPLUG-large, whose replies are a bare "yes"/"no": another judge gives another scale, so the judge is recorded.
Questions are asked through ``vis_und.ask_all``: a thread pool appending to ``<out>/answers.jsonl``, so a rerun
asks nothing twice. An answer is keyed by prompt, crop, proposition and the grid file's hash: a regenerated grid
is asked again.
"""

from __future__ import annotations

import csv
import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

from loguru import logger
from PIL import Image
from tqdm import tqdm

from data_process.schema import atomic_path, atomic_write_text
from evaluation.benchmarks.vis_und import AskFn, VQAItem, ask_all, extract_answer

REQUIRED_COLUMNS = ("item_id", "proposition_id", "dependency", "tuple", "question_natural_language")
N_CROPS = 4  # a 2x2 grid, crops in ELLA's order: top-left, top-right, bottom-left, bottom-right
CategoryCrops = Literal["all", "last"]
# generate_fn(prompts, n, numbers): as GenEval's (geneval.GenerateFn); a prompt's number is prompt_number(item_id).
GenerateFn = Callable[[list[str], int, list[int]], list[list[Image.Image]]]


def prompt_number(item_id: str) -> int:
    """A stable number for a DPG item (CRC-32 of its id): its seeds do not depend on which device drew it or on
    the other prompts of the run."""
    return zlib.crc32(item_id.encode("utf-8"))


class DPGDataError(ValueError):
    """Bad benchmark input; the message is ``file:line: column: problem``."""


@dataclass(frozen=True)
class Question:
    """One proposition of a prompt: ``parents`` are proposition ids of the same prompt (0 = none);
    ``category`` is the detailed category (``"entity - whole"``), ``broad`` its first part (``"entity"``)."""

    item_id: str
    proposition_id: int
    parents: tuple[int, ...]
    question: str
    category: str
    broad: str
    source: str  # file:line, for errors

    @property
    def key(self) -> str:
        return f"{self.item_id}/{self.proposition_id}"


def item_order(item_id: str) -> tuple[int, int, str]:
    """Numeric ids in numeric order, then the rest by name (ELLA's prompts are named 1.txt ... and words)."""
    return (0, int(item_id), "") if item_id.isdigit() else (1, 0, item_id)


# ------------------------------------------------------------------------------------------------ reading
def load_prompts(prompts_dir: str | os.PathLike) -> dict[str, str]:
    """``{item_id: prompt}`` from ``<item_id>.txt`` files, in item order; an empty file is an error naming it."""
    folder = Path(prompts_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"dpg_bench: no prompts folder at {folder} (ELLA's dpg_bench/prompts is expected)")
    prompts = {}
    for path in sorted(folder.glob("*.txt"), key=lambda p: item_order(p.stem)):
        text = path.read_text(encoding="utf-8").strip()
        if not text:
            raise DPGDataError(f"{path}:1: prompt: empty file")
        prompts[path.stem] = text
    if not prompts:
        raise DPGDataError(f"{folder}: no <item_id>.txt prompt files")
    return prompts


def _int_cell(value: str, where: str, column: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise DPGDataError(f"{where}: {column}: expected an integer, got {value!r}") from None


def load_questions(csv_path: str | os.PathLike) -> dict[str, list[Question]]:
    """``{item_id: questions in csv order}``. Every problem names the csv line and column: a missing column or
    value, a non-integer id or dependency, a duplicate (item, proposition), a parent that is not a proposition of
    the same prompt."""
    path = Path(csv_path)
    out: dict[str, list[Question]] = {}
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DPGDataError(f"{path}:1: header: missing columns {missing}; found {reader.fieldnames}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            for col in REQUIRED_COLUMNS:
                if row.get(col) is None or not row[col].strip():
                    raise DPGDataError(f"{where}: {col}: empty")
            item_id = row["item_id"].strip()
            pid = _int_cell(row["proposition_id"], where, "proposition_id")
            parents = tuple(_int_cell(p, where, "dependency") for p in row["dependency"].split(","))
            category = row["tuple"].split("(")[0].strip()
            questions = out.setdefault(item_id, [])
            if any(q.proposition_id == pid for q in questions):
                raise DPGDataError(f"{where}: proposition_id: {pid} appears twice for item {item_id!r}")
            questions.append(Question(item_id, pid, parents, row["question_natural_language"].strip(), category,
                                      category.split("-")[0].strip(), where))
    if not out:
        raise DPGDataError(f"{path}: no questions")
    for questions in out.values():
        ids = {q.proposition_id for q in questions}
        for q in questions:
            unknown = [p for p in q.parents if p != 0 and p not in ids]
            if unknown:
                raise DPGDataError(f"{q.source}: dependency: parents {unknown} are not propositions of item "
                                   f"{q.item_id!r} (it has {sorted(ids)})")
    return out


# ---------------------------------------------------------------------------------------------- generation
def grid_path(out_dir: str | os.PathLike, item_id: str) -> Path:
    return Path(out_dir) / "images" / f"{item_id}.png"


def make_grid(images: Sequence[Image.Image]) -> Image.Image:
    """Four equally sized images as a 2x2 grid, in ELLA's crop order (row-major)."""
    if len(images) != N_CROPS or len({im.size for im in images}) != 1:
        raise ValueError(f"a 2x2 grid needs 4 images of one size, got {[im.size for im in images]}")
    w, h = images[0].size
    grid = Image.new("RGB", (2 * w, 2 * h))
    for k, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((k % 2) * w, (k // 2) * h))
    return grid


def split_grid(grid: Image.Image) -> list[Image.Image]:
    """The 4 crops of a 2x2 grid, row-major (ELLA's crop boxes with ``resolution`` = half the grid's width)."""
    w, h = grid.size
    if w % 2 or h % 2:
        raise ValueError(f"a 2x2 grid has even sides, got {w}x{h}")
    cw, ch = w // 2, h // 2
    return [grid.crop(((k % 2) * cw, (k // 2) * ch, (k % 2 + 1) * cw, (k // 2 + 1) * ch)) for k in range(N_CROPS)]


def generate(generate_fn: GenerateFn, prompts: dict[str, str], out_dir: str | os.PathLike,
             batch_prompts: int = 8) -> list[str]:
    """Draw 4 images for every prompt without a grid on disk, ``batch_prompts`` prompts per
    ``generate_fn(prompts, 4, numbers)`` call (``numbers``: :func:`prompt_number` of each item), and save each
    prompt's grid atomically. Returns the item ids drawn."""
    if batch_prompts < 1:
        raise ValueError(f"batch_prompts must be >= 1, got {batch_prompts}")
    todo = [k for k in prompts if not grid_path(out_dir, k).is_file()]
    if len(todo) < len(prompts):
        logger.info(f"dpg_bench: {len(prompts) - len(todo)} of {len(prompts)} grids already in {out_dir}")
    with tqdm(total=len(todo), desc="dpg_bench generate", unit="prompt") as bar:
        for start in range(0, len(todo), batch_prompts):
            chunk = todo[start:start + batch_prompts]
            images = generate_fn([prompts[k] for k in chunk], N_CROPS, [prompt_number(k) for k in chunk])
            if len(images) != len(chunk):
                raise ValueError(f"generate_fn returned {len(images)} lists for {len(chunk)} prompts")
            for item_id, imgs in zip(chunk, images):
                grid = make_grid(imgs)
                with atomic_path(grid_path(out_dir, item_id)) as tmp:
                    grid.save(tmp, format="PNG")
            bar.update(len(chunk))
    return todo


# -------------------------------------------------------------------------------------------------- rules
def apply_dependencies(questions: Sequence[Question], yes: dict[int, bool]) -> dict[int, float]:
    """ELLA's dependency rule on one crop: ``{proposition: score}`` from its raw yes/no answers. In csv order, a
    question whose parent scores 0 *so far* scores 0 (zeroing is transitive down a chain listed parent-first)."""
    scores = {q.proposition_id: float(yes[q.proposition_id]) for q in questions}
    for q in questions:
        if any(p != 0 and scores[p] == 0 for p in q.parents):
            scores[q.proposition_id] = 0.0
    return scores


def score_prompt(questions: Sequence[Question], crops_yes: Sequence[dict[int, bool]]) -> dict[str, Any]:
    """One prompt: per-crop score (mean over questions after dependencies) and the prompt score (mean of crops)."""
    crop_scores = []
    for yes in crops_yes:
        scores = apply_dependencies(questions, yes)
        crop_scores.append(sum(scores.values()) / len(scores))
    return {"crop_scores": crop_scores, "score": sum(crop_scores) / len(crop_scores)}


def summarize(per_prompt: Sequence[dict[str, Any]], questions: dict[str, list[Question]],
              category_crops: CategoryCrops = "all") -> dict[str, Any]:
    """Overall = 100 x mean prompt score; category scores = 100 x mean raw answer over the pooled questions (of all
    crops, or of the last crop only as ELLA's script)."""
    if not per_prompt:
        raise ValueError("no DPG-Bench prompts to summarize")
    if category_crops not in ("all", "last"):
        raise ValueError(f"category_crops: expected 'all' or 'last', got {category_crops!r}")
    broad: dict[str, list[float]] = {}
    detailed: dict[str, list[float]] = {}
    for rec in per_prompt:
        crops = rec["yes"] if category_crops == "all" else rec["yes"][-1:]
        for q in questions[rec["item_id"]]:
            for yes in crops:
                broad.setdefault(q.broad, []).append(float(yes[str(q.proposition_id)]))
                detailed.setdefault(q.category, []).append(float(yes[str(q.proposition_id)]))
    mean100 = lambda xs: 100.0 * sum(xs) / len(xs)  # noqa: E731
    return {
        "overall": mean100([r["score"] for r in per_prompt]),
        "prompts": len(per_prompt),
        "broad": {k: mean100(v) for k, v in sorted(broad.items())},
        "detailed": {k: mean100(v) for k, v in sorted(detailed.items())},
        "category_crops": category_crops,
        "unreadable_answers": sum(r["unreadable"] for r in per_prompt),
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = ["L1 category scores:"] + [f"\t{k}: {v:.2f}" for k, v in summary["broad"].items()]
    lines += ["L2 category scores:"] + [f"\t{k}: {v:.2f}" for k, v in summary["detailed"].items()]
    lines.append(f"DPG-Bench score: {summary['overall']:.2f} ({summary['prompts']} prompts)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ scoring
def _answer_index(item_id: str, grid_sha: str, crop: int, pid: int) -> str:
    return f"{item_id}|{grid_sha}|{crop}|{pid}"


def _grid_sha(path: Path) -> str:
    from modeling.vq.base import file_hash

    return file_hash(path, 16)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _items_to_ask(item_ids: Iterable[str], questions: dict[str, list[Question]], out_dir: Path,
                  shas: dict[str, str]) -> list[VQAItem]:
    """The questions of these prompts as VQA items, one per (crop, proposition); each crop encoded once."""
    items = []
    for item_id in item_ids:
        with Image.open(grid_path(out_dir, item_id)) as grid:
            crops = [_png(c) for c in split_grid(grid.convert("RGB"))]
        for crop, png in enumerate(crops):
            for q in questions[item_id]:
                items.append(VQAItem("dpg_bench", _answer_index(item_id, shas[item_id], crop, q.proposition_id), png,
                                     q.question, "yes", q.category, q.source))
    return items


def score_folder(out_dir: str | os.PathLike, questions: dict[str, list[Question]], judge: AskFn,
                 item_ids: Sequence[str] | None = None, parallel: int = 8, chunk_prompts: int = 32,
                 category_crops: CategoryCrops = "all", judge_info: dict[str, Any] | None = None,
                 summary_name: str | None = "results.json") -> dict[str, Any]:
    """Ask the judge every question of every crop not yet answered (``answers.jsonl``), ``chunk_prompts`` prompts
    at a time (so only their crops are in memory), then score: ``results.jsonl`` per prompt and the summary
    (``results.json``, with ``judge_info``: endpoint, model, prompt). ``item_ids``: the prompts to score (default:
    every item of ``questions``); each must have its grid."""
    out_dir = Path(out_dir)
    item_ids = sorted(questions, key=item_order) if item_ids is None else list(item_ids)
    unknown = [k for k in item_ids if k not in questions]
    if unknown:
        raise DPGDataError(f"no questions for items {unknown[:5]} ({len(unknown)} in all)")
    lost = [k for k in item_ids if not grid_path(out_dir, k).is_file()]
    if lost:
        raise FileNotFoundError(f"dpg_bench: {len(lost)} grids missing under {out_dir / 'images'}, e.g. {lost[:5]}; "
                                f"generate first")
    shas = {k: _grid_sha(grid_path(out_dir, k)) for k in item_ids}
    answers_path = out_dir / "answers.jsonl"
    replies: dict[str, str] = {}
    for start in tqdm(range(0, len(item_ids), chunk_prompts), desc="dpg_bench prompts", unit="chunk"):
        chunk = item_ids[start:start + chunk_prompts]
        replies.update(ask_all(_items_to_ask(chunk, questions, out_dir, shas), judge, answers_path, parallel))

    per_prompt = []
    for item_id in item_ids:
        qs = questions[item_id]
        crops_yes, raw, unreadable = [], [], 0
        for crop in range(N_CROPS):
            texts = {q.proposition_id: replies[_answer_index(item_id, shas[item_id], crop, q.proposition_id)]
                     for q in qs}
            said = {pid: extract_answer(t, "yes_no") for pid, t in texts.items()}
            unreadable += sum(v is None for v in said.values())
            crops_yes.append({pid: v == "yes" for pid, v in said.items()})
            raw.append(texts)
        per_prompt.append({"item_id": item_id, **score_prompt(qs, crops_yes),
                           "yes": [{str(k): v for k, v in y.items()} for y in crops_yes],
                           "replies": [{str(k): v for k, v in r.items()} for r in raw], "unreadable": unreadable})
    atomic_write_text(out_dir / "results.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in per_prompt))
    summary = {"benchmark": "dpg_bench", **summarize(per_prompt, questions, category_crops),
               "judge": judge_info or {}}
    logger.info("DPG-Bench summary\n" + format_summary(summary))
    if summary_name:
        atomic_write_text(out_dir / summary_name, json.dumps(summary, indent=2) + "\n")
    return summary


def openai_judge(base_url: str, model: str, api_key: str = "none", max_tokens: int = 16,
                 **sampling: Any) -> tuple[AskFn, dict[str, Any]]:
    """The judge over the OpenAI chat API (``vis_und.openai_ask_fn``, greedy by default) and the settings to record
    with the results (the key is left out)."""
    from evaluation.benchmarks.vis_und import openai_ask_fn

    info = {"base_url": base_url, "model": model, "max_tokens": max_tokens, "sampling": sampling,
            "prompt": "{question} Please answer yes or no."}
    return openai_ask_fn(base_url, model, api_key=api_key, max_tokens=max_tokens, **sampling), info

