"""Exclusive output-folder locks: one writer per folder, a clear refusal for the second.

``output_lock(folder, "ingest")`` takes ``folder/.easyref.lock`` with :class:`filelock.FileLock` (an OS advisory
``flock``; the kernel drops it when the holder dies, so there are no stale locks after a crash or a SIGKILL) and
writes who holds it to ``folder/.easyref.lock.holder`` (command, host, pid, start time). A second writer gets
:class:`FolderLocked`, whose message names that holder.

On a shared volume (a Kubernetes ReadWriteMany PVC) the lock is only as good as the file system's lock support:
NFSv4 and CephFS carry ``flock`` across clients (Linux maps it to a byte-range lock there); NFSv3 without the lock
daemon and some FUSE file systems do not, and two pods could then both "hold" it. The holder file still names the
other writer, which is how to spot such a volume.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

LOCK_NAME = ".easyref.lock"
HOLDER_NAME = ".easyref.lock.holder"


class FolderLocked(RuntimeError):
    """Another process holds the folder's lock."""


def _holder(folder: Path) -> str:
    try:
        info = json.loads((folder / HOLDER_NAME).read_text())
        return (
            f"{info.get('what', '?')} (pid {info.get('pid', '?')} on {info.get('host', '?')}, "
            f"since {info.get('since', '?')}: {info.get('command', '?')})"
        )
    except (OSError, ValueError):
        return "another process (no holder record)"


@contextmanager
def output_lock(folder: str | Path, what: str, timeout: float = 0.0) -> Iterator[None]:
    """Hold ``folder``'s exclusive lock for the ``with`` block; raise :class:`FolderLocked` after ``timeout`` s."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_NAME), thread_local=False)
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise FolderLocked(
            f"{folder} is being written by {_holder(folder)}; wait for it to finish or choose another --out"
        ) from None
    holder = folder / HOLDER_NAME
    try:
        record = {
            "what": what,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(sys.argv)[:500],
        }
        tmp = holder.with_name(f"{HOLDER_NAME}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, holder)
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()
