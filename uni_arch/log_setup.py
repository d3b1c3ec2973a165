"""The one place loguru sinks are configured; called only from entry points (``main()``s and spawned workers).

Library modules only do ``from loguru import logger``. Rank-aware: rank 0 logs at ``level``, other ranks only
warnings and errors (unless ``all_ranks``), each line tagged with its rank so multi-process output stays readable;
transformers' own logger follows the same rule. The sink writes through ``tqdm.write`` so that log lines never
break a progress bar. ``level=None`` reads ``$LOGURU_LEVEL`` (default ``INFO``).

This module imports only loguru and tqdm at the top, so that ``data_process`` tools can use it cheaply.
"""

from __future__ import annotations

import os
import sys

from loguru import logger
from tqdm import tqdm


def current_rank() -> int:
    """The process rank from the launcher's environment (torchrun, accelerate and deepspeed all set RANK)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def _write(message: str) -> None:
    tqdm.write(message, end="", file=sys.stderr)


def setup_logging(rank: int | None = None, level: str | None = None, *, tag: str = "rank",
                  all_ranks: bool = False) -> None:
    """Replace every loguru sink with one stderr sink.

    Args:
        rank: this process's rank (None: from the environment, see :func:`current_rank`).
        level: the level of rank 0 (and of every rank with ``all_ranks``); None: ``$LOGURU_LEVEL`` or ``INFO``.
        tag: the word before the rank in each line (``[rank 1]``, ``[encode 1]``).
        all_ranks: every rank logs at ``level`` (workers that each report their own share of the work).
    """
    rank = current_rank() if rank is None else rank
    level = level or os.environ.get("LOGURU_LEVEL", "INFO")
    logger.remove()
    fmt = f"<green>{{time:HH:mm:ss}}</green> <level>{{level: <7}}</level> [{tag} {{extra[rank]}}] {{name}}: {{message}}"
    logger.configure(extra={"rank": rank})
    logger.add(_write, level=level if rank == 0 or all_ranks else "WARNING", format=fmt)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_info() if rank == 0 and level == "DEBUG" else hf_logging.set_verbosity_warning()
