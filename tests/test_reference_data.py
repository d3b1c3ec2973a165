"""The reference Uni-X's data rows, read as they are (issue 12): FineVision ``i2t_multi`` turns, alpaca rows,
pre-tokenised ``input_ids``, ``conversations`` inside Uni-X rows, parquet files and ``data_path`` as ``a^^b`` with
per-source percentages. Parse tests on hand-written rows, then one trainer step on every row type."""

import itertools
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from data_process.schema import (
    IMAGE_PLACEHOLDER, REFERENCE_IMAGE_TOKENIZER, RecordError, read_records, record_from_row,
)
from modeling.vocab import CodeVocab
from uni_arch.train.args import parse_args
from uni_arch.train.dataset import _keep, build_map_dataset, build_streaming_dataset, parse_data_path, stream_rows
from uni_arch.train.hf_trainer import make_trainer
from uni_arch.train.synthetic import make_world

CODES = [(7 * i) % 64 for i in range(16)]  # a 4x4 grid of the test codebook (64 codes)
FINEVISION = {  # as the reference's data_process/encode_vq_finevision.py writes a row
    "data_type": "i2t_multi", "text": "What colour?^^^pair_split^^^red^^^turn_split^^^And the shape?^^^pair_split^^^a circle",
    "length": 140, "vqcode_512": json.dumps(CODES), "vqcode_multi768": "no", "width": "no", "height": "no",
}


def convert(row, line=1):
    return record_from_row(row, "ref.jsonl", line)


def test_finevision_turns_become_a_conversation_with_the_image_first():
    record = convert(FINEVISION)
    assert (record.type, record.id) == ("conversation", "ref.jsonl:1")
    assert record.conversations == [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "a circle"}]
    (image,) = record.images
    assert (image.codes, image.grid, image.tokenizer) == (CODES, (4, 4), REFERENCE_IMAGE_TOKENIZER)


def test_finevision_single_turn_without_question_is_a_caption():
    record = convert({**FINEVISION, "text": "^^^pair_split^^^a red circle on grey"})
    assert (record.type, record.text, record.conversations) == ("i2t", "a red circle on grey", None)


@pytest.mark.parametrize("text, match", [
    ("a caption without turns", r"ref\.jsonl:3: text: turn 0 has 0 '\^\^\^pair_split\^\^\^'"),
    ("q^^^pair_split^^^a^^^turn_split^^^q2^^^pair_split^^^a2^^^pair_split^^^x", r"ref\.jsonl:3: text: turn 1 has 2"),
    ("q^^^pair_split^^^ ", r"ref\.jsonl:3: text: turn 0 has an empty answer"),
])
def test_malformed_finevision_rows_name_file_line_and_field(text, match):
    with pytest.raises(RecordError, match=match):
        convert({**FINEVISION, "text": text}, line=3)


def test_alpaca_rows_become_one_exchange():
    with_input = convert({"instruction": "Name the colour.", "input": "a red circle", "output": "red"})
    assert with_input.type == "conversation" and with_input.images == []
    assert with_input.conversations == [{"from": "human", "value": "Name the colour.\na red circle"},
                                        {"from": "gpt", "value": "red"}]
    no_input = convert({"instruction": "Name a colour.", "input": "", "output": "blue", "text": None})
    assert no_input.conversations[0] == {"from": "human", "value": "Name a colour."}
    with pytest.raises(RecordError, match=r"ref\.jsonl:2: output: an alpaca row needs a non-empty output"):
        convert({"instruction": "Name a colour.", "input": ""}, line=2)


def test_pre_tokenised_rows_keep_their_ids():
    record = convert({"input_ids": [5, 9, 11], "text": "ignored: the reference trains the ids"})
    assert (record.type, record.input_ids, record.text) == ("text", [5, 9, 11], None)
    assert record_from_row(record.to_dict()).input_ids == [5, 9, 11]  # and survives our own layout
    with pytest.raises(RecordError, match=r"ref\.jsonl:1: input_ids: must be a non-empty list"):
        convert({"input_ids": "5 9 11"})


def test_conversations_inside_uni_x_rows():
    text_only = convert({"conversations": [{"from": "human", "value": "hi"}, {"from": "assistant", "value": "hello"}]})
    assert (text_only.type, text_only.images) == ("conversation", [])
    assert [t["from"] for t in text_only.conversations] == ["human", "gpt"]
    turns = [{"from": "user", "value": "Which colour?"}, {"from": "gpt", "value": "red"}]
    with_image = convert({"data_type": "i2t", "conversations": turns, "vqcode_512": CODES, "text": None})
    assert with_image.conversations[0]["value"] == "<image>\nWhich colour?" and len(with_image.images) == 1
    placed = [{"from": "human", "value": f"Look: {IMAGE_PLACEHOLDER} which colour?"}, turns[1]]
    assert convert({"data_type": "i2t", "conversations": placed, "vqcode_512": CODES}).conversations[0] == placed[0]
    # a t2i row's conversations are not read (the reference draws t2i from its text), its text is
    t2i = convert({"data_type": "t2i", "text": "a red circle", "conversations": turns, "vqcode_512": CODES})
    assert (t2i.type, t2i.text) == ("t2i", "a red circle")
    with pytest.raises(RecordError, match=r"ref\.jsonl:1: conversations\[1\]: must be \{'from'"):
        convert({"conversations": [turns[0], {"from": "bot", "value": "red"}]})


def test_caption_rows_and_their_errors():
    record = convert({"data_type": "image_text", "caption": "a red circle", "text": None, "vqcode_512": json.dumps(CODES)})
    assert (record.type, record.text) == ("image_text", "a red circle")
    assert convert({"data_type": "i2t_reverse", "text": "a red circle", "vqcode_512": CODES}).type == "i2t"
    assert convert({"text": "plain text", "score": 0.9, "meta": {"redpajama_set_name": "x"}}).type == "text"
    for row, match in [
        ({"data_type": "video", "text": "t"}, r"data_type: 'video' is not one of text, image_text"),
        ({"data_type": "t2i", "text": "t", "vqcode_512": CODES[:15]}, r"vqcode_512: 15 codes do not make a square"),
        ({"data_type": "t2i", "text": "t"}, r"vqcode_512: missing"),
        ({"text": "t", "images": []}, r"images: unknown field of a reference row .* needs a 'type'"),
    ]:
        with pytest.raises(RecordError, match=r"ref\.jsonl:1: " + match):
            convert(row)


ROWS = [
    FINEVISION,
    {**FINEVISION, "text": "^^^pair_split^^^a red circle"},
    {"instruction": "Name a colour.", "input": "", "output": "red"},
    {"input_ids": [5, 9, 11]},
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "assistant", "value": "hello"}]},
    {"data_type": "t2i", "caption": "a red circle", "vqcode_512": json.dumps(CODES)},
]


def write_parquet(rows: list[dict], path) -> None:
    """The union of the rows' columns (a row's missing ones are nulls), as the reference's parquet shards have."""
    pq.write_table(pa.Table.from_struct_array(pa.array(rows)), path)


def test_parquet_reads_like_jsonl(tmp_path):
    """One table with every row type: the columns a row lacks are nulls, as in the reference's parquet shards."""
    write_parquet(ROWS, tmp_path / "ref.parquet")
    (tmp_path / "ref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    from_parquet = [r.to_dict() for _, r in read_records(tmp_path / "ref.parquet")]
    from_jsonl = [r.to_dict() for _, r in read_records(tmp_path / "ref.jsonl")]
    for a, b in zip(from_parquet, from_jsonl, strict=True):
        assert a["id"].replace(".parquet", ".jsonl") == b["id"] and {**a, "id": b["id"]} == b
    write_parquet([{"data_type": "t2i", "text": "t", "vqcode_512": "[1, 2"}], tmp_path / "bad.parquet")
    with pytest.raises(RecordError, match=r"bad\.parquet:1: vqcode_512: not a JSON list"):
        list(read_records(tmp_path / "bad.parquet"))
    (tmp_path / "not.parquet").write_text("a jsonl line by mistake")
    with pytest.raises(RecordError, match=r"not\.parquet:\?: <parquet>: unreadable parquet file"):
        list(read_records(tmp_path / "not.parquet"))


# ------------------------------------------------------------------------------------------ data_path
VOCAB = CodeVocab(image_offset=100, level_sizes=(64,), vision_start_id=3, vision_end_id=4)


class OneTokenBuilder:
    """Each record -> one token, so rows count records (the plumbing is what is under test)."""

    def build(self, record, rng):
        from uni_arch.train.templates import Sample

        return Sample([5], [5], [0], [], "text")


@pytest.fixture()
def two_sources(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "a.jsonl").write_text("".join(json.dumps({"text": f"a{i}"}) + "\n" for i in range(40)))
    write_parquet([{"text": f"b{i}"} for i in range(10)], tmp_path / "b.parquet")
    return tmp_path


def _per_source(dataset):
    ids = [sid for row in dataset.rows for sid in row["sample_ids"]]
    return sum(i.startswith("a.jsonl") for i in ids), sum(i.startswith("b.parquet") for i in ids)


def test_reference_data_path_concatenates_with_per_source_percentages(two_sources):
    sources = parse_data_path(f"{two_sources}/a^^{two_sources}/b.parquet", [0.5, 1.0])
    assert [(s.weight, s.percentage) for s in sources] == [(None, 0.5), (None, 1.0)]
    kw = dict(seq_len=64, mode=2, seed=0)
    assert _per_source(build_map_dataset(sources, OneTokenBuilder(), VOCAB, **kw)) == (20, 10)
    one_for_all = parse_data_path(f"{two_sources}/a^^{two_sources}/b.parquet", [0.5])
    assert _per_source(build_map_dataset(one_for_all, OneTokenBuilder(), VOCAB, **kw)) == (20, 5)
    # this toolkit's spelling beside it: weights are proportions of the total, a and b get equal shares
    weighted = parse_data_path(f"{two_sources}/a:0.5,{two_sources}/b.parquet:0.5")
    assert _per_source(build_map_dataset(weighted, OneTokenBuilder(), VOCAB, **kw)) == (25, 25)
    with pytest.raises(ValueError, match="percentage gives 3 fractions for the 2 sources"):
        parse_data_path(f"{two_sources}/a^^{two_sources}/b.parquet", [0.5, 0.5, 0.5])


def test_pre_tokenised_ids_outside_the_text_vocabulary_stop_the_run(tmp_path):
    (tmp_path / "ids.jsonl").write_text(json.dumps({"input_ids": [5, 99]}) + "\n" + json.dumps({"input_ids": [5, 100]}))
    with pytest.raises(RecordError, match=r"ids\.jsonl:2: input_ids: id 100 at position 1 is not a text id"):
        build_map_dataset(parse_data_path(str(tmp_path / "ids.jsonl")), OneTokenBuilder(), VOCAB, seq_len=64, mode=2)


def test_reference_data_path_streams_every_record_of_every_source(two_sources):
    """Streamed, ``a^^b`` reads every kept record of both sources once per epoch (weighted sources stop at the
    first exhausted one instead)."""
    sources = parse_data_path(f"{two_sources}/a^^{two_sources}/b.parquet", [0.5, 1.0])
    kw = dict(num_shards=2, sources=sources, builder=OneTokenBuilder(), vocab=VOCAB, seq_len=64, mode=2,
              overlong="split", percentage=1.0, seed=0, skip_bad_records=False, buffer=8, epochs=1)
    ids = [sid for row in stream_rows([0, 1], counts=(40, 10), **kw) for sid in row["sample_ids"]]
    kept_a = [f"a.jsonl:{i + 1}" for i in range(40) if _keep(i, 0.5)]
    assert sorted(ids) == sorted(kept_a + [f"b.parquet:{i + 1}" for i in range(10)])
    assert 0.3 < len(kept_a) / 40 < 0.7
    assert [sid for row in stream_rows([0, 1], **kw) for sid in row["sample_ids"]] != [] # counts are optional
    ds = build_streaming_dataset(sources, OneTokenBuilder(), VOCAB, seq_len=64, mode=2, buffer=8, num_shards=2)
    first = {sid for row in itertools.islice(ds, len(ids)) for sid in row["sample_ids"]}
    assert first == set(ids)  # the endless dataset's first epoch is the same


@pytest.mark.parametrize("extra, match", [
    (["--percentage", "0.5^^x"], "percentage='0.5\\^\\^x' must be fractions"),
    (["--percentage", "0.5^^0"], "percentage=0.0 must be in"),
    (["--percentage", "0.5", "--data_percentage", "0.3"], "percentage='0.5' and data_percentage=0.3 are both set"),
])
def test_percentage_knob_errors_name_the_field(extra, match):
    with pytest.raises(ValueError, match=match):
        parse_args(["--output_dir", "/tmp/x", "--model_config", "m.json", *extra])


# ------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"), n_records=4)


def _rows(kind: str, tokenizer) -> list[dict]:
    conv = [{"from": "human", "value": "What colour is the shape?"}, {"from": "assistant", "value": "red"}]
    return {
        "finevision": [FINEVISION, {**FINEVISION, "text": "^^^pair_split^^^a red circle"}],
        "alpaca": [{"instruction": "What colour is the shape?", "input": "a red circle", "output": "red"},
                   {"instruction": "Describe this image.", "input": "", "output": "a blue square"}],
        "input_ids": [{"input_ids": tokenizer("there is one red circle.", add_special_tokens=False)["input_ids"]}],
        "conversations": [{"conversations": conv}, {"data_type": "i2t", "conversations": conv, "vqcode_512": CODES}],
        "captions": [{"data_type": t, "caption": "a red circle", "text": None, "vqcode_512": json.dumps(CODES)}
                     for t in ("image_text", "t2i", "i2t", "i2t_reverse")] + [{"text": "a blue square."}],
    }[kind]


@pytest.mark.parametrize("kind, suffix", [("finevision", "jsonl"), ("alpaca", "jsonl"), ("input_ids", "parquet"),
                                          ("conversations", "parquet"), ("captions", "jsonl")])
def test_every_reference_row_type_trains(world, tmp_path, kind, suffix):
    tokenizer = AutoTokenizer.from_pretrained(world["tokenizer_path"])
    rows = _rows(kind, tokenizer)
    path = tmp_path / f"{kind}.{suffix}"
    if suffix == "parquet":
        write_parquet(rows, path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--output_dir", str(tmp_path / "run"), "--use_cpu", "true", "--max_steps", "1", "--logging_steps", "1",
            "--save_strategy", "no", "--model_max_length", "256", "--report_to", "none", "--write_loss_curves", "false",
            "--learning_rate", "1e-3", "--seed", "0"]
    for key, value in world.items():
        argv += [f"--{key}", str(path) if key == "data_path" else value]
    trainer = make_trainer(*parse_args(argv))
    samples = sorted({sid for row in trainer.train_dataset.rows for sid in row["sample_ids"]})
    assert samples == sorted(f"{path.name}:{i + 1}" for i in range(len(rows)))  # every row became a sample
    if kind == "input_ids":  # trained verbatim: the ids, all of them in the loss, nothing added
        (row,) = trainer.train_dataset.rows
        assert row["input_ids"].tolist() == rows[0]["input_ids"] == row["labels"].tolist()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    assert math.isfinite(log["loss"]) and log["text_tokens"] > 0
    has_image = any(int(i) >= trainer.code_vocab.image_offset for row in trainer.train_dataset.rows
                    for i in row["input_ids"])
    assert has_image == (kind in ("finevision", "conversations", "captions"))
    assert any(not p.equal(before[n]) for n, p in trainer.model.named_parameters())
