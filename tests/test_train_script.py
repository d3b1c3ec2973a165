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
