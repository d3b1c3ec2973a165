"""train.sh end to end on the synthetic world with the smoke preset: precedence (defaults < preset < environment
< extra arguments), outputs (checkpoint, loss curves, unigram baseline), and a checkpoint that loads back."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from uni_arch.train.synthetic import make_world

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_sh_smoke_preset(tmp_path):
    world = make_world(tmp_path / "world", n_records=80)
    out = tmp_path / "run"
    env = {
        **os.environ, "SETUP_SHAPES": "0", "DATA_PATH": world["data_path"], "TOKENIZER_PATH": world["tokenizer_path"],
        "IMAGE_TOKENIZER_PATH": "", "MODEL_CONFIG": world["model_config"], "OUTPUT_DIR": str(out),
        "LEARNING_RATE": "0.004", "NUM_THREADS": "1",  # the environment beats the preset's 2e-3
    }
    cmd = ["bash", "train.sh", "configs/train/smoke.yaml", "--image_level_sizes", "64", "--data_percentage", "1.0",
           "--max_steps", "4"]  # extra arguments beat the preset's 8 steps
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads((out / "run_args.json").read_text())
    assert run["training"]["learning_rate"] == 0.004 and run["training"]["max_steps"] == 4
    assert run["data"]["model_max_length"] == 512  # from the preset (train.sh's default is 2048)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "loss_curves.csv", "loss_curves.png",
                 "unigram_baseline.json", "train.log"):
        assert (out / name).is_file(), name
    assert f"checkpoint:   {out}" in proc.stdout
    baseline = json.loads((out / "unigram_baseline.json").read_text())
    assert baseline["text_unigram_entropy"] > 0 and baseline["image_unigram_entropy"] > 0

    from transformers import AutoModelForCausalLM

    import modeling  # noqa: F401  registers uni_x_qwen2

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.variant == "uni_x" and model.config.image_level_sizes == [64]


def test_bad_launcher_and_missing_preset_fail_fast(tmp_path):
    env = {**os.environ, "SETUP_SHAPES": "0", "LAUNCHER": "nope"}
    proc = subprocess.run(["bash", "train.sh", str(tmp_path / "missing.yaml")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_a_world_of_another_size_is_not_reused_silently(tmp_path):
    """A shapes world left by an earlier run (or an older default) with another number of images stops the set-up
    with both numbers and what to do, before anything is trained on it."""
    shapes = tmp_path / "shapes"
    shapes.mkdir()
    (shapes / "world.json").write_text(json.dumps({"seed": 0, "num_images": 4000, "complete": True}))
    env = {**os.environ, "SHAPES_DIR": str(shapes), "SHAPES_CODES_DIR": str(tmp_path / "codes"),
           "OUTPUT_DIR": str(tmp_path / "run"), "SHAPES_NUM_IMAGES": "16000", "SETUP_SHAPES": "1"}
    proc = subprocess.run(["bash", "train.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    assert "was built with 4000 images and 0 held-out pairs, but SHAPES_NUM_IMAGES=16000 SHAPES_HELDOUT_PAIRS=4" in log
    assert "SHAPES_NUM_IMAGES=4000 SHAPES_HELDOUT_PAIRS=0" in log
    assert not (tmp_path / "run" / "train.log").exists() and not (shapes / "vq").exists()


@pytest.mark.slow
def test_train_sh_stops_at_the_vq_quality_gate_before_encoding_or_training(tmp_path):
    """A deliberately under-trained VQ (2 steps) makes the shapes set-up stop with the figures and what to do,
    before any code-ID record or model exists; a VQ folder without gate figures (an older train_vq) is not reused.

    Small world and 40 held-out scenes to stay fast: the gate's >= 1,000-scene rule is lowered through its knob."""
    shapes, codes, out = tmp_path / "shapes", tmp_path / "codes", tmp_path / "run"
    env = {
        **os.environ, "SHAPES_DIR": str(shapes), "SHAPES_CODES_DIR": str(codes), "OUTPUT_DIR": str(out),
        "SHAPES_NUM_IMAGES": "16", "NUM_THREADS": "1", "VQ_GATE_MIN_SCENES": "40",
        "VQ_EXTRA_ARGS": "--max_steps 2 --warmup_steps 1 --num_train 64 --num_eval 40 --precision fp32 --num_threads 1",
    }
    # The set-up skips a step whose output exists: a placeholder spares the BPE training, which the gate precedes
    # in what it protects (nothing reads the text tokenizer before the LLM is trained).
    (shapes / "tokenizer").mkdir(parents=True)
    (shapes / "tokenizer" / "tokenizer.json").write_text("{}")
    proc = subprocess.run(["bash", "train.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    assert "below the quality gate" in log and "detector exact match on reconstructions" in log
    assert "% < 90%" in log and f"delete {shapes / 'vq'}" in log and "stopped at the VQ quality gate" in log
    metrics = json.loads((shapes / "vq" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["detector_exact_pct"] < 90.0 and not metrics["gate"]["passed"]
    assert f"{metrics['detector_exact_pct']}%" in log  # the message names the measured figure
    assert not codes.exists() and not (out / "train.log").exists()  # nothing encoded, nothing trained

    # A folder left by the train_vq before the gate (no gate figures) is skipped by the VQ step but not reused.
    (shapes / "vq" / "metrics.json").write_text(json.dumps({"psnr_db": 35.5, "usage_pct": 100.0}))
    proc = subprocess.run(["bash", "train.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "no gate figures" in log, log[-3000:]
    assert not codes.exists() and not (out / "train.log").exists()


@pytest.mark.slow
def test_train_sh_sets_up_the_shapes_world_on_an_rqvae(tmp_path):
    """IMAGE_TOKENIZER=rqvae: the set-up trains the RQ-VAE with data_process/train_tokenizer.py into
    SHAPES_DIR/rqvae and holds it to the same gate before encoding (an under-trained one stops the run)."""
    shapes, codes, out = tmp_path / "shapes", tmp_path / "codes", tmp_path / "run"
    tiny = '{"channels":[8,16,16,16],"dec_res_blocks":1,"codebook_size":32}'
    env = {
        **os.environ, "IMAGE_TOKENIZER": "rqvae", "SHAPES_DIR": str(shapes), "SHAPES_CODES_DIR": str(codes),
        "OUTPUT_DIR": str(out), "SHAPES_NUM_IMAGES": "16", "NUM_THREADS": "1", "VQ_GATE_MIN_SCENES": "40",
        "VQ_EXTRA_ARGS": f"--max_steps 2 --warmup_steps 1 --num_train 64 --num_eval 40 --precision fp32 "
                         f"--num_threads 1 --model_config {tiny}",
    }
    (shapes / "tokenizer").mkdir(parents=True)  # as above: the BPE training is not what this test is about
    (shapes / "tokenizer" / "tokenizer.json").write_text("{}")
    proc = subprocess.run(["bash", "train.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    assert "training the shapes world's rqvae tokenizer" in log and "stopped at the VQ quality gate" in log
    metrics = json.loads((shapes / "rqvae" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["tokenizer"].startswith("rqvae@")
    assert metrics["train_config"]["model"]["codebook_size"] == 32 and f"{metrics['detector_exact_pct']}%" in log
    assert not (shapes / "vq").exists() and not codes.exists() and not (out / "train.log").exists()
