"""n-gram conditional entropy of token streams: how predictable is the next text token, or the next image code?

The reference (Uni-X, Figure 2) argues that image codes are far less predictable from their left context than text
tokens are, one root of the modality conflict. This tool measures that on any data, in bits::

    H_n = -sum p(w_1..w_n) log2 p(w_n | w_1..w_{n-1}),   n = 1..max_n   (H_1 is the unigram entropy)

with ``p`` the empirical n-gram distribution. Over the n-gram counts ``c_g`` (``N`` of them) and the counts
``c_p`` of their ``(n-1)``-token prefixes (the contexts), ``H_n = (sum_p c_p log2 c_p - sum_g c_g log2 c_g) / N``:
only the two sums are needed, so the n-grams and their prefixes are counted independently (below).

**Streams**, each reported separately:

* ``text``: the text of every record of the toolkit's code-ID jsonl (a caption, the turns of a conversation
  without ``<image>``), tokenised with a checkpoint's or a tokenizer directory's tokenizer (no special tokens);
* ``image codes (<tokenizer>)``: every image's codes in serialisation order, one stream per image tokenizer
  (different code spaces are never pooled); multi-level codes count as ``(level, code)`` pairs. An image used by
  several records (the shapes world pairs each scene with a caption *and* a VQA conversation) is counted once,
  keyed by the hash of its tokenizer, grid, levels and codes (``--dedupe_images False`` counts every use);
* ``corpus: <file>``: plain-text corpora, ``.txt`` (one document per non-blank line) or ``.jsonl`` (the
  ``--text_field`` of each line), tokenised like the record text.

``--split_datasets`` further splits the record streams by dataset (the record's ``meta.dataset``, else its folder).

**Documents.** By default no n-gram crosses a document (``--mode per_sequence``): each text, image and corpus line
is its own sequence, so an image's first codes are never "predicted" by the previous image's last ones. The
reference concatenated everything into one stream before counting (``--mode concatenated`` reproduces it; with
short documents the two differ noticeably, with 1,024-code images hardly).

**Reliability.** With few n-grams per distinct n-gram the plug-in estimate collapses towards 0 (every context seen
once predicts its one continuation perfectly). Each row carries the n-gram count, the distinct n-grams and
contexts, the share of n-grams seen once (Good-Turing's estimate of the probability that the next n-gram is
unseen) and ``unreliable`` where distinct n-grams reach ``--unreliable_ratio`` (default 0.5) of all n-grams.
An image tokenizer of ``K`` codes bounds ``H_1 <= log2 K`` (9 bits for the shapes VQ's 512 codes, 13 for 8,192);
each stream reports ``log2`` of the distinct tokens it used, the bound its own data sets.

**Bounded memory.** Every window of ``m`` tokens is hashed to a 64-bit key (a splitmix64 chain over its tokens,
vectorised with numpy; a window of one token maps one-to-one, so unigram counts are exact). Keys are counted by
:class:`KeyCounter`: a buffer is sorted and reduced to a run of (key, count); a run that stays small is kept in
memory (a stream with few distinct n-grams never touches the disk), a large one is appended to a temporary file;
at the end the runs are merged in key order, a block from each at a time, and only the frequency of each count
(how many keys were seen once, twice, ...) is kept: ``sum c log2 c`` needs nothing else. ``--memory_mb`` is a budget
per stream, at about 32 bytes a key, shared by the stream's ``2 * max_n`` counters; the disk holds 16 bytes per
distinct key of a spilled run. A hash collision merges two n-grams; for ``D`` distinct n-grams the expected number of
colliding pairs is ``D(D-1) / 2^65`` (3e-4 at ``D = 10^8``): negligible next to the sampling error. What grows
with the data besides: 8 bytes (plus a Python set entry, ~70 bytes) per distinct image for the de-duplication.
The pass is not resumable: it is one read of the files (the shapes world's 11.5 MB: ~5 s after start-up).

Outputs (written atomically) in ``--out_dir``: ``entropy.json`` (settings, per-stream totals and rows),
``entropy.csv`` (one row per stream and n) and ``entropy.md`` (the table); ``draw_pics/conditional_entropy.py``
draws them beside the reference's published numbers::

    python tools/cal_entropy.py                      # the shapes world: data/shapes_codes, data/shapes/tokenizer
    python tools/cal_entropy.py --records data/my_codes --tokenizer outputs/my-run --corpora wiki.jsonl \\
        --max_n 6 --out_dir outputs/entropy/my_data
    python draw_pics/conditional_entropy.py --entropy_json outputs/entropy/entropy.json
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
from loguru import logger
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_process.schema import IMAGE_PLACEHOLDER, ImageCodes, Record, RecordError, atomic_write_text, iter_jsonl, read_records  # noqa: E402,E501

Mode = Literal["per_sequence", "concatenated"]
MODES = ("per_sequence", "concatenated")
BYTES_PER_KEY = 32  # a buffered key (8) + its count (8) + argsort's index and the sorted copies while reducing
DEFAULT_BATCH_TOKENS = 1 << 20  # tokens hashed per numpy pass: large enough that per-call overhead vanishes
TEXT_BATCH = 512  # texts per tokenizer call (fast tokenizers encode a batch in parallel Rust)

# splitmix64's finaliser (Steele et al. 2014): a bijection of uint64 with full avalanche.
_M1, _M2 = np.array([0xBF58476D1CE4E5B9], np.uint64), np.array([0x94D049BB133111EB], np.uint64)
_GOLDEN = np.array([0x9E3779B97F4A7C15], np.uint64)  # odd: multiplying a token by it is one-to-one mod 2^64
_S27, _S30, _S31 = np.uint64(27), np.uint64(30), np.uint64(31)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic: numpy arrays do not warn on overflow)."""
    x = x ^ (x >> _S30)
    x = x * _M1
    x = x ^ (x >> _S27)
    x = x * _M2
    return x ^ (x >> _S31)


def window_keys(tokens_T: np.ndarray, max_len: int) -> list[np.ndarray]:
    """64-bit keys of every window of 1..``max_len`` consecutive tokens: ``keys[m - 1][i]`` hashes
    ``tokens_T[i : i + m]`` (``T - m + 1`` of them; empty when ``T < m``).

    A chain, ``key_m[i] = mix(key_{m-1}[i] ^ golden * t[i + m - 1])``, so each length costs one vectorised pass
    and equal windows get equal keys wherever they occur. ``mix`` is a bijection, so one-token keys are exact.
    """
    tok_T = np.asarray(tokens_T, dtype=np.int64).astype(np.uint64) * _GOLDEN
    keys = [_mix64(tok_T)]
    for m in range(2, max_len + 1):
        if len(tok_T) < m:
            keys.append(np.empty(0, np.uint64))
            continue
        keys.append(_mix64(keys[-1][:-1] ^ tok_T[m - 1 :]))  # windows of m-1 at i, extended by token i + m - 1
    return keys


def reduce_counts(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct ``keys`` and the summed ``counts`` of each (the one group-by of this module)."""
    if len(keys) == 0:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    order = np.argsort(keys, kind="stable")
    keys_sorted = keys[order]
    starts = np.concatenate(([0], np.flatnonzero(keys_sorted[1:] != keys_sorted[:-1]) + 1))
    return keys_sorted[starts], np.add.reduceat(counts[order], starts)


def _freq_of_freq(counts: np.ndarray) -> Counter:
    values, how_many = np.unique(counts, return_counts=True)
    return Counter({int(v): int(k) for v, k in zip(values, how_many)})


@dataclass
class CountSummary:
    """What the entropy needs of a multiset of keys: its size, its distinct keys and ``{count: keys with it}``."""

    total: int
    distinct: int
    freq_of_freq: dict[int, int]

    @property
    def sum_c_log2_c(self) -> float:
        """``sum over keys of c log2 c``, summed exactly (fsum, in count order: equal inputs give equal bits)."""
        return math.fsum(k * c * math.log2(c) for c, k in sorted(self.freq_of_freq.items()))

    @property
    def singletons(self) -> int:
        return self.freq_of_freq.get(1, 0)


class KeyCounter:
    """Counts of uint64 keys in bounded memory (module doc): buffer -> sorted (key, count) run -> memory or disk.

    ``max_keys=None`` keeps everything in memory and reduces once at :meth:`finish` (the plain path the bounded
    one is tested against); otherwise at most ``max_keys`` keys (buffered or in the in-memory run) are held.
    """

    def __init__(self, max_keys: int | None = None, spill_dir: str | os.PathLike | None = None):
        if max_keys is not None and max_keys < 2:
            raise ValueError(f"max_keys={max_keys}: need at least 2 (or None for no bound)")
        self.max_keys, self.spill_dir = max_keys, spill_dir
        self.total = 0
        self.runs: list[tuple[int, int]] = []  # (offset, length) of each spilled run in the two files below
        self.spills = 0  # runs written to disk so far (kept after finish, for tests and logs)
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._run_keys, self._run_counts = np.empty(0, np.uint64), np.empty(0, np.int64)
        self._files: tuple[Path, Path] | None = None

    def add(self, keys: np.ndarray) -> None:
        if len(keys) == 0:
            return
        self.total += len(keys)
        self._buffer.append(np.asarray(keys, dtype=np.uint64))
        self._buffered += len(keys)
        if self.max_keys is not None and self._buffered + len(self._run_keys) >= self.max_keys:
            self._compact()
            if len(self._run_keys) > self.max_keys // 2:  # a run that stays large would be re-sorted for nothing
                self._spill()

    def _compact(self) -> None:
        """Fold the buffer into the in-memory run."""
        if not self._buffer:
            return
        keys = np.concatenate([self._run_keys, *self._buffer])
        counts = np.concatenate([self._run_counts, np.ones(self._buffered, np.int64)])
        self._run_keys, self._run_counts = reduce_counts(keys, counts)
        self._buffer, self._buffered = [], 0

    def _spill(self) -> None:
        if self._files is None:
            fd, name = tempfile.mkstemp(prefix="ngram-keys-", suffix=".u64", dir=self.spill_dir)
            os.close(fd)
            fd, name_c = tempfile.mkstemp(prefix="ngram-counts-", suffix=".i64", dir=self.spill_dir)
            os.close(fd)
            self._files = (Path(name), Path(name_c))
        offset = sum(length for _, length in self.runs)
        with open(self._files[0], "ab") as fk, open(self._files[1], "ab") as fc:
            self._run_keys.tofile(fk)
            self._run_counts.tofile(fc)
        self.runs.append((offset, len(self._run_keys)))
        self.spills += 1
        self._run_keys, self._run_counts = np.empty(0, np.uint64), np.empty(0, np.int64)

    def finish(self) -> CountSummary:
        """Reduce everything counted so far (and delete the spill files)."""
        self._compact()
        if not self.runs:
            return CountSummary(self.total, len(self._run_keys), dict(_freq_of_freq(self._run_counts)))
        if len(self._run_keys):
            self._spill()
        try:
            return self._merge()
        finally:
            for path in self._files or ():
                path.unlink(missing_ok=True)
            self._files, self.runs = None, []

    def _merge(self) -> CountSummary:
        """k-way merge of the sorted runs through one buffer of ``max_keys / runs`` keys per run. A key never
        straddles two steps: each step takes, from every buffer, the keys up to the smallest last key among the
        buffers of runs with more on disk (every key up to it is then in memory)."""
        assert self._files is not None and self.max_keys is not None
        keys_mm = np.memmap(self._files[0], dtype=np.uint64, mode="r")
        counts_mm = np.memmap(self._files[1], dtype=np.int64, mode="r")
        block = max(1, self.max_keys // len(self.runs))
        pos = [offset for offset, _ in self.runs]  # next unread entry of each run
        end = [offset + length for offset, length in self.runs]
        buf_k = [np.empty(0, np.uint64) for _ in self.runs]
        buf_c = [np.empty(0, np.int64) for _ in self.runs]
        fof: Counter = Counter()
        distinct = 0
        while True:
            for r in range(len(self.runs)):
                if not len(buf_k[r]) and pos[r] < end[r]:
                    hi = min(pos[r] + block, end[r])
                    buf_k[r], buf_c[r] = np.array(keys_mm[pos[r] : hi]), np.array(counts_mm[pos[r] : hi])
                    pos[r] = hi
            active = [r for r in range(len(self.runs)) if len(buf_k[r])]
            if not active:
                break
            open_ends = [buf_k[r][-1] for r in active if pos[r] < end[r]]
            threshold = min(open_ends) if open_ends else None
            parts_k, parts_c = [], []
            for r in active:
                take = len(buf_k[r]) if threshold is None else int(np.searchsorted(buf_k[r], threshold, side="right"))
                parts_k.append(buf_k[r][:take])
                parts_c.append(buf_c[r][:take])
                buf_k[r], buf_c[r] = buf_k[r][take:], buf_c[r][take:]
            _, counts = reduce_counts(np.concatenate(parts_k), np.concatenate(parts_c))
            distinct += len(counts)
            fof.update(_freq_of_freq(counts))
        del keys_mm, counts_mm
        return CountSummary(self.total, distinct, dict(fof))


@dataclass
class StreamCounter:
    """n-gram and context counts of one stream for n = 1..``max_n``; feed documents with :meth:`add`.

    ``per_sequence``: windows never cross a document. ``concatenated``: the documents form one sequence (the
    reference); the last ``max_n - 1`` tokens of a batch are carried into the next so no window is lost or
    counted twice at batch edges.
    """

    max_n: int = 4
    mode: Mode = "per_sequence"
    max_keys: int | None = None
    spill_dir: str | os.PathLike | None = None
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    documents: int = 0
    tokens: int = 0
    ngrams: list[KeyCounter] = field(init=False)
    contexts: list[KeyCounter] = field(init=False)

    def __post_init__(self) -> None:
        if self.max_n < 1:
            raise ValueError(f"max_n={self.max_n}: must be >= 1")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: expected one of {', '.join(MODES)}")
        self.ngrams = [KeyCounter(self.max_keys, self.spill_dir) for _ in range(self.max_n)]
        self.contexts = [KeyCounter(self.max_keys, self.spill_dir) for _ in range(self.max_n)]  # [0] stays empty
        self._docs: list[np.ndarray] = []
        self._pending = 0
        self._tail = np.empty(0, np.int64)

    def add(self, tokens: Sequence[int] | np.ndarray) -> None:
        tokens_T = np.asarray(tokens, dtype=np.int64)
        if tokens_T.ndim != 1:
            raise ValueError(f"a document must be a flat token sequence, got shape {tokens_T.shape}")
        self.documents += 1
        self.tokens += len(tokens_T)
        self._docs.append(tokens_T)
        self._pending += len(tokens_T)
        if self._pending >= self.batch_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._docs:
            return
        concatenated = self.mode == "concatenated"
        flat_T = np.concatenate([self._tail, *self._docs] if concatenated else self._docs)
        skip = len(self._tail) if concatenated else 0  # carried tokens whose windows were counted already
        doc_T = None if concatenated else np.repeat(np.arange(len(self._docs)), [len(d) for d in self._docs])
        self._docs, self._pending = [], 0
        keys = window_keys(flat_T, self.max_n)
        for n in range(1, self.max_n + 1):
            starts = len(flat_T) - n + 1
            if starts <= 0:
                break
            if concatenated:  # windows ending in new tokens: those starting at >= skip - n + 1
                sel: slice | np.ndarray = slice(max(0, skip - n + 1), starts)
            else:  # windows inside one document: same document at both ends
                sel = doc_T[:starts] == doc_T[n - 1 :]
            self.ngrams[n - 1].add(keys[n - 1][sel])
            if n > 1:
                self.contexts[n - 1].add(keys[n - 2][:starts][sel])  # the (n-1)-token prefix of each n-gram
        if concatenated:
            self._tail = flat_T[len(flat_T) - min(len(flat_T), self.max_n - 1) :]

    def rows(self, unreliable_ratio: float = 0.5) -> list[dict[str, Any]]:
        """One row per n: ``entropy_bits`` (H_n), ``joint_entropy_bits`` (of the n-gram), the counts and the flag."""
        self._flush()
        out = []
        for n in range(1, self.max_n + 1):
            grams = self.ngrams[n - 1].finish()
            ctx = self.contexts[n - 1].finish() if n > 1 else None
            out.append(entropy_row(n, grams, ctx, unreliable_ratio))
        return out


def entropy_row(n: int, grams: CountSummary, contexts: CountSummary | None, unreliable_ratio: float) -> dict[str, Any]:
    """H_n from the n-gram and context summaries (module doc); ``contexts`` is None for n = 1 (one empty context)."""
    total = grams.total
    row: dict[str, Any] = {"n": n, "ngrams": total, "distinct_ngrams": grams.distinct,
                           "distinct_contexts": 1 if contexts is None else contexts.distinct}
    if total == 0:
        return row | {"entropy_bits": None, "joint_entropy_bits": None, "distinct_ratio": None,
                      "singleton_share": None, "unreliable": True}
    if contexts is not None and contexts.total != total:
        raise AssertionError(f"n={n}: {contexts.total} contexts for {total} n-grams")  # internal invariant
    s_contexts = total * math.log2(total) if contexts is None else contexts.sum_c_log2_c
    entropy = max(0.0, (s_contexts - grams.sum_c_log2_c) / total)  # max: -1e-16 from rounding is 0
    return row | {"entropy_bits": entropy, "joint_entropy_bits": max(0.0, math.log2(total) - grams.sum_c_log2_c / total),
                  "distinct_ratio": grams.distinct / total, "singleton_share": grams.singletons / total,
                  "unreliable": grams.distinct >= unreliable_ratio * total}


# ----------------------------------------------------------------------------------------------- sources
def conversation_text(record: Record) -> str:
    """The words of a record: its text, or its turns joined by newlines with the ``<image>`` placeholders cut."""
    if record.text is not None:
        return record.text
    return "\n".join(t["value"].replace(IMAGE_PLACEHOLDER, "").strip() for t in record.conversations or ())


def image_tokens(image: ImageCodes) -> np.ndarray:
    """An image's codes as one token sequence; multi-level codes as ``level << 32 | code`` (distinct per level)."""
    codes = np.asarray(image.codes, dtype=np.int64)
    return codes if image.levels is None else (np.asarray(image.levels, dtype=np.int64) << 32) | codes


def image_digest(image: ImageCodes) -> bytes:
    """8 bytes naming an image's content (tokenizer, grid, levels and codes): equal images, equal digests."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{image.tokenizer}|{image.grid[0]}x{image.grid[1]}|".encode())
    if image.levels is not None:
        h.update(np.asarray(image.levels, dtype=np.int64).tobytes())
    h.update(np.asarray(image.codes, dtype=np.int64).tobytes())
    return h.digest()


def iter_corpus(path: str | os.PathLike, text_field: str = "text") -> Iterator[tuple[int, str]]:
    """``(line, text)`` of a plain-text corpus: ``.jsonl`` (``text_field`` of each line) or a text file (each
    non-blank line a document). A line without the field is a :class:`RecordError` naming file, line and field."""
    path = Path(path)
    if path.suffix == ".jsonl":
        for lineno, obj in iter_jsonl(path):
            text = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise RecordError(path, lineno, text_field, "missing or not a string (choose it with --text_field)")
            yield lineno, text
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield lineno, line.rstrip("\n")


class Streams:
    """The named streams of one analysis: text is tokenised in batches, images are de-duplicated per stream."""

    def __init__(self, make_counter: Callable[[], StreamCounter], tokenizer: Any | None, dedupe_images: bool):
        self.make_counter, self.tokenizer, self.dedupe_images = make_counter, tokenizer, dedupe_images
        self.counters: dict[str, StreamCounter] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self._texts: dict[str, list[str]] = {}
        self._seen: dict[str, set[bytes]] = {}

    def _stream(self, name: str, kind: str) -> StreamCounter:
        if name not in self.counters:
            self.counters[name] = self.make_counter()
            self.info[name] = {"name": name, "kind": kind}
        return self.counters[name]

    def add_text(self, name: str, kind: str, text: str) -> None:
        if self.tokenizer is None:
            raise ValueError(f"stream {name!r} has text but no tokenizer was given (--tokenizer DIR)")
        self._stream(name, kind)
        pending = self._texts.setdefault(name, [])
        pending.append(text)
        if len(pending) >= TEXT_BATCH:
            self._tokenise(name)

    def _tokenise(self, name: str) -> None:
        texts, self._texts[name] = self._texts.get(name, []), []
        if texts:
            for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
                self.counters[name].add(ids)

    def add_image(self, name: str, image: ImageCodes) -> None:
        counter = self._stream(name, "image")
        info = self.info[name]
        info["image_uses"] = info.get("image_uses", 0) + 1
        if self.dedupe_images:
            seen = self._seen.setdefault(name, set())
            digest = image_digest(image)
            if digest in seen:
                return
            seen.add(digest)
        counter.add(image_tokens(image))

    def results(self, unreliable_ratio: float) -> list[dict[str, Any]]:
        out = []
        for name, counter in self.counters.items():
            self._tokenise(name)
            rows = counter.rows(unreliable_ratio)
            used = rows[0]["distinct_ngrams"]
            out.append(self.info[name] | {"documents": counter.documents, "tokens": counter.tokens,
                                          "distinct_tokens": used, "h1_bound_bits": math.log2(used) if used else None,
                                          "rows": rows})
        return out


def _as_list(value: str | Sequence[str] | None) -> list[str]:
    """A CLI list: fire hands ``a,b`` over as a tuple and ``a`` as a string; both are accepted."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return [item.strip() for item in items if item.strip()]


def record_files(records: str | Sequence[str] | None) -> list[Path]:
    """Record jsonl files of one or more files, globs or folders (the resolution of training's ``data_path``)."""
    from uni_arch.train.dataset import parse_data_path

    specs = _as_list(records)
    return [f for source in parse_data_path(",".join(specs)) for f in source.files] if specs else []


def _dataset_of(record: Record, path: Path) -> str:
    return str(record.meta.get("dataset") or path.parent.name)


def read_sources(streams: Streams, files: Sequence[Path], corpora: Sequence[Path], *, split_datasets: bool,
                 text_field: str, skip_bad_records: bool) -> int:
    """Feed every record file and corpus into ``streams`` with a progress bar over bytes; returns bad records skipped."""
    bad: list[RecordError] = []
    on_error = bad.append if skip_bad_records else None
    with tqdm(total=sum(p.stat().st_size for p in [*files, *corpora]), unit="B", unit_scale=True, desc="n-grams",
              mininterval=2) as bar:
        for path in files:
            for _, record in read_records(path, on_error=on_error):
                suffix = f": {_dataset_of(record, path)}" if split_datasets else ""
                text = conversation_text(record)
                if text.strip() and streams.tokenizer is not None:
                    streams.add_text(f"text{suffix}", "text", text)
                for image in record.images:
                    streams.add_image(f"image codes ({image.tokenizer}){suffix}", image)
            bar.update(path.stat().st_size)
        for path in corpora:
            for _, text in iter_corpus(path, text_field):
                streams.add_text(f"corpus: {path.name}", "corpus", text)
            bar.update(path.stat().st_size)
    for err in bad[:5]:
        logger.warning(f"skipped bad record: {err}")
    if bad:
        logger.warning(f"skipped {len(bad)} bad record(s) in all (--skip_bad_records)")
    return len(bad)


def analyse(records: str | Sequence[str] | None = None, tokenizer: Any | None = None,
            corpora: str | Sequence[str] | None = None, max_n: int = 4, mode: Mode = "per_sequence",
            dedupe_images: bool = True, split_datasets: bool = False, memory_mb: float = 1024.0,
            unreliable_ratio: float = 0.5, text_field: str = "text", skip_bad_records: bool = False,
            tmp_dir: str | None = None, batch_tokens: int = DEFAULT_BATCH_TOKENS) -> dict[str, Any]:
    """Entropy rows of every stream of ``records`` and ``corpora`` (module doc); the library entry point.

    ``tokenizer``: a tokenizer object, a checkpoint or tokenizer directory, ``"qwen2.5"``, or None (record text is
    then skipped; corpora need one). ``memory_mb <= 0``: no bound (all counts in memory).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    if not 0 < unreliable_ratio <= 1:
        raise ValueError(f"unreliable_ratio={unreliable_ratio}: must be in (0, 1]")
    files = record_files(records)
    corpus_files = [Path(c) for c in _as_list(corpora)]
    for path in corpus_files:
        if not path.is_file():
            raise FileNotFoundError(f"corpora: {path} is not a file")
    if not files and not corpus_files:
        raise ValueError("nothing to analyse: give --records and/or --corpora")
    if isinstance(tokenizer, (str, os.PathLike)):
        from data_process.text_tokenizer import load_text_tokenizer

        tokenizer = load_text_tokenizer(tokenizer)
    if tokenizer is None and corpus_files:
        raise ValueError("--corpora need a tokenizer (--tokenizer DIR)")
    if tokenizer is None and files:
        logger.info("no tokenizer: the records' text is skipped, only their image codes are counted")
    # The budget is per stream: a stream's 2 * max_n counters share it (streams fill side by side).
    max_keys = None if memory_mb <= 0 else max(2, int(memory_mb * 2**20 / BYTES_PER_KEY / (2 * max_n)))
    with tempfile.TemporaryDirectory(prefix="cal_entropy-", dir=tmp_dir) as spill_dir:
        streams = Streams(lambda: StreamCounter(max_n, mode, max_keys, spill_dir, batch_tokens), tokenizer,
                          dedupe_images)
        skipped = read_sources(streams, files, corpus_files, split_datasets=split_datasets, text_field=text_field,
                               skip_bad_records=skip_bad_records)
        results = streams.results(unreliable_ratio)
    settings = {"records": [str(f) for f in files], "corpora": [str(c) for c in corpus_files],
                "tokenizer": getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None,
                "max_n": max_n, "mode": mode, "dedupe_images": dedupe_images, "split_datasets": split_datasets,
                "memory_mb": memory_mb, "max_keys_per_counter": max_keys, "unreliable_ratio": unreliable_ratio,
                "skipped_bad_records": skipped, "hash": "splitmix64 chain, 64-bit keys (unigrams exact)"}
    return {"settings": settings, "streams": results}


# ----------------------------------------------------------------------------------------------- outputs
CSV_FIELDS = ("stream", "kind", "n", "entropy_bits", "joint_entropy_bits", "ngrams", "distinct_ngrams",
              "distinct_contexts", "distinct_ratio", "singleton_share", "unreliable")


def to_csv(result: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for stream in result["streams"]:
        for row in stream["rows"]:
            writer.writerow({"stream": stream["name"], "kind": stream["kind"]} | {k: row[k] for k in CSV_FIELDS[2:]})
    return buf.getvalue()


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def to_markdown(result: dict[str, Any]) -> str:
    """H_n per stream (columns) and n (rows), unreliable cells marked, then each stream's counts."""
    s = result["settings"]
    streams = result["streams"]
    lines = [f"H_n in bits ({s['mode']}, images de-duplicated: {s['dedupe_images']}); `*` unreliable: distinct "
             f"n-grams >= {s['unreliable_ratio']:g} x n-grams", "",
             "| n | " + " | ".join(st["name"] for st in streams) + " |", "|---" * (len(streams) + 1) + "|"]
    for i in range(s["max_n"]):
        cells = [_fmt(st["rows"][i]["entropy_bits"]) + ("*" if st["rows"][i]["unreliable"] else "") for st in streams]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    lines += ["", "| stream | documents | tokens | distinct tokens | log2(distinct) | n | n-grams | distinct | "
              "distinct contexts | seen once |", "|---" * 10 + "|"]
    for st in streams:
        for row in st["rows"]:
            share = "n/a" if row["singleton_share"] is None else f"{row['singleton_share']:.1%}"
            lines.append(f"| {st['name']} | {st['documents']} | {st['tokens']} | {st['distinct_tokens']} | "
                         f"{_fmt(st['h1_bound_bits'])} | {row['n']} | {row['ngrams']} | {row['distinct_ngrams']} | "
                         f"{row['distinct_contexts']} | {share} |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """``entropy.json``, ``entropy.csv`` and ``entropy.md`` in ``out_dir``, each written atomically."""
    out = Path(out_dir)
    paths = {"json": out / "entropy.json", "csv": out / "entropy.csv", "md": out / "entropy.md"}
    atomic_write_text(paths["json"], json.dumps(result, indent=2) + "\n")
    atomic_write_text(paths["csv"], to_csv(result))
    atomic_write_text(paths["md"], to_markdown(result))
    return paths


DEFAULT_RECORDS, DEFAULT_TOKENIZER = "data/shapes_codes", "data/shapes/tokenizer"  # relative to the working directory
SHAPES_HINT = "`bash train.sh` builds the shapes world (data/shapes) and its code-ID records (data/shapes_codes)"


def main(records: str | Sequence[str] | None = DEFAULT_RECORDS, tokenizer: str | None = DEFAULT_TOKENIZER,
         corpora: str | Sequence[str] | None = None, max_n: int = 4, mode: Mode = "per_sequence",
         dedupe_images: bool = True, split_datasets: bool = False, out_dir: str = "outputs/entropy",
         memory_mb: float = 1024.0, unreliable_ratio: float = 0.5, text_field: str = "text",
         skip_bad_records: bool = False, tmp_dir: str | None = None) -> dict[str, Any]:
    """CLI: n-gram conditional entropy H_1..H_max_n of the text, image-code and corpus streams (module doc).

    Args:
        records: code-ID record files, globs or folders (comma-separated); None: none.
        tokenizer: a checkpoint or tokenizer directory (or ``qwen2.5``) for the text; None: skip record text.
        corpora: plain-text corpora, ``.txt`` (a document per line) or ``.jsonl`` (``text_field``), comma-separated.
        max_n: the largest n.
        mode: ``per_sequence`` (no n-gram crosses a document) or ``concatenated`` (the reference's single stream).
        dedupe_images: count an image used by several records once.
        split_datasets: one stream per dataset instead of one per modality.
        out_dir: where entropy.json/.csv/.md go.
        memory_mb: memory budget of the counts (<= 0: unbounded, all in memory); beyond it runs spill to disk.
        unreliable_ratio: flag a row whose distinct n-grams reach this share of its n-grams.
        text_field: the text field of ``.jsonl`` corpora.
        skip_bad_records: skip (and count) malformed records instead of stopping at the first.
        tmp_dir: where spilled runs go (default: the system's temporary directory).
    """
    from uni_arch.log_setup import setup_logging

    setup_logging()
    missing = [f"{flag} {value}" for flag, value, default in (("--records", records, DEFAULT_RECORDS),
                                                               ("--tokenizer", tokenizer, DEFAULT_TOKENIZER))
               if value == default and not Path(default).exists()]
    if missing:
        logger.error(f"missing: {'; '.join(missing)} (the shapes-world defaults). {SHAPES_HINT}; or pass "
                     "--records DIR/FILES and --tokenizer DIR (--tokenizer None skips the text)")
        raise SystemExit(2)
    result = analyse(records, tokenizer, corpora, max_n=max_n, mode=mode, dedupe_images=dedupe_images,
                     split_datasets=split_datasets, memory_mb=memory_mb, unreliable_ratio=unreliable_ratio,
                     text_field=text_field, skip_bad_records=skip_bad_records, tmp_dir=tmp_dir)
    paths = write_outputs(result, out_dir)
    for stream in result["streams"]:
        row_text = ", ".join(f"H{r['n']}={_fmt(r['entropy_bits'])}{'*' if r['unreliable'] else ''}" for r in stream["rows"])
        logger.info(f"{stream['name']}: {stream['documents']} documents, {stream['tokens']} tokens, {row_text} bits")
    logger.info(f"wrote {', '.join(str(p) for p in paths.values())} (* unreliable)")
    return result


if __name__ == "__main__":
    import fire

    fire.Fire(main, serialize=lambda result: None)  # the tables are logged and written; no dict dump on stdout
