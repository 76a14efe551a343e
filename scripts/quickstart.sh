#!/usr/bin/env bash
# The main job end to end on the built-in model (SmolLM2-135M-Instruct) and corpus:
# set up, calibrate (a rerun resumes from the work folder in runs/, so only tuning and the final
# measurement are redone), decode a prompt with the artifact and check it against transformers'
# generate() token for token, then compare on a few built-in prompts of three kinds: generate(),
# our engine without speculation, and SpecBound with the artifact (speed, accepted length, exactness).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SB=.venv/bin/specbound
ARTIFACT=artifacts/smollm2-135m.safetensors
"$SB" calibrate --model smollm2-135m --out "$ARTIFACT" --force
"$SB" inspect "$ARTIFACT"
"$SB" decode --model smollm2-135m --artifact "$ARTIFACT" \
  --prompt "Explain in a short paragraph why the sky is blue." --max-new-tokens 128 --check-exact
echo "Comparing on 6 built-in prompts (chat, summarisation, QA; 128 new tokens each; about 3 minutes):" >&2
"$SB" bench --model smollm2-135m --artifact "$ARTIFACT" --tasks mt-bench,summarization,qa \
  --prompts-per-task 2 --methods ar,specbound --repeats 1
