"""tools/ablate.py: the ``ci`` preset end to end (data once, dense / Uni-X / MoT through train.sh, held-out losses,
the orchestrator's shapes GenEval and VQA, the gradient analysis, table and plots), and a rerun that redoes nothing.

Pinned: the table has every variant and every metric (GenEval seen and unseen too: the world holds out pairs); the
three variants read the same number of parameters per text token and per image token while their totals differ
(dense < Uni-X < MoT); the held-out losses come from another world seed's records; a rerun on the same out_dir calls
neither train.sh, nor the orchestrator, nor the gradient analysis, and writes the same table.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tools import ablate


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    result = ablate.main(out_dir=str(out), preset="ci")
    return out, result


@pytest.mark.slow
def test_ci_preset_writes_every_variant_and_metric(ci_run):
    out, result = ci_run
    table = {row["variant"]: row for row in result["table"]}
    assert list(table) == list(ablate.VARIANTS)
    for variant, row in table.items():
        for metric in ablate.METRICS:
            assert row[metric] is not None, (variant, metric)
        assert row["text_loss"] > 0 and row["image_loss"] > 0
        assert 0 <= row["geneval"] <= 100 and 0 <= row["vqa"] <= 100
        assert row["score"] == pytest.approx((row["geneval"] + row["vqa"]) / 2)
    with open(out / "ablation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == list(ablate.VARIANTS)
    assert set(ablate.METRICS) <= set(rows[0])
    md = (out / "ablation.md").read_text()
    assert all(f"| {v} |" in md for v in ablate.VARIANTS) and "41.6" in md  # the reference's row is quoted
    saved = json.loads((out / "ablation.json").read_text())
    assert {r["run"] for r in saved["runs"]} == {"dense-s42", "uni_x-s42", "mot-s42"}
    for plot in result["plots"]:
        assert Path(plot).stat().st_size > 5000, plot
    assert (out / "plots" / "grad" / "conflict_per_layer.png").is_file()
    # the held-out losses read the other world's records (seed 1), never the training world's
    world = json.loads((out / "data" / "heldout_world" / "world.json").read_text())
    assert world["seed"] == ablate.PRESETS["ci"].heldout_seed != 0
    loss = json.loads((out / "runs" / "uni_x-s42" / "heldout_loss.json").read_text())
    assert loss["text_tokens"] > 0 and loss["image_tokens"] > 0
    # unseen-pair GenEval: the training world holds pairs out and the orchestrator reports them
    shapes = json.loads((out / "eval" / "uni_x-s42" / "shapes" / "results.json").read_text())
    assert shapes["unseen_pairs"] and {"model_seen", "model_unseen"} <= set(shapes["headline"])


@pytest.mark.slow
def test_ci_preset_has_equal_active_parameters_per_token(ci_run):
    _, result = ci_run
    table = {row["variant"]: row for row in result["table"]}
    assert len({(r["active_text"], r["active_image"]) for r in table.values()}) == 1
    assert table["dense"]["active_text"] == table["dense"]["total"]  # dense: every token reads every weight
    assert table["dense"]["total"] < table["uni_x"]["total"] < table["mot"]["total"]


@pytest.mark.slow
def test_rerun_trains_and_evaluates_nothing_twice(ci_run, monkeypatch):
    out, first = ci_run
    from evaluation import eval_template
    from tools import analyze_model_grad

    def refuse(*args, **kwargs):
        raise AssertionError("redone on a rerun")

    monkeypatch.setattr(ablate, "train", refuse)
    monkeypatch.setattr(eval_template, "main", refuse)
    monkeypatch.setattr(analyze_model_grad, "main", refuse)
    monkeypatch.setattr(ablate, "heldout_losses", refuse)
    again = ablate.main(out_dir=str(out), preset="ci")
    assert again["table"] == first["table"]


def test_bad_options_name_themselves(tmp_path):
    with pytest.raises(ValueError, match="--preset"):
        ablate.main(out_dir=str(tmp_path), preset="nope")
    with pytest.raises(ValueError, match="unknown option.*max_stepz"):
        ablate.main(out_dir=str(tmp_path), max_stepz=3)
    with pytest.raises(ValueError, match="--variants"):
        ablate.main(out_dir=str(tmp_path), variants="dense,moe")


def test_plan_only_estimates_from_train_sh_defaults(tmp_path):
    result = ablate.main(out_dir=str(tmp_path), plan_only=True)
    assert result["runs"] == ["dense-s42", "uni_x-s42", "mot-s42"]
    steps = int(ablate.train_sh_default("MAX_STEPS"))
    per_run = ablate.DEFAULT_SECONDS["train_start"] + steps * ablate.DEFAULT_SECONDS["train_step"] + sum(
        ablate.DEFAULT_SECONDS[k] for k in ("heldout_loss", "eval", "grad"))
    assert result["estimate_s"] == pytest.approx(3 * per_run)
    assert not (tmp_path / "runs").exists()  # nothing was trained
