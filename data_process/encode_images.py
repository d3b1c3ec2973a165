"""Encode every dataset of a data config into code-ID records: sharded, parallel, resumable, atomic.

    python data_process/encode_images.py --data_config data/shapes/data_config.yaml --out_dir data/shapes_codes \\
        --tokenizer shapes --checkpoint data/shapes/vq --num_workers 2 --batch_size 64 --shard_size 2000 \\
        --resolution_mode fixed

Design (why it resumes exactly):

* Each dataset is a deterministic item stream (:mod:`data_process.converters`); item ``k`` belongs to *unit*
  ``k // shard_size`` and unit ``u`` of dataset ``d`` to worker ``(d + u) % world_size``. Every worker enumerates
  the whole stream (metadata only) and reads the pixels of its own units only.
* A unit is done iff its shard ``out_dir/<dataset>/part-<worker>-<unit>.jsonl`` exists. The shard is written to a
  temporary name and renamed when complete (:class:`~data_process.schema.AtomicShardWriter`); just before that, the
  unit's counts and error lines go to ``out_dir/<dataset>/.units/unit-<unit>.json``. A run killed at any moment
  and started again redoes only units without a shard, so every input is encoded exactly once, whatever the
  worker count of either run (done-ness does not depend on the worker index in the file name).
* ``manifest.json`` and ``errors.jsonl`` are merged from the unit files once every unit is done, by whichever
  process finishes last (the parent with spawned workers, the last rank under torchrun), and written atomically.
* ``encode_state.json`` pins what makes shards comparable (tokenizer id, preprocessing, shard size, data config,
  the encoding settings below) and the resolved input files with their sizes (annotation files, webdataset shards
  as their globs resolve): a file added to a glob, removed or grown between runs shifts every later unit boundary,
  so resuming would duplicate or drop items. Resuming into an ``out_dir`` made with other settings or inputs is an
  error naming what changed, never a silent mix of codes. Unit files are written durably (fsync of the file and its
  directory) before their shard is renamed into place.
* Codes do not depend on the worker count. A VQ's nearest-code argmax flips at near ties with float noise, and the
  encoder's floats depend on the kernels torch picks, which depend on the intra-op thread count and on the batch
  shape (measured here on the shapes VQ: 1 vs 2 threads give different floats for batches of up to 8 images, and a
  batch of 1 differs from larger ones). So every encoding process runs with the same ``--threads`` (default 1,
  whatever ``--num_workers``; scale with workers), a unit's batches depend only on the unit's items and
  ``--batch_size`` (images are queued per grid in item order, never across units), and threads, batch size and
  device are pinned in ``encode_state.json`` and recorded in ``manifest.json``.

Workers are ``torch.multiprocessing`` spawn processes (``--num_workers``) or torchrun ranks (``RANK`` /
``WORLD_SIZE``). The tokenizer is loaded in the parent first, so a wrong checkpoint fails before any work. Every
image is read through :func:`modeling.vq.preprocess.decode_image` (EXIF orientation applied, 16-bit scaled to 8,
alpha composited onto white), the path every tokenizer shares. Images of equal code grid are batched together
(one grid in ``fixed`` mode; one per anchor in ``fixed_anchors`` mode). Bad inputs (missing or unreadable images, malformed json, images
under ``min_size`` or beyond ``max_aspect``, ...) are skipped, counted by reason and listed in ``errors.jsonl``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
from loguru import logger
from PIL import Image
from tqdm import tqdm

from data_process.converters import BAD_RECORD, BadItem, ImageSource, Item, WorkItem, iter_items
from data_process.data_config import DataConfig, DatasetSpec, load_data_config
from data_process.schema import AtomicShardWriter, ImageCodes, Record, RecordError, atomic_write_text, record_from_dict
from modeling.threads import torch_threads
from modeling.vq import IMAGE_TOKENIZERS, ImageTokenizer, load_image_tokenizer
from modeling.vq.base import file_hash
from modeling.vq.preprocess import decode_image
from uni_arch.log_setup import setup_logging

if TYPE_CHECKING:
    from modeling.vq.preprocess import AnchorSet

# Image-level skip reasons (the converters add malformed_json, bad_record, bad_codes, unreadable_shard).
MISSING_FILE = "missing_file"
UNREADABLE_IMAGE = "unreadable_image"
TOO_SMALL = "too_small"
BAD_ASPECT = "bad_aspect"
RESOLUTION_MODES = ("fixed", "fixed_anchors")
_SHARD_RE = re.compile(r"^part-(\d+)-(\d+)\.jsonl$")
STATE_NAME, MANIFEST_NAME, ERRORS_NAME = "encode_state.json", "manifest.json", "errors.jsonl"


@dataclass(frozen=True)
class EncodeOptions:
    """Everything a worker needs (picklable: spawned workers receive it and rebuild the rest)."""

    data_config: str
    out_dir: str
    tokenizer: str | None = None
    checkpoint: str | None = None
    batch_size: int = 64
    shard_size: int = 2000
    resolution_mode: str = "fixed"
    min_size: int = 32
    max_aspect: float = 2.5
    anchor_target: int | None = None
    anchor_downsample: int | None = None
    device: str = "cpu"
    threads: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError(f"batch_size and shard_size must be >= 1, got {self.batch_size=}, {self.shard_size=}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads=}")
        if self.resolution_mode not in RESOLUTION_MODES:
            raise ValueError(f"resolution_mode={self.resolution_mode!r} is not one of {RESOLUTION_MODES}")
        if self.min_size < 1 or self.max_aspect < 1.0:
            raise ValueError(f"need min_size >= 1 and max_aspect >= 1, got {self.min_size=}, {self.max_aspect=}")


# ------------------------------------------------------------------------------------------- tokenizer
def load_tokenizer(spec: str, checkpoint: str | None) -> ImageTokenizer:
    """A registered kind (``shapes``, ``chameleon``, ...) or ``package.module:Class`` (any ImageTokenizer with
    ``from_checkpoint``), loaded from ``checkpoint``. Errors name the kind and the checkpoint."""
    if checkpoint is None:
        raise ValueError(f"--checkpoint is required to load image tokenizer {spec!r}")
    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file or directory (tokenizer {spec!r})")
    if spec in IMAGE_TOKENIZERS:
        tok = load_image_tokenizer(spec, checkpoint)
    elif ":" in spec:
        module, cls_name = spec.split(":", 1)
        cls = getattr(importlib.import_module(module), cls_name)
        if not (isinstance(cls, type) and issubclass(cls, ImageTokenizer)):
            raise TypeError(f"--tokenizer {spec}: {cls!r} is not an ImageTokenizer subclass")
        tok = cls.from_checkpoint(checkpoint)
    else:
        raise ValueError(f"--tokenizer {spec!r}: not a registered kind ({', '.join(sorted(IMAGE_TOKENIZERS))}) "
                         "nor a 'package.module:Class' path")
    return tok.eval()


@dataclass(frozen=True)
class GridPolicy:
    """Which code grid an image gets: the tokenizer's own (``fixed``) or the nearest anchor (``fixed_anchors``)."""

    mode: str
    anchors: "AnchorSet | None" = None  # set in fixed_anchors mode only

    def grid_for(self, image: Image.Image) -> tuple[int, int] | None:
        return None if self.anchors is None else self.anchors.nearest(image.width, image.height)

    def describe(self, opts: EncodeOptions) -> dict[str, Any]:
        d: dict[str, Any] = {"mode": self.mode, "min_size": opts.min_size, "max_aspect": opts.max_aspect}
        if self.anchors is not None:
            a = self.anchors
            d.update(target=a.target, downsample=a.downsample, anchors=[list(g) for g in a.anchors])
        return d


def make_grid_policy(opts: EncodeOptions, tok: ImageTokenizer | None) -> GridPolicy:
    """Anchor target/downsample come from the CLI, else from the tokenizer's ``preprocessor`` if it has one."""
    if opts.resolution_mode == "fixed":
        return GridPolicy("fixed")
    from modeling.vq.preprocess import AnchorSet

    pre = getattr(tok, "preprocessor", None)
    target = opts.anchor_target or getattr(pre, "target", None)
    downsample = opts.anchor_downsample or getattr(pre, "downsample", None)
    if target is None or downsample is None:
        raise ValueError("--resolution_mode fixed_anchors needs --anchor_target and --anchor_downsample "
                         f"(tokenizer {opts.tokenizer!r} has no preprocessor to take them from)")
    return GridPolicy("fixed_anchors", AnchorSet(target=target, downsample=downsample, max_aspect=opts.max_aspect))


# ---------------------------------------------------------------------------------------------- images
def load_image(src: ImageSource, min_size: int, max_aspect: float) -> Image.Image | tuple[str, str]:
    """Decode one image fully (so truncation shows now), or return ``(reason, detail)`` for a skip."""
    try:
        data = src.read_bytes()
    except FileNotFoundError:
        return MISSING_FILE, f"{src.label}: no such file"
    except OSError as e:
        return UNREADABLE_IMAGE, f"{src.label}: {e}"
    try:  # the loading path every tokenizer shares: EXIF orientation, 16-bit scaled, alpha onto white
        image = decode_image(data)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return UNREADABLE_IMAGE, f"{src.label}: {type(e).__name__}: {e}"
    w, h = image.size
    if min(w, h) < min_size:
        return TOO_SMALL, f"{src.label}: {w}x{h}, shorter side < min_size={min_size}"
    if max(w, h) / min(w, h) > max_aspect:
        return BAD_ASPECT, f"{src.label}: {w}x{h}, aspect {max(w, h) / min(w, h):.2f} > max_aspect={max_aspect}"
    return image


# ------------------------------------------------------------------------------------------- unit stats
@dataclass
class UnitStats:
    """Counts of one unit (saved beside its shard) or of a whole dataset (merged)."""

    inputs: int = 0
    written: int = 0
    images: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    grids: dict[str, int] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def skip(self, dataset: str, file: str, line: int | None, reason: str, detail: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.errors.append({"dataset": dataset, "file": file, "line": line, "reason": reason, "detail": detail})

    def merge(self, other: "UnitStats") -> None:
        self.inputs += other.inputs
        self.written += other.written
        self.images += other.images
        for mine, theirs in ((self.skipped, other.skipped), (self.grids, other.grids)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        self.errors.extend(other.errors)


class UnitEncoder:
    """Encodes the items of one unit: loads images, batches them by grid, assembles and validates records.

    At most ``batch_size`` preprocessed images per grid are held at once, so memory does not grow with the unit.
    """

    def __init__(self, tok: ImageTokenizer | None, policy: GridPolicy, opts: EncodeOptions, device: torch.device):
        self.tok, self.policy, self.opts, self.device = tok, policy, opts, device
        self.multi_level = tok is not None and len(tok.level_sizes) > 1

    def _flush(self, pending: list[tuple[tuple[int, int], torch.Tensor]], out: dict, stats: UnitStats) -> None:
        keys = [k for k, _ in pending]
        pixels_BCHW = torch.stack([p for _, p in pending]).to(self.device)
        with torch.inference_mode():
            enc = self.tok.encode(pixels_BCHW)
        levels = enc.levels_N.tolist() if self.multi_level else None
        grid = (int(enc.grid[0]), int(enc.grid[1]))
        for key, codes in zip(keys, enc.codes_BN.cpu().tolist()):
            out[key] = ImageCodes(codes=codes, grid=grid, tokenizer=self.tok.tokenizer_id, levels=levels)
        stats.images += len(keys)
        stats.grids[f"{grid[0]}x{grid[1]}"] = stats.grids.get(f"{grid[0]}x{grid[1]}", 0) + len(keys)
        pending.clear()

    def _queue_images(self, pos: int, item: WorkItem, pending: dict, out: dict, stats: UnitStats) -> tuple[str, str] | None:
        """Load and preprocess every image of ``item``; returns ``(reason, detail)`` if one is bad, else None.

        All images are loaded before any is queued, so a bad second image leaves no orphan codes behind.
        """
        images = []
        for src in item.images:
            loaded = load_image(src, self.opts.min_size, self.opts.max_aspect)
            if isinstance(loaded, tuple):
                return loaded
            images.append(loaded)
        for j, image in enumerate(images):
            grid = self.policy.grid_for(image)
            pixels_CHW = self.tok.preprocess([image], grid=grid)[0]  # (1, C, H, W) -> (C, H, W)
            queue = pending.setdefault(grid, [])
            queue.append(((pos, j), pixels_CHW))
            if len(queue) >= self.opts.batch_size:
                self._flush(queue, out, stats)
        return None

    def encode_unit(self, spec: DatasetSpec, items: list[Item], progress: tqdm | None = None) -> tuple[list[Record], UnitStats]:
        stats, codes, pending = UnitStats(inputs=len(items)), {}, {}
        ok: list[tuple[int, WorkItem]] = []
        for pos, item in enumerate(items):
            if progress is not None:
                progress.update(1)
            if isinstance(item, BadItem):
                stats.skip(spec.name, item.file, item.line, item.reason, item.detail)
                continue
            skip = self._queue_images(pos, item, pending, codes, stats) if item.images else None
            if skip is not None:
                stats.skip(spec.name, item.file, item.line, *skip)
                continue
            ok.append((pos, item))
        for queue in pending.values():
            if queue:
                self._flush(queue, codes, stats)
        records = []
        for pos, item in ok:
            record = item.record
            if item.images:
                record.images = [codes[(pos, j)] for j in range(len(item.images))]
            try:  # the schema is the contract with training: never write a record it would reject
                record_from_dict(record.to_dict(), item.file, item.line)
            except RecordError as e:
                stats.skip(spec.name, item.file, item.line, BAD_RECORD, str(e))
                continue
            records.append(record)
        stats.written = len(records)
        return records, stats


# ------------------------------------------------------------------------------------------- sharding
def iter_units(items: Iterable[Item], shard_size: int) -> Iterator[tuple[int, list[Item], bool]]:
    """``(unit, items, is_last)`` for consecutive chunks of ``shard_size``; an empty stream is one empty last unit.

    >>> [(u, len(c), last) for u, c, last in iter_units(range(5), 2)]
    [(0, 2, False), (1, 2, False), (2, 1, True)]
    """
    held: list[Item] | None = None
    unit, chunk = 0, []
    for item in items:
        chunk.append(item)
        if len(chunk) == shard_size:
            if held is not None:
                yield unit - 1, held, False
            held, chunk, unit = chunk, [], unit + 1
    if held is not None:
        yield unit - 1, held, not chunk
    if chunk or held is None:
        yield unit, chunk, True


def completed_units(ds_dir: Path) -> dict[int, str]:
    """unit -> shard file name, for every shard under its final name (whatever worker wrote it)."""
    done = {}
    if ds_dir.is_dir():
        for p in ds_dir.iterdir():
            m = _SHARD_RE.match(p.name)
            if m:
                done[int(m.group(2))] = p.name
    return done


def _unit_state_path(ds_dir: Path, unit: int) -> Path:
    return ds_dir / ".units" / f"unit-{unit:05d}.json"


def owner(dataset_index: int, unit: int, world: int) -> int:
    """Round-robin, offset per dataset so that small datasets do not all land on worker 0."""
    return (dataset_index + unit) % world


@dataclass
class WorkerReport:
    rank: int
    units: int = 0
    items: int = 0
    images: int = 0
    seconds: float = 0.0


def _write_unit(ds_dir: Path, rank: int, unit: int, records: list[Record], stats: UnitStats, is_last: bool) -> None:
    for stale in ds_dir.glob(f"part-*-{unit:05d}.jsonl.tmp-*"):  # left by a killed run; this unit is ours now
        stale.unlink(missing_ok=True)
    state = asdict(stats) | {"unit": unit, "is_last": is_last, "shard": f"part-{rank:03d}-{unit:05d}.jsonl"}
    # Durable before the shard appears: a shard marks its unit done, and finalize() trusts the unit file behind it.
    atomic_write_text(_unit_state_path(ds_dir, unit), json.dumps(state, ensure_ascii=False) + "\n", durable=True)
    with AtomicShardWriter(ds_dir / state["shard"]) as writer:  # the rename below marks the unit done
        for record in records:
            writer.write(record)


def run_worker(rank: int, world: int, opts: EncodeOptions, tok: ImageTokenizer | None = None) -> WorkerReport:
    """Encode every unit this rank owns that is not done yet, with ``opts.threads`` torch threads (see the module
    docstring: the thread count changes the encoder's floats, so it must not follow the worker count)."""
    with torch_threads(opts.threads):
        return _run_worker(rank, world, opts, tok)


def _run_worker(rank: int, world: int, opts: EncodeOptions, tok: ImageTokenizer | None) -> WorkerReport:
    config = load_data_config(opts.data_config)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))  # torchrun across nodes: the GPU index is per node
    device = torch.device(opts.device if opts.device != "cuda" else f"cuda:{local_rank % max(1, torch.cuda.device_count())}")
    if tok is None and config.needs_tokenizer:
        tok = load_tokenizer(opts.tokenizer, opts.checkpoint)
    if tok is not None:
        tok = tok.to(device)
    encoder = UnitEncoder(tok, make_grid_policy(opts, tok), opts, device)
    report, start = WorkerReport(rank), time.perf_counter()
    progress = tqdm(desc=f"encode[{rank}]", unit="item", position=rank, dynamic_ncols=True, leave=world == 1)
    for d_idx, spec in enumerate(config.datasets):
        ds_dir = Path(opts.out_dir) / spec.name
        done = completed_units(ds_dir)
        for unit, items, is_last in iter_units(iter_items(spec), opts.shard_size):
            if owner(d_idx, unit, world) != rank or unit in done:
                continue
            records, stats = encoder.encode_unit(spec, items, progress)
            _write_unit(ds_dir, rank, unit, records, stats, is_last)
            report.units, report.items, report.images = report.units + 1, report.items + len(items), report.images + stats.images
    progress.close()
    report.seconds = time.perf_counter() - start
    return report


# ------------------------------------------------------------------------------------------ run state
def input_files(config: DataConfig) -> dict[str, dict[str, int]]:
    """Per dataset, every file its item stream is read from, with its size in bytes: the annotation files, or the
    webdataset shards as their globs resolve now. Paths are relative to the dataset root."""
    files: dict[str, dict[str, int]] = {}
    for spec in config.datasets:
        paths = spec.shard_paths() if spec.format == "webdataset" else spec.annotation_paths()
        root = Path(spec.root)
        files[spec.name] = {(str(p.relative_to(root)) if p.is_relative_to(root) else str(p)): p.stat().st_size
                            for p in paths}
    return files


def describe_input_changes(old: dict[str, dict[str, int]] | None, new: dict[str, dict[str, int]]) -> str:
    """``dataset: added a, b; removed c; size changed d (10 -> 12 bytes)`` for every dataset whose files differ."""
    if old is None:
        return "the input files were not recorded (an out_dir from an older version)"
    parts = []
    for name in sorted(set(old) | set(new)):
        o, n = old.get(name, {}), new.get(name, {})
        added, removed = sorted(set(n) - set(o)), sorted(set(o) - set(n))
        resized = [f"{f} ({o[f]} -> {n[f]} bytes)" for f in sorted(set(o) & set(n)) if o[f] != n[f]]
        what = [f"{label} {', '.join(fs)}" for label, fs in (("added", added), ("removed", removed),
                                                               ("size changed", resized)) if fs]
        if what:
            parts.append(f"{name}: {'; '.join(what)}")
    return " | ".join(parts)


def check_run_state(opts: EncodeOptions, config: DataConfig, header: dict[str, Any]) -> None:
    """Pin the settings and the input files that make shards comparable; resuming with different ones is an error
    naming them (and, for input files, which were added, removed or changed size)."""
    state = {"tokenizer": header["tokenizer"]["id"], "preprocessing": header["preprocessing"],
             "encoding": header["encoding"], "shard_size": opts.shard_size,
             "data_config_sha": file_hash(config.path, 16), "datasets": [d.name for d in config.datasets],
             "inputs": input_files(config)}
    path = Path(opts.out_dir) / STATE_NAME
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("inputs") != state["inputs"]:
            raise ValueError(
                f"{path}: the input files changed since this out_dir was started ("
                f"{describe_input_changes(old.get('inputs'), state['inputs'])}). Units are fixed slices of each "
                "dataset's item stream, so resuming would duplicate or skip items: restore the inputs as they were, "
                f"or encode into a new --out_dir (or delete {opts.out_dir} and start over)")
        changed = sorted(k for k in state if old.get(k) != state[k])
        if changed:
            raise ValueError(f"{path}: out_dir was written with other settings ({', '.join(changed)} differ: "
                             f"{ {k: old.get(k) for k in changed} } now { {k: state[k] for k in changed} }); "
                             "use a new --out_dir or delete the old one")
    else:
        atomic_write_text(path, json.dumps(state, indent=2) + "\n", durable=True)


def finalize(opts: EncodeOptions, config: DataConfig, header: dict[str, Any]) -> dict[str, Any] | None:
    """Merge unit files into ``manifest.json`` + ``errors.jsonl`` if every unit of every dataset is done."""
    out = Path(opts.out_dir)
    datasets, errors = {}, []
    for spec in config.datasets:
        ds_dir = out / spec.name
        done = completed_units(ds_dir)
        states = {u: json.loads(_unit_state_path(ds_dir, u).read_text(encoding="utf-8")) for u in sorted(done)}
        last = [u for u, s in states.items() if s["is_last"]]
        if not last or set(range(last[0] + 1)) - set(done):
            return None
        total = UnitStats()
        for u in range(last[0] + 1):
            s = states[u]
            total.merge(UnitStats(s["inputs"], s["written"], s["images"], s["skipped"], s["grids"], s["errors"]))
        errors.extend(total.errors)
        datasets[spec.name] = {"format": spec.format, "inputs": total.inputs, "written": total.written,
                               "skipped": dict(sorted(total.skipped.items())), "images": total.images,
                               "grids": total.grids, "shards": [f"{spec.name}/{done[u]}" for u in range(last[0] + 1)]}
    for leftover in [*out.glob("*/part-*.tmp-*"), *out.glob("*/.units/*.tmp-*")]:  # from killed runs; all done now
        leftover.unlink(missing_ok=True)
    totals = {k: sum(d[k] for d in datasets.values()) for k in ("inputs", "written", "images")}
    totals["skipped"] = sum(sum(d["skipped"].values()) for d in datasets.values())
    manifest = header | {"shard_size": opts.shard_size, "data_config": str(config.path), "datasets": datasets,
                         "totals": totals}
    atomic_write_text(out / ERRORS_NAME, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors))
    atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


# ------------------------------------------------------------------------------------------ entry points
def _spawned_worker(rank: int, world: int, opts: EncodeOptions, queue: Any) -> None:
    setup_logging(rank, tag="encode", all_ranks=True)  # every worker reports its own shards
    queue.put(asdict(run_worker(rank, world, opts)))  # run_worker sets opts.threads, not cpu_count // world


def _run_spawned(opts: EncodeOptions, world: int) -> list[WorkerReport]:
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_spawned_worker, args=(world, opts, queue), nprocs=world, join=True, start_method="spawn")
    return [WorkerReport(**queue.get()) for _ in range(world)]


def encode(
    data_config: str,
    out_dir: str,
    tokenizer: str | None = None,
    checkpoint: str | None = None,
    num_workers: int = 1,
    batch_size: int = 64,
    shard_size: int = 2000,
    resolution_mode: str = "fixed",
    min_size: int = 32,
    max_aspect: float = 2.5,
    anchor_target: int | None = None,
    anchor_downsample: int | None = None,
    device: str = "cpu",
    threads: int = 1,
) -> dict[str, Any]:
    """Encode a data config into record shards; returns a summary (manifest counts + this run's throughput).

    Args:
        data_config: the datasets YAML (see ``data_process/data_config.py``).
        out_dir: output root: ``<dataset>/part-<worker>-<unit>.jsonl``, ``manifest.json``, ``errors.jsonl``.
        tokenizer: registered kind (``shapes``, ``chameleon``, ``hqvae``) or ``package.module:Class``.
        checkpoint: the tokenizer's checkpoint path (loaded in this process first, so a bad one fails early).
        num_workers: spawned worker processes (ignored under torchrun, where RANK/WORLD_SIZE decide).
        batch_size: images per encoder call (per grid).
        shard_size: items per unit/shard; fixed for the life of an out_dir (it defines the units).
        resolution_mode: ``fixed`` (the tokenizer's grid) or ``fixed_anchors`` (nearest aspect-ratio anchor).
        min_size / max_aspect: images with a shorter side under ``min_size`` px or an aspect beyond are skipped.
        anchor_target / anchor_downsample: the anchor set in ``fixed_anchors`` mode (default: the tokenizer's).
        device: ``cpu`` or ``cuda`` (each worker takes ``cuda:<rank % device_count>``).
        threads: torch intra-op threads of every encoding process, whatever ``num_workers`` (the thread count
            changes the encoder's floats and so near-tie codes); fixed for the life of an out_dir, like
            ``batch_size`` and ``device``. On CPU use more workers, not more threads, to use more cores.
    """
    opts = EncodeOptions(data_config, out_dir, tokenizer, checkpoint, batch_size, shard_size, resolution_mode,
                         min_size, max_aspect, anchor_target, anchor_downsample, device, threads)
    config = load_data_config(data_config)
    tok = None
    if config.needs_tokenizer:
        if tokenizer is None:
            raise ValueError(f"{data_config}: datasets {[d.name for d in config.datasets if d.encode_images]} "
                             "encode images: pass --tokenizer and --checkpoint")
        tok = load_tokenizer(tokenizer, checkpoint)  # fails here, before any work, on a bad checkpoint
    policy = make_grid_policy(opts, tok)
    tok_info = {"id": tok.tokenizer_id, "name": tok.name, "checkpoint_hash": tok.checkpoint_hash,
                "level_sizes": list(tok.level_sizes), "kind": tokenizer, "checkpoint": checkpoint} if tok else {"id": None}
    # What the codes' floats depend on besides the weights (see the module docstring); none when nothing is encoded.
    encoding = {"threads": threads, "batch_size": batch_size, "device": torch.device(device).type} if tok else None
    header = {"tokenizer": tok_info, "preprocessing": policy.describe(opts), "encoding": encoding}
    check_run_state(opts, config, header)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 0))
    start = time.perf_counter()
    if world > 0:  # torchrun: this process is one rank; the last rank to finish writes the manifest
        reports = [run_worker(rank, world, opts, tok)]
    elif num_workers <= 1:
        reports = [run_worker(0, 1, opts, tok)]
    else:
        reports = _run_spawned(opts, num_workers)
    seconds = time.perf_counter() - start
    manifest = finalize(opts, config, header)
    images = sum(r.images for r in reports)
    summary = {"images_encoded_this_run": images, "items_this_run": sum(r.items for r in reports),
               "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 2) if seconds > 0 else None,
               # excludes process start-up and tokenizer loading: the steady-state rate of the encode loops
               "images_per_s_workers": round(images / busy, 2) if (busy := max(r.seconds for r in reports)) > 0 else None,
               "workers": len(reports) if world == 0 else world, "complete": manifest is not None,
               "totals": manifest["totals"] if manifest else None}
    logger.info(f"encoded {images} images in {seconds:.1f}s: {summary['images_per_s']} images/s end to end, "
                f"{summary['images_per_s_workers']} images/s in the worker loops ({summary['workers']} workers); "
                f"totals: {summary['totals']}")
    if manifest is None:
        logger.info("other ranks still running: the last rank to finish writes manifest.json")
    else:
        for name, d in manifest["datasets"].items():
            logger.info(f"{name}: inputs={d['inputs']} written={d['written']} skipped={d['skipped']}")
    return summary


def main() -> None:
    """fire entry point: configure logging once, run, print the summary as one json line on stdout."""
    import fire

    setup_logging(tag="encode", all_ranks=True)
    fire.Fire(encode, serialize=lambda summary: json.dumps(summary))


if __name__ == "__main__":
    main()
