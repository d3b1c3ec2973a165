"""Large corpora: records validated once into memory-mapped arrow shards, read lazily, rendered and packed on the fly.

Selected with ``--data_cache_dir DIR`` (``uni_arch/train/args.py``); without it the map-style and streaming paths
of ``dataset.py`` are unchanged. Why a new path: at the reference's scale (Uni-X-3B: 140B tokens, 8 nodes of 8
GPUs) the map-style path renders the whole corpus into RAM on every rank before step 1, and the streaming path has
every rank parse and range-check the entire corpus (``validate_sources``) and every virtual shard re-read it, with
shards of unequal length (a rank runs dry before the others).

**Choice.** Built on ``datasets`` (already a dependency; litdata and mosaicml-streaming are not installed here, so
they could not be measured): its ``ArrowWriter`` writes the shards and ``Dataset.from_file`` memory-maps them
(``tools/bench.py data``: time to the first batch and peak RSS flat from 200k to 2M records). Not taken, and why:

* ``load_dataset("json")`` + ``map(num_proc=...)`` to build the shards: it infers one arrow schema across rows of
  different types and forgets where a row came from, so a bad record could no longer be named ``file:line: field``,
  and the reference's rows need this toolkit's converter anyway. One shard per record file, files in parallel,
  keeps both.
* ``to_iterable_dataset(num_shards)`` + ``split_dataset_by_node``: it gives each rank whole shards, of unequal
  length unless the shards divide evenly (otherwise every rank reads every example and keeps one in
  ``world_size``), and shuffles by shard order plus a buffer rather than by the weighted mixture.
* ``IterableDataset.state_dict`` for resume: a buffered shuffle comes back without its buffer (datasets warns that
  the buffer "will be refilled": not the same samples), and the HF Trainer resumes by replaying batches anyway.

**1. Prepare once** (``python -m uni_arch.train.prepare_data``, or the first run on the cache: rank 0 prepares
under ``main_process_first`` while the other ranks wait, then all read). Every record file of ``data_path`` is read,
parsed and range-checked once (``iter_source_records``: a bad record stops with ``file:line: field: problem`` as
before, or is counted with ``skip_bad_records``) and written as one arrow shard (datasets' ``ArrowWriter``) of
``(record json, line)`` rows, ``num_proc`` files in parallel, each shard atomically (a killed prepare resumes).
A shard's name hashes the file's absolute path, size and mtime, the code vocabulary it was checked against and
this format's version, so one cache serves many ``data_path`` mixes and a changed file or vocabulary is simply
prepared again; several nodes can share one cache directory.

**2. Read lazily.** A run opens its shards with ``datasets.Dataset.from_file`` (memory-mapped: no record is read
before it is needed) and learns every source's size from the arrow metadata: start-up reads no record, and the
resident memory is the pages actually touched. Measured with ``python tools/bench.py data`` (table in
``tools/bench_data.py``).

**3. The epoch plan without a table.** ``mix_indices`` (the map-style path) shuffles Python lists of every record
index, O(corpus) time and memory on every rank. :class:`MixPlan` gives the same plan -- each source cut to its
``percentage`` by a seeded subset that is the same in every epoch, up- or down-sampled to its weight with a fresh
choice of copies per epoch, the sources interleaved at random -- as pseudo-random *bijections* evaluated per
position (:func:`permute`: a Feistel network on the next power of four, cycle-walking back into range; numpy,
O(1) memory), so position ``g`` of the endless sample sequence maps to (epoch, occurrence, source, record) without
any per-record state. The order is not ``mix_indices``'s (a Python ``random.shuffle`` cannot be evaluated per
position); the proportions are its proportions exactly, and :class:`TablePlan` (``mix_indices`` itself) plugs into
the same stream, which is how ``tests/test_lazy_dataset.py`` shows this path renders and packs what ``dataset.py``
does, sample for sample.

**4. Per-occurrence draws, as before.** A sample is rendered (template, token ids, labels) when it is read, with the
rng ``draw_rng(seed, epoch, occurrence)``, the occurrence being its place in its epoch exactly as in the map-style
path: ``t2i_ratio``, ``cfg_dropout`` and the instruction wording are fresh draws per occurrence. Rendering once
offline would fix one draw per record for every epoch and every up-sampled copy, which is what the per-occurrence
draws exist to avoid; rendering is cheap next to a training step (``tools/bench.py data``: packed rows/s of the
loader against the tiny model's consumption).

**5. Windows, ranks and workers.** The sample sequence is cut into windows of ``packing_buffer`` positions;
window ``j`` belongs to rank ``j % world_size``. A window is rendered and packed on its own (the bounded buffer of
on-the-fly packing: ``pack`` over ``packing_buffer`` samples, the utilisation of today's streaming path), and its
rows are shuffled with a seeded rng (best-fit decreasing sorts them by length). The stream is endless (training
stops at ``max_steps``), so every rank takes the same number of steps and none runs dry. Windows are rendered by
``dataloader_num_workers`` worker processes of a torch ``DataLoader`` over "this rank's m-th window", in order, so
the rows do not depend on the number of workers; the Trainer's own loader then runs in the main process (the
builder moves ``dataloader_num_workers`` here and sets the Trainer's to 0: ``datasets`` hands its workers whole
units, one per rank here, so extra Trainer workers would sit idle, and splitting a rank's stream among them would
tie the row order to their number).

**6. Resume.** The rows of a rank are a pure function of (data, arguments, rank, world size), so the Trainer's
resume -- it skips the batches already trained by reading them again -- continues exactly (same samples per step,
same losses; ``tests/test_train_resume.py``). The skip re-renders the skipped windows (in the workers): resume
time grows with the steps done, not with the corpus. The layout a checkpoint was trained with (world size, window
size, seed, batch shape, sources) is stored in its ``trainer_state.json`` (:class:`DataLayoutCallback`); resuming
with another world size would deal the windows differently, so that is refused before any step, with a message
that says what to do (the Trainer's replay cannot continue a different layout at the same global position).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from loguru import logger
from tqdm import tqdm
from transformers.trainer_callback import ExportableState, TrainerCallback

from data_process.schema import RecordError, atomic_write_text, record_from_dict
from modeling.vocab import CodeVocab
from uni_arch.train.dataset import (
    BadRecordCounter, Located, SampleBuilderLike, Source, _percentages, draw_rng, iter_source_records, mix_indices,
    render_all, rows_from_samples,
)

CACHE_VERSION = 1  # bump when the shard layout changes: old shards are then prepared again, never misread
SHARD_DIR = "shards"


# ------------------------------------------------------------------------------------------ prepare
def shard_key(path: Path, vocab: CodeVocab) -> str:
    """The name of a file's shard: its absolute path, size and mtime, the vocabulary its codes were checked
    against, and the format version (a changed file or vocabulary is prepared again, never misread)."""
    st = path.stat()
    ident = [str(path.resolve()), st.st_size, st.st_mtime_ns, vocab.to_dict(), CACHE_VERSION]
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _shard_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    return cache_dir / SHARD_DIR / f"{key}.arrow", cache_dir / SHARD_DIR / f"{key}.json"


def _write_shard(path: Path, cache_dir: Path, key: str, vocab: CodeVocab, skip_bad_records: bool) -> dict[str, Any]:
    """Validate one record file and write its shard (arrow rows ``record``, ``line``) and meta json atomically."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    arrow, meta_path = _shard_paths(cache_dir, key)
    arrow.parent.mkdir(parents=True, exist_ok=True)
    tmp = arrow.with_name(f"{arrow.name}.tmp-{os.getpid()}")
    on_bad = BadRecordCounter(skip_bad_records)
    features = datasets.Features({"record": datasets.Value("string"), "line": datasets.Value("int32")})
    source = Source(str(path), (path,), None)
    writer = ArrowWriter(features=features, path=str(tmp), writer_batch_size=4096)
    try:
        for item in iter_source_records(source, vocab, on_bad):
            writer.write({"record": item.record.to_json(), "line": item.line})
        records, _ = writer.finalize()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    meta = {"file": str(path.resolve()), "records": records, "bad": on_bad.count, "bad_examples": on_bad.examples,
            "vocab": vocab.to_dict(), "version": CACHE_VERSION}
    os.replace(tmp, arrow)  # the arrow first: a meta json exists only beside a complete shard
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    return meta


def _prepare_one(args: tuple[str, str, str, CodeVocab, bool]) -> dict[str, Any]:
    path, cache_dir, key, vocab, skip = args
    return _write_shard(Path(path), Path(cache_dir), key, vocab, skip)


def prepare_cache(sources: Sequence[Source], vocab: CodeVocab, cache_dir: str | Path, *, num_proc: int = 1,
                  skip_bad_records: bool = False) -> dict[str, int]:
    """Write the shard of every record file of ``sources`` that has none yet; ``num_proc`` files in parallel.

    Returns counts (``files``, ``prepared``, ``records`` written now). A bad record raises :class:`RecordError`
    (``file:line: field: problem``) unless ``skip_bad_records``; its file then has no shard, so the next attempt
    validates it again.
    """
    cache_dir = Path(cache_dir)
    todo, seen = [], set()
    for source in sources:
        for path in source.files:
            key = shard_key(path, vocab)
            if key not in seen and not _shard_paths(cache_dir, key)[1].is_file():
                todo.append((str(path), str(cache_dir), key, vocab, skip_bad_records))
            seen.add(key)
    counts = {"files": len(seen), "prepared": len(todo), "records": 0}
    if not todo:
        return counts
    logger.info(f"data cache {cache_dir}: validating {len(todo)} of {len(seen)} record file(s) into arrow shards "
                f"({num_proc} process(es))")
    parallel = num_proc > 1 and len(todo) > 1  # one file is one task: a single huge file is prepared serially
    with ProcessPoolExecutor(min(num_proc, len(todo))) if parallel else contextlib.nullcontext() as pool:
        for meta in tqdm((pool.map if parallel else map)(_prepare_one, todo), total=len(todo),
                         desc="prepare shards", unit="file", mininterval=5):
            counts["records"] += meta["records"]
    logger.info(f"data cache {cache_dir}: {counts['records']:,} valid record(s) written in {len(todo)} shard(s)")
    return counts


# --------------------------------------------------------------------------------------------- open
@dataclass(frozen=True)
class CachedSource:
    """One ``data_path`` source over its memory-mapped shards: ``table`` (a ``datasets.Dataset`` of ``record``
    json and ``line``) and, to name the file of a record, each file's first row (``offsets``, one per file + end)."""

    source: Source
    table: Any
    files: tuple[str, ...]
    offsets: np.ndarray

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def located(self, index: int) -> Located:
        """Record ``index`` of the source, rebuilt from its json (validated when the shard was written)."""
        row = self.table[int(index)]
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return Located(record_from_dict(json.loads(row["record"]), self.files[k], row["line"]), Path(self.files[k]),
                       row["line"])


def open_cache(sources: Sequence[Source], vocab: CodeVocab, cache_dir: str | Path,
               skip_bad_records: bool = False) -> list[CachedSource]:
    """Memory-map the shards of every source; a missing shard is an error naming the prepare command, and a shard
    written with ``skip_bad_records`` that skipped records stops a run without it (as the file itself would)."""
    import datasets

    cache_dir, out = Path(cache_dir), []
    for source in sources:
        tables, files, sizes = [], [], []
        for path in source.files:
            arrow, meta_path = _shard_paths(cache_dir, shard_key(path, vocab))
            if not meta_path.is_file():
                raise FileNotFoundError(
                    f"data_cache_dir={str(cache_dir)!r} has no shard of {path} (new or changed since it was prepared, "
                    f"or another code vocabulary): run `python -m uni_arch.train.prepare_data` with this run's "
                    f"arguments, or train once on one process with --data_cache_dir to prepare it")
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta["bad"] and not skip_bad_records:
                raise RecordError(path, None, "<file>", f"{meta['bad']} bad record(s) were skipped when this file was "
                                  f"prepared (skip_bad_records); first: {meta['bad_examples'][:1]}; fix the file or "
                                  f"pass --skip_bad_records true")
            if meta["records"]:
                tables.append(datasets.Dataset.from_file(str(arrow), in_memory=False))
                files.append(meta["file"])
                sizes.append(meta["records"])
        if not tables:
            raise ValueError(f"data_path: source {source.spec!r} has no valid records")
        table = tables[0] if len(tables) == 1 else datasets.concatenate_datasets(tables)
        out.append(CachedSource(source, table, tuple(files), np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)))
    return out


# --------------------------------------------------------------------------------------------- plan
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-mixing hash of uint64 values (the Feistel round function)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def stable_key(*parts: Any) -> int:
    """A 64-bit key from any printable parts (Python's ``hash`` of a str changes per process)."""
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def permute(index: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """A pseudo-random bijection of ``[0, n)`` evaluated at ``index`` without a table (O(1) memory).

    A ``rounds``-round Feistel network on ``2 * half`` bits (the next power of four >= n, at most 4n) is a
    permutation of that domain; values that land past ``n`` are sent through it again until they fall inside
    (cycle-walking), which keeps it a bijection of ``[0, n)``.

    >>> sorted(permute(np.arange(10), 10, key=7).tolist()) == list(range(10))
    True
    """
    if n <= 1:
        return np.zeros_like(np.asarray(index, dtype=np.int64))
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = [np.uint64(stable_key(key, r)) for r in range(rounds)]

    def once(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        return (left << np.uint64(half)) | right

    x = np.asarray(index, dtype=np.uint64).copy()
    out = once(x)
    pending = out >= np.uint64(n)
    while pending.any():
        out[pending] = once(out[pending])
        pending = out >= np.uint64(n)
    return out.astype(np.int64)


def mix_targets(kept: Sequence[int], weights: Sequence[float | None]) -> list[int]:
    """Occurrences of each source per epoch: its kept records (the reference's ``a^^b``, weights None) or its
    weight's share of all kept records (``mix_indices``'s rule)."""
    if any(w is None for w in weights):
        if not all(w is None for w in weights):
            raise ValueError(f"data_path: weights {list(weights)} mix proportions with whole sources (None)")
        return list(kept)
    total = sum(kept)
    return [round(total * w / sum(weights)) for w in weights]


@dataclass(frozen=True)
class Occurrences:
    """Where positions of the endless sample sequence go: epoch, occurrence in the epoch, source, record."""

    epoch: np.ndarray
    occurrence: np.ndarray
    source: np.ndarray
    record: np.ndarray


class MixPlan:
    """The epoch plan of ``mix_indices`` (proportions, fixed ``percentage`` subsets, fresh copies per epoch) as
    bijections evaluated per position (see the module doc): O(number of sources) memory whatever the corpus."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float | None], percentages: Sequence[float], seed: int):
        self.sizes, self.seed = [int(n) for n in sizes], seed
        self.kept = [max(1, int(np.floor(n * p))) if n else 0 for n, p in zip(self.sizes, percentages, strict=True)]
        for s, n in enumerate(self.sizes):
            if not n:
                raise ValueError(f"data_path: source {s} has no valid records")
        self.targets = mix_targets(self.kept, weights)
        self.bounds = np.concatenate([[0], np.cumsum(self.targets)]).astype(np.int64)
        self.epoch_len = int(self.bounds[-1])

    def locate(self, positions: np.ndarray) -> Occurrences:
        positions = np.asarray(positions, dtype=np.int64)
        epoch, occurrence = positions // self.epoch_len, positions % self.epoch_len
        source = np.empty_like(positions)
        record = np.empty_like(positions)
        for e in np.unique(epoch):
            at = epoch == e
            slot = permute(occurrence[at], self.epoch_len, stable_key(self.seed, "mix", int(e)))
            src = np.searchsorted(self.bounds, slot, side="right") - 1
            rec = np.empty_like(slot)
            for s in np.unique(src):
                mine = src == s
                k = (slot[mine] - self.bounds[s]) % self.kept[s]  # up-sampling: copies cycle over the kept records
                j = permute(k, self.kept[s], stable_key(self.seed, "copies", int(e), int(s)))
                rec[mine] = permute(j, self.sizes[s], stable_key(self.seed, "subset", int(s)))  # the same every epoch
            source[at], record[at] = src, rec
        return Occurrences(epoch, occurrence, source, record)


class TablePlan:
    """``mix_indices``'s own epochs (the map-style path's order; O(corpus) per epoch): the reference that shows
    the lazy stream renders what ``dataset.py`` renders (``tests/test_lazy_dataset.py``)."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float | None], percentages: Sequence[float], seed: int):
        self.args = (list(sizes), list(weights), list(percentages), seed)
        self.epoch_len = len(mix_indices(*self.args, epoch=0))
        self._cache: dict[int, list[tuple[int, int]]] = {}

    def locate(self, positions: np.ndarray) -> Occurrences:
        positions = np.asarray(positions, dtype=np.int64)
        epoch, occurrence = positions // self.epoch_len, positions % self.epoch_len
        pairs = [self._epoch(int(e))[int(p)] for e, p in zip(epoch, occurrence)]
        return Occurrences(epoch, occurrence, np.array([s for s, _ in pairs]), np.array([i for _, i in pairs]))

    def _epoch(self, e: int) -> list[tuple[int, int]]:
        if e not in self._cache:
            self._cache = {e: mix_indices(*self.args, epoch=e)}
        return self._cache[e]


# ------------------------------------------------------------------------------------------- stream
class LazyRowStream:
    """The rows of the lazy path: window ``j`` (positions ``[j * window, (j + 1) * window)`` of the plan) rendered
    with per-occurrence draws and packed on its own; rank ``r`` of ``world_size`` reads windows ``r, r + W, ...``.

    Picklable (the worker processes receive it): the tables are memory maps, the builder a tokenizer.
    """

    def __init__(self, cached: Sequence[CachedSource], plan: MixPlan | TablePlan, builder: SampleBuilderLike, *,
                 seq_len: int, mode: int, overlong: str, seed: int, window: int, skip_bad_records: bool = False):
        if window <= 0:
            raise ValueError(f"packing_buffer={window} must be positive")
        self.cached, self.plan, self.builder = list(cached), plan, builder
        self.seq_len, self.mode, self.overlong, self.seed = seq_len, mode, overlong, seed
        self.window, self.skip_bad_records = window, skip_bad_records

    def samples(self, j: int):
        """The rendered samples of window ``j``, in position order (bad ones raise, or are skipped and counted)."""
        occ = self.plan.locate(np.arange(j * self.window, (j + 1) * self.window))
        items = [(self.cached[s].located(i), draw_rng(self.seed, int(e), int(k)))
                 for e, k, s, i in zip(occ.epoch, occ.occurrence, occ.source, occ.record)]
        on_bad = BadRecordCounter(self.skip_bad_records)
        samples = render_all(items, self.builder, on_bad)
        on_bad.report()
        return samples

    def window_rows(self, j: int) -> list[dict[str, Any]]:
        """Window ``j`` packed (``pack`` over its samples) and its rows shuffled by a seeded rng."""
        samples = self.samples(j)
        rows = rows_from_samples(samples, self.seq_len, self.mode, self.overlong, f"window {j}: ") if samples else []
        random.Random(f"{self.seed}:window:{j}").shuffle(rows)
        return rows

    def window_loader(self, rank: int, world_size: int, workers: int, prefetch: int = 2, windows: int | None = None):
        """A torch ``DataLoader`` whose item ``m`` is the rows of the rank's ``m``-th window, rendered by ``workers``
        processes and returned in order (``windows`` of them; None: without end)."""
        from torch.utils.data import DataLoader

        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        sampler = itertools.count() if windows is None else range(windows)
        return DataLoader(_RankWindows(self, rank, world_size), batch_size=None, sampler=sampler, num_workers=workers,
                          collate_fn=_identity, **({"prefetch_factor": prefetch} if workers else {}))

    def rank_rows(self, rank: int, world_size: int, workers: int = 0, prefetch: int = 2) -> Iterator[dict[str, Any]]:
        """Endless rows of one rank, windows rendered by ``workers`` processes (in order: the same rows for any
        number of workers; 0 renders in this process)."""
        for rows in self.window_loader(rank, world_size, workers, prefetch):
            yield from rows


class _RankWindows:
    """Map-style view for the worker ``DataLoader``: item ``m`` = the rows of the rank's ``m``-th window."""

    def __init__(self, stream: LazyRowStream, rank: int, world_size: int):
        self.stream, self.rank, self.world_size = stream, rank, world_size

    def __getitem__(self, m: int) -> list[dict[str, Any]]:
        return self.stream.window_rows(m * self.world_size + self.rank)


def _identity(x: Any) -> Any:
    """collate_fn of the window loader: a window's rows pass as they are (no tensor conversion)."""
    return x


def _rank_generator(ranks: Sequence[int], stream: LazyRowStream, world_size: int, workers: int,
                    prefetch: int) -> Iterator[dict[str, Any]]:
    """What ``datasets`` runs for its share of ``ranks`` (one unit per rank; accelerate hands each rank its own)."""
    for rank in ranks:
        yield from stream.rank_rows(rank, world_size, workers, prefetch)


ROW_FEATURES = {"input_ids": "int32", "labels": "int32", "doc_lens": "int32", "sample_ids": "string"}


def build_lazy_dataset(stream: LazyRowStream, world_size: int, workers: int = 0, prefetch: int = 2):
    """An endless ``datasets.IterableDataset`` of the stream's rows with one unit per rank, so that accelerate's
    ``shard(num_shards=world_size, index=rank)`` gives each rank exactly its own windows."""
    import datasets

    features = datasets.Features({k: datasets.Sequence(datasets.Value(v)) for k, v in ROW_FEATURES.items()})
    ds = datasets.IterableDataset.from_generator(
        _rank_generator, features=features,
        gen_kwargs=dict(ranks=list(range(world_size)), stream=stream, world_size=world_size, workers=workers,
                        prefetch=prefetch))
    return ds


def make_stream(sources: Sequence[Source], builder: SampleBuilderLike, vocab: CodeVocab, cache_dir: str | Path, *,
                seq_len: int, mode: int, overlong: str = "split", percentage: float = 1.0, seed: int = 0,
                skip_bad_records: bool = False, window: int = 512, plan: str = "mix") -> LazyRowStream:
    """Open the cache of ``sources`` (prepared already) and build the stream with the ``mix`` or ``table`` plan."""
    cached = open_cache(sources, vocab, cache_dir, skip_bad_records)
    plan_cls = {"mix": MixPlan, "table": TablePlan}[plan]
    plan_obj = plan_cls([len(c) for c in cached], [s.weight for s in sources], _percentages(sources, percentage), seed)
    logger.info(f"lazy data: {len(cached)} source(s), {sum(len(c) for c in cached):,} records, "
                f"{plan_obj.epoch_len:,} samples per data epoch, windows of {window} samples packed on the fly")
    return LazyRowStream(cached, plan_obj, builder, seq_len=seq_len, mode=mode, overlong=overlong, seed=seed,
                         window=window, skip_bad_records=skip_bad_records)


# ------------------------------------------------------------------------------------------- resume
def data_layout(world_size: int, stream: LazyRowStream, per_device: int, grad_accum: int, data_path: str) -> dict:
    """What a checkpoint's batches depend on: if any of it changes, replaying ``global_step`` batches does not
    land at the same global sample position."""
    return {"world_size": world_size, "packing_buffer": stream.window, "shuffle_seed": stream.seed,
            "per_device_train_batch_size": per_device, "gradient_accumulation_steps": grad_accum,
            "model_max_length": stream.seq_len, "use_data_packing": stream.mode, "data_path": data_path,
            "records": [len(c) for c in stream.cached]}


def layout_problem(saved: dict, current: dict) -> str | None:
    """Why a checkpoint of layout ``saved`` cannot be resumed exactly with ``current`` (None: it can)."""
    diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if not diff:
        return None
    what = ", ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in diff.items())
    advice = ""
    if "world_size" in diff:
        advice = (f" The lazy data path deals windows of packing_buffer={current['packing_buffer']} samples to the "
                  f"ranks round-robin, so with {current['world_size']} rank(s) instead of {saved.get('world_size')} "
                  f"the replay of global_step batches would not reach the same global sample position: some samples "
                  f"would be trained twice and others never.")
    return (f"resume_from_checkpoint: the data stream of this checkpoint cannot be continued exactly ({what}).{advice} "
            f"Resume with the checkpoint's settings (e.g. NUM_PROCESSES={saved.get('world_size')}), or start a new "
            f"run from its weights (--model_name_or_path <checkpoint> without --resume_from_checkpoint).")


class DataLayoutCallback(TrainerCallback, ExportableState):
    """Stores the data layout in every checkpoint's ``trainer_state.json`` and refuses, at the start of a resumed
    run and before any batch is replayed, a layout that cannot continue (:func:`layout_problem`)."""

    def __init__(self, layout: dict | None = None):
        self.layout = layout or {}

    def state(self) -> dict:
        return {"args": {"layout": self.layout}, "attributes": {}}

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):  # several saves of the same callback: the latest
            saved = saved[-1] if saved else None
        if isinstance(saved, dict):
            problem = layout_problem(saved.get("args", {}).get("layout", {}), self.layout)
            if problem:
                raise ValueError(problem)
