"""The lazy data path (uni_arch/train/lazy_dataset.py): shards prepared once, the epoch plan without a table, rows
packed on the fly per window, ranks balanced, workers without effect on the order, bad records named."""

import itertools
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest

from data_process.schema import RecordError
from modeling.vocab import CodeVocab
from uni_arch.train.dataset import build_map_dataset, parse_data_path
from uni_arch.train.lazy_dataset import MixPlan, make_stream, open_cache, permute, prepare_cache
from uni_arch.train.synthetic import synthetic_records, write_records

VOCAB = CodeVocab(image_offset=100, level_sizes=(64,), vision_start_id=3, vision_end_id=4)


@dataclass
class _Sample:
    input_ids: list
    labels: list
    image_spans: list


class DrawBuilder:
    """Text -> one id per character, an image -> start, codes, end; the first token is the rng's draw (1 or 2), so
    a different draw per occurrence shows in the rows."""

    def build(self, record, rng):
        ids = [1 if rng.random() < 0.3 else 2] + [5 + (ord(ch) % 90) for ch in (record.text or "q")]
        spans = []
        for im in record.images:
            spans.append((len(ids), len(ids) + len(im.codes) + 2))
            ids += [3, *VOCAB.codes_to_ids(im.codes).tolist(), 4]
        return _Sample(ids, list(ids), spans)


@pytest.fixture()
def corpus(tmp_path):
    """Three record files of uneven size (50, 7, 23) in two sources."""
    write_records(synthetic_records(50, seed=1, prefix="a"), tmp_path / "a" / "p0.jsonl")
    write_records(synthetic_records(7, seed=2, prefix="b"), tmp_path / "a" / "p1.jsonl")
    write_records(synthetic_records(23, seed=3, prefix="c"), tmp_path / "c.jsonl")
    return tmp_path


def _stream(corpus, spec, **kw):
    sources = parse_data_path(spec)
    prepare_cache(sources, VOCAB, corpus / "cache")
    args = dict(seq_len=256, mode=2, seed=5, window=8) | kw
    return make_stream(sources, DrawBuilder(), VOCAB, corpus / "cache", **args)


def _key(rows):
    return sorted((tuple(r["sample_ids"]), tuple(int(i) for i in r["input_ids"])) for r in rows)


def test_permute_is_a_bijection_for_any_size():
    for n in (1, 2, 3, 10, 97, 1000, 4097):
        out = permute(np.arange(n), n, key=n)
        assert sorted(out.tolist()) == list(range(n))
    assert permute(np.arange(50), 50, key=1).tolist() != permute(np.arange(50), 50, key=2).tolist()


def test_lazy_path_equals_the_map_path_sample_for_sample(corpus):
    """With mix_indices's own order (TablePlan) and one window per epoch, the lazy path renders and packs exactly
    the rows of build_map_dataset, draws included: the cache, the lazy reads and the per-window packing add
    nothing. Two epochs: fresh draws in the second, as in the map-style plan."""
    spec = f"{corpus}/a:0.7,{corpus}/c.jsonl:0.3"
    today = build_map_dataset(parse_data_path(spec), DrawBuilder(), VOCAB, seq_len=256, mode=2, seed=5, epochs=2)
    epoch_len = 80
    stream = _stream(corpus, spec, window=epoch_len, plan="table")
    lazy_rows = stream.window_rows(0) + stream.window_rows(1)
    assert _key(lazy_rows) == _key(today.rows)
    assert len(today.rows) == len(lazy_rows) > 0


def test_mix_plan_keeps_the_proportions_subsets_and_fresh_copies():
    plan = MixPlan([30, 10], [1.0, 1.0], [1.0, 1.0], seed=3)  # equal weights: 40 occurrences, 20 each
    occ = plan.locate(np.arange(2 * plan.epoch_len))
    assert plan.epoch_len == 40 and (occ.epoch == np.repeat([0, 1], 40)).all()
    first = occ.epoch == 0
    assert Counter(occ.source[first].tolist()) == {0: 20, 1: 20}
    copies = Counter(occ.record[first & (occ.source == 1)].tolist())
    assert sorted(copies) == list(range(10)) and set(copies.values()) == {2}  # each of the 10 records twice
    down = set(occ.record[first & (occ.source == 0)].tolist())
    assert len(down) == 20  # 20 distinct of 30: down-sampled without repeats
    assert down != set(occ.record[~first & (occ.source == 0)].tolist())  # another choice in the next epoch
    sub = MixPlan([100], [1.0], [0.3], seed=3)  # percentage: the same 30 records in every epoch
    o = sub.locate(np.arange(3 * sub.epoch_len))
    epochs = [set(o.record[o.epoch == e].tolist()) for e in range(3)]
    assert sub.epoch_len == 30 and len(epochs[0]) == 30 and epochs[0] == epochs[1] == epochs[2]
    whole = MixPlan([7, 5], [None, None], [1.0, 1.0], seed=0)  # the reference's a^^b: each source whole
    o = whole.locate(np.arange(whole.epoch_len))
    assert sorted(zip(o.source.tolist(), o.record.tolist())) == [(0, i) for i in range(7)] + [(1, i) for i in range(5)]


def test_three_ranks_over_uneven_shards_are_balanced_and_disjoint(corpus):
    """Windows are dealt round-robin and the stream is endless: every rank yields as many rows as asked (none runs
    dry), and over one data epoch the ranks read disjoint samples that cover it."""
    stream = _stream(corpus, str(corpus))  # one source: 80 records, each once per epoch, 10 windows of 8
    per_rank = [list(itertools.islice(stream.rank_rows(r, 3), 60)) for r in range(3)]
    assert [len(rows) for rows in per_rank] == [60, 60, 60]
    epoch = [[sid for j in range(r, 10, 3) for row in stream.window_rows(j) for sid in row["sample_ids"]]
             for r in range(3)]
    assert sorted(sum(epoch, [])) == sorted(f"{p}-{i:06d}" for p, n in (("a", 50), ("b", 7), ("c", 23))
                                            for i in range(n))
    assert [len(e) for e in epoch] == [32, 24, 24]  # windows 0,3,6,9 / 1,4,7 / 2,5,8


def test_rows_do_not_depend_on_the_number_of_workers(corpus):
    stream = _stream(corpus, str(corpus), mode=1, seq_len=64)
    ref = [(tuple(r["sample_ids"]), r["input_ids"].tolist()) for r in itertools.islice(stream.rank_rows(1, 2), 40)]
    for workers in (1, 2):
        rows = itertools.islice(stream.rank_rows(1, 2, workers=workers), 40)
        assert [(tuple(r["sample_ids"]), r["input_ids"].tolist()) for r in rows] == ref, workers


def test_packing_on_the_fly_keeps_the_utilisation(corpus):
    stream = _stream(corpus, str(corpus), seq_len=128, window=40)
    rows = [row for j in range(6) for row in stream.window_rows(j)]
    assert sum(len(r["input_ids"]) for r in rows) / (128 * len(rows)) > 0.9


def _corrupt(path, lineno, new_line):
    lines = path.read_text().splitlines()
    lines[lineno - 1] = new_line
    path.write_text("\n".join(lines) + "\n")


def test_bad_record_stops_the_prepare_naming_file_line_field(corpus):
    _corrupt(corpus / "c.jsonl", 3, '{"id": "x", "type": "text"}')
    sources = parse_data_path(str(corpus))
    with pytest.raises(RecordError, match=r"c\.jsonl:3: text: a text record needs a non-empty text"):
        prepare_cache(sources, VOCAB, corpus / "cache")
    counts = prepare_cache(sources, VOCAB, corpus / "cache", skip_bad_records=True)
    assert counts["prepared"] == 1 and counts["records"] == 22  # a/ was prepared before c.jsonl stopped it
    with pytest.raises(RecordError, match=r"c\.jsonl.*1 bad record"):
        open_cache(sources, VOCAB, corpus / "cache")  # a run without skip_bad_records still stops
    assert sum(len(c) for c in open_cache(sources, VOCAB, corpus / "cache", skip_bad_records=True)) == 79


def test_a_changed_file_is_prepared_again_and_a_missing_shard_is_named(corpus):
    sources = parse_data_path(str(corpus / "c.jsonl"))
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        open_cache(sources, VOCAB, corpus / "cache")
    assert prepare_cache(sources, VOCAB, corpus / "cache")["prepared"] == 1
    assert prepare_cache(sources, VOCAB, corpus / "cache")["prepared"] == 0
    write_records(synthetic_records(5, seed=9, prefix="z"), corpus / "c.jsonl")
    sources = parse_data_path(str(corpus / "c.jsonl"))
    assert prepare_cache(sources, VOCAB, corpus / "cache")["prepared"] == 1
    assert len(open_cache(sources, VOCAB, corpus / "cache")[0]) == 5


def test_draws_are_per_occurrence(corpus):
    """An up-sampled record gets a fresh draw per copy (the rng of its occurrence), as in the map-style path."""
    stream = _stream(corpus, f"{corpus}/a:0.2,{corpus}/c.jsonl:0.8", window=80, mode=0)
    draws: dict[str, set] = {}
    for row in stream.window_rows(0):
        draws.setdefault(row["sample_ids"][0], set()).add(int(row["input_ids"][0]))
    assert sum(len(v) == 2 for k, v in draws.items() if k.startswith("c")) >= 10


def test_a_resume_on_another_layout_is_refused_with_what_to_do():
    from uni_arch.train.lazy_dataset import layout_problem

    saved = {"world_size": 2, "packing_buffer": 512, "shuffle_seed": 218, "records": [80]}
    assert layout_problem(saved, dict(saved)) is None
    problem = layout_problem(saved, {**saved, "world_size": 1})
    assert "world_size: 2 in the checkpoint, 1 now" in problem and "NUM_PROCESSES=2" in problem
    assert "records: [80] in the checkpoint, [81] now" in layout_problem(saved, {**saved, "records": [81]})


def test_arguments_refuse_streaming_with_the_cache_and_a_run_without_max_steps(corpus):
    from uni_arch.train.args import DataArguments, UniTrainingArguments
    from uni_arch.train.builders import build_train_dataset

    with pytest.raises(ValueError, match="data_cache_dir=.* and streaming_data=1"):
        DataArguments(data_path=str(corpus), data_cache_dir=str(corpus / "cache"), streaming_data=1)
    data_args = DataArguments(data_path=str(corpus), data_cache_dir=str(corpus / "cache"))
    training_args = UniTrainingArguments(output_dir=str(corpus / "out"), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="needs max_steps > 0"):
        build_train_dataset(data_args, training_args, DrawBuilder(), VOCAB)


def test_parallel_prepare_writes_the_same_shards(corpus):
    sources = parse_data_path(str(corpus))
    assert prepare_cache(sources, VOCAB, corpus / "serial")["records"] == 80
    assert prepare_cache(sources, VOCAB, corpus / "parallel", num_proc=2)["records"] == 80
    serial, parallel = (open_cache(sources, VOCAB, corpus / d) for d in ("serial", "parallel"))
    assert [c.table["record"] for c in serial] == [c.table["record"] for c in parallel]
    assert [c.located(57).line for c in serial] == [c.located(57).line for c in parallel] == [1]  # c.jsonl, line 1
