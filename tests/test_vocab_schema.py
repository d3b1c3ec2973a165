import json

import numpy as np
import pytest

from data_process.schema import AtomicShardWriter, Record, RecordError, ImageCodes, read_records, record_from_dict
from modeling.vocab import CodeVocab


def test_vocab_round_trip_multi_level():
    v = CodeVocab(image_offset=1000, level_sizes=(16, 8), vision_start_id=3, vision_end_id=4)
    codes, levels = np.array([0, 15, 0, 7]), np.array([0, 0, 1, 1])
    ids = v.codes_to_ids(codes, levels)
    assert ids.tolist() == [1000, 1015, 1016, 1023]
    back_codes, back_levels = v.ids_to_codes(ids)
    assert back_codes.tolist() == codes.tolist() and back_levels.tolist() == levels.tolist()
    assert v.image_token_range == (1000, 1024) and v.level_range(1) == (1016, 1024)


def test_vocab_range_checks_name_position():
    v = CodeVocab(image_offset=1000, level_sizes=(16,), vision_start_id=3, vision_end_id=4)
    with pytest.raises(ValueError, match="code 16 at position 1"):
        v.codes_to_ids([1, 16])
    with pytest.raises(ValueError, match="token id 999 at position 0 is not an image code"):
        v.ids_to_codes([999])
    with pytest.raises(ValueError, match="vision_start_id"):
        CodeVocab(image_offset=10, level_sizes=(4,), vision_start_id=12, vision_end_id=4)


def test_record_round_trip_and_errors(tmp_path):
    rec = Record(id="a", type="image_text", text="a red circle",
                 images=[ImageCodes(codes=[1, 2, 3, 4], grid=(2, 2), tokenizer="t@h")])
    path = tmp_path / "r.jsonl"
    with AtomicShardWriter(path) as w:
        w.write(rec)
        w.write({"id": "b", "type": "text", "text": "hello"})
    got = list(read_records(path))
    assert [ln for ln, _ in got] == [1, 2]
    assert got[0][1].to_dict() == rec.to_dict()
    path.write_text(path.read_text() + '{"id": "c", "type": "image_text", "text": "x", "images": [{"codes": [1], "grid": [2, 2], "tokenizer": "t"}]}\n{oops\n')
    with pytest.raises(RecordError, match=r"r.jsonl:3: images\[0\].codes: 1 codes do not fill grid"):
        list(read_records(path))
    errors = []
    assert len(list(read_records(path, on_error=errors.append))) == 2
    assert [e.line for e in errors] == [3, 4] and errors[1].field == "<json>"
    with pytest.raises(RecordError, match="images: 0 image"):
        record_from_dict({"id": "d", "type": "conversation", "conversations": [
            {"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}]})


def test_atomic_writer_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "shard.jsonl"
    with pytest.raises(RuntimeError):
        with AtomicShardWriter(path) as w:
            w.write({"id": "x"})
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ size tags, vision rule
def test_size_tags_follow_the_codes_and_are_vision_for_numpy_and_torch():
    import torch

    v = CodeVocab(image_offset=1000, level_sizes=(16, 8), vision_start_id=3, vision_end_id=4, max_grid=4)
    assert v.image_token_range == (1000, 1024) and v.size_tag_range == (1024, 1032) and v.total_vocab_size == 1032
    assert v.size_tag_ids((1, 1)) == [1024, 1028] and v.size_tag_ids((4, 2)) == [1027, 1029]
    ids = [3, 4, 999, 1000, 1023, 1024, 1031, 1032]
    vision = [True, False, False, True, True, True, True, False]
    image_target = [False, True, False, True, True, True, True, False]
    assert v.is_vision_id(ids).tolist() == vision
    assert v.is_vision_id(torch.tensor([ids])).tolist() == [vision]  # the model's routing input
    assert v.is_image_target(torch.tensor(ids)).tolist() == image_target  # the trainer's image loss
    assert v.is_size_tag_id(np.array(ids)).tolist() == [False] * 5 + [True, True, False]
    assert sorted(v.image_block_ids().tolist()) == [3, 4] + list(range(1000, 1032))
    with pytest.raises(ValueError, match="grid 5x1 has no size tag.*up to 4x4"):
        v.size_tag_ids((5, 1))
    with pytest.raises(ValueError, match="token id 1024 at position 0 is not an image code"):
        v.ids_to_codes([1024])  # a size tag is not a code
    none = CodeVocab(1000, (16,), 3, 4)
    assert none.total_vocab_size == 1016 and not none.is_vision_id([1016]).any()
    with pytest.raises(ValueError, match="max_grid=0"):
        none.size_tag_ids((1, 1))
    assert CodeVocab.from_dict(v.to_dict()) == v
    assert CodeVocab.from_dict({k: x for k, x in none.to_dict().items() if k != "max_grid"}) == none  # older dicts


# ------------------------------------------------------------------------- one definition of each concept
ONE_DEFINITION = {
    r"^\s*IGNORE_INDEX\s*=": "modeling/vocab.py",
    r"^\s*Span\s*=|^class Span\b": "uni_arch/train/packing.py",
    r"^def setup_log": "uni_arch/log_setup.py",
    r"\blogger\.(remove|add)\(": "uni_arch/log_setup.py",
    r"\.(image_token_range|size_tag_range)\b": "modeling/vocab.py",  # id-range checks go through CodeVocab methods
}


@pytest.mark.parametrize("pattern", sorted(ONE_DEFINITION))
def test_each_concept_is_defined_in_one_place(pattern):
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    hits = sorted({str(p.relative_to(root)) for folder in ("modeling", "uni_arch", "data_process", "tools", "evaluation")
                   for p in (root / folder).rglob("*.py")
                   if re.search(pattern, p.read_text(encoding="utf-8"), flags=re.MULTILINE)})
    assert hits == [ONE_DEFINITION[pattern]], f"{pattern!r} appears in {hits}, expected only {ONE_DEFINITION[pattern]}"


@pytest.mark.parametrize("codes, problem", [([1, True, 2, 3], "must be a list of integers"),
                                            ([1, 2.0, 2, 3], "must be a list of integers"),
                                            ([1, -4, 2, 3], "negative code -4")])
def test_image_codes_are_checked_per_code(codes, problem):
    d = {"id": "x", "type": "image_text", "text": "a cat",
         "images": [{"codes": codes, "grid": [2, 2], "tokenizer": "vq@1"}]}
    with pytest.raises(RecordError, match=rf"f\.jsonl:3: images\[0\]\.codes: {problem}"):
        record_from_dict(d, "f.jsonl", 3)
