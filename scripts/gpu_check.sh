#!/usr/bin/env bash
# GPU check (see scripts/gpu_check.py): exactness on tiny models and a short speed comparison on
# cuda in fp32, bf16 and fp16. Sets up the environment first, like the other scripts.
#   bash scripts/gpu_check.sh [--artifact A] [--prompts 4] [--tokens 128] [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/gpu_check.py --device "${SPECBOUND_DEVICE:-cuda}" "$@"
