"""Prepare a corpus once for the lazy data path (``--data_cache_dir``), for many runs and nodes.

    python -m uni_arch.train.prepare_data --config configs/train/stage2.yaml --data_cache_dir /shared/uni_x_cache \
        --prepare_num_proc 16 [the run's --data_path / --tokenizer_path / --image_tokenizer_path ...]

It takes the training arguments themselves (same YAML, same flags: ``uni_arch/train/args.py``) and uses those
that decide the shards: ``data_path`` (every file of every source), the tokenizer and the image tokenizer (or
``image_level_sizes``; the code vocabulary the codes are range-checked against) and ``skip_bad_records``. Each record
file is validated once into an arrow shard (``uni_arch/train/lazy_dataset.py``); files that have a shard already
are skipped, so a killed prepare resumes and a grown corpus prepares only its new files. A bad record stops it with
``file:line: field: problem``. Training with the same ``--data_cache_dir`` then starts without reading a record.
"""

from __future__ import annotations

from loguru import logger

from uni_arch.log_setup import setup_logging
from uni_arch.train import builders
from uni_arch.train.args import DataArguments, ModelArguments, UniTrainingArguments, make_parser


def main(model_args: ModelArguments, data_args: DataArguments, training_args: UniTrainingArguments) -> dict:
    """Validate every record file of ``data_path`` into ``data_cache_dir``; returns the counts it logs."""
    from uni_arch.train import lazy_dataset as lazy
    from uni_arch.train.dataset import parse_data_path

    if not data_args.data_cache_dir:
        raise ValueError("prepare_data: --data_cache_dir is empty: give the directory the shards go to")
    tokenizer = builders.build_tokenizer(model_args)
    vocab = builders.build_code_vocab(model_args, tokenizer, size_tags=data_args.size_tags)
    sources = parse_data_path(data_args.data_path, data_args.percentages)
    counts = lazy.prepare_cache(sources, vocab, data_args.data_cache_dir, num_proc=data_args.prepare_num_proc,
                                skip_bad_records=data_args.skip_bad_records)
    cached = lazy.open_cache(sources, vocab, data_args.data_cache_dir, data_args.skip_bad_records)
    counts["sources"] = {c.source.spec: len(c) for c in cached}
    logger.info(f"data cache {data_args.data_cache_dir}: {counts['files']} file(s), {counts['prepared']} prepared now; "
                f"valid records per source: {counts['sources']}")
    return counts


if __name__ == "__main__":
    args = make_parser().parse_with_config()
    setup_logging(0)
    main(*args)
