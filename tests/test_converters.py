"""Data config validation and the input-format converters (no tokenizer, no pixels decoded)."""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile
from pathlib import Path

import pytest
import yaml

from data_process.converters import BadItem, ImageSource, WorkItem, iter_items
from data_process.data_config import DataConfigError, load_data_config


def write_yaml(path: Path, datasets) -> Path:
    path.write_text(yaml.safe_dump({"datasets": datasets}))
    return path


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    return tmp_path


# --------------------------------------------------------------------------------------------- data config
def test_shapes_world_config_format_loads_with_defaults(root):
    path = write_yaml(root / "cfg.yaml", [
        {"name": "caps", "format": "image_folder", "root": ".", "image_dir": "images", "annotations": ["a.jsonl"],
         "encode_images": True, "record_type": "image_text"},
        {"name": "vqa", "format": "llava", "root": ".", "image_dir": ".", "annotations": ["a.jsonl"], "encode_images": True},
        {"name": "txt", "format": "text_jsonl", "root": ".", "annotations": ["a.jsonl"], "encode_images": False},
    ])
    cfg = load_data_config(path)
    caps, vqa, txt = cfg.datasets
    assert caps.root == str(root.resolve()) and caps.image_root == root.resolve() / "images"
    assert (vqa.record_type, vqa.encode_images, txt.encode_images) == (None, True, False)
    assert cfg.needs_tokenizer and caps.annotation_paths() == [root.resolve() / "a.jsonl"]


@pytest.mark.parametrize("entry, field, problem", [
    ({"name": "d", "format": "image_folder", "annotations": ["a.jsonl"], "captions": "x"}, "captions", "unknown key"),
    ({"name": "d", "format": "parquet", "annotations": ["a.jsonl"]}, "format", "'parquet' is not one of"),
    ({"name": "d", "format": "text_jsonl", "annotations": ["missing.jsonl"]}, r"annotations\[0\]", "does not exist"),
    ({"name": "d", "format": "image_folder", "image_dir": "nope", "annotations": ["a.jsonl"]}, "image_dir", "does not exist"),
    ({"name": "d", "format": "text_jsonl", "annotations": ["a.jsonl"], "encode_images": True}, "encode_images", "no images"),
    ({"name": "d", "format": "llava", "annotations": ["a.jsonl"], "record_type": "t2i"}, "record_type", "not used"),
    ({"name": "d", "format": "image_folder", "annotations": ["a.jsonl"], "record_type": "edit"}, "record_type", "not one of"),
    ({"name": "d", "format": "webdataset", "shards": ["*.tar"]}, r"shards\[0\]", "matches no file"),
    ({"name": "d", "format": "uni_x_ref", "annotations": ["a.jsonl"], "tokenizer_name": "t"}, "codebook_size", "uni_x_ref needs"),
    ({"name": "d", "format": "text_jsonl"}, "annotations", "needs at least one"),
    ({"format": "text_jsonl", "annotations": ["a.jsonl"]}, "name", "missing"),
    ({"name": "a/b", "format": "text_jsonl", "annotations": ["a.jsonl"]}, "name", "must be a non-empty name"),
])
def test_config_errors_name_file_dataset_and_field(root, entry, field, problem):
    ok = {"name": "first", "format": "text_jsonl", "annotations": ["a.jsonl"]}
    path = write_yaml(root / "cfg.yaml", [ok, entry])
    label = re.escape(entry.get("name", "?"))
    with pytest.raises(DataConfigError, match=rf"cfg\.yaml: datasets\[1\] \({label}\): {field}: .*{problem}"):
        load_data_config(path)


def test_config_top_level_and_duplicate_errors(root):
    (root / "bad.yaml").write_text("sets: []\n")
    with pytest.raises(DataConfigError, match="bad.yaml: top level must be a mapping with exactly one key 'datasets'"):
        load_data_config(root / "bad.yaml")
    dup = {"name": "d", "format": "text_jsonl", "annotations": ["a.jsonl"]}
    with pytest.raises(DataConfigError, match=r"datasets\[1\] \(d\): name: duplicate"):
        load_data_config(write_yaml(root / "dup.yaml", [dup, dup]))
    with pytest.raises(DataConfigError, match="does not exist"):
        load_data_config(root / "none.yaml")


# ------------------------------------------------------------------------------------------------ llava
def llava_items(root: Path, rows) -> list:
    write_jsonl(root / "v.jsonl", rows)
    spec = load_data_config(write_yaml(root / "v.yaml", [{"name": "v", "format": "llava", "annotations": ["v.jsonl"]}])).datasets[0]
    return list(iter_items(spec))


def test_llava_classification_and_role_aliases(root):
    rows = [
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"},
                                              {"from": "human", "value": "more?"}, {"from": "gpt", "value": "B"}]},
        {"images": ["a.png"], "conversations": [{"role": "user", "content": "draw a cat"}, {"role": "assistant", "content": " <image> "}]},
        {"images": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image> edit"}, {"from": "gpt", "value": "<image>"}]},
        {"images": ["a.png"], "conversations": [{"from": "human", "value": "draw"}, {"from": "gpt", "value": "here: <image>"},
                                                 {"from": "human", "value": "thanks"}, {"from": "gpt", "value": "ok"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    ]
    items = llava_items(root, rows)
    assert [it.record.type for it in items] == ["conversation", "t2i", "edit", "conversation", "conversation"]
    assert items[1].record.text == "draw a cat" and items[1].record.conversations is None
    assert items[2].images == [ImageSource(str(root.resolve() / "a.png")), ImageSource(str(root.resolve() / "b.png"))]
    assert items[1].record.meta == {"dataset": "v", "source": "v.jsonl:2"} and items[1].id == "v/v.jsonl:2"
    assert items[4].images == [] and items[0].record.conversations[2] == {"from": "human", "value": "more?"}


@pytest.mark.parametrize("row, reason, detail", [
    ({"images": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
     "bad_record", r"2 image\(s\) but 1 <image>"),
    ({"image": "a.png", "conversations": [{"from": "human", "value": "<image>"}]}, "bad_record", "no gpt turn"),
    ({"image": "a.png", "conversations": [{"from": "robot", "value": "<image>"}]}, "bad_record", r"conversations\[0\]"),
    ({"images": [3], "conversations": []}, "bad_record", "images: must be a path"),
    ("[1, 2]", "malformed_json", "expected a json object"),
])
def test_llava_bad_rows(root, row, reason, detail):
    (item,) = llava_items(root, [row])
    assert isinstance(item, BadItem) and item.reason == reason and (item.file, item.line) == ("v.jsonl", 1)
    assert item.detail.startswith("v.jsonl:1: ")
    assert re.search(detail, item.detail)


# --------------------------------------------------------------------------------------------- uni_x_ref
def test_uni_x_ref_rows(root):
    codes = list(range(16))
    write_jsonl(root / "r.jsonl", [
        {"data_type": "i2t_reverse", "caption": "from caption", "text": None, "vqcode_512": json.dumps(codes)},
        {"data_type": "t2i", "text": "t", "vqcode_512": codes[:15]},
        {"data_type": "t2i", "text": "t", "vqcode_512": "[1, 2"},
        {"data_type": "t2i", "text": "t", "vqcode_512": [16] + codes[1:]},
        {"data_type": "video", "text": "t"},
        {"text": "plain"},
    ])
    spec = load_data_config(write_yaml(root / "r.yaml", [{"name": "r", "format": "uni_x_ref", "annotations": ["r.jsonl"],
                                                         "codebook_size": 16, "tokenizer_name": "vq@1", "grid": [4, 4]}])).datasets[0]
    items = list(iter_items(spec))
    first = items[0].record
    assert (first.type, first.text, first.images[0].codes, first.images[0].grid, first.images[0].tokenizer) == (
        "i2t", "from caption", codes, (4, 4), "vq@1")
    assert [(it.reason, it.detail.split(": ", 2)[2][:20]) for it in items[1:5]] == [
        ("bad_codes", "15 codes, grid 4x4 n"), ("bad_codes", "not a JSON list (Exp"),
        ("bad_codes", "code 16 outside the "), ("bad_record", "'video' is not one o")]
    assert items[5].record.type == "text" and items[5].record.images == []


def test_uni_x_ref_reads_every_reference_row_as_training_does(root):
    """The encoder's uni_x_ref format and training's reader share one conversion (schema.record_from_reference)."""
    write_jsonl(root / "r.jsonl", [
        {"data_type": "i2t_multi", "text": "Which colour?^^^pair_split^^^red", "vqcode_512": json.dumps(list(range(16))),
         "vqcode_multi768": "no", "width": "no", "height": "no"},
        {"instruction": "Name a colour.", "input": "", "output": "red"},
        {"input_ids": [1, 2, 3]},
        {"data_type": "i2t_multi", "text": "no turns here", "vqcode_512": json.dumps(list(range(16)))},
    ])
    spec = load_data_config(write_yaml(root / "r.yaml", [{"name": "r", "format": "uni_x_ref", "annotations": ["r.jsonl"],
                                                         "codebook_size": 16, "tokenizer_name": "vq@1", "grid": [4, 4]}])).datasets[0]
    finevision, alpaca, ids, bad = iter_items(spec)
    assert finevision.record.type == "conversation" and finevision.record.id == "r/r.jsonl:1"
    assert finevision.record.conversations[0]["value"] == "<image>\nWhich colour?"
    assert finevision.record.meta == {"dataset": "r", "source": "r.jsonl:1"}
    assert alpaca.record.conversations[1] == {"from": "gpt", "value": "red"} and ids.record.input_ids == [1, 2, 3]
    assert isinstance(bad, BadItem) and bad.reason == "bad_record" and bad.detail.startswith("r.jsonl:4: text: turn 0")


# ------------------------------------------------------------------------------------------- webdataset
def make_tar(path: Path, members: list[tuple[str, bytes]], compress: bool = False) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(buf.getvalue()) if compress else buf.getvalue())


@pytest.mark.parametrize("compress", [False, True])
def test_webdataset_groups_by_key_and_reads_lazily(root, compress):
    ext = "tar.gz" if compress else "tar"
    make_tar(root / f"s-0.{ext}", [("dir/a.jpg", b"AAAA"), ("dir/a.txt", b" cap a \n"),
                                    ("b.png", b"BB"), ("b.json", json.dumps({"text": "cap b"}).encode()),
                                    ("c.jpg", b"C"), ("c.json", b"{oops"),
                                    ("d.txt", b"no image")], compress)
    make_tar(root / f"s-1.{ext}", [("e.jpg", b"EE"), ("e.txt", b"cap e")], compress)
    spec = load_data_config(write_yaml(root / "w.yaml", [{"name": "w", "format": "webdataset", "shards": [f"s-*.{ext}"],
                                                         "record_type": "t2i"}])).datasets[0]
    items = list(iter_items(spec))
    assert [it.id for it in items] == ["w/s-0/dir/a", "w/s-0/b", "w/s-0/c", "w/s-0/d", "w/s-1/e"]
    a, b, c, d, e = items
    assert (a.record.type, a.record.text, b.record.text, e.record.text) == ("t2i", "cap a", "cap b", "cap e")
    assert [a.images[0].read_bytes(), b.images[0].read_bytes(), e.images[0].read_bytes()] == [b"AAAA", b"BB", b"EE"]
    assert (a.images[0].data is None) != compress  # uncompressed tars are read by offset, gz ones eagerly
    assert (c.reason, d.reason) == ("malformed_json", "bad_record")
    assert a.record.meta == {"dataset": "w", "source": f"s-0.{ext}:s-0/dir/a"}


def test_truncated_tar_member_and_broken_tar(root):
    make_tar(root / "s.tar", [("a.jpg", b"A" * 600), ("a.txt", b"cap")])
    spec = load_data_config(write_yaml(root / "w.yaml", [{"name": "w", "format": "webdataset", "shards": ["s.tar"]}])).datasets[0]
    (item,) = iter_items(spec)
    src = item.images[0]
    (root / "s.tar").write_bytes((root / "s.tar").read_bytes()[: src.offset + 100])
    with pytest.raises(OSError, match="truncated"):
        src.read_bytes()
    items = list(iter_items(spec))
    assert isinstance(items[-1], BadItem) and items[-1].reason == "unreadable_shard"


def test_image_folder_and_text_ids_are_stable(root):
    write_jsonl(root / "c.jsonl", [{"id": 7, "image": "x.png", "caption": "  c  "}, {"image": "y.png"}, "", {"image": "z.png", "text": "t"}])
    write_jsonl(root / "t.jsonl", [{"text": ""}, {"text": "ok"}])
    cfg = load_data_config(write_yaml(root / "c.yaml", [
        {"name": "c", "format": "image_folder", "image_dir": "images", "annotations": ["c.jsonl"]},
        {"name": "t", "format": "text_jsonl", "annotations": ["t.jsonl"]}]))
    c_items, t_items = (list(iter_items(s)) for s in cfg.datasets)
    assert [it.id for it in c_items] == ["c/7", "c/c.jsonl:2", "c/c.jsonl:4"]
    assert isinstance(c_items[0], WorkItem) and c_items[0].record.text == "c"
    assert c_items[0].images == [ImageSource(str(root.resolve() / "images" / "x.png"))]
    assert isinstance(c_items[1], BadItem) and "caption/text: no non-empty caption" in c_items[1].detail
    assert [type(it).__name__ for it in t_items] == ["BadItem", "WorkItem"] and t_items[1].record.text == "ok"
    assert [it.id for it in c_items] == [it.id for it in iter_items(cfg.datasets[0])]
