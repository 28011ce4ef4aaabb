"""One writer per run directory: the ``lock`` file a build holds from start to end.

The lock is an exclusive ``flock`` on ``RUN_DIR/lock``, which the kernel releases whenever its
holder ends, ``kill -9`` included; the file names the holder (pid, host, start time; not its
command line, which may hold anything) for the message a second build gets. A ``lock`` file
whose lock nobody holds was left by a build that died: the next build takes it over and says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from kdata.errors import RunLocked

LOCK_FILE = "lock"


@contextlib.contextmanager
def hold(run_dir: Path, note: Callable[[str], None]) -> Iterator[None]:
    """Hold the run directory's lock for the ``with`` block (creating the directory).

    Args:
        run_dir: the run directory.
        note: receives a line when a lock left by a build that died is taken over.

    Raises:
        RunLocked: another build holds the lock.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = _acquire(path)
    try:
        left = _read(fd)
        if left:
            note(f"took over the lock of {run_dir} left by {_holder(left)}, which is gone")
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield
    finally:
        # Unlink before unlocking: a build that opened the file meanwhile finds it unlinked and
        # opens the path again (see _acquire).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _acquire(path: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = _read(fd)
            os.close(fd)
            raise RunLocked(
                f"{path.parent} is in use by another build ({_holder(held)}); wait for it to "
                f"finish, or build into another directory with -o"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder released and removed this file as we opened it: again


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 65536, 0) or b"{}")
    except ValueError:  # half written by a build that died at that moment
        return {}


def _holder(info: dict) -> str:
    if not info:
        return "a build that has not written its name yet"
    return f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started_at')}"
