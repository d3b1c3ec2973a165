"""Exact resume: train 2N steps (checkpoint at N) vs resume that checkpoint for N more steps.

The resumed run must see exactly the same samples at each step (none trained twice, none skipped) and reach the
same losses to 1e-6 on CPU, for map-style, streamed and lazily read (``data_cache_dir``) data.
"""

import pytest

from uni_arch.train.args import parse_args
from uni_arch.train.hf_trainer import make_trainer
from uni_arch.train.synthetic import make_world
from uni_arch.train.trainer import UniTrainer

N = 3


class RecordingTrainer(UniTrainer):
    """Records the sample ids of every trained micro-batch, keyed by the step it belongs to."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.__dict__.setdefault("seen", []).append((self.state.global_step + 1, tuple(inputs["sample_ids"])))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"), n_records=150)


def _run(world, out, *extra, resume=None):
    argv = ["--output_dir", str(out), "--use_cpu", "true", "--max_steps", str(2 * N), "--save_steps", str(N),
            "--logging_steps", "1", "--learning_rate", "3e-3", "--model_max_length", "192", "--report_to", "none",
            "--write_loss_curves", "false", "--seed", "0", "--per_device_train_batch_size", "2"]
    for k, v in world.items():
        argv += [f"--{k}", v]
    trainer = make_trainer(*parse_args(argv + list(extra)), trainer_cls=RecordingTrainer)
    trainer.train(resume_from_checkpoint=resume)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    return trainer.seen, losses


@pytest.mark.parametrize("streaming", ["0", "1", "cache"])
def test_resume_continues_the_data_stream_and_the_losses(world, tmp_path, streaming):
    """``cache``: the lazy path (``data_cache_dir``); the resumed run renders with 2 dataloader workers, the first
    with none: the rows must not depend on it."""
    if streaming == "cache":
        extra = ("--data_cache_dir", str(tmp_path / "cache"), "--packing_buffer", "16")
        resumed_extra = extra + ("--dataloader_num_workers", "2")
    else:
        extra = resumed_extra = ("--streaming_data", streaming, "--packing_buffer", "16")
    full_seen, full_losses = _run(world, tmp_path / "full", *extra)
    resumed_seen, resumed_losses = _run(world, tmp_path / "resumed", *resumed_extra,
                                        resume=str(tmp_path / "full" / f"checkpoint-{N}"))

    if streaming == "cache":
        assert any((tmp_path / "cache" / "shards").glob("*.arrow")), "the lazy path was not taken"
    assert [s for s, _ in full_seen] == [s for s in range(1, 2 * N + 1) for _ in range(1)]
    ids = [i for _, batch in full_seen for i in batch]
    assert len(ids) == len(set(ids)), "a sample was trained twice within the epoch"
    assert resumed_seen == [x for x in full_seen if x[0] > N], "resume must continue exactly where it stopped"
    for step in range(N + 1, 2 * N + 1):
        assert resumed_losses[step] == pytest.approx(full_losses[step], abs=1e-6), step
