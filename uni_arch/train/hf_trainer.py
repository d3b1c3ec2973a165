"""Training entry point: parse -> logging -> builders -> ``UniTrainer.train()`` -> save; clean-up in ``finally``.

    python uni_arch/train/hf_trainer.py --config configs/train/stage2.yaml [--learning_rate 1e-3 ...]
    accelerate launch --config_file configs/accelerate/single_node.yaml uni_arch/train/hf_trainer.py --config ...
    deepspeed uni_arch/train/hf_trainer.py --config ... --deepspeed configs/deepspeed/zero2.json

Precedence: defaults < ``--config`` YAML < command line (``uni_arch/train/args.py``). ``bash train.sh`` builds the
whole command (launcher, data, model config) for the shapes world or a preset; the presets are
``configs/train/{smoke,stage1,stage2,stage3}.yaml``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist
from loguru import logger
from transformers import set_seed
from transformers.trainer_utils import get_last_checkpoint

from uni_arch.log_setup import setup_logging
from uni_arch.train import builders
from uni_arch.train.args import DataArguments, ModelArguments, UniTrainingArguments, make_parser
from uni_arch.train.curves import LossCurveCallback
from uni_arch.train.data_collator import UniDataCollator
from uni_arch.train.trainer import UniTrainer


RUN_ARGS_NAME = "run_args.json"  # what `main` records about a finished run, next to its final weights


def read_run_args(checkpoint: str | Path) -> dict[str, Any]:
    """A run's ``run_args.json`` (model/data arguments, metrics) for its final checkpoint or one of its
    ``checkpoint-N/`` folders (read from the run directory above it); ``{}`` when there is none (a run still
    training writes it at the end)."""
    checkpoint = Path(checkpoint)
    for path in (checkpoint / RUN_ARGS_NAME, checkpoint.parent / RUN_ARGS_NAME):
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from e
    return {}


def resolve_resume(training_args: UniTrainingArguments) -> str | None:
    """``resume_from_checkpoint``: empty/0/false = fresh, 1/true/last = newest checkpoint in output_dir, else a path."""
    value = training_args.resume_from_checkpoint
    if value in (None, "", "0", "false", "False"):
        return None
    if value in ("1", "true", "True", "last"):
        last = get_last_checkpoint(training_args.output_dir) if Path(training_args.output_dir).is_dir() else None
        if last is None:
            logger.warning(f"resume_from_checkpoint={value}: no checkpoint in {training_args.output_dir}; starting fresh")
        return last
    if not Path(value).is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint={value!r} is not a checkpoint directory")
    return value


def make_trainer(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: UniTrainingArguments,
    trainer_cls: type[UniTrainer] = UniTrainer,
) -> UniTrainer:
    """Tokenizer -> code vocabulary -> samples -> dataset -> model -> trainer (the dataset first: a bad corpus fails
    before a large checkpoint is loaded)."""
    set_seed(training_args.seed)
    tokenizer, code_vocab, train_dataset = builders.build_data(model_args, data_args, training_args)
    model = builders.build_model(model_args, data_args, code_vocab)
    builders.apply_init_vision_with_text(model, training_args.init_vision_with_text)
    builders.log_batch_size_readings(data_args, training_args, train_dataset)
    builders.apply_unfreeze(model, model_args.unfreeze_keys, code_vocab, training_args.weight_decay)
    callbacks = [LossCurveCallback(training_args.output_dir)] if training_args.write_loss_curves else []
    if getattr(train_dataset, "lazy_layout", None) is not None:  # data_cache_dir: refuse a resume that cannot continue
        from uni_arch.train.lazy_dataset import DataLayoutCallback

        callbacks.append(DataLayoutCallback(train_dataset.lazy_layout))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return trainer_cls(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=UniDataCollator(pad_id or 0, data_args.use_data_packing, data_args.model_max_length),
        processing_class=tokenizer,
        callbacks=callbacks,
        code_vocab=code_vocab,
        inference_spec=builders.build_inference_spec(model_args, data_args, tokenizer, code_vocab),
    )


def main(model_args: ModelArguments, data_args: DataArguments, training_args: UniTrainingArguments) -> None:
    setup_logging(training_args.process_index)
    try:
        trainer = make_trainer(model_args, data_args, training_args)
        result = trainer.train(resume_from_checkpoint=resolve_resume(training_args))
        trainer.save_model()  # every rank: under ZeRO-3 the shards are gathered collectively (rank 0 alone hangs)
        trainer.save_state()
        if trainer.is_world_process_zero():
            (Path(training_args.output_dir) / RUN_ARGS_NAME).write_text(json.dumps(
                {"model": vars(model_args), "data": vars(data_args), "metrics": result.metrics,
                 "training": {k: getattr(training_args, k) for k in ("learning_rate", "max_steps", "seed",
                                                                     "per_device_train_batch_size", "world_size")}},
                indent=2, default=str))
            logger.info(f"checkpoint: {training_args.output_dir}")
            if isinstance(getattr(trainer.train_dataset, "rows", None), list):  # map-style: the rows just trained on
                from uni_arch.train.unigram import report

                report(trainer.train_dataset.rows, trainer.code_vocab, Path(training_args.output_dir))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    main(*make_parser().parse_with_config())
