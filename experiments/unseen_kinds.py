"""An artifact on prompts of calibration's held-out kinds that neither its calibration nor the
bench has seen: the live check of `specbound calibrate`, on another draw of each kind.

    .venv/bin/python experiments/unseen_kinds.py ARTIFACT [PER_KIND=2] [SEED=1] [TOKENS=128]

Draws PER_KIND prompts of each kind with `held_out_kind_prompts(..., seed=SEED)`, leaves out any
that the default calibration (seed 0, 3 per kind) judged on, and decodes each plain (SpecBound's
engine without drafts), with the paper's defaults and with the artifact, interleaved per prompt
(calibrate.live.measure). Prints the JSON report: per-kind and overall speedups, exactness.
"""

from __future__ import annotations

import json
import sys

import specbound_runtime as sb
from specbound.calibrate.corpus import CorpusItem
from specbound.calibrate.live import kind_by_kind, measure
from specbound.data.calibration import held_out_kind_prompts


def main(artifact: str, per_kind: int = 2, seed: int = 1, tokens: int = 128) -> None:
    judged = {p.id for p in held_out_kind_prompts(3, seed=0)}
    pool = held_out_kind_prompts(per_kind + 3, seed=seed)
    chosen: dict[str, list] = {}
    for p in pool:
        if p.id not in judged and len(chosen.setdefault(p.task, [])) < per_kind:
            chosen[p.task].append(CorpusItem(p.id, True, p.text, p.task))
    prompts = kind_by_kind([p for ps in chosen.values() for p in ps])
    m = sb.load("smollm2-135m", artifact=artifact)
    report = measure(m, m.eos_token_ids, m.policy, m.exit_weights, prompts, tokens)
    report["ids"] = [p.id for p in prompts]
    print(json.dumps(report, indent=1, sort_keys=True))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1], *(int(a) for a in sys.argv[2:5]))
