"""Records -> rendered samples -> packed rows, as a map-style dataset or a stream.

``data_path`` names one or more sources, each a file, a glob or a folder of ``*.jsonl`` / ``*.parquet`` record
shards (this toolkit's records or the reference's rows: ``data_process.schema.record_from_row``), in one of two
spellings:

* this toolkit's, with optional mixing weights: ``data/shapes_codes/shapes_captions:0.7,data/more/*.jsonl:0.3``.
  Weights are mixture proportions: the epoch keeps the total number of selected records and each source is up- or
  down-sampled (deterministically, with ``shuffle_seed``) to its share; a source without a weight has weight 1.
* the reference's, ``a^^b^^c``: the sources are concatenated (each weighs what it holds), and the reference's
  ``percentage`` knob gives one fraction for all or one per source (``0.5^^1.0^^0.2``).

A fraction (``data_percentage``, or a source's own percentage) keeps a seeded random subset of the source, the
same records in every epoch; the reference kept the first rows of each source instead.

**Validation first.** Every record is parsed and its image codes are range-checked against the code vocabulary
*before* training starts: a malformed record or an out-of-range code stops the run with ``file:line: field:
problem`` (``skip_bad_records`` counts, warns and skips instead). A code is never clamped.

**Per-occurrence draws.** A sample's random choices (text-to-image or image-to-text, CFG dropout, question
wording) come from an rng seeded by ``(shuffle_seed, data epoch, occurrence)``: the occurrence is the sample's place
in its epoch (map-style: its index in the mixed epoch; streaming: shard and position in the shard). So a record
up-sampled by the mix, or seen again in the next epoch, is a fresh draw: over the epochs an ``image_text`` record is
t2i in a ``t2i_ratio`` share of its occurrences and CFG dropout hits a different 10% each time. (Seeding by the
record id alone made every copy identical.)

**Epochs.** The Trainer sizes its epoch from ``len(dataset)`` once and replays the same rows in every pass, so a
map-style dataset holds the whole *plan*: as many data epochs as training reads (``min_rows`` rows, or ``epochs``),
each mixed, rendered and packed with its own draws, back to back. Streaming is an endless sequence of data epochs.

**Determinism.** Given the seed the rows are a pure function of the data and the arguments, which is what makes
resuming exact: the Trainer's resume skips the batches already consumed (map-style: through its seeded sampler;
streaming: by re-reading the deterministic stream), so no sample is trained twice or skipped
(``tests/test_train_resume.py``).

**Ranks.** Map-style rows are split across ranks by the Trainer's distributed sampler. The stream is a
``datasets.IterableDataset`` over ``num_shards`` virtual shards (record ``i`` of a source belongs to shard
``i % num_shards``), handed out in ``num_groups`` groups (one per rank and dataloader worker); accelerate gives
each rank its own groups, so ranks read disjoint records. A group, not a shard, is the unit datasets iterates: it
runs one generator per unit in turn, and an endless generator per shard would never let the second shard start.
"""

from __future__ import annotations

import glob
import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
from loguru import logger
from tqdm import tqdm

from data_process.schema import Record, RecordError, iter_rows, record_from_row
from modeling.vocab import CodeVocab
from uni_arch.train.packing import Span, pack, padded_utilisation
from uni_arch.train.templates import SampleError

NOT_RECORDS = frozenset({"errors.jsonl"})  # bookkeeping files of data_process/encode_images.py
RECORD_SUFFIXES = (".jsonl", ".parquet")
REFERENCE_SEPARATOR = "^^"  # the reference's data_path (and percentage) separator


class SampleLike(Protocol):
    input_ids: Sequence[int]
    labels: Sequence[int]
    image_spans: Sequence[Span]


class SampleBuilderLike(Protocol):
    def build(self, record: Record, rng: random.Random) -> SampleLike: ...


@dataclass(frozen=True)
class Source:
    """One entry of ``data_path``: its files (sorted, so the order is reproducible), its mixing weight (None: as many
    records as it holds, the reference's concatenation) and its own fraction (None: ``data_percentage``)."""

    spec: str
    files: tuple[Path, ...]
    weight: float | None
    percentage: float | None = None


@dataclass(frozen=True)
class Located:
    """A record and where it came from, so that a sample-building error still names ``file:line``."""

    record: Record
    path: Path
    line: int


@dataclass
class RenderedSample:
    """A sample reduced to what packing and the collator need (int32 arrays keep 10^5 samples small)."""

    sample_id: str
    input_ids: np.ndarray
    labels: np.ndarray
    image_spans: list[Span]


# ------------------------------------------------------------------------------------------ data_path
def _split_weight(item: str) -> tuple[str, float]:
    head, sep, tail = item.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return item, 1.0


def _source_files(path: str) -> tuple[Path, ...]:
    p = Path(path)
    if any(ch in path for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(path, recursive=True) if f.endswith(RECORD_SUFFIXES))
    elif p.is_dir():  # every record shard below it, minus hidden paths and the encoder's errors.jsonl
        files = sorted(f for f in p.rglob("*") if f.suffix in RECORD_SUFFIXES and f.name not in NOT_RECORDS
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
    else:
        files = [p] if p.is_file() else []
    if not files:
        raise FileNotFoundError(f"data_path: source {path!r} matches no .jsonl or .parquet record file")
    return tuple(files)


def parse_data_path(spec: str, percentages: Sequence[float] | None = None) -> list[Source]:
    """Resolve ``data_path`` (either spelling, see the module doc) into sources; a source that matches no record
    file is an error naming it. ``percentages``: the reference's per-source fractions, one for all or one each."""
    reference = REFERENCE_SEPARATOR in spec
    items = [s.strip() for s in spec.split(REFERENCE_SEPARATOR if reference else ",")]
    items = [s for s in items if s]
    if not items:
        raise ValueError(f"data_path={spec!r} names no source")
    if percentages is not None and len(percentages) not in (1, len(items)):
        raise ValueError(f"percentage gives {len(percentages)} fractions for the {len(items)} sources of "
                         f"data_path={spec!r}: give one for all or one per source")
    sources = []
    for k, item in enumerate(items):
        path, weight = (item, None) if reference else _split_weight(item)
        if weight is not None and not weight > 0:
            raise ValueError(f"data_path: source {item!r} has weight {weight}; weights must be positive")
        pct = None if percentages is None else percentages[k if len(percentages) > 1 else 0]
        sources.append(Source(item, _source_files(path), weight, pct))
    return sources


# --------------------------------------------------------------------------------------- validation
def check_record_codes(record: Record, vocab: CodeVocab, path: str | Path | None, line: int | None) -> None:
    """Raise :class:`RecordError` if any image code is outside the configured codebook (never clamp), or a
    pre-tokenised id is not a text id."""
    if record.input_ids is not None:
        bad = next((k for k, i in enumerate(record.input_ids) if i >= vocab.image_offset), None)
        if bad is not None:
            raise RecordError(path, line, "input_ids", f"id {record.input_ids[bad]} at position {bad} is not a text id "
                              f"(the text vocabulary ends at {vocab.image_offset}): tokenize with this model's tokenizer")
    for i, image in enumerate(record.images):
        try:
            vocab.codes_to_ids(image.codes, 0 if image.levels is None else image.levels)
        except ValueError as e:
            raise RecordError(path, line, f"images[{i}].codes", str(e)) from e


class BadRecordCounter:
    """The ``skip_bad_records`` policy: raise (default) or count, keep the first few messages and go on."""

    def __init__(self, skip: bool):
        self.skip, self.count, self.examples = skip, 0, []

    def __call__(self, err: RecordError) -> None:
        if not self.skip:
            raise err
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(str(err))

    def report(self) -> None:
        if self.count:
            logger.warning(f"skipped {self.count} bad record(s) (skip_bad_records); first: {self.examples}")


def iter_source_records(source: Source, vocab: CodeVocab, on_bad: BadRecordCounter) -> Iterator[Located]:
    """Every valid record of a source with its place, in file order; bad ones go to ``on_bad`` (raises unless
    skipping)."""
    for path in source.files:
        for lineno, obj in iter_rows(path, on_bad):
            try:
                record = record_from_row(obj, path, lineno)
                check_record_codes(record, vocab, path, lineno)
            except RecordError as e:
                on_bad(e)
                continue
            yield Located(record, path, lineno)


# ------------------------------------------------------------------------------------------- mixing
def _percentages(sources: Sequence[Source], default: float) -> list[float]:
    """Each source's own fraction (the reference's ``percentage``), else ``data_percentage``."""
    return [default if s.percentage is None else s.percentage for s in sources]


def mix_indices(sizes: Sequence[int], weights: Sequence[float | None], percentage: float | Sequence[float], seed: int,
                epoch: int = 0) -> list[tuple[int, int]]:
    """``(source, index)`` pairs of one epoch: each source shuffled, cut to its ``percentage`` (one for all, or one
    per source), resampled to its weight; a None weight keeps the cut source whole (the reference's ``a^^b``).

    The ``percentage`` subset depends on ``seed`` only (the same records every epoch); which records an up-/down-
    sampled source repeats or leaves out, and the epoch's order, change with ``epoch``.

    >>> mix_indices([4, 2], [1.0, 1.0], 1.0, 0).__len__()
    6
    >>> mix_indices([4, 2], [None, None], [0.5, 1.0], 0).__len__()
    4
    """
    percentages = [percentage] * len(sizes) if isinstance(percentage, (int, float)) else list(percentage)
    rng = random.Random(seed)
    kept = []
    for s, (n, pct) in enumerate(zip(sizes, percentages, strict=True)):
        order = list(range(n))
        rng.shuffle(order)
        kept.append(order[: max(1, math.floor(n * pct))] if n else [])
    if any(w is None for w in weights):
        if not all(w is None for w in weights):
            raise ValueError(f"mix_indices: weights {list(weights)} mix proportions with whole sources (None)")
        targets = [len(k) for k in kept]
    else:
        total = sum(len(k) for k in kept)
        targets = [round(total * w / sum(weights)) for w in weights]
    epoch_rng = random.Random(f"{seed}:mix:{epoch}")
    out = []
    for s, (k, target) in enumerate(zip(kept, targets)):
        if not k:
            raise ValueError(f"data_path: source {s} has no valid records")
        k = list(k)
        epoch_rng.shuffle(k)
        out.extend((s, k[i % len(k)]) for i in range(target))  # deterministic up-/down-sampling
    epoch_rng.shuffle(out)
    return out


# ------------------------------------------------------------------------------------------ render
def draw_rng(seed: int, epoch: int, occurrence: int | str) -> random.Random:
    """The rng of one occurrence of a sample: independent across epochs and across up-sampled copies."""
    return random.Random(f"{seed}:{epoch}:{occurrence}")


def render(item: Located, builder: SampleBuilderLike, rng: random.Random) -> RenderedSample:
    """Build one sample with its occurrence's rng (:func:`draw_rng`: order-, rank- and worker-independent)."""
    record = item.record
    try:
        sample = builder.build(record, rng)
    except SampleError as e:
        raise RecordError(item.path, item.line, "<sample>", str(e)) from e
    ids = np.asarray(sample.input_ids, dtype=np.int32)
    labels = np.asarray(sample.labels, dtype=np.int32)
    if ids.shape != labels.shape or ids.size == 0:
        raise ValueError(f"record {record.id!r}: sample builder returned {ids.size} ids and {labels.size} labels")
    return RenderedSample(record.id, ids, labels, [tuple(map(int, s)) for s in sample.image_spans])


def render_all(items: Sequence[tuple[Located, random.Random]], builder: SampleBuilderLike, on_bad: BadRecordCounter,
               desc: str | None = None) -> list[RenderedSample]:
    """Render ``(record, rng)`` pairs; one that cannot become a sample is a bad record (raised, or counted)."""
    out = []
    for item, rng in tqdm(items, desc=desc, mininterval=5, disable=desc is None):
        try:
            out.append(render(item, builder, rng))
        except RecordError as e:
            on_bad(e)
    return out


def rows_from_samples(
    samples: Sequence[RenderedSample], seq_len: int, mode: int, overlong: str, log_prefix: str = ""
) -> list[dict[str, Any]]:
    """Pack rendered samples into collator rows; log utilisation and what happened to overlong samples."""
    result = pack([len(s.input_ids) for s in samples], seq_len, mode, [s.image_spans for s in samples], overlong)
    if result.dropped or result.split:
        logger.warning(
            f"{log_prefix}{len(result.dropped)} sample(s) longer than model_max_length={seq_len} dropped "
            f"({len(result.dropped_multimodal)} with an image: never split from their text), "
            f"{len(result.split)} text-only sample(s) split (overlong={overlong})"
        )
    rows = []
    for row in result.rows:
        rows.append(
            {
                "input_ids": np.concatenate([samples[p.sample].input_ids[p.start : p.end] for p in row]),
                "labels": np.concatenate([samples[p.sample].labels[p.start : p.end] for p in row]),
                "doc_lens": [p.length for p in row],
                "sample_ids": [samples[p.sample].sample_id for p in row],
            }
        )
    return rows


def log_utilisation(rows: Sequence[dict[str, Any]], seq_len: int, mode: int, batch_size: int, prefix: str = "") -> float:
    """Real tokens / row capacity (mode 0: / padded batch size, for consecutive batches of ``batch_size``)."""
    lengths = [len(r["input_ids"]) for r in rows]
    if mode == 0:
        value = padded_utilisation(lengths, batch_size)
    else:
        value = sum(lengths) / (len(lengths) * seq_len) if lengths else 0.0
    logger.info(f"{prefix}{len(rows)} rows, {sum(lengths)} tokens, token utilisation {value:.4f} (use_data_packing={mode})")
    return value


# --------------------------------------------------------------------------------------- map-style
class PackedRowDataset:
    """Map-style dataset of packed rows (a plain sequence; the Trainer's sampler shuffles and shards it)."""

    def __init__(self, rows: list[dict[str, Any]], epochs: int = 1):
        self.rows, self.epochs = rows, epochs

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


def build_map_dataset(
    sources: Sequence[Source],
    builder: SampleBuilderLike,
    vocab: CodeVocab,
    *,
    seq_len: int,
    mode: int,
    overlong: str = "split",
    percentage: float = 1.0,
    seed: int = 0,
    skip_bad_records: bool = False,
    batch_size: int = 1,
    epochs: int = 1,
    min_rows: int = 0,
) -> PackedRowDataset:
    """Validate every record, then mix, render and pack data epochs (each with its own draws) until there are
    ``epochs`` of them and at least ``min_rows`` rows: everything before training starts."""
    on_bad = BadRecordCounter(skip_bad_records)
    per_source = [list(iter_source_records(s, vocab, on_bad)) for s in sources]
    sizes, weights = [len(r) for r in per_source], [s.weight for s in sources]
    percentages = _percentages(sources, percentage)
    rows: list[dict[str, Any]] = []
    epoch = 0
    while epoch < epochs or len(rows) < min_rows:
        order = mix_indices(sizes, weights, percentages, seed, epoch)
        items = [(per_source[s][i], draw_rng(seed, epoch, k)) for k, (s, i) in enumerate(order)]
        samples = render_all(items, builder, on_bad, desc=f"render samples (epoch {epoch})")
        if not samples:
            raise ValueError("data_path: no record could be rendered into a sample")
        rows += rows_from_samples(samples, seq_len, mode, overlong, f"epoch {epoch}: ")
        epoch += 1
    on_bad.report()
    log_utilisation(rows, seq_len, mode, batch_size, f"{epoch} data epoch(s): ")
    return PackedRowDataset(rows, epoch)


# ---------------------------------------------------------------------------------------- streaming
def _keep(index: int, percentage: float) -> bool:
    """Deterministic subsample of a stream (a multiplicative hash of the record index)."""
    return percentage >= 1.0 or ((index * 2654435761) % 2**32) / 2**32 < percentage


def stream_rows(
    shards: Sequence[int],
    *,
    num_shards: int,
    sources: Sequence[Source],
    builder: SampleBuilderLike,
    vocab: CodeVocab,
    seq_len: int,
    mode: int,
    overlong: str,
    percentage: float,
    seed: int,
    skip_bad_records: bool,
    buffer: int,
    epochs: int | None = 1,
    counts: Sequence[int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Rows of the given virtual shards: interleave sources by weight, render, pack every ``buffer`` samples; then
    the next data epoch (new interleaving and new draws), ``epochs`` times (None: without end; training stops at
    ``max_steps``). Sources without a weight (the reference's ``a^^b``) are read whole, interleaved in proportion
    to ``counts`` (their record counts; equal without them)."""
    whole, percentages = any(s.weight is None for s in sources), _percentages(sources, percentage)
    if whole and counts:
        weights = [max(c * p, 1.0) for c, p in zip(counts, percentages, strict=True)]  # > 0 for rng.choices
    else:
        weights = [1.0 if s.weight is None else s.weight for s in sources]
    for epoch in itertools.count() if epochs is None else range(epochs):
        for shard in shards:
            rng = random.Random(f"{seed}:{epoch}:shard:{shard}")
            on_bad = BadRecordCounter(skip_bad_records)
            its = [_shard_records(s, vocab, on_bad, shard, num_shards, pct) for s, pct in zip(sources, percentages)]
            live = list(range(len(its)))
            pending: list[RenderedSample] = []
            prefix = f"epoch {epoch} shard {shard}: "
            for position in itertools.count():
                k = rng.choices(live, weights=[weights[j] for j in live])[0] if len(live) > 1 else live[0]
                item = next(its[k], None)
                if item is None and whole and len(live) > 1:  # whole sources: read the others to their end
                    live.remove(k)
                    continue
                if item is None:  # first exhausted source ends the shard: keeps the mixture proportions
                    break
                pending.extend(render_all([(item, draw_rng(seed, epoch, f"{shard}.{position}"))], builder, on_bad))
                if len(pending) == buffer:
                    yield from _shuffled(rows_from_samples(pending, seq_len, mode, overlong, prefix), rng)
                    pending = []
            if pending:
                yield from _shuffled(rows_from_samples(pending, seq_len, mode, overlong, prefix), rng)
            on_bad.report()


def _stream_groups(groups: Sequence[Sequence[int]], **kwargs: Any) -> Iterator[dict[str, Any]]:
    """The generator datasets calls with its share of ``groups``: one stream over all their shards."""
    yield from stream_rows(sorted(s for g in groups for s in g), **kwargs)


def _shuffled(rows: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    rng.shuffle(rows)
    return rows


def _shard_records(source: Source, vocab, on_bad, shard: int, num_shards: int, percentage: float) -> Iterator[Located]:
    for index, item in enumerate(iter_source_records(source, vocab, on_bad)):
        if index % num_shards == shard and _keep(index, percentage):
            yield item


def validate_sources(sources: Sequence[Source], vocab: CodeVocab, skip_bad_records: bool) -> list[int]:
    """Scan every record once before a streamed run, so a bad corpus stops it before step 1; returns the number of
    valid records of each source."""
    on_bad = BadRecordCounter(skip_bad_records)
    counts = [sum(1 for _ in tqdm(iter_source_records(s, vocab, on_bad), desc=f"validate {s.spec}", mininterval=5))
              for s in sources]
    on_bad.report()
    return counts


def build_streaming_dataset(
    sources: Sequence[Source],
    builder: SampleBuilderLike,
    vocab: CodeVocab,
    *,
    seq_len: int,
    mode: int,
    overlong: str = "split",
    percentage: float = 1.0,
    seed: int = 0,
    skip_bad_records: bool = False,
    buffer: int = 512,
    num_shards: int = 8,
    num_groups: int = 1,
    validate: bool = True,
):
    """An endless ``datasets.IterableDataset`` of packed rows over ``num_shards`` virtual shards (see the module
    doc); the Trainer stops it at ``max_steps``."""
    import datasets

    counts = None
    if validate or any(s.weight is None for s in sources):  # whole sources interleave by their sizes
        counts = tuple(validate_sources(sources, vocab, skip_bad_records))  # a tuple: datasets shards lists
    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            "doc_lens": datasets.Sequence(datasets.Value("int32")),
            "sample_ids": datasets.Sequence(datasets.Value("string")),
        }
    )
    if not 1 <= num_groups <= num_shards:
        raise ValueError(f"streaming: num_groups={num_groups} must be in [1, num_shards={num_shards}]")
    gen: Callable[..., Iterator[dict[str, Any]]] = _stream_groups
    return datasets.IterableDataset.from_generator(
        gen,
        features=features,
        gen_kwargs=dict(
            groups=[list(range(g, num_shards, num_groups)) for g in range(num_groups)], num_shards=num_shards, sources=tuple(sources), builder=builder,
            vocab=vocab, seq_len=seq_len, mode=mode, overlong=overlong, percentage=percentage, seed=seed,
            skip_bad_records=skip_bad_records, buffer=buffer, epochs=None, counts=counts,
        ),
    )
