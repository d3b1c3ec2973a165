"""``python tools/bench.py <name> --help`` shows that subcommand's own options (issue 8: it died with
``TypeError: main() got an unexpected keyword argument 'help'`` because fire saw a ``**kwargs`` wrapper)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools import bench

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(bench.SUBCOMMANDS))
def test_every_subcommand_help_lists_its_options(name):
    env = {**os.environ, "PAGER": "cat", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "tools/bench.py", name, "--help"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "TypeError" not in text
    options = list(inspect.signature(bench.subcommand(name)).parameters)
    assert options, f"{name}: main() has no options to show"
    missing = [o for o in options if f"--{o}" not in text]
    assert not missing, f"`bench.py {name} --help` does not list {missing}:\n{text}"


def test_unknown_subcommand_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown benchmark .nope.; known: model, train, generate"):
        bench.subcommand("nope")
