"""Calibration spread over workers: shards of work claimed through a shared folder, and local
worker processes.

Every piece of collection is a numbered shard whose content depends only on the job (never on
who computes it), written atomically. A worker claims a shard by creating its claim file
exclusively, keeps the claim fresh while it works (a heartbeat touches it), and deletes it when
the shard is written. A claim whose owner is gone (a dead process on this host, or no heartbeat
for STALE_AFTER_S seconds from another host) is taken over, so a killed worker only loses the
shard it was writing, and a restarted one resumes. Workers on other machines join through the
same work folder (a shared file system) and the same study storage.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

STALE_AFTER_S = 60.0
HEARTBEAT_S = 5.0
POLL_S = 0.2
READY_TIMEOUT_S = 600.0  # how long local workers may take to load the model


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child not yet reaped by its parent is a zombie: gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass
class Claims:
    """This process's claims, kept fresh by a heartbeat thread."""

    held: set[Path] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def _beat(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            with self._lock:
                for path in list(self.held):
                    try:
                        os.utime(path)
                    except OSError:
                        pass

    def take(self, claim: Path) -> bool:
        """Claim exclusively; take over a stale claim. True when this process now holds it."""
        for _ in range(2):
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale(claim):
                    return False
                try:  # one taker wins the rename; the others see the claim gone and retry
                    os.replace(claim, claim.with_name(f"{claim.name}.stale-{os.getpid()}-{time.time_ns()}"))
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
            with self._lock:
                self.held.add(claim)
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, daemon=True)
                self._thread.start()
            return True
        return False

    def release(self, claim: Path) -> None:
        with self._lock:
            self.held.discard(claim)
        try:
            claim.unlink()
        except FileNotFoundError:
            pass

    @staticmethod
    def _stale(claim: Path) -> bool:
        try:
            owner = json.loads(claim.read_text() or "{}")
            age = time.time() - claim.stat().st_mtime
        except (OSError, ValueError):
            return False  # being written or just released: look again later
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
            return owner["pid"] != os.getpid() and not _alive(owner["pid"])
        return age > STALE_AFTER_S


CLAIMS = Claims()


def log_event(work: Path, event: str) -> None:
    """One line in <work>/workers.log: which process did what (appended whole, by any worker)."""
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {socket.gethostname()}:{os.getpid()} {event}\n"
    fd = os.open(work / "workers.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def make_shards(
    folder: Path,
    count: int,
    suffix: str,
    build: Callable[[int], bytes],
    worker: int = 0,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Make folder/shard-NNNNN<suffix> for every shard 0..count-1, each computed once across all
    workers (this one starts at its own share), and wait until all exist. `build(i)` returns the
    shard's bytes; progress(i) is called for every shard as it is found done."""
    from specbound_runtime.files import atomic_write_bytes

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"shard-{i:05d}{suffix}" for i in range(count)]
    start = (worker * count) // max(1, workers)
    order = list(range(start, count)) + list(range(start))
    reported: set[int] = set()
    while True:
        missing = []
        for i in order:
            if paths[i].exists():
                if i not in reported and progress is not None:
                    progress(i)
                reported.add(i)
                continue
            claim = folder / f".shard-{i:05d}{suffix}.claim"
            if not CLAIMS.take(claim):
                missing.append(i)
                continue
            try:
                if not paths[i].exists():
                    started = time.monotonic()
                    atomic_write_bytes(paths[i], build(i))
                    log_event(folder.parent, f"built {folder.name}/{paths[i].name} in {time.monotonic() - started:.2f}s")
            finally:
                CLAIMS.release(claim)
            if progress is not None:
                progress(i)
            reported.add(i)
        if not missing:
            return paths
        order = missing
        time.sleep(POLL_S)


# -- local worker processes --------------------------------------------------------------------


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

    from .pipeline import collect_and_tune, options_from_payload, prepare

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
