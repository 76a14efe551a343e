"""Work shared through a folder: numbered shards, each computed once across all workers.

Every piece of collection is a numbered shard whose content depends only on the job (never on
who computes it), written atomically. A worker claims a shard by creating its claim file
exclusively, keeps the claim fresh while it works (a heartbeat touches it), and deletes it when
the shard is written. A claim whose owner is gone (a dead process on this host, or no heartbeat
for STALE_AFTER_S seconds from another host) is taken over, so a killed worker only loses the
shard it was writing, and a restarted one resumes. Workers on other machines join through the
same work folder (a shared file system). `<work>/workers.log` says which process did what.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

STALE_AFTER_S = 60.0
HEARTBEAT_S = 5.0
POLL_S = 0.2


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
