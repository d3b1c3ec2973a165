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
