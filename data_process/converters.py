"""Input formats -> a deterministic stream of work items (DESIGN.md section 3).

Each converter turns one :class:`~data_process.data_config.DatasetSpec` into an iterator of

* :class:`WorkItem`: a stable ``id``, a record skeleton (``images`` still empty unless the input is already
  encoded, as ``uni_x_ref`` is) and the :class:`ImageSource` of every image the record needs, in placeholder order;
* :class:`BadItem`: an input that cannot become a record (malformed json, missing field, placeholder/image count
  mismatch, codes out of range), with a reason the encoder counts in its manifest.

Both occupy one position of the stream, so item ``k`` is the same input on every run and in every worker: the
encoder's sharding and resume rely on that. Converters never read image pixels: a worker enumerates the whole
stream and only opens the images of the items it owns (:meth:`ImageSource.read_bytes`).

Formats: ``image_folder`` (captions jsonl), ``webdataset`` (tar shards, stdlib ``tarfile``), ``llava`` (LLaVA /
ILLUME conversations: understanding, text-to-image, two-image editing), ``uni_x_ref`` (the Uni-X reference rows, converted
by ``data_process.schema.record_from_reference``, the same conversion training applies at read time) and ``text_jsonl``.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from data_process.data_config import DatasetSpec
from data_process.schema import IMAGE_PLACEHOLDER, ROLE_ALIASES, Record, RecordError, record_from_reference
from modeling.vq.preprocess import decode_image

if TYPE_CHECKING:
    from PIL import Image

# Skip reasons (manifest keys); the encoder adds the image-level ones.
MALFORMED_JSON = "malformed_json"
BAD_RECORD = "bad_record"
BAD_CODES = "bad_codes"
UNREADABLE_SHARD = "unreadable_shard"

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp")  # webdataset image keys, by preference


@dataclass(frozen=True)
class ImageSource:
    """Where one image's bytes are: a file, a member of an uncompressed tar (offset/size), or bytes in memory.

    Reading is deferred so that enumerating a dataset costs no image I/O.
    """

    path: str
    member: str | None = None
    offset: int = 0
    size: int = -1
    data: bytes | None = None  # members of compressed tars, which cannot be seeked into

    @property
    def label(self) -> str:
        return f"{self.path}:{self.member}" if self.member else self.path

    def read_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        with open(self.path, "rb") as f:
            if self.member is None:
                return f.read()
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"tar member {self.member} of {self.path} is truncated ({len(data)} of {self.size} bytes)")
        return data

    def open(self) -> "Image.Image":
        """The decoded RGB image, through the one loading path every tokenizer shares
        (:func:`modeling.vq.preprocess.decode_image`: EXIF orientation, 16-bit scaling, alpha onto white)."""
        return decode_image(self.read_bytes())


@dataclass
class WorkItem:
    id: str
    record: Record
    images: list[ImageSource]
    file: str  # input file the item came from (relative to the dataset root), for error reports
    line: int | None = None


@dataclass
class BadItem:
    id: str
    file: str
    line: int | None
    reason: str
    detail: str


Item = WorkItem | BadItem


@dataclass
class _Ctx:
    """Per-input-line context: builds ids and bad items that name the file and line."""

    spec: DatasetSpec
    file: str
    line: int | None
    key: str | None = None
    given_id: Any = field(default=None)

    @property
    def id(self) -> str:
        if self.given_id is not None and str(self.given_id):
            return f"{self.spec.name}/{self.given_id}"
        return f"{self.spec.name}/{self.key or f'{self.file}:{self.line}'}"

    def bad(self, reason: str, detail: str) -> BadItem:
        return BadItem(self.id, self.file, self.line, reason, detail)

    @property
    def where(self) -> str:
        """``file:line`` (``file:key`` for tar members): the prefix of every message about this input."""
        return f"{self.file}:{self.line}" if self.line is not None else f"{self.file}:{self.key}"

    def meta(self) -> dict[str, Any]:
        return {"dataset": self.spec.name, "source": self.where}


def _rel(spec: DatasetSpec, path: Path) -> str:
    try:
        return str(path.relative_to(spec.root))
    except ValueError:
        return str(path)


def _iter_json_lines(spec: DatasetSpec) -> Iterator[tuple[_Ctx, Any]]:
    """Every non-blank line of every annotation file; a malformed line yields ``(ctx, BadItem)``."""
    for path in spec.annotation_paths():
        rel = _rel(spec, path)
        with open(path, encoding="utf-8") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                ctx = _Ctx(spec, rel, lineno)
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as e:
                    yield ctx, ctx.bad(MALFORMED_JSON, f"{rel}:{lineno}: malformed json ({e.msg} at column {e.colno})")
                    continue
                if not isinstance(obj, dict):
                    yield ctx, ctx.bad(MALFORMED_JSON, f"{rel}:{lineno}: expected a json object, got {type(obj).__name__}")
                    continue
                ctx.given_id = obj.get("id")
                yield ctx, obj


def _caption(spec: DatasetSpec, obj: dict) -> str | None:
    for name in spec.caption_fields:
        value = obj.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _json_rows(convert: Callable[[DatasetSpec, _Ctx, dict], Item]) -> Callable[[DatasetSpec], Iterator[Item]]:
    """Lift a per-row converter to a dataset converter (malformed lines pass through as bad items)."""

    def iterate(spec: DatasetSpec) -> Iterator[Item]:
        for ctx, obj in _iter_json_lines(spec):
            yield obj if isinstance(obj, BadItem) else convert(spec, ctx, obj)

    iterate.__doc__ = convert.__doc__
    return iterate


# ------------------------------------------------------------------------------------------- image_folder
def _image_folder_row(spec: DatasetSpec, ctx: _Ctx, obj: dict) -> Item:
    """``{"id"?, "image": rel_path, "caption" | "text"}`` -> one image_text (or t2i / i2t) record."""
    image, caption = obj.get("image"), _caption(spec, obj)
    if not isinstance(image, str) or not image:
        return ctx.bad(BAD_RECORD, f"{ctx.where}: image: missing or not a path string")
    if caption is None:
        return ctx.bad(BAD_RECORD, f"{ctx.where}: {'/'.join(spec.caption_fields)}: no non-empty caption")
    record = Record(id=ctx.id, type=spec.record_type or "image_text", text=caption, meta=ctx.meta())
    return WorkItem(ctx.id, record, [ImageSource(str(spec.image_root / image))], ctx.file, ctx.line)


# ------------------------------------------------------------------------------------------------- llava
def _classify_conversation(convs: list[dict[str, str]]) -> tuple[str, str | None]:
    """Record type of a LLaVA/ILLUME conversation by where its images sit, plus the t2i prompt if any.

    Images only in human turns: understanding (``conversation``). One human turn then a gpt turn that is just
    ``<image>``: ``t2i`` (its prompt becomes the text). One image in the human turn and one in the gpt turn:
    ``edit``. Anything else with images in gpt turns stays a ``conversation``.
    """
    in_human = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in convs if t["from"] != "gpt")
    in_gpt = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in convs if t["from"] == "gpt")
    roles = [t["from"] for t in convs]
    if in_gpt == 1 and in_human == 0 and roles == ["human", "gpt"] and convs[1]["value"].strip() == IMAGE_PLACEHOLDER:
        prompt = convs[0]["value"].strip()
        if prompt:
            return "t2i", prompt
    if in_gpt == 1 and in_human == 1:
        return "edit", None
    return "conversation", None


def _llava_row(spec: DatasetSpec, ctx: _Ctx, obj: dict) -> Item:
    """LLaVA / ILLUME row: ``images`` list (or ``image`` str) + ``conversations`` with ``<image>`` placeholders."""
    where = ctx.where
    images = obj.get("images", obj.get("image", []))
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        return ctx.bad(BAD_RECORD, f"{where}: images: must be a path string or a list of path strings")
    raw_convs = obj.get("conversations")
    if not isinstance(raw_convs, list) or not raw_convs:
        return ctx.bad(BAD_RECORD, f"{where}: conversations: missing or empty")
    convs: list[dict[str, str]] = []
    for i, turn in enumerate(raw_convs):
        role = ROLE_ALIASES.get(turn.get("from", turn.get("role"))) if isinstance(turn, dict) else None
        value = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if role is None or not isinstance(value, str):
            return ctx.bad(BAD_RECORD, f"{where}: conversations[{i}]: must be {{'from': human|gpt|system, 'value': str}}")
        convs.append({"from": role, "value": value})
    n_placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in convs)
    if n_placeholders != len(images):
        return ctx.bad(BAD_RECORD, f"{where}: images: {len(images)} image(s) but {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s)")
    if not any(t["from"] == "gpt" for t in convs):
        return ctx.bad(BAD_RECORD, f"{where}: conversations: no gpt turn, nothing to train on")
    rtype, prompt = _classify_conversation(convs)
    if rtype == "t2i":
        record = Record(id=ctx.id, type="t2i", text=prompt, meta=ctx.meta())
    else:
        record = Record(id=ctx.id, type=rtype, conversations=convs, meta=ctx.meta())
    sources = [ImageSource(str(spec.image_root / p)) for p in images]
    return WorkItem(ctx.id, record, sources, ctx.file, ctx.line)


# ---------------------------------------------------------------------------------------------- uni_x_ref
def _uni_x_ref_row(spec: DatasetSpec, ctx: _Ctx, obj: dict) -> Item:
    """Uni-X reference row (``data_type``, ``text``/``caption``, ``vqcode_512``, FineVision turns, alpaca,
    ``input_ids``, ``conversations``): already encoded, converted as training reads it; codes checked against the
    codebook that made them."""
    try:
        record = record_from_reference(obj, ctx.file, ctx.line, code_field=spec.code_field, grid=tuple(spec.grid),
                                       image_tokenizer=spec.tokenizer_name)
    except RecordError as e:
        return ctx.bad(BAD_CODES if e.field == spec.code_field else BAD_RECORD, str(e))
    codes = record.images[0].codes if record.images else []
    bad = [c for c in codes if c >= spec.codebook_size]
    if bad:
        return ctx.bad(BAD_CODES, f"{ctx.where}: {spec.code_field}: code {bad[0]} outside the codebook [0, {spec.codebook_size})")
    record.id, record.meta = ctx.id, ctx.meta()
    return WorkItem(ctx.id, record, [], ctx.file, ctx.line)


# -------------------------------------------------------------------------------------------- text_jsonl
def _text_row(spec: DatasetSpec, ctx: _Ctx, obj: dict) -> Item:
    """``{"id"?, "text"}`` -> one text record."""
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        return ctx.bad(BAD_RECORD, f"{ctx.where}: text: missing or empty")
    return WorkItem(ctx.id, Record(id=ctx.id, type="text", text=text, meta=ctx.meta()), [], ctx.file, ctx.line)


# -------------------------------------------------------------------------------------------- webdataset
def _tar_key(member_name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first '.' of the basename, the rest the extension."""
    directory, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _webdataset_sample(spec: DatasetSpec, ctx: _Ctx, parts: dict[str, tuple[tarfile.TarInfo, bytes | None]],
                       tar_path: str, read: Callable[[tarfile.TarInfo], bytes]) -> Item:
    """One sample (all members sharing a key) -> an image_text item; caption from json's caption field, else txt."""
    where = f"{ctx.file}: key {ctx.key}"
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
    if image_ext is None:
        return ctx.bad(BAD_RECORD, f"{where}: no image member ({'/'.join(IMAGE_EXTENSIONS)}) among {sorted(parts)}")
    caption = None
    if "json" in parts:
        try:
            obj = json.loads(read(parts["json"][0]))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return ctx.bad(MALFORMED_JSON, f"{where}: {ctx.key}.json: malformed json ({e})")
        caption = _caption(spec, obj) if isinstance(obj, dict) else None
    if caption is None and "txt" in parts:
        caption = read(parts["txt"][0]).decode("utf-8", errors="replace").strip() or None
    if caption is None:
        return ctx.bad(BAD_RECORD, f"{where}: no caption ({'/'.join(spec.caption_fields)} in .json, or .txt)")
    info, data = parts[image_ext]
    source = ImageSource(tar_path, info.name, info.offset_data, info.size, data)
    record = Record(id=ctx.id, type=spec.record_type or "image_text", text=caption, meta=ctx.meta())
    return WorkItem(ctx.id, record, [source], ctx.file, None)


def _shard_stem(rel: str) -> str:
    """``shards/cc3m-0001.tar.gz`` -> ``shards/cc3m-0001`` (the shard's part of every item id)."""
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if rel.endswith(suffix):
            return rel[: -len(suffix)]
    return rel


def _iter_tar_groups(tf: tarfile.TarFile, eager: bool) -> Iterator[tuple[str, dict[str, tuple[tarfile.TarInfo, bytes | None]]]]:
    """Consecutive members sharing a key, as webdataset writes them. ``eager`` reads image bytes now (gz tars)."""
    key, parts = None, {}
    for info in tf:
        if not info.isfile():
            continue
        k, ext = _tar_key(info.name)
        if k != key and parts:
            yield key, parts
            parts = {}
        key = k
        data = tf.extractfile(info).read() if eager and ext in IMAGE_EXTENSIONS else None
        parts[ext] = (info, data)
    if parts:
        yield key, parts


def iter_webdataset(spec: DatasetSpec) -> Iterator[Item]:
    """BLIP3o-style tar shards (``key.jpg`` + ``key.txt`` and/or ``key.json``) read with the stdlib ``tarfile``.

    Uncompressed tars (the usual case) are indexed by member offset so image bytes are read only by the worker
    that encodes them; compressed tars cannot be seeked into, so their image bytes are read while enumerating.
    A tar that breaks mid-way yields one ``unreadable_shard`` item and the shard's remaining samples are lost.
    """
    for path in spec.shard_paths():
        rel = _rel(spec, path)
        try:
            tf, eager = tarfile.open(path, mode="r:"), False
        except tarfile.ReadError:
            try:
                tf, eager = tarfile.open(path, mode="r:*"), True
            except (tarfile.ReadError, OSError) as e:
                yield BadItem(f"{spec.name}/{rel}", rel, None, UNREADABLE_SHARD, f"{rel}: cannot open tar ({e})")
                continue
        with tf:
            try:
                for key, parts in _iter_tar_groups(tf, eager):
                    ctx = _Ctx(spec, rel, None, key=f"{_shard_stem(rel)}/{key}")
                    yield _webdataset_sample(spec, ctx, parts, str(path), lambda i: tf.extractfile(i).read())
            except (tarfile.TarError, OSError, EOFError) as e:
                yield BadItem(f"{spec.name}/{rel}#error", rel, None, UNREADABLE_SHARD, f"{rel}: tar breaks off ({e})")


CONVERTERS: dict[str, Callable[[DatasetSpec], Iterator[Item]]] = {
    "image_folder": _json_rows(_image_folder_row),
    "llava": _json_rows(_llava_row),
    "uni_x_ref": _json_rows(_uni_x_ref_row),
    "text_jsonl": _json_rows(_text_row),
    "webdataset": iter_webdataset,
}


def iter_items(spec: DatasetSpec) -> Iterator[Item]:
    """The deterministic item stream of one dataset (same order on every call, in every process)."""
    return CONVERTERS[spec.format](spec)
