"""torch's intra-op thread count as a scoped setting.

Several jobs pin it (the VQ trainer times 1 vs 2 threads, the encoder fixes it so codes do not depend on the worker
count) and must hand the caller's setting back afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads and restore the caller's count after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


__all__ = ["torch_threads"]
