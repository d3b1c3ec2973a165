"""Visual understanding: MME, POPE and MMBench from local TSV files in VLMEvalKit's layout, asked through any
OpenAI-compatible chat server (this toolkit's ``evaluation/api_server.py`` by default), scored by the benchmarks'
own rules.

Files (VLMEvalKit's ``MME.tsv``, ``POPE.tsv``, ``MMBench_DEV_EN.tsv`` ...; one row per question, tab-separated):

- every benchmark: ``index``, ``image`` (base64, or, to save space, the ``index`` of an earlier row with the same
  picture: VLMEvalKit stores MME's second question of an image that way), ``question``, ``answer``, ``category``.
- MME: ``image_path`` (optional) names the picture; its two questions (one "Yes", one "No") share it: acc+.
  Subtasks are the categories; perception is the sum of 10 of them, cognition of 4 (``MME_PERCEPTION``,
  ``MME_COGNITION``).
- POPE: ``category`` is the split (``adversarial`` / ``popular`` / ``random``); VLMEvalKit merges a question that
  occurs in several splits into one row with ``category`` = ``"popular,random"``: the row counts in each.
- MMBench: options in columns ``A`` ... (``C``/``D`` empty when a question has two), optional ``hint`` and
  ``l2-category``. Circular variants: the same question with rotated options has ``index`` = original index +
  k * 1,000,000 (k = 1, 2, 3) and its answer letter rotated with it; a question counts as right only if every
  rotation present is right (circular evaluation). A file with no rotated rows scores as plain accuracy.

``run_vqa`` asks each item through ``ask_fn(image_bytes, prompt, options) -> str`` (``openai_ask_fn`` builds one
around the ``openai`` client), from a thread pool, appending each reply to ``answers.jsonl`` as it arrives; a rerun
asks only what is missing. Then it extracts the answer (``extract_answer``: rules, no judge model), scores, and writes
``samples.jsonl`` (per question: reply, extracted answer, right or wrong) and ``results.json`` atomically.
Percentages throughout (VLMEvalKit's convention), except MME's scores (0-200 per subtask, its own scale).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import csv
import hashlib
import io
import json
import os
import re
import string
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

from loguru import logger
from tqdm import tqdm

from data_process.schema import read_jsonl_log

Benchmark = Literal["mme", "pope", "mmbench"]
AnswerKind = Literal["yes_no", "choice", "open"]
AskFn = Callable[[Any, str, "dict[str, str] | None"], str]

BENCHMARKS: tuple[str, ...] = ("mme", "pope", "mmbench")
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
POPE_SPLITS = ("adversarial", "popular", "random")
CIRCULAR_STRIDE = 1_000_000  # VLMEvalKit: rotation k of question i has index i + k * 1e6
_REQUIRED = ("index", "image", "question", "answer", "category")
_IMAGE_REF_MAX = 64  # VLMEvalKit: an image field this short is another row's index, not base64


@dataclass(frozen=True)
class VQAItem:
    """One question of a benchmark file, with everything scoring needs; ``source`` is ``file:line`` for errors."""

    benchmark: str
    index: int | str
    image: bytes  # the encoded picture (PNG/JPEG bytes), as stored in the TSV
    question: str
    answer: str  # "yes"/"no" for MME and POPE, the option letter for MMBench
    category: str
    source: str
    options: dict[str, str] | None = None  # MMBench: letter -> text, in letter order
    hint: str | None = None
    l2_category: str | None = None
    image_key: str = ""  # MME: the picture's name (image_path, else its content hash): its two questions share it
    extra: dict[str, str] = field(default_factory=dict)  # the file's other columns, kept for the samples file
    # Other question sets (the shapes VQA): a short free-form answer ("open"), asked as exactly this text (the
    # phrasing the model was trained on) instead of the benchmark's instruction.
    answer_kind: AnswerKind | None = None
    prompt_text: str | None = None

    @property
    def kind(self) -> AnswerKind:
        if self.answer_kind is not None:
            return self.answer_kind
        return "choice" if self.benchmark == "mmbench" else "yes_no"

    @property
    def splits(self) -> tuple[str, ...]:
        """POPE: the splits this row counts in (``"popular,random"`` -> both)."""
        return tuple(s.strip() for s in self.category.split(",") if s.strip())

    @property
    def prompt(self) -> str:
        """What the model is asked: MME/POPE's question with a yes/no instruction; MMBench's hint, question and
        lettered options (LLaVA's MMBench instruction), so a reply of one letter is what a trained model gives.
        ``prompt_text``, when set, is sent as it is."""
        if self.prompt_text is not None:
            return self.prompt_text
        if self.kind == "yes_no":
            q = self.question.strip()
            return q if "answer yes or no" in q.lower() else f"{q} Please answer yes or no."
        lines = [f"Hint: {self.hint}"] if self.hint else []
        lines.append(f"Question: {self.question.strip()}")
        lines += [f"{k}. {v}" for k, v in (self.options or {}).items()]
        lines.append("Answer with the option's letter from the given choices directly.")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ reading
@contextlib.contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    """csv's field limit (128 KiB) is process-wide; base64 images exceed it: raise it only while reading."""
    before = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(before)


def _cell(row: dict[str, str | None], col: str) -> str | None:
    v = row.get(col)
    return v if v is not None and v.strip() not in ("", "nan", "NaN") else None


def load_tsv(path: str | Path, benchmark: str) -> list[VQAItem]:
    """Read a VLMEvalKit-layout TSV of ``benchmark`` (``mme``, ``pope`` or ``mmbench``) into items.

    Every problem is an error naming ``file:line``, the column and the fix: a missing column or value, a duplicate
    index, base64 that does not decode, an image reference to no row, a yes/no answer that is neither, an MMBench
    answer that is not one of its options, a rotated MMBench row without its original.
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"{path}: unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{benchmark}: no TSV at {path} (VLMEvalKit's {benchmark.upper()} file is expected)")
    with _csv_field_limit(sys.maxsize), path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        columns = reader.fieldnames or []
        required = _REQUIRED + (("A", "B") if benchmark == "mmbench" else ())
        missing = [c for c in required if c not in columns]
        if missing:
            raise ValueError(f"{path}:1: missing column(s) {missing} for {benchmark}; the header has {columns}")
        rows = [(reader.line_num, row) for row in reader]
    raw_images = {}
    for line, row in rows:
        raw_images.setdefault(str(row["index"]).strip(), (line, row["image"]))
    items, seen = [], {}
    for line, row in rows:
        where = f"{path}:{line}"
        item = _parse_row(row, benchmark, where, raw_images)
        if item.index in seen:
            raise ValueError(f"{where}: column 'index': {item.index!r} repeats line {seen[item.index]}")
        seen[item.index] = line
        items.append(item)
    if benchmark == "mmbench":
        _check_rotations(items)
    logger.info(f"{path}: {len(items)} {benchmark} questions")
    return items


def _parse_row(row: dict[str, str | None], benchmark: str, where: str,
               raw_images: dict[str, tuple[int, str]]) -> VQAItem:
    for col in _REQUIRED:
        if _cell(row, col) is None:
            raise ValueError(f"{where}: column {col!r} is empty")
    index_text = row["index"].strip()
    index: int | str = int(index_text) if index_text.lstrip("-").isdigit() else index_text
    if benchmark == "mmbench" and not isinstance(index, int):
        raise ValueError(f"{where}: column 'index': {index_text!r} is not an integer (MMBench's circular variants "
                         f"are found by index modulo {CIRCULAR_STRIDE})")
    image = _decode_image_cell(row["image"].strip(), where, raw_images)
    answer = row["answer"].strip()
    options = None
    if benchmark == "mmbench":
        options = {k: _cell(row, k).strip() for k in string.ascii_uppercase if _cell(row, k) is not None}
        if answer not in options:
            raise ValueError(f"{where}: column 'answer': {answer!r} is not one of the options {sorted(options)}")
    else:
        answer = answer.lower()
        if answer not in ("yes", "no"):
            raise ValueError(f"{where}: column 'answer': {row['answer']!r} is neither Yes nor No")
    known = set(_REQUIRED) | set(string.ascii_uppercase) | {"hint", "l2-category", "image_path"}
    image_key = (_cell(row, "image_path") or "").strip() or hashlib.sha1(image).hexdigest()
    return VQAItem(
        benchmark=benchmark, index=index, image=image, question=row["question"], answer=answer,
        category=row["category"].strip(), source=where, options=options, hint=_cell(row, "hint"),
        l2_category=_cell(row, "l2-category"), image_key=image_key,
        extra={k: v for k, v in row.items() if k is not None and k not in known and v},
    )


def _decode_image_cell(cell: str, where: str, raw_images: dict[str, tuple[int, str]]) -> bytes:
    if len(cell) <= _IMAGE_REF_MAX:  # a reference to the row holding the picture
        target = raw_images.get(cell)
        if target is None or len(target[1].strip()) <= _IMAGE_REF_MAX:
            raise ValueError(f"{where}: column 'image': {cell!r} is neither base64 nor the index of a row holding "
                             f"an image")
        cell = target[1].strip()
    try:
        return base64.b64decode(cell, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{where}: column 'image': the base64 does not decode ({e})") from e


def _check_rotations(items: Sequence[VQAItem]) -> None:
    originals = {it.index for it in items if it.index < CIRCULAR_STRIDE}
    for it in items:
        if it.index >= CIRCULAR_STRIDE and it.index % CIRCULAR_STRIDE not in originals:
            raise ValueError(f"{it.source}: column 'index': rotated question {it.index} has no original "
                             f"{it.index % CIRCULAR_STRIDE} in the file")


# ------------------------------------------------------------------------------------------------ answers
_WORD = re.compile(r"[a-z]+")
_ANSWER_IS = re.compile(r"(?i:\banswer(?:\s+is)?)\s*:?\s*\(?([A-Z])\)?(?![A-Za-z])")  # the letter: capital
_BARE_LETTER = re.compile(r"^\s*\(?([A-Za-z])\)?\s*[.:)]?\s*$")
_LEADING_LETTER = re.compile(r"^\s*\(?([A-Z])\)?[.:)]\s")  # "A. red", "(B) blue", "C: ..."
_WORD_LETTER = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")
_ARTICLE_NEXT = re.compile(r"\s+(?!(?:or|and|is|was)\b)[a-z]")


def _norm(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def extract_answer(text: str | None, kind: AnswerKind, options: dict[str, str] | None = None) -> str | None:
    """The answer a free-form reply gives, or None when it gives none (counted wrong by the scorers).

    ``yes_no``: "Yes." / "yes" / "YES, it is" / "No" -> "yes" / "no": the first word if it is yes or no, else the
    one of the two that occurs alone. ``choice`` (``options``: letter -> text): "A", "A.", "(A)", "A. red", "The
    answer is A", a lone capital letter among the options ("I pick C"), or exactly one option's text ("red").
    """
    if text is None or not text.strip():
        return None
    if kind == "yes_no":
        words = _WORD.findall(text.lower())
        if words and words[0] in ("yes", "no"):
            return words[0]
        has_yes, has_no = "yes" in words, "no" in words
        return "yes" if has_yes and not has_no else "no" if has_no and not has_yes else None
    if kind == "open":  # a short answer compared as it is: lower case, words and numbers only ("Red." -> "red")
        return " ".join(re.findall(r"[a-z0-9]+", text.lower())) or None
    if kind != "choice":
        raise ValueError(f"extract_answer: unknown kind {kind!r}; known: yes_no, choice, open")
    letters = set(options or {})
    for pattern in (_BARE_LETTER, _ANSWER_IS, _LEADING_LETTER):
        m = pattern.search(text)
        if m and m.group(1).upper() in letters:
            return m.group(1).upper()
    norm = _norm(text)
    exact = [k for k, v in (options or {}).items() if _norm(v) == norm]
    if len(exact) == 1:
        return exact[0]
    by_text = [k for k, v in (options or {}).items() if _norm(v) and re.search(rf"\b{re.escape(_norm(v))}\b", norm)]
    if len(by_text) == 1:
        return by_text[0]
    # a lone capital letter: not the article "A" before a lower-case word ("A red circle"; "A or B" has two)
    found = {m.group(1) for m in _WORD_LETTER.finditer(text) if m.group(1) in letters
             and not (m.group(1) == "A" and _ARTICLE_NEXT.match(text[m.end():]))}
    return found.pop() if len(found) == 1 else None


# ------------------------------------------------------------------------------------------------ metrics
@dataclass(frozen=True)
class Scored:
    """One answered question: the item, the reply, the extracted answer and whether it is right."""

    item: VQAItem
    prediction: str
    extracted: str | None

    @property
    def correct(self) -> bool:
        return self.extracted is not None and self.extracted == self.item.answer


def _pct(num: float, den: float) -> float:
    return 100.0 * num / den if den else 0.0


def mme_scores(scored: Sequence[Scored]) -> dict[str, Any]:
    """Per subtask: acc (per question), acc+ (per picture: both of its questions right), score = acc + acc+
    (0-200); ``perception`` / ``cognition``: sums over the subtasks of each (MME's totals, 2000 and 800 at most).
    Subtasks absent from the file are listed under ``missing`` and add nothing."""
    by_cat: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for s in scored:
        by_cat[s.item.category][s.item.image_key].append(s.correct)
    subtasks = {}
    for cat, images in sorted(by_cat.items()):
        answers = [c for v in images.values() for c in v]
        acc = _pct(sum(answers), len(answers))
        acc_plus = _pct(sum(all(v) for v in images.values()), len(images))
        subtasks[cat] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "questions": len(answers),
                         "images": len(images)}
    out: dict[str, Any] = {"subtasks": subtasks}
    for name, cats in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        out[name] = sum(subtasks[c]["score"] for c in cats if c in subtasks)
        out[f"{name}_missing"] = [c for c in cats if c not in subtasks]
    out["total"] = out["perception"] + out["cognition"]
    unknown = sorted(set(subtasks) - set(MME_PERCEPTION) - set(MME_COGNITION))
    if unknown:
        logger.warning(f"MME: categories {unknown} are in neither perception nor cognition: scored, not summed")
    return out


def _binary_metrics(scored: Sequence[Scored]) -> dict[str, float]:
    """"yes" is the positive class; an unreadable reply counts wrong and as not-"yes" (VLMEvalKit's rule)."""
    tp = sum(s.item.answer == "yes" and s.extracted == "yes" for s in scored)
    fp = sum(s.item.answer == "no" and s.extracted == "yes" for s in scored)
    fn = sum(s.item.answer == "yes" and s.extracted != "yes" for s in scored)
    precision, recall = _pct(tp, tp + fp), _pct(tp, tp + fn)
    return {"accuracy": _pct(sum(s.correct for s in scored), len(scored)), "precision": precision,
            "recall": recall, "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": _pct(sum(s.extracted == "yes" for s in scored), len(scored)), "questions": len(scored)}


def pope_scores(scored: Sequence[Scored]) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 and the share of "yes" replies, per split and over all rows."""
    by_split: dict[str, list[Scored]] = defaultdict(list)
    for s in scored:
        for split in s.item.splits:
            by_split[split].append(s)
    return {"overall": _binary_metrics(scored), "splits": {k: _binary_metrics(v) for k, v in sorted(by_split.items())}}


def mmbench_scores(scored: Sequence[Scored]) -> dict[str, Any]:
    """Circular evaluation: a question (all rows with the same index modulo 1e6) counts only if every rotation of it
    is right; overall, per ``category`` and per ``l2-category`` (from the original row). ``vanilla``: accuracy of
    the original rows alone, for comparison."""
    groups: dict[int, list[Scored]] = defaultdict(list)
    for s in scored:
        groups[int(s.item.index) % CIRCULAR_STRIDE].append(s)
    passed = {g: all(s.correct for s in rows) for g, rows in groups.items()}
    main = {g: min(rows, key=lambda s: int(s.item.index)).item for g, rows in groups.items()}

    def by(attr: str) -> dict[str, float]:
        buckets: dict[str, list[bool]] = defaultdict(list)
        for g, ok in passed.items():
            key = getattr(main[g], attr)
            if key is not None:
                buckets[key].append(ok)
        return {k: _pct(sum(v), len(v)) for k, v in sorted(buckets.items())}

    originals = [s for s in scored if int(s.item.index) < CIRCULAR_STRIDE]
    return {"circular": _pct(sum(passed.values()), len(passed)), "questions": len(passed), "rows": len(scored),
            "vanilla": _pct(sum(s.correct for s in originals), len(originals)),
            "categories": by("category"), "l2_categories": by("l2_category")}


SCORERS: dict[str, Callable[[Sequence[Scored]], dict[str, Any]]] = {
    "mme": mme_scores, "pope": pope_scores, "mmbench": mmbench_scores}


def score(items: Sequence[VQAItem], predictions: dict[str, str],
          scorer: Callable[[Sequence[Scored]], dict[str, Any]] | None = None) -> tuple[dict[str, Any], list[Scored]]:
    """Extract every reply and score the benchmark of ``items`` (all of one benchmark); ``predictions`` is keyed by
    ``str(index)``. Unreadable replies are logged (count and examples) and count wrong. ``scorer``: the metrics of
    a question set outside ``SCORERS`` (default: the benchmark's own)."""
    benchmark = _one_benchmark(items)
    missing = [it.index for it in items if str(it.index) not in predictions]
    if missing:
        raise ValueError(f"{benchmark}: {len(missing)} question(s) have no reply, e.g. {missing[:5]}")
    scored = [Scored(it, predictions[str(it.index)],
                     extract_answer(predictions[str(it.index)], it.kind, it.options)) for it in items]
    unread = [s for s in scored if s.extracted is None]
    if unread:
        examples = "; ".join(f"{s.item.index}: {s.prediction[:60]!r}" for s in unread[:5])
        logger.warning(f"{benchmark}: {len(unread)}/{len(scored)} replies give no answer (counted wrong): {examples}")
    metrics = (scorer or SCORERS[benchmark])(scored)
    metrics["unreadable"] = len(unread)
    return metrics, scored


def _one_benchmark(items: Sequence[VQAItem]) -> str:
    kinds = {it.benchmark for it in items}
    if len(kinds) != 1:
        raise ValueError(f"run one benchmark at a time; got items of {sorted(kinds) or 'none'}")
    return kinds.pop()


# ------------------------------------------------------------------------------------------------ asking
def openai_ask_fn(base_url: str, model: str, api_key: str = "none", max_tokens: int = 32,
                  timeout_s: float = 600.0, **sampling: Any) -> AskFn:
    """An ``ask_fn`` that sends the picture as a ``data:`` URL and the prompt as one user turn to an
    OpenAI-compatible server (``base_url``: the server root or its ``/v1``). Greedy (temperature 0) unless
    ``sampling`` says otherwise; one client shared by the threads (httpx clients are thread-safe)."""
    import openai

    base_url = base_url.rstrip("/")
    client = openai.OpenAI(base_url=base_url if base_url.endswith("/v1") else base_url + "/v1", api_key=api_key,
                           timeout=timeout_s, max_retries=2)
    settings = {"temperature": 0.0, **sampling}

    def ask(image: Any, prompt: str, options: dict[str, str] | None = None) -> str:
        content = [{"type": "image_url", "image_url": {"url": image_data_url(image)}},
                   {"type": "text", "text": prompt}]
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                               max_tokens=max_tokens, **settings)
        return reply.choices[0].message.content or ""

    return ask


def image_data_url(image: Any) -> str:
    """``data:image/<format>;base64,...`` for encoded bytes (format read from the header) or a PIL image (PNG)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data, fmt = buf.getvalue(), "png"
    else:
        data = bytes(image)
        with Image.open(io.BytesIO(data)) as probe:
            fmt = (probe.format or "png").lower()
    return f"data:image/{fmt};base64,{base64.b64encode(data).decode()}"


def _read_answers(path: Path) -> dict[str, str]:
    """Replies already on disk, by ``str(index)`` (a torn last line is cut off: ``read_jsonl_log``)."""
    out = {}
    for n, rec in enumerate(read_jsonl_log(path), 1):
        try:
            out[str(rec["index"])] = str(rec["prediction"])
        except KeyError as e:
            raise ValueError(f"{path}: record {n}: not an answer record (no {e}); fix or delete the line") from e
    return out


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _write_jsonl_atomic(path: Path, records: Iterable[dict[str, Any]]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


def ask_all(items: Sequence[VQAItem], ask_fn: AskFn, answers_path: Path, parallel: int = 8) -> dict[str, str]:
    """Ask every item not yet in ``answers_path`` from ``parallel`` threads; each reply is appended (one write, then
    flushed) as it arrives, so an interrupted run loses only the questions in flight. Returns all replies.

    An ``ask_fn`` failure cancels the questions not yet sent and is re-raised naming the item; the replies already
    written stay, and a rerun asks the rest.
    """
    done = _read_answers(answers_path)
    todo = [it for it in items if str(it.index) not in done]
    if len(todo) < len(items):
        logger.info(f"{answers_path}: {len(items) - len(todo)} of {len(items)} questions already answered")
    if not todo:
        return done
    with answers_path.open("a", encoding="utf-8") as out, ThreadPoolExecutor(max(1, parallel)) as pool, \
            tqdm(total=len(todo), desc=f"{items[0].benchmark} questions", unit="q") as bar:
        futures = {pool.submit(ask_fn, it.image, it.prompt, it.options): it for it in todo}
        try:
            for fut in as_completed(futures):
                it = futures[fut]
                try:
                    reply = fut.result()
                except Exception as e:
                    raise RuntimeError(f"{it.benchmark} question {it.index} ({it.source}): asking failed: "
                                       f"{type(e).__name__}: {e}") from e
                out.write(json.dumps({"index": it.index, "prediction": reply}, ensure_ascii=False) + "\n")
                out.flush()
                done[str(it.index)] = reply
                bar.update()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return done


def run_vqa(items: Sequence[VQAItem], ask_fn: AskFn, out_dir: str | Path, parallel: int = 8,
            settings: dict[str, Any] | None = None,
            scorer: Callable[[Sequence[Scored]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Ask, extract, score one benchmark; writes ``answers.jsonl`` (resumable), ``samples.jsonl`` and
    ``results.json`` (metrics + ``settings``, e.g. the server, model, sampling and checkpoint hash) under
    ``out_dir``, and returns the results. ``scorer``: as in :func:`score`."""
    benchmark = _one_benchmark(items)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    predictions = ask_all(items, ask_fn, out / "answers.jsonl", parallel)
    metrics, scored = score(items, predictions, scorer)
    _write_jsonl_atomic(out / "samples.jsonl", (
        {"index": s.item.index, "category": s.item.category, "question": s.item.question, "answer": s.item.answer,
         "prediction": s.prediction, "extracted": s.extracted, "correct": s.correct, **s.item.extra}
        for s in scored))
    results = {"benchmark": benchmark, "metrics": metrics, "questions": len(items),
               "settings": {"parallel": parallel, **(settings or {})}}
    _write_json_atomic(out / "results.json", results)
    logger.info(f"{benchmark}: {_headline(benchmark, metrics)} -> {out / 'results.json'}")
    return results


def _headline(benchmark: str, m: dict[str, Any]) -> str:
    if benchmark == "mme":
        return f"perception {m['perception']:.1f}, cognition {m['cognition']:.1f}"
    if benchmark == "pope":
        return f"accuracy {m['overall']['accuracy']:.1f}, F1 {m['overall']['f1']:.1f}"
    if benchmark == "mmbench":
        return f"circular {m['circular']:.1f} ({m['questions']} questions), vanilla {m['vanilla']:.1f}"
    return ", ".join(f"{k} {v:.1f}" for k, v in m.items() if isinstance(v, float))  # another question set
