"""Two CPU ranks (gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3 give the same losses; rank 1 trains on text-only rows
(the vision branch must stay in the graph); a ZeRO-3 checkpoint loads back with ``from_pretrained``; 2 ranks x
gradient accumulation 1 equal 1 rank x gradient accumulation 2 on the same rows (pins the loss scaling by
``num_processes`` and by the accumulated token count).

The same file is the worker: ``torchrun --nproc_per_node 2 tests/test_distributed.py --engine ddp ...``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
ENGINES = {"ddp": None, "zero2": "configs/deepspeed/zero2.json", "zero3": "configs/deepspeed/zero3.json"}


# ------------------------------------------------------------------------------------------- worker
def _regroup_rows(dataset, vocab) -> None:
    """Rows alternate [image docs] / [text-only docs]; with sequential sampling rank 1 sees text only."""
    import numpy as np

    docs = {True: [], False: []}
    for row in dataset.rows:
        pos = 0
        for n, sid in zip(row["doc_lens"], row["sample_ids"]):
            ids, labels = row["input_ids"][pos : pos + n], row["labels"][pos : pos + n]
            docs[bool(vocab.is_image_id(ids).any())].append((ids, labels, sid))
            pos += n
    rows = {k: [] for k in docs}
    for k, items in docs.items():
        for i in range(0, len(items), 3):
            chunk = items[i : i + 3]
            rows[k].append({"input_ids": np.concatenate([c[0] for c in chunk]),
                            "labels": np.concatenate([c[1] for c in chunk]),
                            "doc_lens": [len(c[0]) for c in chunk], "sample_ids": [c[2] for c in chunk]})
    n = min(len(rows[True]), len(rows[False]))
    dataset.rows = [r for pair in zip(rows[True][:n], rows[False][:n]) for r in pair]


def worker(engine: str, world_json: str, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    from uni_arch.log_setup import setup_logging
    from uni_arch.train.args import parse_args
    from uni_arch.train.hf_trainer import make_trainer
    from uni_arch.train.trainer import UniTrainer

    class Recording(UniTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            has_image = bool(self.code_vocab.is_image_id(inputs["input_ids"].cpu().numpy()).any())
            self.__dict__.setdefault("image_flags", []).append(has_image)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    world = json.loads(world_json)
    argv = ["--output_dir", out, "--use_cpu", "true", "--max_steps", str(STEPS), "--logging_steps", "1",
            "--learning_rate", "3e-3", "--save_strategy", "no", "--model_max_length", "192", "--report_to", "none",
            "--write_loss_curves", "false", "--seed", "0", "--train_sampling_strategy", "sequential",
            "--ddp_backend", "gloo", "--max_grad_norm", "1.0"]
    if ENGINES[engine]:
        argv += ["--deepspeed", str(ROOT / ENGINES[engine])]
    for k, v in world.items():
        argv += [f"--{k}", v]
    model_args, data_args, training_args = parse_args(argv)
    setup_logging(training_args.process_index, "WARNING")
    import torch.distributed as dist

    try:
        trainer = make_trainer(model_args, data_args, training_args, trainer_cls=Recording)
        _regroup_rows(trainer.train_dataset, trainer.code_vocab)
        trainer.train()
        trainer.save_model()  # every rank (ZeRO-3 gathers the shards collectively)
        if dist.is_initialized():
            flags = [None] * dist.get_world_size()
            dist.all_gather_object(flags, trainer.image_flags)
        else:  # one process launched without a process group
            flags = [trainer.image_flags]
        if trainer.is_world_process_zero():
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            Path(out, "result.json").write_text(json.dumps({"losses": losses, "image_flags": flags}))
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


# -------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from uni_arch.train.synthetic import make_world

    return make_world(tmp_path_factory.mktemp("world"), n_records=120)


def _launch(engine: str, world: dict, out: Path, nproc: int, port_offset: int) -> tuple[Path, dict]:
    """Run the worker under torchrun with ``nproc`` CPU ranks; returns the output directory and rank 0's result."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29500 + 17 * port_offset + os.getpid() % 300), __file__,
           "--engine", engine, "--world", json.dumps(world), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"{engine} x{nproc} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return out, json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {engine: _launch(engine, world, root / engine, 2, k) for k, engine in enumerate(ENGINES)}


@pytest.fixture(scope="module")
def one_rank_ga2(world, tmp_path_factory):
    """The DDP run's global batch (2 ranks x GA 1 x 1 row) as 1 rank x GA 2 x 1 row: with sequential sampling rank r
    reads rows r, r + 2, ..., so step s sees rows 2s and 2s + 1 in both runs."""
    return _launch("ddp", {**world, "gradient_accumulation_steps": "2"}, tmp_path_factory.mktemp("ga2") / "ddp", 1,
                   len(ENGINES))


@pytest.mark.slow
def test_two_ranks_one_text_only(runs):
    _, ddp = runs["ddp"]
    assert ddp["image_flags"][0] == [True] * STEPS and ddp["image_flags"][1] == [False] * STEPS


@pytest.mark.slow
def test_ddp_zero2_zero3_same_losses(runs):
    ddp = runs["ddp"][1]["losses"]
    assert len(ddp) == STEPS
    for engine in ("zero2", "zero3"):
        assert runs[engine][1]["losses"] == pytest.approx(ddp, abs=1e-5), engine


@pytest.mark.slow
def test_zero3_checkpoint_loads_with_from_pretrained(runs):
    import torch
    from transformers import AutoModelForCausalLM

    import modeling  # noqa: F401  registers uni_x_qwen2

    ddp = AutoModelForCausalLM.from_pretrained(runs["ddp"][0])
    z3 = AutoModelForCausalLM.from_pretrained(runs["zero3"][0])
    sd_ddp, sd_z3 = ddp.state_dict(), z3.state_dict()
    assert sd_ddp.keys() == sd_z3.keys()
    for k in sd_ddp:
        assert sd_z3[k].numel() > 0, f"{k} saved as an empty ZeRO-3 shard"
        assert torch.allclose(sd_ddp[k], sd_z3[k], atol=1e-4), k


@pytest.mark.slow
def test_every_engine_saves_the_inference_spec_next_to_the_weights(runs):
    """uni_x_inference.json is written by the process that writes the weights, under DDP, ZeRO-2 and ZeRO-3 alike."""
    from uni_arch.train.inference_spec import InferenceSpec

    specs = {engine: InferenceSpec.load(out) for engine, (out, _) in runs.items()}
    assert specs["zero3"] == specs["ddp"] == specs["zero2"] and specs["ddp"].chat_format["roles"]


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_gradient_accumulation(runs, one_rank_ga2):
    """Same rows, same order, same global batch: the logged losses and the trained weights must agree (the loss is
    normalised by the token count of the whole accumulated, all-rank batch and scaled by ``num_processes`` for DDP's
    gradient averaging; a missing or double scaling shows here as a factor of 2)."""
    import torch
    from transformers import AutoModelForCausalLM

    import modeling  # noqa: F401  registers uni_x_qwen2

    (ddp_dir, ddp), (ga_dir, ga) = runs["ddp"], one_rank_ga2
    assert ga["image_flags"][0] == [True, False] * STEPS  # the same rows as the two ranks, interleaved
    assert len(ga["losses"]) == STEPS
    assert ga["losses"] == pytest.approx(ddp["losses"], abs=1e-5)
    sd_ddp = AutoModelForCausalLM.from_pretrained(ddp_dir).state_dict()
    sd_ga = AutoModelForCausalLM.from_pretrained(ga_dir).state_dict()
    assert sd_ddp.keys() == sd_ga.keys()
    for k in sd_ddp:
        assert torch.allclose(sd_ddp[k], sd_ga[k], atol=1e-5, rtol=0), (k, (sd_ddp[k] - sd_ga[k]).abs().max())


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--engine", choices=sorted(ENGINES), required=True)
    p.add_argument("--world", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    worker(a.engine, a.world, a.out)
