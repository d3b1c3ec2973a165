"""tools/cal_entropy.py and draw_pics/conditional_entropy.py: H_n on hand-computable streams, the literal
definition on random ones, per-sequence vs concatenated, image de-duplication, the spill-to-disk path against the
in-memory one, bad input, and the CLI end to end on a tiny world."""

from __future__ import annotations

import csv
import json
import math
import random
from collections import Counter

import numpy as np
import pytest

from data_process.schema import ImageCodes, Record, RecordError
from draw_pics.conditional_entropy import draw, entropy_frame
from tools.cal_entropy import KeyCounter, StreamCounter, analyse, main
from uni_arch.train.synthetic import make_world, write_records


def entropies(docs, max_n: int, **kwargs) -> list[float | None]:
    counter = StreamCounter(max_n=max_n, **kwargs)
    for doc in docs:
        counter.add(doc)
    return [row["entropy_bits"] for row in counter.rows()]


def definition(docs: list[list[int]], n: int, concatenated: bool = False) -> tuple[float, int, int]:
    """H_n = -sum p(g) log2 p(g_n | g_1..g_{n-1}) over literal tuples, with the n-gram and distinct counts."""
    seqs = [[t for d in docs for t in d]] if concatenated else docs
    grams = Counter(tuple(s[i : i + n]) for s in seqs for i in range(len(s) - n + 1))
    contexts: Counter = Counter()
    for gram, c in grams.items():
        contexts[gram[:-1]] += c
    total = sum(grams.values())
    return -sum(c / total * math.log2(c / contexts[g[:-1]]) for g, c in grams.items()), total, len(grams)


def random_docs(seed: int, count: int = 120, vocab: int = 6, max_len: int = 20) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, max_len))] for _ in range(count)]


def test_periodic_stream_is_certain_after_one_token_and_uniform_pairs_give_log2_k():
    h = entropies([[0, 1, 2] * 10], max_n=3)
    assert h[0] == pytest.approx(math.log2(3), abs=1e-12)
    assert h[1] == 0.0 and h[2] == 0.0

    k = 8  # every ordered pair once, each its own document: tokens uniform, the second independent of the first
    counter = StreamCounter(max_n=3)
    for a in range(k):
        for b in range(k):
            counter.add([a, b])
    rows = counter.rows()
    assert rows[0]["entropy_bits"] == pytest.approx(math.log2(k), abs=1e-12)
    assert rows[1]["entropy_bits"] == pytest.approx(math.log2(k), abs=1e-12)
    assert rows[1]["ngrams"] == k * k and rows[1]["distinct_contexts"] == k
    assert rows[2]["ngrams"] == 0 and rows[2]["entropy_bits"] is None  # no 3-gram inside a 2-token document
    # 64 bigrams, all distinct: the flag; 128 tokens over 8 symbols: fine
    assert [r["unreliable"] for r in rows] == [False, True, True]


def test_hand_computed_small_stream():
    h = entropies([[0, 0, 1]], max_n=2)
    assert h[0] == pytest.approx(math.log2(3) - 2 / 3, abs=1e-12)  # p = (2/3, 1/3)
    assert h[1] == pytest.approx(1.0, abs=1e-12)  # context "0" is followed by 0 and by 1, once each


@pytest.mark.parametrize("mode", ["per_sequence", "concatenated"])
def test_hashed_counts_equal_the_literal_definition(mode):
    docs = random_docs(0)
    counter = StreamCounter(max_n=4, mode=mode, batch_tokens=37)  # batches cut documents' neighbourhoods apart
    for doc in docs:
        counter.add(doc)
    for row in counter.rows():
        bits, total, distinct = definition(docs, row["n"], concatenated=mode == "concatenated")
        assert (row["ngrams"], row["distinct_ngrams"]) == (total, distinct)
        assert row["entropy_bits"] == pytest.approx(bits, abs=1e-12)


def test_per_sequence_and_concatenated_differ_as_expected():
    docs = [[0, 1], [0, 2]]
    per_seq = StreamCounter(max_n=2)
    concat = StreamCounter(max_n=2, mode="concatenated")
    for doc in docs:
        per_seq.add(doc)
        concat.add(doc)
    per_rows, concat_rows = per_seq.rows(), concat.rows()
    assert per_rows[1]["ngrams"] == 2 and per_rows[1]["entropy_bits"] == pytest.approx(1.0)  # 0 -> 1 or 2
    # concatenated adds the bigram (1, 0) across the boundary: contexts 0 (twice, 1 bit) and 1 (once, certain)
    assert concat_rows[1]["ngrams"] == 3 and concat_rows[1]["entropy_bits"] == pytest.approx(2 / 3)
    assert per_rows[0] == concat_rows[0]  # unigrams never cross anything

    docs = random_docs(1, count=60)
    joined = [[t for d in docs for t in d]]
    one_batch = entropies(docs, 4, mode="concatenated")
    assert entropies(docs, 4, mode="concatenated", batch_tokens=1) == one_batch  # carried tails at every edge
    assert entropies(joined, 4) == one_batch
    assert entropies(docs, 4) != one_batch


def test_spilled_counts_equal_in_memory_counts():
    docs = random_docs(2, count=150, vocab=12)
    in_memory = StreamCounter(max_n=4)
    bounded = StreamCounter(max_n=4, max_keys=64, batch_tokens=5)
    for doc in docs:
        in_memory.add(doc)
        bounded.add(doc)
    assert bounded.rows() == in_memory.rows()  # bit for bit: both reduce to the same count-of-counts
    assert min(c.spills for c in bounded.ngrams[1:]) > 10  # the disk path really ran, with many runs to merge

    rng = np.random.default_rng(0)
    keys = rng.integers(0, 50, 5000).astype(np.uint64)
    plain, spilled = KeyCounter(), KeyCounter(max_keys=8)
    for chunk in np.array_split(keys, 97):
        plain.add(chunk)
        spilled.add(chunk)
    assert spilled.finish() == plain.finish()
    assert spilled.spills > 1 and plain.spills == 0


def _image(codes: list[int]) -> ImageCodes:
    return ImageCodes(codes=codes, grid=(2, 2), tokenizer="toy@0")


def test_images_shared_by_records_are_counted_once(tmp_path):
    a, b = [1, 2, 3, 4], [4, 3, 2, 1]
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a thing"}]
    records = [Record(id="cap-a", type="image_text", text="a caption", images=[_image(a)]),
               Record(id="vqa-a", type="conversation", conversations=conv, images=[_image(a)]),
               Record(id="cap-b", type="image_text", text="another", images=[_image(b)])]
    path = write_records(records, tmp_path / "records.jsonl")
    [once] = analyse(records=str(path), max_n=3, memory_mb=0)["streams"]  # no tokenizer: images only
    [every] = analyse(records=str(path), max_n=3, memory_mb=0, dedupe_images=False)["streams"]
    assert once["name"] == "image codes (toy@0)" and once["image_uses"] == 3 == every["image_uses"]
    assert (once["documents"], once["tokens"], every["documents"]) == (2, 8, 3)
    assert [r["entropy_bits"] for r in once["rows"]] == entropies([a, b], 3)
    assert [r["entropy_bits"] for r in every["rows"]] == entropies([a, a, b], 3)


def test_bad_input_names_file_line_and_field(tmp_path):
    good = Record(id="t", type="text", text="fine").to_json()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\n{not json\n", encoding="utf-8")
    with pytest.raises(RecordError, match=r"bad\.jsonl:2: <json>: malformed json"):
        analyse(records=str(bad), max_n=2)
    skipped = analyse(records=str(bad), max_n=2, skip_bad_records=True)
    assert skipped["settings"]["skipped_bad_records"] == 1

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "one"}\n{"body": "two"}\n', encoding="utf-8")
    with pytest.raises(RecordError, match=r"corpus\.jsonl:2: text: missing"):
        analyse(corpora=str(corpus), tokenizer=lambda texts, **_: {"input_ids": [[1] for _ in texts]})


def test_cli_writes_tables_and_the_plot(tmp_path):
    world = make_world(tmp_path / "world", n_records=40)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the red circle\n\nthe blue square is next to it\n", encoding="utf-8")
    out = tmp_path / "out"
    result = main(records=world["data_path"], tokenizer=world["tokenizer_path"], corpora=str(corpus), max_n=3,
                  out_dir=str(out))
    names = [s["name"] for s in result["streams"]]
    assert names == ["text", "image codes (synthetic@0)", "corpus: corpus.txt"]
    text_stream, _, corpus_stream = result["streams"]
    assert text_stream["documents"] == 40 and corpus_stream["documents"] == 2  # the blank line is no document

    saved = json.loads((out / "entropy.json").read_text())
    assert saved["streams"][1]["rows"][0]["entropy_bits"] == pytest.approx(result["streams"][1]["rows"][0]["entropy_bits"])
    with (out / "entropy.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 3 * 3
    assert "| 3 |" in (out / "entropy.md").read_text()

    frame = entropy_frame(out / "entropy.json")
    assert set(frame["source"]) >= {"text", "reference: English (Qwen2.5 tokens)"}
    assert not any("reference" in s for s in entropy_frame(out / "entropy.json", reference=False)["source"])
    png = draw(out / "entropy.json")
    assert png == out / "conditional_entropy.png" and png.read_bytes()[:4] == b"\x89PNG"


def test_default_run_without_the_shapes_world_says_what_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--records data/shapes_codes" in err and "bash train.sh" in err
