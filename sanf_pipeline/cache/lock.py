"""Who may write into a cache: an exclusive creation lock, and owner files that keep two jobs apart.

Each writing process leaves ``<host>-<pid>.json`` (its shard assignment) in ``.<cache>.lock/`` beside the
cache. A second process is refused if a live owner's shards overlap its own; ranks of one torchrun job
or one job array own disjoint shards and pass. An owner file whose process is gone from this host is a
stale lock: it is removed with a note. Owners on other hosts cannot be checked and count as live.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..errors import SanfError


def lock_dir(cache_path: Path) -> Path:
    cache_path = Path(cache_path)
    return cache_path.parent / f".{cache_path.name}.lock"


@contextlib.contextmanager
def creation_lock(cache_path: Path):
    """Serialise the create-or-verify step between processes that start together."""
    folder = lock_dir(cache_path)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "create.flock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _overlaps(a: dict, b: dict) -> bool:
    if a["num_shards"] != b["num_shards"]:
        return True
    return a["shard_index"] == b["shard_index"]


class OwnerLock:
    """This process's claim on a set of shards of one cache."""

    def __init__(self, cache_path: Path, num_shards: int, shard_index: int):
        self.folder = lock_dir(cache_path)
        self.cache_path = Path(cache_path)
        self.me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "num_shards": num_shards,
            "shard_index": shard_index,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.file = self.folder / f"{self.me['host']}-{self.me['pid']}.json"
        self.stale_removed: list[str] = []

    def acquire(self) -> None:
        """Call inside ``creation_lock``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for other_file in sorted(self.folder.glob("*.json")):
            if other_file == self.file:
                continue
            try:
                other = json.loads(other_file.read_text()[:4096])
            except (OSError, ValueError):
                other_file.unlink(missing_ok=True)
                continue
            if other.get("host") == self.me["host"] and not _pid_alive(int(other.get("pid", -1))):
                other_file.unlink(missing_ok=True)
                self.stale_removed.append(f"pid {other.get('pid')} on {other.get('host')}")
                continue
            if _overlaps(self.me, other):
                raise SanfError(
                    f"cache {self.cache_path} is being written by another process (pid {other.get('pid')} on "
                    f"{other.get('host')}, since {other.get('started')}); wait for it, or, if that process is "
                    f"gone, delete {other_file}"
                )
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.me))
        os.replace(tmp, self.file)

    def release(self) -> None:
        self.file.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            remaining = [p for p in self.folder.iterdir() if p.name != "create.flock"]
            if not remaining:
                (self.folder / "create.flock").unlink(missing_ok=True)
                self.folder.rmdir()
