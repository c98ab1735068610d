"""Build locks: one uncoordinated writer per store at a time.

A lock is an `flock` on a small file inside the store. The kernel drops it when its holder
exits, however it exits (kill -9 included), so a killed build never leaves a lock behind that
needs clearing: the next build simply takes it. The file names its holder (pid, host, command,
start time) to anyone refused, and a build that ends removes it. A build takes the store lock
exclusively; `--part` jobs, which may run side by side, share it and each take the lock of
their own writer region exclusively.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path

from .errors import StoreError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: builds run unguarded (said in a warning)
    fcntl = None

log = logging.getLogger(__name__)

STORE_LOCK = ".ser-build.lock"


def region_lock(writer: int) -> str:
    return f".ser-build-{writer}.lock"


def is_lock_file(name: str) -> bool:
    return name == STORE_LOCK or (name.startswith(".ser-build-") and name.endswith(".lock"))


class BuildLock:
    """An flock held on `folder/name` until `release` (or the process ends).

    Args:
        folder: the store folder (created if missing).
        name: the lock file's name.
        shared: share the lock with other shared holders (`--part` jobs); refused while an
            exclusive holder has it, and the other way round.
        doing: what the holder does to the folder, for the refusal ("built", "written").

    Raises:
        StoreError: another process holds the lock (its pid, host, command and start are named),
            or the folder cannot be written.
    """

    def __init__(self, folder: str | Path, name: str = STORE_LOCK, *, shared: bool = False,
                 doing: str = "built"):
        self.path = Path(folder) / name
        self.shared = shared
        self.fd: int | None = None
        if fcntl is None:
            log.warning("%s: this system has no flock; nothing stops two builds into one store", folder)
            return
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as err:
                raise StoreError(f"{self.path.parent}: cannot write ({err.strerror}); choose a "
                                 "writable --out") from None
            try:
                fcntl.flock(self.fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self.holder()
                os.close(self.fd)
                self.fd = None
                raise StoreError(f"{self.path.parent} is being {doing} by another process ({holder}); "
                                 "wait for it to finish or stop it, then rerun (a killed process's "
                                 "lock is released by itself)") from None
            except OSError as err:  # e.g. a network filesystem without lock support
                log.warning("%s: cannot lock (%s); nothing stops two builds into one store",
                            self.path, err.strerror)
                os.close(self.fd)
                self.fd = None
                return
            if self._still_there():
                break
            os.close(self.fd)  # its holder removed the file as we opened it: lock the new one
        self._write_holder(shared)

    def _still_there(self) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
        except FileNotFoundError:
            return False

    def _write_holder(self, shared: bool) -> None:
        """Name this process in the file (shared holders leave it empty: they name themselves
        in their region's lock file)."""
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
                  "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            os.ftruncate(self.fd, 0)
            if not shared:
                os.pwrite(self.fd, json.dumps(record).encode(), 0)
        except OSError:  # the holder's name is a courtesy; the lock itself is what matters
            pass

    def holder(self) -> str:
        """Who holds the lock, in words: the exclusive holder, or the `--part` jobs running."""
        named = [_describe(self.path)]
        if not named[0]:
            named = [_describe(path) for path in sorted(self.path.parent.glob(".ser-build-*.lock"))
                     if path != self.path and _held(path)]
        named = [n for n in named if n]
        return "; ".join(named) if named else "a process that did not name itself"

    def release(self) -> None:
        """Drop the lock. An exclusive holder removes the file first (so a finished store holds
        no lock file): whoever opened it meanwhile finds it gone once locked, and starts over."""
        if self.fd is not None:
            try:
                if self.shared:
                    os.ftruncate(self.fd, 0)
                else:
                    self.path.unlink()
            except OSError:  # a read-only store keeps its lock file: harmless
                pass
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _describe(path: Path) -> str:
    try:
        record = json.loads(path.read_text() or "{}")
        return f"pid {record['pid']} on {record['host']} since {record['since']}: {record['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _held(path: Path) -> bool:
    """Whether another process holds the lock on `path` now."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)
