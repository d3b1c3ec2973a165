"""A tiny, self-contained training world for pipeline tests and benchmarks (the "dummy" of this package).

It writes what the real pipeline reads -- jsonl records, a text tokenizer directory, a model config json -- so
tests exercise the real entry point (``hf_trainer.main``) end to end in seconds, without the shapes world, the VQ
or a network. The records are learnable: a caption names a colour and a shape, and the image codes are a
deterministic function of them plus a little noise, so both the text and the image losses fall.

Two corpora: ``captions`` (the default: short captions, sentences and VQA turns on a small grid, for pipeline tests)
and ``mixed`` (``mixed_records``: text documents of log-normal length next to 32x32-code image documents, the length
distribution that decides what packing buys; ``tools/bench_train.py`` measures throughput on it).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Literal

from data_process.schema import AtomicShardWriter, ImageCodes, Record

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
SENTENCES = ("the {c} {s} is next to the {c2} {s2}.", "a {c} {s} sits above a {c2} {s2}.", "there is one {c} {s}.")


def _caption(rng: random.Random) -> tuple[str, int, int]:
    c, s = rng.randrange(len(COLOURS)), rng.randrange(len(SHAPES))
    return f"a {COLOURS[c]} {SHAPES[s]}", c, s


def _codes(c: int, s: int, grid: tuple[int, int], codebook: int, rng: random.Random) -> list[int]:
    n = grid[0] * grid[1]
    base = [(c * 7 + s * 3 + i) % codebook for i in range(n)]
    return [b if rng.random() > 0.1 else rng.randrange(codebook) for b in base]


def synthetic_records(n: int, seed: int = 0, grid: tuple[int, int] = (4, 4), codebook: int = 64,
                      text_fraction: float = 0.3, prefix: str = "syn") -> list[Record]:
    """``n`` records: ``image_text`` captions with codes, ``text`` sentences, and a few VQA conversations."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        rid = f"{prefix}-{i:06d}"
        kind = rng.random()
        if kind < text_fraction:
            text = rng.choice(SENTENCES).format(c=rng.choice(COLOURS), s=rng.choice(SHAPES),
                                                c2=rng.choice(COLOURS), s2=rng.choice(SHAPES))
            out.append(Record(id=rid, type="text", text=text))
            continue
        caption, c, s = _caption(rng)
        image = ImageCodes(codes=_codes(c, s, grid, codebook, rng), grid=grid, tokenizer="synthetic@0")
        if kind < 0.85:
            out.append(Record(id=rid, type="image_text", text=caption, images=[image]))
        else:
            conv = [{"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": COLOURS[c]}]
            out.append(Record(id=rid, type="conversation", conversations=conv, images=[image]))
    return out


def _document(rng: random.Random, n_words: int) -> str:
    """About ``n_words`` words of synthetic sentences (the tokenizer's vocabulary: ~1.25 tokens a word)."""
    words: list[str] = []
    while len(words) < n_words:
        words += rng.choice(SENTENCES).format(c=rng.choice(COLOURS), s=rng.choice(SHAPES), c2=rng.choice(COLOURS),
                                              s2=rng.choice(SHAPES)).split()
    return " ".join(words[:n_words])


def mixed_records(n: int, seed: int = 0, grid: tuple[int, int] = (32, 32), codebook: int = 512,
                  image_fraction: float = 0.3, text_median: float = 80.0, text_sigma: float = 1.0,
                  max_text_words: int = 1200, prefix: str = "mix") -> list[Record]:
    """``n`` records of a realistic mixed length distribution: ``text`` documents whose word count is log-normal
    (median ``text_median``, shape ``text_sigma``, capped at ``max_text_words``; the synthetic tokenizer makes ~1.25
    tokens of a word, so the defaults give a median of ~100 tokens and a tail to ~1500) and ``image_text`` documents
    of ``grid`` codes (1024 with the default 32x32) plus a short caption, ``image_fraction`` of the documents (30%
    by default, as in ``tools/bench_model.py``: images are then ~70% of the tokens).

    Why: with samples of near-equal length (the captions corpus, the shapes world) padding wastes little and packing
    buys little; a real pretraining mix of short text and ~1k-token images is where padded batches waste most.
    """
    if not 0.0 <= image_fraction <= 1.0:
        raise ValueError(f"image_fraction={image_fraction} must be in [0, 1]")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        rid = f"{prefix}-{i:06d}"
        if rng.random() >= image_fraction:
            words = min(max_text_words, max(1, round(rng.lognormvariate(math.log(text_median), text_sigma))))
            out.append(Record(id=rid, type="text", text=_document(rng, words)))
            continue
        caption, c, s = _caption(rng)
        caption = f"{caption}. {_document(rng, rng.randint(4, 24))}"
        image = ImageCodes(codes=_codes(c, s, grid, codebook, rng), grid=grid, tokenizer="synthetic@0")
        out.append(Record(id=rid, type="image_text", text=caption, images=[image]))
    return out


def write_records(records: list[Record], path: str | Path) -> Path:
    with AtomicShardWriter(path) as w:
        for r in records:
            w.write(r)
    return Path(path)


def write_tokenizer(out_dir: str | Path, vocab_size: int = 400):
    """A small BPE over the synthetic sentences, with the vision and chat special tokens (shapes tokenizer recipe)."""
    from data_process.text_tokenizer import train_shapes_tokenizer

    texts = [f"a {c} {s}" for c in COLOURS for s in SHAPES] * 4
    texts += [t.format(c=c, s=s, c2=c, s2=s) for t in SENTENCES for c in COLOURS for s in SHAPES]
    texts += ["What colour is the shape?", "Describe this image.", "Generate an image based on this description."]
    return train_shapes_tokenizer(texts, out_dir, vocab_size=vocab_size, min_frequency=1)


def write_model_config(path: str | Path, *, hidden_size: int = 32, layers: int = 4, heads: int = 4,
                       variant: str = "uni_x", vision_encode_layers: int = 1, vision_decode_layers: int = 1) -> Path:
    """A tiny ``uni_x_qwen2`` config json; the vocabulary fields are filled in by the builders at train time."""
    cfg = {
        "model_type": "uni_x_qwen2", "variant": variant, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2),
        "max_position_embeddings": 4096, "vocab_size": 16, "image_offset": 8, "image_level_sizes": [8],
        "vision_start_token_id": 3, "vision_end_token_id": 4, "tie_word_embeddings": True,
        "vision_encode_layers": vision_encode_layers if variant == "uni_x" else 0,
        "vision_decode_layers": vision_decode_layers if variant == "uni_x" else 0,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return Path(path)


def make_world(root: str | Path, n_records: int = 200, seed: int = 0, shards: int = 2, grid: tuple[int, int] = (4, 4),
               codebook: int = 64, corpus: Literal["captions", "mixed"] = "captions", **model_kwargs) -> dict[str, str]:
    """Records (``shards`` files), tokenizer and model config under ``root``; returns the paths as train args.

    ``corpus="mixed"`` writes ``mixed_records`` (pass e.g. ``grid=(32, 32), codebook=512``) instead of the captions.
    """
    root = Path(root)
    if corpus == "captions":
        records = synthetic_records(n_records, seed, grid=grid, codebook=codebook)
    elif corpus == "mixed":
        records = mixed_records(n_records, seed, grid=grid, codebook=codebook)
    else:
        raise ValueError(f"corpus={corpus!r}: expected 'captions' or 'mixed'")
    per = (len(records) + shards - 1) // shards
    for k in range(shards):
        write_records(records[k * per : (k + 1) * per], root / "records" / f"part-{k:03d}.jsonl")
    if not (root / "tokenizer" / "tokenizer.json").is_file():
        write_tokenizer(root / "tokenizer")
    write_model_config(root / "model.json", **model_kwargs)
    return {"data_path": str(root / "records"), "tokenizer_path": str(root / "tokenizer"),
            "model_config": str(root / "model.json"), "image_level_sizes": str(codebook)}
