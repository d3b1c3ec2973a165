"""``python tools/bench.py data`` with a small corpus runs end to end and prints its tables (the figures of issue 13
come from the same code at --sizes 200000,2000000)."""

import json

import pytest

from tools.bench import subcommand


@pytest.mark.slow  # three fresh processes (prepare, old, new), each importing torch and transformers
def test_bench_data_small_default_prints_the_tables(capsys, tmp_path):
    subcommand("data")(records=300, seq_len=256, windows=2, steps=1, threads=1, repeats=2,
                       json_out=str(tmp_path / "bench.json"))
    out = capsys.readouterr().out
    assert ("| records | pipeline | time to first batch (s) | peak RSS per rank (MiB) | of it private / mapped files "
            "(MiB) | row utilisation | note |") in out
    new = json.loads((tmp_path / "bench.json").read_text())["results"][0]["new"]
    assert len(new["repeats"]) == 2 and round(new["seconds"], 2) in new["repeats"]  # the median of the two
    assert 0 < new["anon_rss_mib"] < new["peak_rss_mib"] and new["file_rss_mib"] > 0
    assert "median of 2 ranks" in out
    for name in ("| 300 | prepare once (new) |", "| 300 | old: map-style |", "| 300 | new: data_cache_dir |"):
        assert name in out
    assert "| loader workers | packed rows/s (loader) |" in out and (tmp_path / "bench.json").is_file()
