"""tools/analyze_model_grad.py and draw_pics/grad_conflict.py on tiny random models and the synthetic world.

Pinned: the cosine is exact (1 for identical gradient sets, -1 for opposite ones, torch's cosine otherwise); a zero
gradient gives N/A, never a cosine; branches follow ``config.layer_kinds`` for every variant; the text set holds
only samples without a vision token, the multimodal set only samples with one, and every set has exactly the same
number of trained targets; 2 gloo ranks give the 1-rank result; the csv/json are written and a rerun reuses them;
the plots are drawn.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from model_fixtures import VARIANTS, documents, tiny_model
from modeling import UniXConfig, build_model
from modeling.vocab import CodeVocab
from tools import analyze_model_grad as grad

ROOT = Path(__file__).resolve().parents[1]
ONE_PROCESS = SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1, is_main_process=True)


def _row(docs: list[list[int]]) -> dict:
    ids = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs])
    return {"input_ids": ids, "labels": ids.copy(), "doc_lens": [len(d) for d in docs]}


def _gradients(model, docs: list[list[int]]) -> dict[str, torch.Tensor]:
    targets = grad.analysis_targets(model)
    params = {name: p for name, p in model.named_parameters() if name in {t.param for t in targets}}
    return grad.set_gradient(model, [_row(docs)], model.config.code_vocab, params, 100, ONE_PROCESS)


# ------------------------------------------------------------------------------------------ cosines
@pytest.mark.parametrize("name", list(VARIANTS))
def test_identical_gradient_sets_give_cosine_one(name):
    model = tiny_model(name, attn="uni_x_packed")
    targets = grad.analysis_targets(model)
    first, second = _gradients(model, documents(0)), _gradients(model, documents(0))  # two passes, same samples
    rows = grad.compare(targets, {"text": first, "mm": second, "a": first, "b": second})
    assert rows and all(r["norm_text"] > 0 for r in rows)  # the documents have text and image tokens
    for r in rows:
        assert r["cos_text_mm"] == pytest.approx(1.0, abs=1e-9) and r["cos_a_b"] == pytest.approx(1.0, abs=1e-9)
        assert r["similarity"] == pytest.approx(0.0, abs=1e-9) and r["conflict"] == pytest.approx(0.0, abs=1e-9)


def test_cosine_is_torch_cosine_and_signs():
    other = _gradients(tiny_model("dense"), documents(1))
    g = _gradients(tiny_model("dense"), documents(0))
    for name in list(g)[:5]:
        expected = torch.nn.functional.cosine_similarity(g[name].flatten().double(), other[name].flatten().double(),
                                                         dim=0).item()
        assert grad.cosine(g[name], other[name]) == pytest.approx(expected, abs=1e-12)
        assert abs(expected) < 0.999  # different data: a real test of the formula, not 1 again
        assert grad.cosine(g[name], -3 * g[name]) == pytest.approx(-1.0, abs=1e-12)


def test_zero_gradient_is_na_never_a_cosine():
    x = torch.randn(4, 3)
    assert grad.cosine(torch.zeros(4, 3), x) is None and grad.cosine(x, torch.zeros(4, 3)) is None
    model = tiny_model("uni_x_amv0", attn="uni_x_packed")
    targets = grad.analysis_targets(model)
    docs = documents(0)
    text_only = [d for d in docs if not model.config.code_vocab.is_vision_id(np.asarray(d)).any()]
    g_text, g_all = _gradients(model, text_only), _gradients(model, docs)
    rows = grad.compare(targets, {"text": g_text, "mm": g_all, "a": g_all, "b": g_all})
    vision = [r for r in rows if r["branch"] == "vision"]
    assert vision and all(r["norm_text"] == 0.0 and r["norm_mm"] > 0 for r in vision)
    assert all(r["cos_text_mm"] is None and r["similarity"] is None and r["conflict"] is None for r in vision)
    assert all(r["cos_a_b"] == pytest.approx(1.0) for r in vision)  # the vision branch's own comparison is defined
    # cos_branch (vision weight under mm data vs its text counterpart under text data): defined where shapes match
    assert {r["weight"] for r in vision if r["cos_branch"] is not None} == {"q", "k", "v", "o"}  # FFN 48 != 64
    text_side = [r for r in rows if r["branch"] != "vision"]
    assert all(r["conflict"] is not None for r in text_side)
    table = grad.rows_csv([{"rows": [{**r, "checkpoint": "c", "step": 1, "variant": "uni_x"} for r in rows]}])
    assert ",N/A," in table and "nan" not in table.lower()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_branches_follow_layer_kinds(name):
    model = tiny_model(name)
    targets = grad.analysis_targets(model)
    kinds = model.config.layer_kinds
    for layer, kind in enumerate(kinds):
        for weight in grad.WEIGHT_TYPES:
            mine = {t.branch: t for t in targets if t.layer == layer and t.weight == weight}
            split = kind in ("separated", "mot") or (kind == "moe" and weight in ("gate", "up", "down"))
            assert set(mine) == ({"text", "vision"} if split else {"shared"}), (layer, kind, weight)
            assert all(t.kind == kind for t in mine.values())
            if split:  # attention shapes match; the vision FFN is narrower (48 vs 64): no cross-branch cosine
                assert (mine["vision"].counterpart == mine["text"].param) == (weight in ("q", "k", "v", "o"))
    names = dict(model.named_parameters())
    assert all(t.param in names for t in targets)


def test_share_ffn_layers_report_the_shared_ffn():
    """add_share_ffn=1: a middle layer's share_mlp is its own branch ("share"), its mlp the text branch."""
    model = tiny_model("uni_x_amv1", add_share_ffn=1)
    targets = grad.analysis_targets(model)
    middle = [i for i, k in enumerate(model.config.layer_kinds) if k == "share_ffn"]
    assert middle, model.config.layer_kinds
    for layer in middle:
        for weight in ("gate", "up", "down"):
            mine = {t.branch: t.param for t in targets if t.layer == layer and t.weight == weight}
            assert set(mine) == {"text", "vision", "share"}, (layer, weight, mine)
            assert ".share_mlp." in mine["share"]
    assert not [t for t in targets if t.branch == "share" and t.layer not in middle]


# ------------------------------------------------------------------------------------------ samples
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from uni_arch.train.synthetic import make_world

    return make_world(tmp_path_factory.mktemp("world"), n_records=160)


def _builder_and_vocab(world):
    from data_process.text_tokenizer import load_text_tokenizer
    from uni_arch.train.args import DataArguments
    from uni_arch.train.builders import build_sample_builder

    tokenizer = load_text_tokenizer(world["tokenizer_path"])
    vocab = CodeVocab.from_tokenizer(tokenizer, [64])
    data_args = DataArguments(data_path=world["data_path"], t2i_ratio=0.5)
    return data_args, build_sample_builder(data_args, tokenizer, vocab), vocab, tokenizer


def test_text_set_holds_only_text_samples_and_every_set_the_same_tokens(world):
    data_args, builder, vocab, _ = _builder_and_vocab(world)
    sets = grad.select_sets(grad.analysis_documents(data_args, builder, vocab, seed=5), vocab, 300)
    types = {}
    for path in Path(world["data_path"]).glob("*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            types[record["id"]] = record["type"]
    text, mm = sets.sets["text"], sets.sets["mm"]
    assert text and all(not vocab.is_vision_id(s.input_ids).any() for s in text)
    assert {types[s.sample_id] for s in text} == {"text"}
    assert mm and all(vocab.is_vision_id(s.input_ids).any() for s in mm)
    assert {types[s.sample_id] for s in mm} <= {"image_text", "conversation"}
    assert all(sum(grad.trained_targets(s.labels) for s in sets.sets[k]) == 300 for k in grad.SETS)
    a, b = {id(s) for s in sets.sets["a"]}, {id(s) for s in sets.sets["b"]}
    assert not a & b  # disjoint halves of all samples, each holding both kinds
    for half in ("a", "b"):
        assert {bool(vocab.is_vision_id(s.input_ids).any()) for s in sets.sets[half]} == {True, False}
    described = sets.describe(vocab)
    assert described["text"]["image_tokens"] == 0 and described["mm"]["image_tokens"] > 0


def test_take_tokens_masks_the_tail_of_the_last_sample(world):
    data_args, builder, vocab, _ = _builder_and_vocab(world)
    samples = grad.analysis_documents(data_args, builder, vocab, seed=1)[:6]
    total = sum(grad.trained_targets(s.labels) for s in samples)
    cut = grad.take_tokens(samples, total - 3)
    assert sum(grad.trained_targets(s.labels) for s in cut) == total - 3
    assert np.array_equal(cut[-1].input_ids, samples[len(cut) - 1].input_ids)  # ids untouched, labels masked
    with pytest.raises(ValueError, match="fewer than"):
        grad.take_tokens(samples, total + 1)


# ------------------------------------------------------------------------------ the CLI, 1 and 2 ranks
def _checkpoint(world, root: Path) -> Path:
    """A random tiny Uni-X saved with its tokenizer and a run_args.json naming the world's records."""
    _, _, vocab, tokenizer = _builder_and_vocab(world)
    d = json.loads(Path(world["model_config"]).read_text())
    d.pop("model_type")
    torch.manual_seed(0)
    model = build_model(UniXConfig(**d).with_vocab(vocab))
    ckpt = root / "run"
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    run_args = {"data": {"data_path": world["data_path"], "model_max_length": 96, "t2i_ratio": 0.5, "shuffle_seed": 3}}
    (ckpt / "run_args.json").write_text(json.dumps(run_args))
    return ckpt


ARGS = ["--tokens_per_set", "400", "--cpu"]


@pytest.fixture(scope="module")
def one_rank(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("grad")
    ckpt = _checkpoint(world, root)
    grad.main(str(ckpt), str(root / "one"), tokens_per_set=400, cpu=True)
    return ckpt, root / "one"


def test_csv_and_json_written_and_a_rerun_reuses_them(one_rank, monkeypatch):
    ckpt, out = one_rank
    result = json.loads((out / grad.JSON_NAME).read_text())
    (checkpoint,) = result["checkpoints"]
    assert checkpoint["variant"] == "uni_x" and checkpoint["tokens_per_set"] == 400
    assert all(s["tokens"] == 400 for s in checkpoint["sets"].values())
    with (out / grad.CSV_NAME).open(newline="") as f:
        reader = csv.DictReader(f)
        table = list(reader)
    assert reader.fieldnames == list(grad.ROW_FIELDS)
    layers = checkpoint["layer_kinds"]
    n_vision = 7 * sum(k == "separated" for k in layers)
    assert len(table) == len(checkpoint["rows"]) == 7 * len(layers) + n_vision
    na = [r for r in table if r["conflict"] == "N/A"]
    assert len(na) == n_vision and {r["branch"] for r in na} == {"vision"}  # no text-data gradient reaches them
    assert all(float(r["conflict"]) == -float(r["similarity"]) for r in table if r["conflict"] != "N/A")
    assert [p["layer"] for p in checkpoint["per_layer"]] == list(range(len(layers)))
    assert all(p["defined"] == 7 and p["mean_conflict"] is not None for p in checkpoint["per_layer"])

    def recompute(*args, **kwargs):
        raise AssertionError("a checkpoint with a result on disk was analysed again")

    monkeypatch.setattr(grad, "analyze_checkpoint", recompute)
    before = (out / f"{ckpt.name}.json").read_text()
    grad.main(str(ckpt), str(out), tokens_per_set=400, cpu=True)
    assert (out / f"{ckpt.name}.json").read_text() == before
    with pytest.raises(AssertionError, match="analysed again"):  # other settings: recomputed
        grad.main(str(ckpt), str(out), tokens_per_set=300, cpu=True)


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_rank(one_rank, tmp_path):
    ckpt, out_one = one_rank
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29900 + os.getpid() % 90), str(ROOT / "tools" / "analyze_model_grad.py"),
           "--model_name_or_path", str(ckpt), "--output_dir", str(tmp_path / "two"), *ARGS]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    one = json.loads((out_one / grad.JSON_NAME).read_text())
    two = json.loads((tmp_path / "two" / grad.JSON_NAME).read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    rows_one, rows_two = one["checkpoints"][0]["rows"], two["checkpoints"][0]["rows"]
    assert one["checkpoints"][0]["sets"] == two["checkpoints"][0]["sets"]
    assert len(rows_one) == len(rows_two) > 0
    for r1, r2 in zip(rows_one, rows_two):
        for key in grad.ROW_FIELDS:
            if isinstance(r1[key], float):  # the same sums in another order: float rounding only
                assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-7), (r1["param"], key)
            else:
                assert r2[key] == r1[key], (r1["param"], key)


# ------------------------------------------------------------------------------------------ plots
def test_plots_drawn_for_several_runs(one_rank, tmp_path):
    from draw_pics.grad_conflict import draw, read_conflicts

    _, out = one_rank
    csv = out / grad.CSV_NAME
    rows = read_conflicts([str(csv), str(csv)], "uni_x,again")
    assert set(rows["branch"]) <= {"shared", "text"} and rows["conflict"].notna().all()
    written = draw(f"{csv},{csv}", tmp_path / "plots", labels="uni_x,again")
    names = sorted(Path(p).name for p in written)
    assert names == ["conflict_per_layer.png", "heatmap_again.png", "heatmap_uni_x.png"]
    for p in written:
        data = Path(p).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="labels"):
        draw(str(csv), tmp_path / "x", labels="a,b")
