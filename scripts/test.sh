#!/usr/bin/env bash
# Set everything up, then run the whole test suite (and ruff).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest -q --durations=20 "$@"
