#!/usr/bin/env bash
# Set everything up, then run the pipeline on the built-in demo clip (results in ./results/demo_carphone).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/avatar-pipeline demo "$@"
