"""The lazy data path (``data_cache_dir``) on 2 gloo ranks: ranks read disjoint samples and take the same steps, a
2-rank checkpoint resumes exactly on 2 ranks, and resuming it on 1 rank (in the test process) is refused with a
message before any step.

The same file is the worker: ``torchrun --nproc_per_node 2 tests/test_lazy_distributed.py --world ... --out ...``
(launched as in ``tests/test_distributed.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
N = 2  # steps before the checkpoint; the full run trains 2N


def _argv(world: dict, out: str, launched: bool = True) -> list[str]:
    """The run's arguments; ``launched``: a torchrun rank (gloo), else one process without a process group."""
    argv = ["--output_dir", out, "--use_cpu", "true", "--max_steps", str(2 * N), "--save_steps", str(N),
            "--logging_steps", "1", "--learning_rate", "3e-3", "--model_max_length", "192", "--report_to", "none",
            "--write_loss_curves", "false", "--seed", "0", "--packing_buffer", "16"]
    argv += ["--ddp_backend", "gloo"] if launched else []
    return argv + [a for k, v in world.items() for a in (f"--{k}", v)]


def worker(world_json: str, out: str, resume: str | None) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from uni_arch.log_setup import setup_logging
    from uni_arch.train.args import parse_args
    from uni_arch.train.hf_trainer import make_trainer
    from uni_arch.train.trainer import UniTrainer

    class Recording(UniTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.__dict__.setdefault("seen", []).append((self.state.global_step + 1, list(inputs["sample_ids"])))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    model_args, data_args, training_args = parse_args(_argv(json.loads(world_json), out))
    setup_logging(training_args.process_index, "WARNING")
    try:
        trainer = make_trainer(model_args, data_args, training_args, trainer_cls=Recording)
        trainer.train(resume_from_checkpoint=resume)
        seen = [None] * dist.get_world_size() if dist.is_initialized() else [trainer.seen]
        if dist.is_initialized():
            dist.all_gather_object(seen, trainer.seen)
        if trainer.is_world_process_zero():
            losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
            Path(out, "result.json").write_text(json.dumps({"losses": losses, "seen": seen}))
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _launch(world: dict, out: Path, nproc: int, port_offset: int, resume: Path | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29700 + 13 * port_offset + os.getpid() % 300), __file__, "--world", json.dumps(world), "--out", str(out)]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_ranks_resume_exactly_and_one_rank_is_refused(tmp_path):
    from uni_arch.train.synthetic import make_world

    world = {**make_world(tmp_path / "world", n_records=120), "data_cache_dir": str(tmp_path / "cache")}
    full = _launch(world, tmp_path / "full", 2, 0)
    assert full.returncode == 0, full.stderr[-6000:]
    result = json.loads((tmp_path / "full" / "result.json").read_text())
    seen = result["seen"]
    assert [[s for s, _ in rank] for rank in seen] == [list(range(1, 2 * N + 1))] * 2  # same steps on both ranks
    ids = [[i for _, batch in rank for i in batch] for rank in seen]
    assert not set(ids[0]) & set(ids[1]), "the ranks read the same samples"

    from uni_arch.train.args import parse_args
    from uni_arch.train.hf_trainer import make_trainer

    one = make_trainer(*parse_args(_argv(world, str(tmp_path / "one"), launched=False)))  # 1 rank, in this process
    with pytest.raises(ValueError, match=r"world_size: 2 in the checkpoint, 1 now.*NUM_PROCESSES=2"):
        one.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{N}"))
    assert one.state.global_step == N  # refused before any step

    again = _launch(world, tmp_path / "again", 2, 2, resume=tmp_path / "full" / f"checkpoint-{N}")
    assert again.returncode == 0, again.stderr[-6000:]
    resumed = json.loads((tmp_path / "again" / "result.json").read_text())
    assert resumed["seen"] == [[x for x in rank if x[0] > N] for rank in seen]
    for step in range(N + 1, 2 * N + 1):
        assert resumed["losses"][str(step)] == pytest.approx(result["losses"][str(step)], abs=1e-6), step


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--world", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", default=None)
    a = p.parse_args()
    worker(a.world, a.out, a.resume)
