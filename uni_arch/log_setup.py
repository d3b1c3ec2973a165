"""The one place loguru sinks are configured; called only from entry points (``main()``s).

Rank-aware: rank 0 logs at ``level``, other ranks only warnings and errors, each line tagged with its rank so
multi-process output stays readable. transformers' own logger follows the same rule.
"""

from __future__ import annotations

import os
import sys

from loguru import logger


def current_rank() -> int:
    """The process rank from the launcher's environment (torchrun, accelerate and deepspeed all set RANK)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def setup_logging(rank: int | None = None, level: str = "INFO") -> None:
    rank = current_rank() if rank is None else rank
    logger.remove()
    fmt = "<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> [rank {extra[rank]}] {name}: {message}"
    logger.configure(extra={"rank": rank})
    logger.add(sys.stderr, level=level if rank == 0 else "WARNING", format=fmt)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_info() if rank == 0 and level == "DEBUG" else hf_logging.set_verbosity_warning()
