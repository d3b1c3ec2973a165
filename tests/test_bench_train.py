"""The mixed synthetic corpus (length distribution, determinism) and the training benchmark's bookkeeping on a
miniature world: utilisation per mode, the mode 2 / mode 0 ratios, the skipped shapes world. No timing asserted."""

import math
import statistics

import pytest

from data_process.schema import read_records
from tools import bench_train
from uni_arch.train.synthetic import make_world, mixed_records


def test_mixed_records_length_distribution():
    records = mixed_records(600, seed=3)
    text = [len(r.text.split()) for r in records if r.type == "text"]
    images = [r for r in records if r.type == "image_text"]
    assert 0.25 < len(images) / len(records) < 0.35
    assert all(len(r.images) == 1 and r.images[0].grid == (32, 32) and len(r.images[0].codes) == 1024 for r in images)
    assert all(0 <= c < 512 for r in images for c in r.images[0].codes)
    assert 60 <= statistics.median(text) <= 105  # log-normal, median 80 words
    assert max(text) <= 1200 and max(text) > 4 * statistics.median(text)  # a long tail, capped
    assert [r.text for r in mixed_records(50, seed=3)] == [r.text for r in records[:50]]
    with pytest.raises(ValueError, match="image_fraction"):
        mixed_records(1, image_fraction=1.5)


def test_make_world_mixed_and_unknown_corpus(tmp_path):
    world = make_world(tmp_path / "w", n_records=20, grid=(8, 8), corpus="mixed")
    records = [r for p in sorted((tmp_path / "w" / "records").glob("*.jsonl")) for _, r in read_records(p)]
    assert len(records) == 20 and {r.type for r in records} <= {"text", "image_text"}
    assert world["image_level_sizes"] == "64"
    with pytest.raises(ValueError, match="corpus"):
        make_world(tmp_path / "x", n_records=2, corpus="nope")


def test_utilisation_row_packing_beats_padding_on_mixed_lengths():
    lengths = [10] * 7 + [1000]  # one long sample pads a whole batch of short ones
    row = bench_train.utilisation_row(lengths, seq_len=1024, batch_size=8)
    assert row["mode0_padded"] == pytest.approx(1070 / 8000)
    assert row["mode2"] == pytest.approx(1070 / 2048)  # 1000 + 2 x 10 fill one row, the other five the next


def test_bench_world_on_a_miniature_mixed_world(tmp_path, monkeypatch):
    def tiny_world(world, tmp, n_records):
        if world == "shapes":
            return None
        paths = make_world(tmp / "mini", n_records=n_records, grid=(8, 8), corpus="mixed", hidden_size=32, layers=2)
        return [arg for k, v in paths.items() for arg in (f"--{k}", v)]

    monkeypatch.setattr(bench_train, "_world_args", tiny_world)
    kwargs = dict(seq_len=512, batch_size=None, steps=2, warmup=1, n_records=120)
    assert bench_train.bench_world("shapes", tmp_path, **kwargs) is None
    r = bench_train.bench_world("mixed", tmp_path, **kwargs)
    speed = r["throughput"]
    assert r["batch_size_mode0"] == max(1, round(512 * r["token_utilisation"]["mode2"] / r["mean_length"]))
    assert r["token_utilisation"]["mode2"] > r["token_utilisation"]["mode0_padded"]
    for mode in ("mode2", "mode0"):
        assert speed[mode]["steps"] == 2 and speed[mode]["real_tokens"] > 0
        assert math.isfinite(speed[mode]["tokens_per_second"]) and speed[mode]["tokens_per_second"] > 0
        assert 0 < speed[mode]["token_utilisation"] <= 1
    assert speed["mode0"]["batch_size"] == r["batch_size_mode0"] and speed["mode2"]["batch_size"] == 1
    assert speed["mode2_over_mode0_tokens_per_second"] == pytest.approx(
        speed["mode2"]["tokens_per_second"] / speed["mode0"]["tokens_per_second"])
    table = bench_train._table({"shapes": None, "mixed": r}, 512, 1, 2, 1)
    assert "shapes   skipped" in table and "mixed" in table
