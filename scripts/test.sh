#!/usr/bin/env bash
# Set everything up and run the whole test suite (Triton kernels run in the interpreter on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export TRITON_INTERPRET=1
python -m pytest -q "$@"
