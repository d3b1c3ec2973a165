"""data_process/train_tokenizer.py on tiny tokenizers: a 2-process `accelerate launch` (gloo) equals 1 process on
the same global batch, an interrupted run resumes bit-exactly, a data config's images (and bad inputs) feed training, HQ-VAE with the
perceptual and GAN terms trains and loads strictly, taming's adaptive weight, and --kind shapes delegates."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from data_process import train_tokenizer as tt
from modeling.vq import load_image_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "data_process" / "train_tokenizer.py"
TINY_RQ = {"channels": [8, 16, 16, 16], "dec_res_blocks": 1, "codebook_size": 32}
FLAGS = {"num_train": 64, "num_eval": 16, "max_steps": 6, "warmup_steps": 1, "batch_size": 8, "precision": "fp32",
         "num_threads": 1, "log_every": 3, "min_gate_scenes": 16}


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; do not leave its singleton state to later tests."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _cli(out: Path, nproc: int) -> None:
    args = [f"--{k}={v}" for k, v in FLAGS.items()] + ["--kind=rqvae", f"--out_dir={out}",
                                                      f"--model_config={json.dumps(TINY_RQ)}"]
    # accelerate launch as users type it; --multi_gpu on a machine without GPUs runs gloo CPU ranks
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                str(29600 + os.getpid() % 300)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(launcher + [str(SCRIPT)] + args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    """The reference: one process, in this interpreter (a second subprocess would cost ~10 s of imports)."""
    from accelerate.state import AcceleratorState

    out = tmp_path_factory.mktemp("one") / "rq"
    tt.train_tokenizer(**FLAGS, kind="rqvae", out_dir=str(out), model_config=TINY_RQ)
    AcceleratorState._reset_state(reset_partial_state=True)
    return out


def _max_diff(a: Path, b: Path) -> dict[str, float]:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return {k: float((wa[k].float() - wb[k].float()).abs().max()) for k in wa}


def test_two_gloo_processes_equal_one_process(one_process_run, tmp_path):
    _cli(tmp_path / "rq2", 2)
    diffs = _max_diff(one_process_run, tmp_path / "rq2")
    assert max(diffs.values()) < 1e-4, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]  # codebook EMA included
    m1, m2 = (json.loads((p / "metrics.json").read_text()) for p in (one_process_run, tmp_path / "rq2"))
    assert (m1["num_processes"], m2["num_processes"]) == (1, 2)
    assert m1["psnr_db"] == pytest.approx(m2["psnr_db"], abs=0.05)
    tok = load_image_tokenizer("rqvae", str(one_process_run))
    assert tok.level_sizes == (32,) * 4 and m1["tokenizer"] == tok.tokenizer_id
    assert len(m1["usage_pct_per_level"]) == 4 and m1["gate"]["passed"] is False  # 6 steps: far below the gate


def test_interrupted_run_resumes_exactly(one_process_run, tmp_path):
    out = tmp_path / "rq"
    kwargs = {**FLAGS, "kind": "rqvae", "out_dir": str(out), "model_config": TINY_RQ}
    partial = tt.train_tokenizer(**kwargs, stop_after=4)
    assert partial["steps"] == 4 and not partial["finished"] and (out / tt.STATE_NAME).exists()
    assert not (out / "model.safetensors").exists()
    tt.train_tokenizer(**kwargs)  # resumes at step 4
    assert not (out / tt.STATE_NAME).exists()
    assert max(_max_diff(one_process_run, out).values()) == 0.0
    again = tt.train_tokenizer(**kwargs)  # finished with these settings: nothing to do
    assert again["steps"] == 6
    with pytest.raises(FileExistsError, match="other settings"):
        tt.train_tokenizer(**{**kwargs, "lr": 1e-3})


def test_data_config_images_and_bad_inputs(tmp_path):
    import yaml

    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i, rgb in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (24, 20), rgb).save(images / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"colour {i}"})
    (images / "broken.png").write_bytes(b"not a png")
    rows += [{"image": "broken.png", "caption": "broken"}, {"image": "small.png", "caption": "tiny"},
             {"caption": "no image"}]
    Image.new("RGB", (8, 8), (9, 9, 9)).save(images / "small.png")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "data.yaml"
    cfg.write_text(yaml.safe_dump({"datasets": [{"name": "mine", "format": "image_folder", "image_dir": "images",
                                                 "annotations": ["c.jsonl"]}]}))
    out = tmp_path / "rq"
    metrics = tt.train_tokenizer(kind="rqvae", out_dir=str(out), data_config=str(cfg), max_steps=3, warmup_steps=1,
                                 batch_size=4, precision="fp32", num_threads=1, min_size=16,
                                 model_config={"image_size": 16, "channels": [8, 16, 16], "codebook_size": 16})
    assert metrics["steps"] == 3 and "psnr_db" not in metrics  # no shapes scenes: no gate
    assert metrics["bad_inputs"]["record:bad_record"] == 1  # the row without an image
    assert metrics["bad_inputs"]["unreadable_image"] >= 1 and metrics["bad_inputs"]["too_small"] >= 1
    assert metrics["train_config"]["num_train"] == 5  # 5 image rows enumerated, 3 usable
    assert metrics["train_config"]["edge_loss_weight"] == 0.0 and "l2_edge_weighted" not in metrics["final_terms"]
    tok = load_image_tokenizer("rqvae", str(out))
    assert tok.encode(tok.preprocess([Image.open(images / "0.png")])).codes_BN.shape == (1, 4 * 4 * 4)
    # a plain folder (no captions): every image file under it, the broken and the small one counted as bad
    folder_run = tt.train_tokenizer(kind="rqvae", out_dir=str(tmp_path / "rq_folder"), data_config=str(images),
                                    max_steps=3, warmup_steps=1, batch_size=4, precision="fp32", num_threads=1,
                                    min_size=16, model_config={"image_size": 16, "channels": [8, 16, 16],
                                                               "codebook_size": 16})
    assert folder_run["train_config"]["num_train"] == 5 and "record:bad_record" not in folder_run["bad_inputs"]
    assert folder_run["bad_inputs"]["unreadable_image"] >= 1 and folder_run["bad_inputs"]["too_small"] >= 1


def test_hqvae_with_perceptual_and_gan_terms(tmp_path, capsys):
    feats = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.Flatten()))
    feats.save(str(tmp_path / "feats.pt"))
    out = tmp_path / "hq"
    metrics = tt.train_tokenizer(
        kind="hqvae", out_dir=str(out), num_train=16, num_eval=8, max_steps=3, warmup_steps=1, batch_size=4,
        precision="fp32", num_threads=1, log_every=1, perceptual_path=str(tmp_path / "feats.pt"), disc_weight=0.5,
        disc_start=1, l1_weight=1.0, min_gate_scenes=8,
        model_config={"resolution": 64, "base_channels": 32, "channel_multiplier": [1, 1], "embed_dim": 8,
                      "level_sizes": [16, 16]})
    assert metrics["steps"] == 3 and len(metrics["perplexity_per_level"]) == 2
    terms = metrics["final_terms"]
    assert {"l1", "l2", "commit", "perceptual", "gan_g", "gan_weight", "disc", "restarted"} <= set(terms)
    assert terms["perceptual"] > 0 and terms["gan_weight"] > 0 and terms["disc"] > 0
    assert metrics["train_config"]["edge_loss_weight"] == 8.0 and terms["l2_edge_weighted"] > terms["l2"]
    tok = load_image_tokenizer("hqvae", str(out))
    assert tok.native_grid == (8, 8)  # top 8x8 + bottom 16x16 on 64 px
    with pytest.raises(FileNotFoundError, match="--perceptual_path"):
        tt.train_tokenizer(kind="rqvae", out_dir=str(tmp_path / "x"), perceptual_path=str(tmp_path / "none.pt"))


def test_adaptive_gan_weight_is_tamings_ratio():
    last = torch.ones(3, requires_grad=True)
    nll, g = (2.0 * last).sum(), (-4.0 * last).sum()  # gradient norms 2*sqrt(3) and 4*sqrt(3)
    assert float(tt.adaptive_gan_weight(nll, g, last)) == pytest.approx(0.5, rel=1e-4)


def test_kind_shapes_delegates_to_train_vq(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("data_process.train_vq.train_vq", lambda **kw: seen.update(kw) or {"ok": 1})
    assert tt.train_tokenizer(kind="shapes", out_dir=str(tmp_path), max_steps=7, dec_res_blocks=2) == {"ok": 1}
    assert seen["out_dir"] == str(tmp_path) and seen["max_steps"] == 7 and seen["dec_res_blocks"] == 2
    with pytest.raises(TypeError, match="dec_res_blocks"):
        tt.train_tokenizer(kind="rqvae", out_dir=str(tmp_path / "r"), dec_res_blocks=2)
    with pytest.raises(ValueError, match="--kind"):
        tt.train_tokenizer(kind="vqgan", out_dir=str(tmp_path / "v"))


def test_learned_code_restarter_moves_dead_codes_onto_inputs():
    from types import SimpleNamespace

    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAEVectorQuantizer

    q = ChameleonVQVAEVectorQuantizer(SimpleNamespace(num_embeddings=4, embed_dim=2, beta=0.25))
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [100.0, 100.0], [-100.0, 100.0], [100.0, -100.0]]))
    restarter = tt.LearnedCodeRestarter([q], decay=0.5, ratio=0.5)
    z = torch.randn(2, 2, 3, 3)  # 18 vectors near the origin: only code 0 is ever used
    counts = []
    for _ in range(3):
        q(z)
        counts.append(restarter.step())
    assert counts == [0, 3, 0]  # use 4.5 -> 2.25 -> 1.125 < 0.5 * 4.5 at the second step; then back to the average
    rows = set(map(tuple, z.permute(0, 2, 3, 1).reshape(-1, 2).tolist()))
    assert all(tuple(v) in rows for v in q.embedding.weight[1:].tolist())  # each restarted onto an input vector
    saved = restarter.state_dict()
    # third step: each restarted code is its own input vector's nearest code, so it is used (count above 0.5 * 4.5)
    assert torch.equal(saved[0], restarter.counts[0]) and (saved[0][1:] > 2.25).all()


def test_shared_flags_default_as_train_vq():
    """``--kind shapes`` with no flags must be train_vq's default run, so the shared defaults are train_vq's."""
    import inspect

    from data_process.train_vq import train_vq

    mine, theirs = inspect.signature(tt.train_tokenizer).parameters, inspect.signature(train_vq).parameters
    shared = ["num_train", "num_eval", "batch_size", "lr", "seed", "precision", "save_every", "num_threads"]
    assert {k: mine[k].default for k in shared} == {k: theirs[k].default for k in shared}
    # max_steps and warmup_steps default per kind: train_vq's for shapes, longer for RQ-VAE's four depths
    assert mine["max_steps"].default is None and tt.DEFAULT_MAX_STEPS["shapes"] == theirs["max_steps"].default
    assert mine["warmup_steps"].default is None
    assert tt.DEFAULT_WARMUP_STEPS["shapes"] == theirs["warmup_steps"].default
    assert tt.DEFAULT_MAX_STEPS["rqvae"] > theirs["max_steps"].default


def test_default_max_steps_per_kind(monkeypatch, tmp_path):
    """No --max_steps: --kind shapes runs train_vq's schedule (handed over explicitly)."""
    seen = {}
    monkeypatch.setattr("data_process.train_vq.train_vq", lambda **kw: seen.update(kw) or {"ok": 1})
    tt.train_tokenizer(kind="shapes", out_dir=str(tmp_path))
    assert seen["max_steps"] == tt.DEFAULT_MAX_STEPS["shapes"]
    assert seen["warmup_steps"] == tt.DEFAULT_WARMUP_STEPS["shapes"]
