"""A copy of an artifact with some policy fields changed, for ablations in the bench.

    .venv/bin/python experiments/policy_variant.py ARTIFACT OUT field=value [field=value ...]

Fields are ExitPolicy's (lookup_ngram, lookup_max, lookup_min, head_draft, w_max, ...); values are
integers or true/false, and for guard_costs comma-separated numbers or nothing (`guard_costs=`:
the run-time guard off). The copy keeps the exit head, the cost model and the rest of the metadata,
and says in its metadata `ablation` what changed: it is not what calibration chose.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from specbound_runtime.artifact import Artifact, read_artifact, save_artifact
from specbound_runtime.errors import SpecBoundError, UsageError


def main(source: str, out: str, changes: list[str]) -> None:
    art = read_artifact(source)
    known = {f.name for f in dataclasses.fields(art.policy)}
    fields = {}
    for change in changes:
        name, _, value = change.partition("=")
        if name not in known:
            raise UsageError(f"{name!r} is not a policy field; use one of {', '.join(sorted(known))}")
        try:
            if name == "guard_costs":
                fields[name] = tuple(float(v) for v in value.split(",") if v)
            else:
                fields[name] = value.lower() == "true" if value.lower() in ("true", "false") else int(value)
        except ValueError:
            raise UsageError(f"{change!r}: give an integer, true/false or (guard_costs) numbers") from None
    try:
        policy = dataclasses.replace(art.policy, **fields)
    except ValueError as e:
        raise UsageError(f"invalid policy: {e}") from None
    metadata = {k: v for k, v in art.metadata.items() if k not in ("checksum", "kind", "schema_version")}
    metadata["ablation"] = json.dumps({"from": source, "changed": fields}, sort_keys=True)
    save_artifact(out, Artifact(policy, art.exit_weights, metadata), force=True)
    print(f"wrote {out}: {policy}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    try:
        main(sys.argv[1], sys.argv[2], sys.argv[3:])
    except SpecBoundError as e:
        sys.exit(f"Error: {e}")
