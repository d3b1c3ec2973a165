#!/usr/bin/env bash
# The test command of README.md: set up .venv if needed, then run the whole pytest suite (no network).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${UNI_X_VENV:-$ROOT/.venv}/bin/python" -m pytest -q "$@"
