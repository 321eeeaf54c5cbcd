#!/usr/bin/env bash
# Set everything up, then run the whole test suite (and ruff).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
# Two workers of one torch thread each: on two cores, about twice as fast as one process with two threads.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" --dist worksteal --durations=20 "$@"
