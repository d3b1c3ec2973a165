"""Records -> rows: data_path parsing and mixing, validation before work, skip_bad_records, streaming shards."""

import json
from dataclasses import dataclass

import pytest

from data_process.schema import RecordError
from modeling.vocab import CodeVocab
from uni_arch.train.dataset import (
    build_map_dataset, build_streaming_dataset, mix_indices, parse_data_path, stream_rows,
)
from uni_arch.train.synthetic import synthetic_records, write_records

VOCAB = CodeVocab(image_offset=100, level_sizes=(64,), vision_start_id=3, vision_end_id=4)


@dataclass
class _Sample:
    input_ids: list
    labels: list
    image_spans: list


class FakeBuilder:
    """Text -> one id per character; an image -> start, codes, end (enough to test the plumbing)."""

    def build(self, record, rng):
        ids = [5 + (ord(ch) % 90) for ch in (record.text or "q")]
        spans = []
        for im in record.images:
            spans.append((len(ids), len(ids) + len(im.codes) + 2))
            ids += [3, *VOCAB.codes_to_ids(im.codes).tolist(), 4]
        return _Sample(ids, list(ids), spans)


@pytest.fixture()
def corpus(tmp_path):
    write_records(synthetic_records(30, seed=1, prefix="a"), tmp_path / "a" / "p0.jsonl")
    write_records(synthetic_records(10, seed=2, prefix="b"), tmp_path / "b.jsonl")
    return tmp_path


def test_parse_data_path_globs_folders_weights(corpus):
    sources = parse_data_path(f"{corpus}/a:0.75, {corpus}/*.jsonl:0.25")
    assert [s.weight for s in sources] == [0.75, 0.25]
    assert [f.name for f in sources[0].files] == ["p0.jsonl"] and [f.name for f in sources[1].files] == ["b.jsonl"]
    with pytest.raises(FileNotFoundError, match="nothere"):
        parse_data_path(f"{corpus}/nothere")
    with pytest.raises(ValueError, match="weight"):
        parse_data_path(f"{corpus}/a:0")


def test_mix_indices_follow_weights_and_percentage():
    order = mix_indices([100, 10], [0.5, 0.5], 1.0, seed=0)
    assert len(order) == 110
    assert sum(1 for s, _ in order if s == 1) == 55  # up-sampled to its share
    order = mix_indices([100], [1.0], 0.3, seed=0)
    assert len(order) == 30 and len({i for _, i in order}) == 30
    assert mix_indices([7, 5], [1, 3], 1.0, seed=4) == mix_indices([7, 5], [1, 3], 1.0, seed=4)


def test_map_dataset_rows_cover_every_record_once(corpus):
    ds = build_map_dataset(parse_data_path(str(corpus)), FakeBuilder(), VOCAB, seq_len=256, mode=2, seed=0)
    ids = [sid for row in ds.rows for sid in row["sample_ids"]]
    assert sorted(ids) == sorted({*ids}) and len(ids) == 40
    for row in ds.rows:
        assert sum(row["doc_lens"]) == len(row["input_ids"]) <= 256


def _corrupt(path, lineno, new_line):
    lines = path.read_text().splitlines()
    lines[lineno - 1] = new_line
    path.write_text("\n".join(lines) + "\n")


def test_bad_record_stops_before_work_naming_file_line_field(corpus):
    path = corpus / "b.jsonl"
    _corrupt(path, 3, '{"id": "x", "type": "text"}')
    with pytest.raises(RecordError, match=r"b\.jsonl:3: text: a text record needs a non-empty text"):
        build_map_dataset(parse_data_path(str(corpus)), FakeBuilder(), VOCAB, seq_len=256, mode=2)
    _corrupt(path, 3, "{not json")
    with pytest.raises(RecordError, match=r"b\.jsonl:3: <json>: malformed json"):
        build_map_dataset(parse_data_path(str(path)), FakeBuilder(), VOCAB, seq_len=256, mode=2)


def test_out_of_range_code_is_an_error_never_clamped(corpus):
    path = corpus / "b.jsonl"
    lines = path.read_text().splitlines()
    k = next(i for i, line in enumerate(lines) if json.loads(line)["images"])
    rec = json.loads(lines[k])
    rec["images"][0]["codes"][5] = 64  # codebook has 64 codes: 0..63
    _corrupt(path, k + 1, json.dumps(rec))
    with pytest.raises(RecordError, match=rf"b\.jsonl:{k + 1}: images\[0\]\.codes: code 64 at position 5"):
        build_map_dataset(parse_data_path(str(path)), FakeBuilder(), VOCAB, seq_len=256, mode=2)


def test_skip_bad_records_counts_and_skips(corpus, caplog):
    path = corpus / "b.jsonl"
    _corrupt(path, 2, "{not json")
    _corrupt(path, 4, '{"id": "y", "type": "nope"}')
    ds = build_map_dataset(parse_data_path(str(path)), FakeBuilder(), VOCAB, seq_len=256, mode=0, skip_bad_records=True)
    assert len(ds) == 8


def test_streaming_shards_are_disjoint_and_cover_the_data(corpus):
    sources = parse_data_path(str(corpus))
    kw = dict(num_shards=4, sources=sources, builder=FakeBuilder(), vocab=VOCAB, seq_len=256, mode=2,
              overlong="split", percentage=1.0, seed=0, skip_bad_records=False, buffer=8)
    per_rank = [[sid for row in stream_rows([r, r + 2], **kw) for sid in row["sample_ids"]] for r in (0, 1)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(per_rank[0]) + len(per_rank[1]) == 40
    again = [sid for row in stream_rows([0, 2], **kw) for sid in row["sample_ids"]]
    assert again == per_rank[0]  # deterministic: what makes resume-by-replay exact


def test_streaming_dataset_yields_rows(corpus):
    ds = build_streaming_dataset(parse_data_path(str(corpus)), FakeBuilder(), VOCAB, seq_len=256, mode=1,
                                 buffer=16, num_shards=2)
    rows = list(ds)
    assert sum(sum(r["doc_lens"]) for r in rows) == sum(len(r["input_ids"]) for r in rows)
    assert len({sid for r in rows for sid in r["sample_ids"]}) == 40
