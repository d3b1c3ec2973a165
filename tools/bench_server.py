"""Throughput of the OpenAI-compatible server (``evaluation/api_server.py``) as a real process, and the helpers the
server tests share: a server subprocess on a free loopback port (``ServerProcess``) and a thread-pool load
generator (``run_load``).

    python tools/bench_server.py --checkpoint outputs/shapes-tiny-uni-x --requests 32 --kind images

``bench_server`` (also for ``tools/bench.py generate``) sends the same requests from 1 and from 16 concurrent
clients and reports wall time, requests/s, p50/p95 latency and image tokens/s: continuous batching lets the 16
clients share forward passes, one client cannot. The server is started with ``--threads`` (default 1) so both runs
use the same cores.

Measured on ``outputs/shapes-tiny-uni-x`` (the default ``bash train.sh`` checkpoint: 4 layers, hidden 256, 16x16 =
256 codes per image), 1 thread on a shared 2-core CPU:

=====================================  ==========  ===========  =========
requests                               clients     requests/s   p50 / p95
=====================================  ==========  ===========  =========
16 images (CFG 4: 2 rows each)         1           0.47         2.08 / 2.68 s   (121 image tokens/s)
16 images                              16          2.75         5.18 / 5.39 s   (705 image tokens/s: 5.8x)
32 chats of 32 tokens (ignore_eos)     1           4.66         0.17 / 0.22 s
32 chats of 32 tokens                  16          14.3         0.56 / 0.74 s   (3.1x)
=====================================  ==========  ===========  =========

Chat gains less: its rows are cheap for the tiny model, so the per-step Python work (constraints, sampling per
row) weighs more than the shared forward.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from loguru import logger

SERVER = Path(__file__).resolve().parents[1] / "evaluation" / "api_server.py"


def free_port() -> int:
    """A loopback TCP port nobody listens on now (uvicorn's CLI cannot report the port it got for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python evaluation/api_server.py`` in a subprocess on a free loopback port; waits for /health."""

    def __init__(self, checkpoint: str | Path, timeout_s: float = 120.0, env: dict[str, str] | None = None,
                 wait: bool = True, **flags: Any):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, str(SERVER), "--checkpoint", str(checkpoint), "--port",
               str(self.port), "--log_level", "warning"]
        for k, v in flags.items():
            cmd += [f"--{k}", str(v)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        if wait:
            self.wait(timeout_s)

    def wait(self, timeout_s: float = 120.0) -> "ServerProcess":
        """Block until /health answers 200 (several servers can start in parallel with ``wait=False``)."""
        import httpx

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.proc.stdout.read()[-5000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.close()
        raise TimeoutError(f"the server did not answer /health within {timeout_s} s")

    def close(self) -> str:
        """Stop the server; returns its output."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stdout.read() if self.proc.stdout else ""

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_load(url: str, requests: Sequence[tuple[str, dict[str, Any]]], clients: int, api_key: str | None = None,
             timeout_s: float = 300.0) -> dict[str, Any]:
    """POST ``requests`` (path, json) from ``clients`` threads; returns every answer (status, headers, json) and
    wall time, p50/p95 latency and requests/s."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def one(item):
        path, body = item
        with httpx.Client(timeout=timeout_s) as client:
            t0 = time.perf_counter()
            r = client.post(url + path, json=body, headers=headers)
            return r.status_code, dict(r.headers), r.json(), time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(one, requests))
    wall = time.perf_counter() - t0
    lat = sorted(a[3] for a in answers)
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
    return {"answers": answers, "requests": len(answers), "clients": clients, "wall_s": wall,
            "p50_s": pick(0.5), "p95_s": pick(0.95), "requests_per_s": len(answers) / wall}


def bench_server(checkpoint: str | Path, clients: Sequence[int] = (1, 16), requests: int = 48, kind: str = "images",
                 max_tokens: int = 16, max_batch_rows: int = 64, threads: int | None = 1,
                 rounds: int = 3) -> dict[str, Any]:
    """The same ``requests`` from each number of concurrent ``clients`` against one real server process.

    ``kind="images"``: single-image generations (CFG 4, the checkpoint's grid); image tokens/s counts the codes
    returned. ``kind="chat"``: text chats of exactly ``max_tokens`` tokens (``ignore_eos``). Returns, per client
    count, the round of median wall time (``rounds`` rounds, the client counts interleaved in each, so a slow spell
    of a shared machine hits them alike: one pass each read 3.3x to 4.3x on the same code): wall time,
    requests/s, p50/p95 latency (and image tokens/s), every round's requests/s, and ``speedup``: median requests/s
    of the most clients over the fewest.
    """
    import httpx

    if kind not in ("images", "chat"):
        raise ValueError(f"kind={kind!r} must be images or chat")
    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    flags: dict[str, Any] = dict(max_batch_rows=max_batch_rows, max_queue=max(64, requests))
    if threads:
        flags["threads"] = threads
    if kind == "images":
        items = [("/v1/images/generations", {"prompt": f"a photo of a red circle {i}", "seed": i})
                 for i in range(requests)]
    else:
        items = [("/v1/chat/completions", {"model": Path(checkpoint).resolve().name, "seed": i, "ignore_eos": True,
                                           "max_tokens": max_tokens,
                                           "messages": [{"role": "user", "content": f"hello {i}"}]})
                 for i in range(requests)]
    out: dict[str, Any] = {"checkpoint": str(checkpoint), "kind": kind, "requests": requests, "threads": threads}
    with ServerProcess(checkpoint, env=env, **flags) as server:
        codes = httpx.get(server.url + "/health").json()["codes_per_image"]
        run_load(server.url, items[:1], 1)  # warm-up
        loads: dict[int, list[dict[str, Any]]] = {c: [] for c in clients}
        for _ in range(rounds):
            for c in clients:
                load = run_load(server.url, items, c)
                bad = [a[0] for a in load.pop("answers") if a[0] != 200]
                if bad:
                    raise RuntimeError(f"{len(bad)} of {requests} requests failed: {bad[:5]}")
                if kind == "images":
                    load["image_tokens_per_s"] = requests * codes / load["wall_s"]
                loads[c].append(load)
        for c, runs in loads.items():
            median = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
            out[f"clients_{c}"] = {**median, "rounds_requests_per_s": [r["requests_per_s"] for r in runs]}
    lo, hi = f"clients_{min(clients)}", f"clients_{max(clients)}"
    out["speedup"] = out[hi]["requests_per_s"] / out[lo]["requests_per_s"]
    logger.info(f"bench_server: {json.dumps(out, indent=1)}")
    return out


def main(checkpoint: str, clients: Sequence[int] = (1, 16), requests: int = 48, kind: str = "images",
         max_tokens: int = 16, max_batch_rows: int = 64, threads: int = 1, rounds: int = 3,
         out: str | None = None) -> dict[str, Any]:
    """fire entry point: ``bench_server`` and, with ``out``, its json written there."""
    from uni_arch.log_setup import setup_logging

    setup_logging(0)
    result = bench_server(checkpoint, tuple(clients), requests, kind, max_tokens, max_batch_rows, threads, rounds)
    if out:
        from data_process.schema import atomic_write_text

        atomic_write_text(Path(out), json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    import fire

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    fire.Fire(main)
