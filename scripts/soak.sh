#!/usr/bin/env bash
# Load test (issue 5): N MT-Bench prompts x T new tokens with speculation, every output checked
# against generate() token for token, resident memory recorded after each prompt, peak RSS from
# /usr/bin/time. Usage: scripts/soak.sh [ARTIFACT] [N=50] [T=512]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ARTIFACT=${1:-artifacts/smollm2-135m.safetensors}
N=${2:-50}
T=${3:-512}
OUT=runs/soak
mkdir -p "$OUT"
.venv/bin/python -c "
import json, sys
from specbound.data.tasks import task_prompts
with open('$OUT/prompts.jsonl', 'w') as f:
    for p in task_prompts('mt-bench', $N):
        f.write(json.dumps({'prompt': p.text}) + '\n')
"
/usr/bin/time -v .venv/bin/specbound decode --model smollm2-135m --artifact "$ARTIFACT" \
  --prompt-file "$OUT/prompts.jsonl" --max-new-tokens "$T" --check-exact --json \
  > "$OUT/records.jsonl" 2> "$OUT/stderr.txt"
.venv/bin/python -c "
import json
rows = [json.loads(l) for l in open('$OUT/records.jsonl')]
rss = [r['rss_mb'] for r in rows]
print(f'prompts: {len(rows)}, new tokens: {sum(r[\"new_tokens\"] for r in rows)}, exact: {sum(r[\"exact\"] for r in rows)}/{len(rows)}')
print(f'RSS after prompt 1 / 10 / last: {rss[0]} / {rss[min(9, len(rss)-1)]} / {rss[-1]} MB; max {max(rss)} MB')
"
grep -E "Maximum resident set size|Elapsed" "$OUT/stderr.txt"
