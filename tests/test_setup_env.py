"""tools/setup_env.sh with a venv shared between checkouts (UNI_X_VENV)."""

import hashlib
import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_shared_venv_is_pointed_at_the_checkout_that_uses_it(tmp_path):
    """With the requirements already installed, setup_env still re-points the editable install when the venv was
    last installed from another checkout (else that checkout's code runs silently), and only then."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    calls = tmp_path / "calls.txt"
    fake = venv / "bin" / "python"  # records its arguments instead of running pip
    fake.write_text(f"#!/usr/bin/env bash\necho \"$*\" >> {calls}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    want = hashlib.sha256((ROOT / "requirements.txt").read_bytes() + (ROOT / "pyproject.toml").read_bytes()).hexdigest()
    (venv / ".requirements.sha256").write_text(want + "\n")
    (venv / ".editable_root").write_text("/somewhere/else\n")
    env = {**os.environ, "UNI_X_VENV": str(venv)}

    subprocess.run(["bash", str(ROOT / "tools/setup_env.sh")], env=env, check=True, capture_output=True, timeout=60)
    assert calls.read_text().split("\n")[0].endswith(f"-e {ROOT}")  # only the editable install, no requirements
    assert (venv / ".editable_root").read_text().strip() == str(ROOT)

    calls.unlink()
    subprocess.run(["bash", str(ROOT / "tools/setup_env.sh")], env=env, check=True, capture_output=True, timeout=60)
    assert not calls.exists()  # already pointing here: nothing to do
