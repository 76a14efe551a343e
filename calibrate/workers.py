"""Calibration spread over local worker processes: this process is worker 0, workers 1..N-1
start beside it with the same plan, and all of them share the work folder's shards
(calibrate.shards) and the study's trials (calibrate.study). Workers on other machines join
through the same work folder and the same study storage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .pipeline import collect_and_tune, options_from_payload, prepare
from .shards import POLL_S

READY_TIMEOUT_S = 600.0  # how long local workers may take to load the model


def start_local_workers(payload: dict, workers: int, work: Path) -> list[subprocess.Popen]:
    """Start workers 1..workers-1 as child processes (this process is worker 0) and wait until
    each has loaded the model, so that all start collecting together. The options, storage URL
    included, go through the child's stdin: never on a command line or on disk."""
    import tempfile

    ready = Path(tempfile.mkdtemp(prefix=".ready-", dir=work))
    payload = {**payload, "ready": str(ready)}
    children = []
    threads = max(1, (os.cpu_count() or 1) // workers)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), SPECBOUND_WORKER_THREADS=str(threads))
    for index in range(1, workers):
        child = subprocess.Popen(
            [sys.executable, "-m", "specbound.calibrate.workers"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env,
        )
        child.stdin.write(json.dumps({**payload, "worker": index, "workers": workers}).encode())
        child.stdin.close()
        children.append(child)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while len(list(ready.iterdir())) < workers - 1 and time.monotonic() < deadline:
        if any(child.poll() is not None for child in children):
            break  # one failed to start: the others, and this process, do its share
        time.sleep(POLL_S)
    for entry in ready.iterdir():
        entry.unlink()
    ready.rmdir()
    return children


def main() -> None:
    """A child worker: read its options from stdin, collect and tune its share, exit. Errors are
    one `Error:` line on stderr, like the CLI's."""
    import torch

    from specbound_runtime.errors import SpecBoundError


    request = json.loads(sys.stdin.read())
    torch.set_num_threads(int(os.environ.get("SPECBOUND_WORKER_THREADS", "1")))
    index = request["worker"]
    try:
        plan = prepare(options_from_payload(request))
        try:
            (Path(request["ready"]) / str(index)).touch()
        except OSError:
            pass  # the parent stopped waiting
        collect_and_tune(plan, index, request["workers"], quiet=True)
    except SpecBoundError as e:
        print(f"Error: [worker {index}] {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
