#!/usr/bin/env bash
# Export a Hugging Face folder to OpenVINO IR in fp32, for the OpenVINO GenAI comparison
# (experiments/openvino_peer.py, which runs OpenVINO GenAI in the same environment).
# optimum-intel's exporter pins transformers < 5.6, which SpecBound cannot use (5.24), so it runs
# in an environment of its own (made once, ~1.5 min, from PyPI):
#   bash scripts/openvino_export.sh <hf folder> <out folder>
# For the built-in model, the folder is the converted GGUF under ~/.cache/specbound/gguf/.
set -euo pipefail
src=${1:?usage: openvino_export.sh <hf folder> <out folder>}
out=${2:?usage: openvino_export.sh <hf folder> <out folder>}
env=${SPECBOUND_OV_EXPORT_ENV:-$HOME/.cache/specbound/ov-export-env}
if [ ! -x "$env/bin/optimum-cli" ] || ! "$env/bin/python" -c "import openvino_genai" 2>/dev/null; then
  echo "making the exporter's environment in $env (optimum-intel, transformers<5.6, openvino-genai) ..." >&2
  python3 -m venv "$env"
  "$env/bin/python" -m pip --disable-pip-version-check -q install \
    "optimum-intel[openvino]==2.2.0" "transformers<5.6" "openvino-genai==2026.4.1.0"
fi
"$env/bin/optimum-cli" export openvino --model "$src" --task text-generation-with-past --weight-format fp32 "$out"
