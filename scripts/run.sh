#!/usr/bin/env bash
# Set everything up, then run the main job: `fedmomentum run` on the embedded default (any flags pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/fedmomentum run "$@"
