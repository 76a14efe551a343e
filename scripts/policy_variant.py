"""A copy of an artifact with some policy fields changed, for ablations in the bench.

    PYTHONPATH=.pp:. .venv/bin/python scripts/policy_variant.py ARTIFACT OUT field=value [field=value ...]

Fields are ExitPolicy's (lookup_ngram, lookup_max, lookup_min, head_draft, w_max, ...); values are
integers or true/false. The copy keeps the exit head, the cost model and the rest of the metadata,
and says in its metadata `ablation` what changed: it is not what calibration chose.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from specbound_runtime.artifact import Artifact, read_artifact, save_artifact


def main(source: str, out: str, changes: list[str]) -> None:
    art = read_artifact(source)
    fields = {}
    for change in changes:
        name, _, value = change.partition("=")
        fields[name] = value.lower() == "true" if value.lower() in ("true", "false") else int(value)
    policy = dataclasses.replace(art.policy, **fields)
    metadata = {k: v for k, v in art.metadata.items() if k not in ("checksum", "kind", "schema_version")}
    metadata["ablation"] = json.dumps({"from": source, "changed": fields}, sort_keys=True)
    save_artifact(out, Artifact(policy, art.exit_weights, metadata), force=True)
    print(f"wrote {out}: {policy}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
