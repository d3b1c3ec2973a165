"""Continuous batching: one worker thread runs a :class:`~evaluation.sampling.DecodeBatch` for many requests.

Callers (the HTTP server, a benchmark) ``submit`` a :class:`Job` (the decoder rows of one request and its settings)
and get a :class:`Ticket`, whose events stream the request's tokens as they are chosen. The worker loops:

1. admit queued requests, first come first served, while their rows (CFG twins included) fit in
   ``max_batch_rows``; all requests admitted together are prefilled in one forward and merged into the running
   batch (``DecodeBatch.add``);
2. take out the rows of cancelled requests (a client that disconnected) and of samples the caller ended (a stop
   string matched in the decoded text): their batch rows are free at the next admission;
3. one decoding step for every row (``DecodeBatch.step``), then the new tokens, finished samples and finished
   requests go to their tickets.

The queue is bounded: ``submit`` on a full queue raises :class:`QueueFull` (the server answers 503 with
``Retry-After``). Failures stay with their request: a request that cannot be prefilled (its prompt is refused or its
forward raises; requests admitted together are then prefilled one by one to find it) or sampled (``finish="error"``
on its rows) fails alone and the others go on. Only an exception in the shared decoding forward, which cannot be
attributed, fails every request in the batch; the worker then starts a fresh batch and keeps serving.

Measured (``tools/bench_server.py``, the default shapes checkpoint, one CPU thread): 16 concurrent clients get 5.8x
the image tokens/s of one client (705 against 121), 3.1x the requests/s for 32-token chats.

A request's output does not depend on what else is in the batch (each row has its own generator, padding is masked):
``tests/test_scheduler.py`` checks tokens and logits against decoding alone while other requests join and leave.
Events reach a thread-safe ``queue.Queue``, or an ``asyncio.Queue`` through ``loop.call_soon_threadsafe`` when the
ticket was submitted with an event loop (the server).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Iterator, Sequence

import torch
from loguru import logger

from evaluation.sampling import ConstrainedDecoder, DecodeRow, DecodeSettings, RowPlan
from modeling.threads import torch_threads


class QueueFull(RuntimeError):
    """The request queue is full: retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class Job:
    """One request: its decoder rows (one per sample, seeded per sample) and how they are decoded."""

    plans: Sequence[RowPlan]
    settings: DecodeSettings

    @property
    def batch_rows(self) -> int:
        """Batch rows it occupies: one per sample, two with a CFG twin."""
        return sum(2 if p.uncond_prompt is not None else 1 for p in self.plans)


# ------------------------------------------------------------------------------------------ events
@dataclass(frozen=True)
class Tokens:
    """New ids of sample ``sample`` (in order; forced ones included)."""

    sample: int
    ids: list[int]


@dataclass(frozen=True)
class SampleEnd:
    """Sample ``sample`` is finished: ``"stop"``, ``"length"`` or ``"cancelled"``."""

    sample: int
    finish: str


@dataclass(frozen=True)
class Done:
    """Every sample of the request is finished (the last event of a request that did not fail)."""


@dataclass(frozen=True)
class Failed:
    """The request failed (the last event); ``error`` is the exception."""

    error: BaseException


Event = Tokens | SampleEnd | Done | Failed


class Ticket:
    """A submitted request: its events, and the caller's levers (``cancel``, ``end_sample``)."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop | None = None):
        self.job, self.id, self._loop = job, uuid.uuid4().hex, loop
        self._events: queue.Queue | asyncio.Queue = asyncio.Queue() if loop is not None else queue.Queue()
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._end_requests: set[int] = set()
        # worker side only
        self.rows: list[DecodeRow] = []
        self._sent: list[int] = []
        self._ended: list[bool] = []

    # ---------------------------------------------------------------------------------- caller
    def cancel(self) -> None:
        """Drop the request (e.g. its client disconnected): its rows leave the batch at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def end_sample(self, sample: int) -> None:
        """End one sample early as ``"stop"`` (a stop string matched): its rows leave at the next step."""
        with self._lock:
            self._end_requests.add(int(sample))

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """The events of a ticket submitted without a loop, until ``Done`` or ``Failed`` (``queue.Empty`` after
        ``timeout`` seconds without one)."""
        if self._loop is not None:
            raise TypeError("this ticket delivers to an event loop: use `async for event in ticket.aevents()`")
        while True:
            event = self._events.get(timeout=timeout)
            yield event
            if isinstance(event, (Done, Failed)):
                return

    async def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event of a ticket submitted with a loop, or None after ``timeout`` seconds (nothing is lost:
        the server polls for a disconnected client between waits)."""
        if self._loop is None:
            raise TypeError("this ticket was submitted without an event loop: use ticket.events()")
        try:
            return await asyncio.wait_for(self._events.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def aevents(self) -> AsyncIterator[Event]:
        """The events of a ticket submitted with a loop, until ``Done`` or ``Failed``."""
        while True:
            event = await self.next_event()
            yield event
            if isinstance(event, (Done, Failed)):
                return

    def result(self, timeout: float | None = None) -> list[tuple[list[int], str]]:
        """Wait for a ticket submitted without a loop: ``(ids, finish)`` per sample; raises the request's error."""
        ids: list[list[int]] = [[] for _ in self.job.plans]
        finish = [""] * len(self.job.plans)
        for event in self.events(timeout):
            if isinstance(event, Tokens):
                ids[event.sample] += event.ids
            elif isinstance(event, SampleEnd):
                finish[event.sample] = event.finish
            elif isinstance(event, Failed):
                raise event.error
        return list(zip(ids, finish))

    # ---------------------------------------------------------------------------------- worker
    def _emit(self, event: Event) -> None:
        if self._loop is None:
            self._events.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self._cancelled.set()

    def _take_end_requests(self) -> list[int]:
        with self._lock:
            ends, self._end_requests = self._end_requests, set()
        return sorted(ends)


class Scheduler:
    """Continuous batching over one :class:`ConstrainedDecoder` in one background thread (module docstring).

    Args:
        decoder: the model and its constraints (one image grid).
        max_batch_rows: batch rows decoded together, CFG twins included; a request needing more is refused.
        max_queue: requests waiting for admission; one more raises :class:`QueueFull`.
        threads: torch intra-op threads for the worker (``modeling.threads.torch_threads``); None = leave as is.
        retry_after_s: what :class:`QueueFull` tells callers to wait.
    """

    def __init__(self, decoder: ConstrainedDecoder, max_batch_rows: int = 32, max_queue: int = 64,
                 threads: int | None = None, use_cache: bool = True, retry_after_s: int = 1):
        if max_batch_rows < 1 or max_queue < 1:
            raise ValueError(f"max_batch_rows={max_batch_rows} and max_queue={max_queue} must be >= 1")
        self.decoder, self.max_batch_rows, self.threads = decoder, int(max_batch_rows), threads
        self.retry_after_s, self.use_cache = int(retry_after_s), use_cache
        self._queue: queue.Queue[Ticket] = queue.Queue(maxsize=int(max_queue))
        self._held: Ticket | None = None  # taken from the queue but not yet room for it
        self._batch = decoder.new_batch(use_cache)
        self._active: list[Ticket] = []
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0  # decoding steps run (for tests and /health)
        self.cancelled = 0  # requests dropped by their caller, waiting or decoding (a client that disconnected)

    # ------------------------------------------------------------------------------- lifecycle
    def start(self) -> "Scheduler":
        if self._thread is not None:
            raise RuntimeError("the scheduler is already started")
        self._thread = threading.Thread(target=self._run, name="uni-x-scheduler", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker; requests still queued or running fail with a RuntimeError."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout)
        gone = RuntimeError("the scheduler was closed")
        for t in self._active + ([self._held] if self._held else []):
            t._emit(Failed(gone))
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()._emit(Failed(gone))

    def __enter__(self) -> "Scheduler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def active_rows(self) -> int:
        """Batch rows in use now (CFG twins included)."""
        return len(self._batch)

    @property
    def queued(self) -> int:
        return self._queue.qsize() + (self._held is not None)

    # ----------------------------------------------------------------------------------- submit
    def submit(self, job: Job, loop: asyncio.AbstractEventLoop | None = None) -> Ticket:
        """Queue a request; raises ValueError for a request that can never run, QueueFull when the queue is full."""
        if self._closing.is_set():
            raise RuntimeError("the scheduler is closed")
        if not job.plans:
            raise ValueError("a request needs at least one row")
        if job.batch_rows > self.max_batch_rows:
            raise ValueError(f"this request needs {job.batch_rows} batch rows (one per sample, two with CFG) but "
                             f"at most {self.max_batch_rows} run together (max_batch_rows): ask for fewer samples")
        ticket = Ticket(job, loop)
        try:
            self._queue.put_nowait(ticket)
        except queue.Full:
            raise QueueFull(f"the request queue is full ({self._queue.maxsize} waiting): retry in "
                            f"{self.retry_after_s} s", self.retry_after_s) from None
        return ticket

    # ----------------------------------------------------------------------------------- worker
    def _run(self) -> None:
        with torch_threads(self.threads) if self.threads else contextlib.nullcontext(), torch.no_grad():
            while not self._closing.is_set():
                try:
                    self._admit()
                    self._sweep()
                    if not self._batch.rows:
                        continue
                    finished = self._batch.step()
                    self.steps += 1
                except Exception as e:  # noqa: BLE001 - the shared forward failed: its requests fail, we go on
                    logger.exception(f"decoding step failed; failing the {len(self._active)} request(s) in the batch")
                    for t in self._active:
                        t._emit(Failed(e))
                    self._active = []
                    self._batch = self.decoder.new_batch(self.use_cache)
                    continue
                self._publish(finished)

    def _next_waiting(self, block: bool) -> Ticket | None:
        if self._held is not None:
            ticket, self._held = self._held, None
            return ticket
        try:
            return self._queue.get(timeout=0.05) if block else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _admit(self) -> None:
        """Take waiting requests while they fit and prefill them together."""
        room = self.max_batch_rows - len(self._batch)
        admitted: list[Ticket] = []
        while True:
            ticket = self._next_waiting(block=not self._batch.rows and not admitted)
            if ticket is None:
                break
            if ticket.cancelled:  # its client left while it waited
                self.cancelled += 1
                ticket._emit(Done())
                continue
            if ticket.job.batch_rows > room:
                self._held = ticket  # first come first served: nobody overtakes it
                break
            admitted.append(ticket)
            room -= ticket.job.batch_rows
        if admitted:
            self._prefill(admitted)

    def _prefill(self, tickets: list[Ticket]) -> None:
        ok = []
        for t in tickets:
            try:
                self.decoder.check(t.job.plans, t.job.settings)
                ok.append(t)
            except ValueError as e:
                t._emit(Failed(e))
        if not ok:
            return
        plans = [p for t in ok for p in t.job.plans]
        try:
            rows = self._batch.add(plans, [t.job.settings for t in ok for _ in t.job.plans])
        except Exception as e:  # noqa: BLE001 - find the request that breaks the forward
            if len(ok) == 1:
                logger.warning(f"request {ok[0].id} failed at prefill: {type(e).__name__}: {e}")
                ok[0]._emit(Failed(e))
            else:
                for t in ok:
                    self._prefill([t])
            return
        for t in ok:
            t.rows, rows = rows[:len(t.job.plans)], rows[len(t.job.plans):]
            t._sent, t._ended = [0] * len(t.rows), [False] * len(t.rows)
            self._active.append(t)

    def _sweep(self) -> None:
        """Rows of cancelled requests and of samples ended by their caller leave the batch."""
        changed = []
        for t in self._active:
            if t.cancelled:
                self._batch.remove(t.rows, "cancelled")
                self.cancelled += 1
                changed.append(t)
                continue
            ends = [t.rows[i] for i in t._take_end_requests() if 0 <= i < len(t.rows)]
            if ends:
                self._batch.remove(ends, "stop")
                changed.append(t)
        if changed:
            self._publish([], changed)

    def _publish(self, finished: list[DecodeRow], tickets: list[Ticket] | None = None) -> None:
        """New tokens, ended samples and finished requests to their tickets."""
        del finished  # every active ticket is looked at: rows record their own state
        still = []
        for t in self._active:
            if tickets is not None and t not in tickets:
                still.append(t)
                continue
            failed = next((r.error for r in t.rows if r.error is not None), None)
            if failed is not None:
                self._batch.remove(t.rows, "cancelled")
                t._emit(Failed(failed))
                continue
            for i, r in enumerate(t.rows):
                if len(r.out) > t._sent[i]:
                    t._emit(Tokens(i, r.out[t._sent[i]:]))
                    t._sent[i] = len(r.out)
                if r.finish is not None and not t._ended[i]:
                    t._ended[i] = True
                    t._emit(SampleEnd(i, r.finish))
            if all(t._ended):
                t._emit(Done())
            else:
                still.append(t)
        self._active = still


__all__ = ["Scheduler", "Job", "Ticket", "QueueFull", "Tokens", "SampleEnd", "Done", "Failed", "Event"]
