"""Named builders called by the entry point; each takes only the argument group it needs.

tokenizer -> code vocabulary -> sample builder -> dataset -> model -> trainable parameters. The model is built
*after* the dataset so that a bad corpus fails before a large checkpoint is loaded.
"""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from modeling.configuration_uni_x import LEGACY_MODEL_TYPE, UniXConfig
from modeling.vocab import DEFAULT_MAX_GRID, CodeVocab
from uni_arch.train.args import DataArguments, ModelArguments, UniTrainingArguments

IMAGE_EMBEDDINGS = "image_embeddings"
ARCH_FIELDS = ("vision_encode_layers", "vision_decode_layers", "all_modal_visible", "ffn_vision_size",
               "ffn_share_size", "moe_every_k", "add_share_ffn", "mot_style")


# -------------------------------------------------------------------------------------- tokenizers
def build_tokenizer(model_args: ModelArguments):
    """The text tokenizer (a directory or ``qwen2.5``), from ``tokenizer_path`` or the checkpoint directory."""
    from data_process.text_tokenizer import load_text_tokenizer

    source = model_args.tokenizer_path or model_args.model_name_or_path
    if not source:
        raise ValueError("tokenizer_path is empty and there is no model_name_or_path to read a tokenizer from")
    return load_text_tokenizer(source)


def _checkpoint_config(model_args: ModelArguments):
    if not model_args.model_name_or_path:
        return None
    from transformers import AutoConfig

    import modeling  # noqa: F401  registers uni_x_qwen2 with AutoConfig

    return AutoConfig.from_pretrained(model_args.model_name_or_path)


def build_code_vocab(model_args: ModelArguments, tokenizer, size_tags: bool = False) -> CodeVocab:
    """Image ids start at ``len(tokenizer)``; codebook sizes come from the image tokenizer or the checkpoint;
    ``size_tags`` reserves the size tags (up to ``DEFAULT_MAX_GRID``) after the codes."""
    if model_args.image_tokenizer_path:
        from modeling.vq import load_image_tokenizer

        level_sizes = load_image_tokenizer(model_args.image_tokenizer, model_args.image_tokenizer_path).level_sizes
    elif model_args.image_level_sizes:
        level_sizes = model_args.level_sizes
    else:
        config = _checkpoint_config(model_args)
        if config is None or not hasattr(config, "image_level_sizes"):
            raise ValueError("image_tokenizer_path and image_level_sizes are empty and model_name_or_path has no "
                             "image_level_sizes: give the image tokenizer checkpoint so the code vocabulary is known")
        level_sizes = config.image_level_sizes
    vocab = CodeVocab.from_tokenizer(tokenizer, level_sizes, max_grid=DEFAULT_MAX_GRID if size_tags else 0)
    logger.info(f"code vocabulary: {vocab.to_dict()} (total {vocab.total_vocab_size} ids)")
    return vocab


# ------------------------------------------------------------------------------------------- data
def build_sample_builder(data_args: DataArguments, tokenizer, code_vocab: CodeVocab):
    from uni_arch.train.templates import SampleBuilder

    kwargs: dict[str, Any] = dict(
        t2i_ratio=data_args.t2i_ratio, cfg_dropout=data_args.cfg_dropout,
        ignore_instruction=bool(data_args.ignore_instruction), size_tags=data_args.size_tags,
        system_prompt=data_args.system_prompt, template_name=data_args.chat_template,
    )
    if data_args.template_dir:
        kwargs["template_dir"] = data_args.template_dir
    return SampleBuilder(tokenizer, code_vocab, **kwargs)


def build_inference_spec(model_args: ModelArguments, data_args: DataArguments, tokenizer, code_vocab: CodeVocab):
    """What every saved checkpoint records about its use (``uni_x_inference.json``): the renderer's settings, and the
    image tokenizer (kind, absolute path, weights hash, native grid) when one was given."""
    from uni_arch.train.inference_spec import ImageTokenizerRef, InferenceSpec

    ref = grid = None
    if model_args.image_tokenizer_path:
        from modeling.vq import load_image_tokenizer

        vq = load_image_tokenizer(model_args.image_tokenizer, model_args.image_tokenizer_path)
        ref = ImageTokenizerRef(model_args.image_tokenizer, str(Path(model_args.image_tokenizer_path).resolve()),
                                vq.checkpoint_hash)
        grid = vq.native_grid
    builder = build_sample_builder(data_args, tokenizer, code_vocab)
    return InferenceSpec.from_builder(builder, ref, grid, variant=model_args.variant)


def build_train_dataset(data_args: DataArguments, training_args: UniTrainingArguments, sample_builder, code_vocab):
    """Map-style packed rows, or a stream of them (``streaming_data=1``; needs ``max_steps``).

    Map-style: the dataset holds every data epoch that training reads, each with its own per-occurrence draws
    (``dataset.py``). With ``max_steps`` that is as many epochs as the steps need rows; with ``num_train_epochs`` it
    is ``ceil(num_train_epochs)`` epochs, and ``num_train_epochs`` becomes the fraction of that plan to train, so
    the Trainer makes one pass over fresh draws instead of replaying the first epoch's.
    """
    from uni_arch.train import dataset as ds

    sources = ds.parse_data_path(data_args.data_path, data_args.percentages)
    common = dict(seq_len=data_args.model_max_length, mode=data_args.use_data_packing, overlong=data_args.overlong,
                  percentage=data_args.data_percentage, seed=data_args.shuffle_seed,
                  skip_bad_records=data_args.skip_bad_records)
    if data_args.data_cache_dir:
        return build_lazy_train_dataset(sources, data_args, training_args, sample_builder, code_vocab)
    if data_args.streaming_data:
        if training_args.max_steps <= 0:
            raise ValueError("streaming_data=1 needs max_steps > 0 (a stream has no length to derive epochs from)")
        num_groups = training_args.world_size * max(1, training_args.dataloader_num_workers)
        return ds.build_streaming_dataset(sources, sample_builder, code_vocab, buffer=data_args.packing_buffer,
                                          num_shards=max(8, num_groups), num_groups=num_groups, **common)
    if training_args.max_steps > 0:
        epochs = 1
        min_rows = (training_args.max_steps * training_args.per_device_train_batch_size
                    * training_args.gradient_accumulation_steps * training_args.world_size)
    else:
        epochs, min_rows = max(1, math.ceil(training_args.num_train_epochs)), 0
    dataset = ds.build_map_dataset(sources, sample_builder, code_vocab, epochs=epochs, min_rows=min_rows,
                                   batch_size=training_args.per_device_train_batch_size, **common)
    if training_args.max_steps <= 0 and dataset.epochs > 1:
        fraction = training_args.num_train_epochs / dataset.epochs
        logger.info(f"num_train_epochs={training_args.num_train_epochs}: one pass over {fraction:.4g} of the "
                    f"{dataset.epochs}-epoch plan (each data epoch has its own draws)")
        training_args.num_train_epochs = fraction
    return dataset


def build_lazy_train_dataset(sources, data_args: DataArguments, training_args: UniTrainingArguments, sample_builder,
                             code_vocab: CodeVocab):
    """The lazy path (``data_cache_dir``, ``uni_arch/train/lazy_dataset.py``): shards prepared once (rank 0 first,
    the others wait and find them), then an endless per-rank stream of rows packed on the fly.

    ``dataloader_num_workers`` moves into the stream (its workers render windows, in order) and the Trainer's own
    loader runs in the main process: Trainer workers would each replay the whole stream of the rank.
    """
    from uni_arch.train import lazy_dataset as lazy

    if training_args.max_steps <= 0:
        raise ValueError(f"data_cache_dir={data_args.data_cache_dir!r} needs max_steps > 0: the lazy stream is endless "
                         "(data epochs follow each other with fresh draws)")
    with training_args.main_process_first(local=False, desc="prepare the data cache"):
        counts = lazy.prepare_cache(sources, code_vocab, data_args.data_cache_dir,
                                    num_proc=data_args.prepare_num_proc, skip_bad_records=data_args.skip_bad_records)
    if counts["prepared"]:
        logger.warning(f"data_cache_dir: {counts['prepared']} of {counts['files']} record file(s) had no shard and were "
                       "prepared by this run; for a large corpus run `python -m uni_arch.train.prepare_data` "
                       "beforehand (the other ranks wait meanwhile)")
    stream = lazy.make_stream(sources, sample_builder, code_vocab, data_args.data_cache_dir,
                              seq_len=data_args.model_max_length, mode=data_args.use_data_packing,
                              overlong=data_args.overlong, percentage=data_args.data_percentage,
                              seed=data_args.shuffle_seed, skip_bad_records=data_args.skip_bad_records,
                              window=data_args.packing_buffer)
    workers = training_args.dataloader_num_workers
    prefetch = training_args.dataloader_prefetch_factor or 2
    if workers:
        logger.info(f"data_cache_dir: dataloader_num_workers={workers} render the windows of the stream; the "
                    "Trainer's loader runs in the main process")
        training_args.dataloader_num_workers = 0
        training_args.dataloader_prefetch_factor = None
        training_args.dataloader_persistent_workers = False
    dataset = lazy.build_lazy_dataset(stream, training_args.world_size, workers, prefetch)
    dataset.lazy_stream = stream  # for inspection and tools/bench_data.py
    dataset.lazy_layout = lazy.data_layout(training_args.world_size, stream, training_args.per_device_train_batch_size,
                                           training_args.gradient_accumulation_steps, data_args.data_path)
    return dataset


# ------------------------------------------------------------------------------------------ model
def build_data(model_args: ModelArguments, data_args: DataArguments, training_args: UniTrainingArguments):
    """Tokenizer -> code vocabulary -> sample builder -> training dataset; returns ``(tokenizer, code_vocab, dataset)``.

    The one data chain of the entry point, the unigram baseline and the benchmarks.
    """
    tokenizer = build_tokenizer(model_args)
    code_vocab = build_code_vocab(model_args, tokenizer, size_tags=data_args.size_tags)
    if model_args.model_name_or_path:  # config.json only: a wrong checkpoint fails before the data is rendered
        check_checkpoint(_checkpoint_config(model_args), model_args, code_vocab)
    sample_builder = build_sample_builder(data_args, tokenizer, code_vocab)
    return tokenizer, code_vocab, build_train_dataset(data_args, training_args, sample_builder, code_vocab)


def _fresh_config(model_args: ModelArguments, code_vocab: CodeVocab):
    d = json.loads(Path(model_args.model_config).read_text(encoding="utf-8"))
    for key in ("model_type", "transformers_version", "architectures"):
        d.pop(key, None)
    d["variant"] = model_args.variant
    if d["variant"] != "uni_x":
        d["vision_encode_layers"] = d["vision_decode_layers"] = 0
    for name in ARCH_FIELDS:
        value = getattr(model_args, name)
        if value is not None:
            d[name] = value
    return UniXConfig(**d).with_vocab(code_vocab)


TOOLKIT_MODEL_TYPES = (UniXConfig.model_type, LEGACY_MODEL_TYPE)  # the current model_type and the pre-rename one


def _effective(config, name: str):
    """A checkpoint's value of an architecture field; an FFN width of None means the shared ``intermediate_size``,
    a field the checkpoint predates its default (``add_share_ffn`` 0, ``mot_style`` ours)."""
    value = getattr(config, name, {"add_share_ffn": 0, "mot_style": "ours"}.get(name))
    return config.intermediate_size if value is None and name.startswith("ffn_") else value


def conversion_command(model_args: ModelArguments, code_vocab: CodeVocab) -> str:
    """The ``modeling/conversion.py`` command that turns a plain Qwen2 checkpoint into what the arguments ask for."""
    src = model_args.model_name_or_path
    args = [f"--src {src}", f"--dst {src.rstrip('/')}-{model_args.variant}", f"--variant {model_args.variant}"]
    for name in ("vision_encode_layers", "vision_decode_layers", "ffn_vision_size", "all_modal_visible", "moe_every_k",
                 "add_share_ffn", "ffn_share_size", "mot_style"):
        if getattr(model_args, name) is not None:
            args.append(f"--{name} {getattr(model_args, name)}")
    sizes = list(code_vocab.level_sizes)
    args.append(f"--num_image_tokens {sizes[0]}" if len(sizes) == 1 else f"--image_level_sizes '{sizes}'")
    args += [f"--image_offset {code_vocab.image_offset}", f"--vision_start_token_id {code_vocab.vision_start_id}",
             f"--vision_end_token_id {code_vocab.vision_end_id}"]
    return "python modeling/conversion.py " + " ".join(args)


def check_checkpoint(config, model_args: ModelArguments, code_vocab: CodeVocab) -> None:
    """A checkpoint's architecture and vocabulary are fixed: a disagreeing argument is an error, not a rebuild.

    Runs on ``config.json`` alone, before the dataset is built or any weight is read. A checkpoint that is not this
    toolkit's (a plain Qwen2/Qwen2.5) would otherwise load as a dense model with no image rows and no vision
    layers whatever the arguments say: it must be converted first.
    """
    path = model_args.model_name_or_path
    if config.model_type not in TOOLKIT_MODEL_TYPES:
        raise ValueError(
            f"{path} is a {config.model_type!r} checkpoint, not a Uni-X toolkit one (model_type "
            f"{TOOLKIT_MODEL_TYPES[0]!r}): it has no image-code rows and no vision layers. Convert it first:\n  "
            f"{conversion_command(model_args, code_vocab)}\nthen train with --model_name_or_path on the --dst directory"
        )
    if config.variant != model_args.variant:
        raise ValueError(f"model_spec_module={model_args.model_spec_module!r}/custom_cls={model_args.custom_cls!r} ask "
                         f"for variant {model_args.variant!r} but {path} is a {config.variant!r} checkpoint "
                         f"(variant={config.variant!r})")
    for name in ARCH_FIELDS:
        value = getattr(model_args, name)
        if value is not None and _effective(config, name) != value:
            raise ValueError(f"{name}={value} disagrees with {path} ({name}={_effective(config, name)}); drop the "
                             f"argument or convert the checkpoint (modeling/conversion.py)")
    if hasattr(config, "code_vocab") and config.code_vocab != code_vocab:
        raise ValueError(f"{path} was built for the code vocabulary {config.code_vocab} but "
                         f"the tokenizers give {code_vocab}: use the checkpoint's own tokenizer")


def default_attn_implementation(packing: int) -> str:
    """Packed rows on CPU/GPU: the per-document varlen path (``uni_x_packed``); padded batches: sdpa."""
    return "uni_x_packed" if packing else "sdpa"


def build_model(model_args: ModelArguments, data_args: DataArguments, code_vocab: CodeVocab):
    import modeling
    from transformers import AutoModelForCausalLM

    attn = model_args.attn_implementation or default_attn_implementation(data_args.use_data_packing)
    if model_args.model_name_or_path:
        check_checkpoint(_checkpoint_config(model_args), model_args, code_vocab)
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, attn_implementation=attn,
                                                     dtype=torch.float32)
    else:
        config = _fresh_config(model_args, code_vocab)
        model = modeling.build_model(config)
        model.set_attn_implementation(attn)
    model.config.use_cache = False
    n = sum(p.numel() for p in model.parameters())
    logger.info(f"model: {type(model).__name__} variant={getattr(model.config, 'variant', 'dense')} "
                f"layer_kinds={getattr(model.config, 'layer_kinds', None)} attn={attn} params={n / 1e6:.2f}M")
    return model


# -------------------------------------------------------------------------------- trainable params
def _row_mask_hook(param: torch.nn.Parameter, rows: torch.Tensor):
    """Zero the gradient of every row not in ``rows``: only those rows of a shared matrix learn."""
    mask = torch.zeros(param.shape[0], 1, dtype=param.dtype, device=param.device)
    mask[rows] = 1
    return param.register_hook(lambda grad: grad * mask.to(grad.device, grad.dtype))


def apply_unfreeze(model: torch.nn.Module, unfreeze_keys: str, code_vocab: CodeVocab, weight_decay: float = 0.0) -> dict:
    """``train-all`` or comma-separated patterns (fnmatch, else substring) of parameter names to train.

    ``image_embeddings`` trains only the image-block rows (codes, size tags, ``<|vision_start|>``/``<|vision_end|>``)
    of the input embedding and of the output head, through a gradient mask: the text rows receive a zero gradient. With AdamW a
    zero gradient means a zero update, but decoupled weight decay would still shrink the text rows, hence the
    check on ``weight_decay``. Every pattern must match something (a typo must not freeze the whole model).
    """
    keys = [k.strip() for k in unfreeze_keys.split(",") if k.strip()]
    if keys == ["train-all"]:
        for p in model.parameters():
            p.requires_grad_(True)
        return {"trainable": sum(p.numel() for p in model.parameters()), "hooks": 0}
    patterns = [k for k in keys if k != IMAGE_EMBEDDINGS]
    matched = {k: 0 for k in patterns}
    for name, p in model.named_parameters():
        hit = [k for k in patterns if (fnmatch.fnmatch(name, k) if any(c in k for c in "*?[") else k in name)]
        p.requires_grad_(bool(hit))
        for k in hit:
            matched[k] += 1
    missing = [k for k, n in matched.items() if n == 0]
    if missing:
        raise ValueError(f"unfreeze_keys: pattern(s) {missing} match no parameter name "
                         f"(e.g. {[n for n, _ in list(model.named_parameters())[:4]]})")
    hooks = 0
    if IMAGE_EMBEDDINGS in keys:
        if weight_decay:
            raise ValueError(f"unfreeze_keys={IMAGE_EMBEDDINGS!r} with weight_decay={weight_decay}: decay would "
                             "shrink the frozen text rows; use weight_decay=0 for this stage")
        rows = torch.from_numpy(code_vocab.image_block_ids())
        matrices = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
                    if m is not None}
        for w in matrices.values():  # tied embeddings are one matrix: one hook
            w.requires_grad_(True)
            _row_mask_hook(w, rows)
            hooks += 1
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"unfreeze_keys={unfreeze_keys!r}: {trainable / 1e6:.2f}M trainable parameters, {hooks} row-mask hook(s)")
    return {"trainable": trainable, "hooks": hooks}


# ------------------------------------------------------------------------------ reference knobs at start-up
def apply_init_vision_with_text(model: torch.nn.Module, init_vision_with_text: int) -> int:
    """The reference's ``init_vision_with_text=1``: copy every text weight into the vision branch at the same depth
    before training (its ``init_vision_weights``; here for every variant, where the shapes match). Returns the
    number of copied tensors; 0 leaves the model as loaded."""
    if not init_vision_with_text:
        return 0
    from modeling.conversion import copy_vision_branches

    copied = copy_vision_branches(model) if hasattr(model.config, "layer_kinds") else set()
    if not copied:
        logger.warning("init_vision_with_text=1: the model has no vision branch of the text's shape to copy into "
                       "(dense, or vision FFNs of another width); nothing changed")
    else:
        logger.info(f"init_vision_with_text=1: {len(copied)} vision tensors copied from the text layers at the same "
                    "depth (the reference's init_vision_weights)")
    return len(copied)


def tokens_per_step(per_device: int, grad_accum: int, world: int, seq_len: int,
                    mean_sample_tokens: float | None) -> dict[str, float | None]:
    """Tokens per optimizer step under the two readings of ``per_device_train_batch_size`` (packed training).

    Here it counts packed ROWS of up to ``seq_len`` tokens: ``per_device x seq_len x grad_accum x world`` (the row
    capacity). The reference counted RAW SAMPLES, all packed into ONE row of at most ``seq_len`` per device and
    micro-step (its ``DataCollatorSFTPacked``): ``min(per_device x mean sample, seq_len) x grad_accum x world``
    (None when the mean sample length is unknown, e.g. streaming).
    """
    ours = per_device * seq_len * grad_accum * world
    reference = None
    if mean_sample_tokens is not None:
        reference = min(per_device * mean_sample_tokens, seq_len) * grad_accum * world
    return {"ours": ours, "reference": reference}


def log_batch_size_readings(data_args: DataArguments, training_args: UniTrainingArguments, dataset) -> dict:
    """One start-up message with the tokens per step in both readings of ``per_device_train_batch_size``, so that a
    value copied from a reference ``train.sh`` (its ``train_batch_size=20``: 20 samples in one row) is not silently
    taken as 20 rows here. Map-style datasets give the mean sample length; streams do not."""
    if not data_args.use_data_packing:  # padded batches: a row is a sample in both codebases
        return {}
    rows = getattr(dataset, "rows", None)
    mean = samples_per_row = None
    if rows:
        docs = sum(len(r["doc_lens"]) for r in rows)
        mean = sum(len(r["input_ids"]) for r in rows) / docs
        samples_per_row = docs / len(rows)
    b, g, w, seq = (training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps,
                    training_args.world_size, data_args.model_max_length)
    counts = tokens_per_step(b, g, w, seq, mean)
    measured = (f"{samples_per_row:.1f} samples per row, {mean:.0f} tokens per sample on average" if mean is not None
                else "sample length unknown (streaming)")
    ref = f"{counts['reference']:,.0f} tokens" if counts["reference"] is not None else "min(B x mean sample, L) x G x W"
    logger.warning(
        f"per_device_train_batch_size={b} counts PACKED ROWS here: {b} row(s) x model_max_length={seq} x "
        f"gradient_accumulation_steps={g} x world_size={w} = {counts['ours']:,} tokens per optimizer step "
        f"(capacity; {measured}). The reference read the same number as RAW SAMPLES packed into ONE row per device: "
        f"{b} sample(s) -> {ref} per step. A reference run (train_batch_size=R, model_max_length=L) maps to "
        "per_device_train_batch_size=1 here with model_max_length=min(L, R x mean sample): one row per device and "
        "micro-step."
    )
    return counts
