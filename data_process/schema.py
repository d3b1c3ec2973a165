"""Records on disk (DESIGN.md section 3): one jsonl line per sample, read and written only here.

A record::

    {"id": "shapes-000012", "type": "image_text",
     "text": "two red circles left of a blue square",          # text-bearing types
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour?"}, {"from": "gpt", "value": "red"}],
     "images": [{"codes": [...], "grid": [16, 16], "tokenizer": "shapes-vq@1a2b3c4d", "levels": null}],
     "meta": {...}}                                              # free-form, carried through untouched

``levels`` is null for single-level tokenizers and a per-code list of codebook levels for multi-level ones
(HQ-VAE: the top code then its 2x2 bottom block, DESIGN.md section 2).

Every problem in a record is reported as ``file:line: field: problem``; the reader either raises it
(default: a bad corpus stops the job before any work) or hands it to a callback and skips the record.
Writers go through :class:`AtomicShardWriter`: a shard exists under its final name only when complete.
"""

from __future__ import annotations

import contextlib
import json
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

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "type": self.type}
        if self.text is not None:
            d["text"] = self.text
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
    if not isinstance(codes, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in codes):
        raise err(f"{fname}.codes", "must be a list of integers")
    if any(c < 0 for c in codes):
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
    unknown = set(d) - {"id", "type", "text", "conversations", "images", "meta"}
    if unknown:
        raise err(sorted(unknown)[0], "unknown field (known: id, type, text, conversations, images, meta)")
    if not isinstance(d.get("id"), str) or not d["id"]:
        raise err("id", "missing or not a non-empty string")
    rtype = d.get("type")
    if rtype not in RECORD_TYPES:
        raise err("type", f"{rtype!r} is not one of {', '.join(RECORD_TYPES)}")
    images_raw = d.get("images", [])
    if not isinstance(images_raw, list):
        raise err("images", "must be a list")
    images = [_parse_image(obj, i, err) for i, obj in enumerate(images_raw)]
    text, convs = d.get("text"), d.get("conversations")
    if rtype in _TEXT_TYPES:
        if not isinstance(text, str) or not text.strip():
            raise err("text", f"a {rtype} record needs a non-empty text")
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
    return Record(id=d["id"], type=rtype, text=text, conversations=convs, images=images, meta=meta)


def _decode_line(raw: str, path: str | os.PathLike, lineno: int) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise RecordError(path, lineno, "<json>", f"malformed json ({e.msg} at column {e.colno})") from e


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, decoded_object)`` for every non-blank line; malformed json raises ``RecordError``."""
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                yield lineno, _decode_line(raw, path, lineno)


def read_records(
    path: str | os.PathLike, on_error: Callable[[RecordError], None] | None = None
) -> Iterator[tuple[int, Record]]:
    """Yield ``(line_number, Record)``. With ``on_error`` bad lines are reported to it and skipped; else they raise."""
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield lineno, record_from_dict(_decode_line(raw, path, lineno), path, lineno)
            except RecordError as e:
                if on_error is None:
                    raise
                on_error(e)


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
