"""The data config: one YAML listing every dataset the encoder converts (the role of ILLUME's metadata config).

Format::

    datasets:
      - {name: shapes_captions, format: image_folder, root: ., image_dir: images, annotations: [captions.jsonl],
         encode_images: true, record_type: image_text}
      - {name: shapes_vqa, format: llava, root: ., image_dir: ., annotations: [vqa.jsonl], encode_images: true}
      - {name: shapes_text, format: text_jsonl, root: ., annotations: [text.jsonl], encode_images: false}
      - {name: cc3m, format: webdataset, root: /data/cc3m, shards: ["*.tar"]}
      - {name: uni_x_ct, format: uni_x_ref, root: ., annotations: [ref.jsonl], codebook_size: 8192,
         tokenizer_name: "chameleon@0123456789ab"}

``root`` is relative to the YAML's directory; ``image_dir``, ``annotations`` and ``shards`` (globs) are relative to
``root``. Everything is validated when loaded, before any work: an unknown key, an unknown format, a missing file
or a field that does not fit the format raises :class:`DataConfigError` naming the YAML file, the dataset
(index and name) and the field.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

FORMATS: tuple[str, ...] = ("image_folder", "webdataset", "llava", "uni_x_ref", "text_jsonl")
IMAGE_FORMATS: tuple[str, ...] = ("image_folder", "webdataset", "llava")  # formats whose images we encode
CAPTION_RECORD_TYPES: tuple[str, ...] = ("image_text", "t2i", "i2t")  # one image + one text
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # the name becomes a directory under out_dir


class DataConfigError(ValueError):
    """A bad data config; the message names the YAML file, the dataset and the field."""


@dataclass
class DatasetSpec:
    """One dataset of the data config; paths are absolute after :func:`load_data_config`.

    Fields that only some formats use are rejected on the others, so a typo'd layout fails loudly instead of
    being silently ignored.
    """

    name: str
    format: str
    root: str = "."
    image_dir: str = "."
    annotations: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)  # webdataset: tar globs relative to root
    encode_images: bool | None = None  # default: true for image formats, false for uni_x_ref/text_jsonl
    record_type: str | None = None  # image_folder/webdataset: image_text (default), t2i or i2t
    caption_fields: list[str] = field(default_factory=lambda: ["caption", "text"])  # first present wins
    # uni_x_ref only: the codes are already there; we check them against the tokenizer that made them.
    codebook_size: int | None = None
    tokenizer_name: str | None = None
    code_field: str = "vqcode_512"
    grid: list[int] = field(default_factory=lambda: [32, 32])

    @property
    def image_root(self) -> Path:
        return Path(self.root) / self.image_dir

    def annotation_paths(self) -> list[Path]:
        return [Path(self.root) / a for a in self.annotations]

    def shard_paths(self) -> list[Path]:
        """Every tar matched by ``shards``, sorted per glob and de-duplicated: the order fixes the item ids."""
        seen: dict[str, None] = {}
        for pattern in self.shards:
            for p in sorted(glob.glob(str(Path(self.root) / pattern))):
                seen.setdefault(p, None)
        return [Path(p) for p in seen]


@dataclass
class DataConfig:
    path: Path
    datasets: list[DatasetSpec]

    @property
    def needs_tokenizer(self) -> bool:
        return any(d.encode_images for d in self.datasets)


def _validate(spec: DatasetSpec, err) -> None:
    """Cross-field rules of one dataset; ``err(field, problem)`` builds the error."""
    if not isinstance(spec.name, str) or not _NAME_RE.match(spec.name):
        raise err("name", f"{spec.name!r} must be a non-empty name of letters, digits, '_', '.', '-'")
    if spec.format not in FORMATS:
        raise err("format", f"{spec.format!r} is not one of {', '.join(FORMATS)}")
    for list_field in ("annotations", "shards", "caption_fields"):
        value = getattr(spec, list_field)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise err(list_field, f"must be a list of non-empty strings, got {value!r}")
    is_image = spec.format in IMAGE_FORMATS
    if spec.encode_images is None:
        spec.encode_images = is_image
    if not isinstance(spec.encode_images, bool):
        raise err("encode_images", f"must be true or false, got {spec.encode_images!r}")
    if spec.encode_images != is_image:
        why = "its images must be encoded" if is_image else "it has no images to encode"
        raise err("encode_images", f"must be {str(is_image).lower()} for format {spec.format} ({why})")
    if spec.format in ("image_folder", "webdataset"):
        spec.record_type = spec.record_type or "image_text"
        if spec.record_type not in CAPTION_RECORD_TYPES:
            raise err("record_type", f"{spec.record_type!r} is not one of {', '.join(CAPTION_RECORD_TYPES)}")
    elif spec.record_type is not None:
        raise err("record_type", f"not used by format {spec.format} (the type comes from each record)")
    if spec.format == "webdataset":
        if not spec.shards:
            raise err("shards", "a webdataset needs at least one tar glob")
        if spec.annotations:
            raise err("annotations", "not used by format webdataset (captions live in the tar shards)")
    else:
        if spec.shards:
            raise err("shards", f"only used by format webdataset, not {spec.format}")
        if not spec.annotations:
            raise err("annotations", f"format {spec.format} needs at least one annotation jsonl")
    if spec.format == "uni_x_ref":
        if not isinstance(spec.codebook_size, int) or spec.codebook_size <= 0:
            raise err("codebook_size", f"uni_x_ref needs the codebook size of the tokenizer that made the codes, got {spec.codebook_size!r}")
        if not isinstance(spec.tokenizer_name, str) or not spec.tokenizer_name:
            raise err("tokenizer_name", "uni_x_ref needs the tokenizer id to store in records (e.g. 'chameleon@<hash>')")
        if not (isinstance(spec.grid, list) and len(spec.grid) == 2 and all(isinstance(g, int) and g > 0 for g in spec.grid)):
            raise err("grid", f"must be [height, width] of positive integers, got {spec.grid!r}")
    else:
        for uni_x_field in ("codebook_size", "tokenizer_name"):
            if getattr(spec, uni_x_field) is not None:
                raise err(uni_x_field, f"only used by format uni_x_ref, not {spec.format}")


def _check_paths(spec: DatasetSpec, err) -> None:
    if not Path(spec.root).is_dir():
        raise err("root", f"directory {spec.root} does not exist")
    if spec.format in ("image_folder", "llava") and not spec.image_root.is_dir():
        raise err("image_dir", f"directory {spec.image_root} does not exist")
    for i, path in enumerate(spec.annotation_paths()):
        if not path.is_file():
            raise err(f"annotations[{i}]", f"file {path} does not exist")
    for i, pattern in enumerate(spec.shards):
        if not glob.glob(str(Path(spec.root) / pattern)):
            raise err(f"shards[{i}]", f"glob {pattern!r} matches no file under {spec.root}")


def load_data_config(path: str | os.PathLike) -> DataConfig:
    """Read and validate a data config; raise :class:`DataConfigError` on the first problem."""
    path = Path(path).resolve()
    if not path.is_file():
        raise DataConfigError(f"{path}: data config file does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict) or set(raw) != {"datasets"}:
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise DataConfigError(f"{path}: top level must be a mapping with exactly one key 'datasets', got {found}")
    if not isinstance(raw["datasets"], list) or not raw["datasets"]:
        raise DataConfigError(f"{path}: datasets: must be a non-empty list")
    known = {f.name for f in fields(DatasetSpec)}
    specs: list[DatasetSpec] = []
    for i, entry in enumerate(raw["datasets"]):
        label = entry.get("name", "?") if isinstance(entry, dict) else "?"

        def err(field_name: str, problem: str, _i: int = i, _label: Any = label) -> DataConfigError:
            return DataConfigError(f"{path}: datasets[{_i}] ({_label}): {field_name}: {problem}")

        if not isinstance(entry, dict):
            raise err("<entry>", f"must be a mapping, got {type(entry).__name__}")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise err(unknown[0], f"unknown key (known: {', '.join(sorted(known))})")
        for required in ("name", "format"):
            if required not in entry:
                raise err(required, "missing")
        spec = DatasetSpec(**entry)
        _validate(spec, err)
        spec.root = str((path.parent / str(spec.root)).resolve())
        _check_paths(spec, err)
        if any(s.name == spec.name for s in specs):
            raise err("name", f"duplicate dataset name {spec.name!r}")
        specs.append(spec)
    return DataConfig(path=path, datasets=specs)
