#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install requirements.txt into it.
# Idempotent: a stamp holding the hash of requirements.txt skips the install when nothing changed.
# torch is installed first and pinned (2.13.0): on the CPU machines that version resolves to the CPU wheel,
# whereas a bare `torch` pulled in by another package would fetch a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${UNI_X_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.requirements.sha256"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  exit 0
fi
echo "[setup_env] installing the environment into $VENV (first run takes a few minutes)" >&2
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >&2 || true
"$VENV/bin/python" -m pip install -q "$(grep -E '^torch==' "$ROOT/requirements.txt")" >&2
"$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt" >&2
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" >&2
echo "$WANT" > "$STAMP"
