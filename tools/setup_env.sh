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
EDITABLE="$VENV/.editable_root"  # the checkout the venv's editable install points at
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  # A venv shared between checkouts (UNI_X_VENV) imports the packages of the checkout installed last: re-point it
  # at this one, or its scripts would silently run another checkout's code.
  if [[ "$(cat "$EDITABLE" 2>/dev/null)" != "$ROOT" ]]; then
    echo "[setup_env] pointing $VENV's editable install at $ROOT" >&2
    "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" >&2
    echo "$ROOT" > "$EDITABLE"
  fi
  exit 0
fi
echo "[setup_env] installing the environment into $VENV (first run takes a few minutes)" >&2
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >&2 || true
"$VENV/bin/python" -m pip install -q "$(grep -E '^torch==' "$ROOT/requirements.txt")" >&2
"$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt" >&2
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" >&2
echo "$ROOT" > "$EDITABLE"
echo "$WANT" > "$STAMP"
