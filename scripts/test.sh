#!/usr/bin/env bash
# Set everything up, then run the whole test suite (and ruff).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
# Two workers, one torch thread each: on two cores that is about twice one process with two threads. Each
# document's blocks and the tests that start Flower or Ray processes stay together (tests/conftest.py).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadgroup --durations=20 "$@"
