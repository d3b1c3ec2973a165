"""Records on disk (DESIGN.md section 3): one jsonl line per sample, read and written only here.

A record::

    {"id": "shapes-000012", "type": "image_text",
     "text": "two red circles left of a blue square",          # text-bearing types
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour?"}, {"from": "gpt", "value": "red"}],
     "images": [{"codes": [...], "grid": [16, 16], "tokenizer": "shapes-vq@1a2b3c4d", "levels": null}],
     "meta": {...}}                                              # free-form, carried through untouched

``levels`` is null for single-level tokenizers and a per-code list of codebook levels for multi-level ones
(HQ-VAE: the top code then its 2x2 bottom block, DESIGN.md section 2). A ``text`` record may carry pre-tokenised
``input_ids`` (text-vocabulary ids, trained verbatim) instead of its ``text``.

Rows in the reference Uni-X layout (no ``type``; ``data_type``, ``vqcode_512``, FineVision's ``^^^turn_split^^^``
/ ``^^^pair_split^^^`` turns, alpaca's ``instruction``/``input``/``output``, ``input_ids``, ``conversations``) are
converted into records here, at read time, by :func:`record_from_reference` (the table in its docstring); jsonl
and parquet files are read row by row by :func:`iter_rows` (a parquet "line" is its 1-based row number).

Every problem in a record is reported as ``file:line: field: problem``; the reader either raises it
(default: a bad corpus stops the job before any work) or hands it to a callback and skips the record.
Writers go through :class:`AtomicShardWriter`: a shard exists under its final name only when complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from loguru import logger

RecordType = Literal["text", "image_text", "t2i", "i2t", "conversation", "edit", "interleaved"]
RECORD_TYPES: tuple[str, ...] = ("text", "image_text", "t2i", "i2t", "conversation", "edit", "interleaved")
IMAGE_PLACEHOLDER = "<image>"
ROLES = ("human", "gpt", "system")
_TEXT_TYPES = ("text", "image_text", "t2i", "i2t")


class RecordError(ValueError):
    """A bad record; ``str(err)`` is ``file:line: field: problem``."""

    def __init__(self, path: str | os.PathLike | None, line: int | None, field_name: str, problem: str):
        self.path, self.line, self.field, self.problem = (str(path) if path else None), line, field_name, problem
        where = f"{self.path or '<record>'}:{line if line is not None else '?'}"
        super().__init__(f"{where}: {field_name}: {problem}")


@dataclass
class ImageCodes:
    """One image as VQ codes: ``codes`` in serialisation order, ``grid`` = [h, w] of the (top-level) code grid."""

    codes: list[int]
    grid: tuple[int, int]
    tokenizer: str
    levels: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"codes": list(self.codes), "grid": list(self.grid), "tokenizer": self.tokenizer, "levels": self.levels}


@dataclass
class Record:
    id: str
    type: str
    text: str | None = None
    conversations: list[dict[str, str]] | None = None
    images: list[ImageCodes] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    input_ids: list[int] | None = None  # text records only: pre-tokenised text ids, in place of ``text``

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "type": self.type}
        if self.text is not None:
            d["text"] = self.text
        if self.input_ids is not None:
            d["input_ids"] = list(self.input_ids)
        if self.conversations is not None:
            d["conversations"] = self.conversations
        d["images"] = [im.to_dict() for im in self.images]
        if self.meta:
            d["meta"] = self.meta
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------- parsing
def _parse_image(obj: Any, idx: int, err: Callable[[str, str], RecordError]) -> ImageCodes:
    fname = f"images[{idx}]"
    if not isinstance(obj, dict):
        raise err(fname, f"expected an object with codes/grid/tokenizer, got {type(obj).__name__}")
    for key in ("codes", "grid", "tokenizer"):
        if key not in obj:
            raise err(f"{fname}.{key}", "missing")
    codes, grid = obj["codes"], obj["grid"]
    # set(map(type, ...)) and min() run in C: a record of 1,024 codes is checked ~10x faster than by a Python loop
    # (``prepare_data`` validates every record of a corpus); bool is its own type, so True/False are refused as before
    if not isinstance(codes, list) or not set(map(type, codes)) <= {int}:
        raise err(f"{fname}.codes", "must be a list of integers")
    if codes and min(codes) < 0:
        raise err(f"{fname}.codes", f"negative code {min(codes)}")
    if not (isinstance(grid, list) and len(grid) == 2 and all(isinstance(g, int) and g > 0 for g in grid)):
        raise err(f"{fname}.grid", f"must be [height, width] of positive integers, got {grid!r}")
    levels = obj.get("levels")
    if levels is None:
        if len(codes) != grid[0] * grid[1]:
            raise err(f"{fname}.codes", f"{len(codes)} codes do not fill grid {grid} ({grid[0] * grid[1]} expected)")
    else:
        if not isinstance(levels, list) or len(levels) != len(codes) or not all(isinstance(v, int) and v >= 0 for v in levels):
            raise err(f"{fname}.levels", "must be a list of non-negative integers, one per code")
    if not isinstance(obj["tokenizer"], str) or not obj["tokenizer"]:
        raise err(f"{fname}.tokenizer", "must be a non-empty string")
    return ImageCodes(codes=codes, grid=(grid[0], grid[1]), tokenizer=obj["tokenizer"], levels=levels)


def record_from_dict(d: Any, path: str | os.PathLike | None = None, line: int | None = None) -> Record:
    """Validate one decoded json object and build a :class:`Record`; raise :class:`RecordError` on any problem."""

    def err(field_name: str, problem: str) -> RecordError:
        return RecordError(path, line, field_name, problem)

    if not isinstance(d, dict):
        raise err("<record>", f"expected a json object, got {type(d).__name__}")
    unknown = set(d) - {"id", "type", "text", "conversations", "images", "meta", "input_ids"}
    if unknown:
        raise err(sorted(unknown)[0], "unknown field (known: id, type, text, conversations, images, meta, input_ids)")
    if not isinstance(d.get("id"), str) or not d["id"]:
        raise err("id", "missing or not a non-empty string")
    rtype = d.get("type")
    if rtype not in RECORD_TYPES:
        raise err("type", f"{rtype!r} is not one of {', '.join(RECORD_TYPES)}")
    images_raw = d.get("images", [])
    if not isinstance(images_raw, list):
        raise err("images", "must be a list")
    images = [_parse_image(obj, i, err) for i, obj in enumerate(images_raw)]
    text, convs, input_ids = d.get("text"), d.get("conversations"), d.get("input_ids")
    if input_ids is not None and (rtype != "text" or text is not None):
        raise err("input_ids", "only a text record may carry input_ids, and then no text")
    if input_ids is not None and (not isinstance(input_ids, list) or not input_ids or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in input_ids)):
        raise err("input_ids", "must be a non-empty list of non-negative token ids")
    if rtype in _TEXT_TYPES:
        if input_ids is None and (not isinstance(text, str) or not text.strip()):
            raise err("text", f"a {rtype} record needs a non-empty text" + (" (or input_ids)" if rtype == "text" else ""))
        need_images = 0 if rtype == "text" else 1
        if len(images) != need_images:
            raise err("images", f"a {rtype} record has exactly {need_images} image(s), got {len(images)}")
    else:
        if not isinstance(convs, list) or not convs:
            raise err("conversations", f"a {rtype} record needs a non-empty conversations list")
        n_placeholders = 0
        for i, turn in enumerate(convs):
            if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
                raise err(f"conversations[{i}]", f"must be {{'from': one of {ROLES}, 'value': str}}")
            n_placeholders += turn["value"].count(IMAGE_PLACEHOLDER)
        if n_placeholders != len(images):
            raise err("images", f"{len(images)} image(s) but {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s)")
        if not any(t["from"] == "gpt" for t in convs):
            raise err("conversations", "no 'gpt' turn: nothing to train on")
    meta = d.get("meta", {})
    if not isinstance(meta, dict):
        raise err("meta", "must be an object")
    return Record(id=d["id"], type=rtype, text=text, conversations=convs, images=images, meta=meta, input_ids=input_ids)


def _decode_line(raw: str, path: str | os.PathLike, lineno: int) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise RecordError(path, lineno, "<json>", f"malformed json ({e.msg} at column {e.colno})") from e


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, decoded_object)`` for every non-blank line; malformed json raises ``RecordError``."""
    yield from iter_rows(path)


def iter_rows(path: str | os.PathLike, on_error: Callable[[RecordError], None] | None = None) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, decoded_row)`` of a jsonl file, or ``(row_number, row)`` of a ``.parquet`` file
    (1-based, nulls as None). A malformed json line is reported to ``on_error`` and skipped, or raised without it;
    an unreadable parquet file always raises."""
    if Path(path).suffix == ".parquet":
        yield from _iter_parquet(path)
        return
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = _decode_line(raw, path, lineno)
            except RecordError as e:
                if on_error is None:
                    raise
                on_error(e)
                continue
            yield lineno, obj


def _iter_parquet(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow as pa  # lazily: only parquet inputs pay for the import
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise RecordError(path, None, "<parquet>", f"unreadable parquet file ({e})") from e
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):  # bounded memory on multi-GB shards
        for obj in batch.to_pylist():
            row += 1
            yield row, obj


def record_from_row(d: Any, path: str | os.PathLike | None = None, line: int | None = None) -> Record:
    """A decoded row -> :class:`Record`: this toolkit's records (they have a ``type``) through
    :func:`record_from_dict`, the reference's rows (they have none) through :func:`record_from_reference`."""
    if isinstance(d, dict) and "type" not in d:
        return record_from_reference(d, path, line)
    return record_from_dict(d, path, line)


def read_records(
    path: str | os.PathLike, on_error: Callable[[RecordError], None] | None = None
) -> Iterator[tuple[int, Record]]:
    """Yield ``(line_number, Record)`` of a jsonl or parquet file, in this toolkit's layout or the reference's.
    With ``on_error`` bad rows are reported to it and skipped; else they raise."""
    for lineno, obj in iter_rows(path, on_error):
        try:
            yield lineno, record_from_row(obj, path, lineno)
        except RecordError as e:
            if on_error is None:
                raise
            on_error(e)


# ---------------------------------------------------------------------------------- the reference's rows
REFERENCE_IMAGE_TYPES = ("image_text", "t2i", "i2t", "i2t_multi", "i2t_reverse")  # its collator's type_for_img_text
REFERENCE_DATA_TYPES = ("text", *REFERENCE_IMAGE_TYPES)
# Every column the reference reads (configs/data_features.py, the alpaca and pre-tokenised branches of its collator);
# the unused ones (its bookkeeping: score, length, meta, ...; FineVision's 'no' placeholders) are accepted and dropped.
REFERENCE_FIELDS = ("id", "data_type", "text", "caption", "conversations", "instruction", "input", "output", "input_ids",
                    "vqcode_512", "vqcode_multi768", "width", "height", "length", "score", "meta", "metadata")
REFERENCE_CODE_FIELD = "vqcode_512"
REFERENCE_IMAGE_TOKENIZER = "uni_x_reference"  # codes of the reference's VQGAN (Chameleon's, 8,192 codes)
TURN_SPLIT, PAIR_SPLIT = "^^^turn_split^^^", "^^^pair_split^^^"  # FineVision turns, as its encode script joins them
ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "system": "system"}


def record_from_reference(
    d: dict[str, Any], path: str | os.PathLike | None = None, line: int | None = None, *,
    code_field: str = REFERENCE_CODE_FIELD, grid: tuple[int, int] | None = None,
    image_tokenizer: str = REFERENCE_IMAGE_TOKENIZER,
) -> Record:
    """Convert one row of the reference Uni-X layout into a :class:`Record`; errors name the reference's field.

    A null value counts as absent (parquet and the reference's ``datasets`` features give every column to every
    row). ``data_type`` absent means ``text``. Rules, in the reference collator's order of precedence:

    ========================================  ======================================================================
    reference row                             record
    ========================================  ======================================================================
    text + ``input_ids``                      ``text`` with ``input_ids`` (trained verbatim, nothing added)
    text + ``instruction``/``input``/``output``  ``conversation``: human ``instruction\ninput`` (no ``\n`` when the
    (alpaca; ``text`` null)                   input is empty), gpt ``output``
    text + ``conversations`` (``text`` null)  ``conversation`` without image
    text + ``text``                           ``text``
    ``image_text`` / ``t2i``                  ``image_text`` / ``t2i`` of ``text`` (else ``caption``) and the codes
    ``i2t*`` + ``conversations``              ``conversation``; the image opens the first human turn
    ``i2t*`` + ``text`` with ``^^^pair_split^^^``  ``conversation`` of the FineVision turns (``q^^^pair_split^^^a``
                                              joined by ``^^^turn_split^^^``); a single turn with an empty question
                                              is a caption: ``i2t`` (the question is drawn from the template's)
    ``i2t`` / ``i2t_reverse`` + plain text    ``i2t`` (caption)
    ========================================  ======================================================================

    Roles: ``human``/``user``, ``gpt``/``assistant``, ``system``. The image goes where a conversation's single
    ``<image>`` placeholder is, else in front of the first human turn, as the reference puts it before all turns.
    The codes (``code_field``, a JSON string or a list) fill ``grid``, by default the square they make (1,024
    codes: 32x32). ``id``: the row's, else ``<file name>:<line>``.
    """

    def err(field_name: str, problem: str) -> RecordError:
        return RecordError(path, line, field_name, problem)

    unknown = sorted(set(d) - set(REFERENCE_FIELDS) - {code_field})
    if unknown:
        raise err(unknown[0], f"unknown field of a reference row (known: {', '.join(REFERENCE_FIELDS)}); a record "
                              f"in this toolkit's layout needs a 'type'")
    row = {k: v for k, v in d.items() if v is not None}
    rid = row.get("id") if isinstance(row.get("id"), str) and row["id"] else f"{Path(path or 'row').name}:{line}"
    data_type = row.get("data_type", "text")
    if data_type not in REFERENCE_DATA_TYPES:
        raise err("data_type", f"{data_type!r} is not one of {', '.join(REFERENCE_DATA_TYPES)}")
    if data_type == "text":
        record = _reference_text_row(row, rid, err)
    else:
        image = _reference_codes(row.get(code_field), code_field, grid, image_tokenizer, err)
        record = _reference_image_row(row, data_type, rid, image, err)
    return record_from_dict(record.to_dict(), path, line)  # this toolkit's invariants, checked in their one place


def _nonempty_str(row: dict[str, Any], key: str) -> str | None:
    value = row.get(key)
    return value if isinstance(value, str) and value.strip() else None


def _reference_text_row(row: dict[str, Any], rid: str, err: Callable[[str, str], RecordError]) -> Record:
    if "input_ids" in row:
        ids = row["input_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                           for i in ids):
            raise err("input_ids", "must be a non-empty list of non-negative token ids")
        return Record(id=rid, type="text", input_ids=list(ids))
    if "text" not in row and "instruction" in row:
        instruction, output, extra = row["instruction"], row.get("output"), row.get("input", "")
        if not isinstance(instruction, str) or not instruction.strip():
            raise err("instruction", "an alpaca row needs a non-empty instruction")
        if not isinstance(extra, str):
            raise err("input", f"must be a string, got {type(extra).__name__}")
        if not isinstance(output, str) or not output.strip():
            raise err("output", "an alpaca row needs a non-empty output")
        question = f"{instruction}\n{extra}" if extra.strip() else instruction
        return Record(id=rid, type="conversation", conversations=[
            {"from": "human", "value": question}, {"from": "gpt", "value": output}])
    if "text" not in row and "conversations" in row:
        turns = _reference_turns(row["conversations"], err)
        if any(IMAGE_PLACEHOLDER in t["value"] for t in turns):
            raise err("conversations", f"{IMAGE_PLACEHOLDER} in a text row (data_type text has no image)")
        return Record(id=rid, type="conversation", conversations=turns)
    text = _nonempty_str(row, "text")
    if text is None:
        raise err("text", "a text row needs a non-empty text (or input_ids, instruction/output, conversations)")
    return Record(id=rid, type="text", text=text)


def _reference_image_row(row: dict[str, Any], data_type: str, rid: str, image: ImageCodes,
                         err: Callable[[str, str], RecordError]) -> Record:
    text = _nonempty_str(row, "text") or _nonempty_str(row, "caption")
    if data_type not in ("image_text", "t2i") and row.get("conversations"):  # an empty list counts as absent, as there
        turns = _place_image(_reference_turns(row["conversations"], err), err)
        return Record(id=rid, type="conversation", conversations=turns, images=[image])
    if text is None:
        raise err("text", f"a {data_type} row needs a non-empty text (or caption)")
    if data_type in ("image_text", "t2i"):
        return Record(id=rid, type=data_type, text=text, images=[image])
    if PAIR_SPLIT in text or data_type == "i2t_multi":
        turns = _finevision_turns(text, err)
        if len(turns) == 2 and not turns[0]["value"].strip():  # the reference asks a random captioning question
            return Record(id=rid, type="i2t", text=turns[1]["value"], images=[image])
        return Record(id=rid, type="conversation", conversations=_place_image(turns, err), images=[image])
    return Record(id=rid, type="i2t", text=text, images=[image])


def _finevision_turns(text: str, err: Callable[[str, str], RecordError]) -> list[dict[str, str]]:
    turns = []
    for k, turn in enumerate(text.split(TURN_SPLIT)):
        pair = turn.split(PAIR_SPLIT)
        if len(pair) != 2:
            raise err("text", f"turn {k} has {len(pair) - 1} '{PAIR_SPLIT}' (expected exactly one: turns are "
                              f"'question{PAIR_SPLIT}answer' joined by '{TURN_SPLIT}')")
        if not pair[1].strip():
            raise err("text", f"turn {k} has an empty answer: nothing to train on")
        turns += [{"from": "human", "value": pair[0]}, {"from": "gpt", "value": pair[1]}]
    return turns


def _reference_turns(convs: Any, err: Callable[[str, str], RecordError]) -> list[dict[str, str]]:
    if not isinstance(convs, list) or not convs:
        raise err("conversations", "must be a non-empty list of {from, value}")
    turns = []
    for i, turn in enumerate(convs):
        role = ROLE_ALIASES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise err(f"conversations[{i}]", f"must be {{'from': one of {', '.join(ROLE_ALIASES)}, 'value': str}}")
        turns.append({"from": role, "value": turn["value"]})
    if not any(t["from"] == "gpt" and t["value"].strip() for t in turns):
        raise err("conversations", "no non-empty gpt/assistant turn: nothing to train on")
    return turns


def _place_image(turns: list[dict[str, str]], err: Callable[[str, str], RecordError]) -> list[dict[str, str]]:
    """The row's one image: at its ``<image>`` placeholder, else opening the first human turn."""
    n = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
    if n > 1:
        raise err("conversations", f"{n} {IMAGE_PLACEHOLDER} placeholders, but a reference row has one image")
    if n == 1:
        return turns
    first = next((i for i, t in enumerate(turns) if t["from"] == "human"), None)
    if first is None:
        raise err("conversations", "no human/user turn to carry the image")
    value = turns[first]["value"]
    turns = [dict(t) for t in turns]
    turns[first]["value"] = IMAGE_PLACEHOLDER + ("\n" + value if value else "")
    return turns


def _reference_codes(raw: Any, field_name: str, grid: tuple[int, int] | None, image_tokenizer: str,
                     err: Callable[[str, str], RecordError]) -> ImageCodes:
    if raw is None:
        raise err(field_name, "missing: an image row carries its VQ codes here")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise err(field_name, f"not a JSON list ({e.msg})") from e
    if not isinstance(raw, list) or not raw or not all(isinstance(c, int) and not isinstance(c, bool) for c in raw):
        raise err(field_name, "must be a non-empty list of integer codes (or its JSON string)")
    if min(raw) < 0:
        raise err(field_name, f"negative code {min(raw)}")
    if grid is None:
        side = math.isqrt(len(raw))
        if side * side != len(raw):
            raise err(field_name, f"{len(raw)} codes do not make a square grid (pass the grid)")
        grid = (side, side)
    elif len(raw) != grid[0] * grid[1]:
        raise err(field_name, f"{len(raw)} codes, grid {grid[0]}x{grid[1]} needs {grid[0] * grid[1]}")
    return ImageCodes(codes=raw, grid=(grid[0], grid[1]), tokenizer=image_tokenizer)


class AtomicShardWriter:
    """Write jsonl lines to ``<final>.tmp-<pid>`` and rename to ``final`` on :meth:`commit` (atomic on POSIX).

    Use as a context manager: leaving the block normally commits; an exception leaves no final file behind.
    """

    def __init__(self, final_path: str | os.PathLike):
        self.final_path = Path(final_path)
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_path = self.final_path.with_name(f"{self.final_path.name}.tmp-{os.getpid()}")
        self._f = open(self.tmp_path, "w", encoding="utf-8")
        self.count = 0

    def write(self, record: Record | dict) -> None:
        line = record.to_json() if isinstance(record, Record) else json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        self._f.write(line + "\n")
        self.count += 1

    def commit(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp_path, self.final_path)
        fsync_dir(self.final_path.parent)  # the rename itself survives a power loss only once its directory is synced

    def abort(self) -> None:
        self._f.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "AtomicShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so that renames and new entries in it are durable (POSIX; a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it is renamed to ``path`` (atomic on POSIX), on an
    exception it is removed: a killed or failed writer never leaves a truncated file under the final name.

    ``durable``: also fsync the file before the rename and its directory after it, so the file survives a power
    loss (for bookkeeping that later steps trust, like the encoder's unit files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str, durable: bool = False) -> None:
    """Write a small file (manifest, json result) atomically; ``durable``: see :func:`atomic_path`."""
    with atomic_path(path, durable) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_jsonl_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of an append-only jsonl log (results, cached answers). A torn last line (a run killed mid-write) is
    cut off the file so appends start on a fresh line; a bad line elsewhere is an error naming it."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        logger.warning(f"{path}: dropping a torn last line ({len(data) - cut} bytes) left by an interrupted run")
        with path.open("r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    out = []
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: malformed json ({e.msg}); fix or delete the line") from e
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        out.append(rec)
    return out
