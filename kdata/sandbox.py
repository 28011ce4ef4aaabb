"""Run a teacher's Python code against tests, isolated: the one place kdata executes model output.

Each run gets a fresh temporary folder, the only place it can write. Everything else is
read-only; ``/tmp`` is a private tmpfs that vanishes with the run; there is no network (a new,
empty network namespace), no view of other processes, and an empty environment, so no API key
reaches the code. CPU time, address space, file size (output included), open files and processes
are capped with rlimits, and a wall-clock timeout kills the whole process group; every process
the code started lives in the run's own PID namespace and dies with it. (The kernel does not
enforce the process cap for namespaces root creates, so under root a fork bomb is stopped by the
timeout, not by the cap.) The home folder
is hidden behind an empty tmpfs (only the Python installation is mounted back), so tokens and
configuration stored there cannot be read and printed into a row.

Isolation comes from bubblewrap (``bwrap``). Where it is missing or cannot create namespaces,
`run_python` refuses with `SandboxUnavailable` instead of running the code unconfined.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kdata.errors import KdataError


class SandboxUnavailable(KdataError):
    """No isolation to run code in: kdata will not run a teacher's code unconfined."""


@dataclass(frozen=True)
class Limits:
    """What one run may use."""

    timeout_s: float = 10.0  # wall clock; CPU time is capped at the same number of seconds
    memory_mb: int = 1024  # address space
    output_bytes: int = 1 << 20  # stdout + stderr, and any one file it writes
    processes: int = 32  # the run's own processes, beyond what its user already runs


@dataclass(frozen=True)
class Outcome:
    """How a run ended.

    Attributes:
        passed: it exited 0 within its limits.
        reason: ``passed``, ``failed`` (a non-zero exit: a failed assert, an exception, a
            ``MemoryError`` past the address-space cap), ``timeout``, ``cpu_limit``,
            ``output_limit`` or ``killed`` (another signal).
        returncode: the exit status (negative: the signal that ended it).
        output: stdout and stderr together, at most ``Limits.output_bytes``.
    """

    passed: bool
    reason: str
    returncode: int
    output: str


def require() -> None:
    """Check, before anything is paid for, that this machine can sandbox code.

    Raises:
        SandboxUnavailable: it cannot; the message says what to install.
    """
    _bwrap()


@functools.cache
def _bwrap() -> str:
    """The bwrap that can isolate here, checked once per process."""
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxUnavailable(
            "no sandbox to run code in: install bubblewrap (Debian/Ubuntu: apt-get install "
            "bubblewrap; Fedora: dnf install bubblewrap); kdata does not run a teacher's code "
            "without isolation"
        )
    probe = subprocess.run(
        [path, *_isolation(Path(tempfile.gettempdir())), "true"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        raise SandboxUnavailable(
            f"bubblewrap cannot isolate here ({probe.stderr.strip() or probe.returncode}): "
            "it needs user namespaces (sysctl kernel.unprivileged_userns_clone=1, or inside "
            "a container --security-opt seccomp=unconfined); kdata does not run a teacher's "
            "code without isolation"
        )
    return path


def _isolation(workdir: Path) -> list[str]:
    args = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    home = Path.home().resolve()
    if home != Path("/"):
        args += ["--tmpfs", str(home)]
        for prefix in sorted({Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}):
            if prefix.is_relative_to(home):
                args += ["--ro-bind", str(prefix), str(prefix)]
    return [
        *args,
        "--bind", str(workdir), str(workdir),
        "--chdir", str(workdir),
        "--unshare-all",
        "--unshare-user",  # also under root: the code runs as nobody in a namespace of its own
        "--uid", "65534",
        "--gid", "65534",
        "--die-with-parent",
        "--clearenv",
        "--setenv", "PATH", "/usr/bin:/bin",
        "--setenv", "HOME", str(workdir),
    ]  # fmt: skip


def _confine(limits: Limits, processes: int) -> None:
    """In the child, before bwrap: its own process group and the rlimits."""
    os.setsid()
    for which, value in [
        (resource.RLIMIT_CPU, int(limits.timeout_s) + 1),
        (resource.RLIMIT_AS, limits.memory_mb << 20),
        (resource.RLIMIT_FSIZE, limits.output_bytes),
        (resource.RLIMIT_NOFILE, 64),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NPROC, processes),
    ]:
        resource.setrlimit(which, (value, value))


def _user_processes() -> int:
    """How many processes this user runs now: RLIMIT_NPROC counts all of them."""
    uid, n = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                n += entry.stat().st_uid == uid
    return n


def run_python(code: str, limits: Limits = Limits()) -> Outcome:
    """Run ``code`` as a Python program in the sandbox.

    Args:
        code: the whole program (e.g. a solution followed by its tests).
        limits: what it may use.

    Returns:
        How it ended; a failing program is an `Outcome`, not an exception.

    Raises:
        SandboxUnavailable: no isolation is available on this machine.
    """
    bwrap = _bwrap()
    with tempfile.TemporaryDirectory(prefix="kdata-sandbox-") as tmp:
        workdir = Path(tmp) / "run"
        workdir.mkdir()
        (workdir / "main.py").write_text(code, encoding="utf-8")
        out_path = Path(tmp) / "output"
        processes = _user_processes() + limits.processes
        with out_path.open("wb") as out:
            proc = subprocess.Popen(
                [bwrap, *_isolation(workdir), sys.executable, "-I", "main.py"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=functools.partial(_confine, limits, processes),
            )
            try:
                rc = proc.wait(timeout=limits.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            # Whatever it left behind (children, a fork bomb's survivors) goes with the group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            if timed_out:
                rc = proc.wait()
        with out_path.open("rb") as f:
            output = f.read(limits.output_bytes).decode("utf-8", errors="replace")
        full = out_path.stat().st_size >= limits.output_bytes
    if rc != 0 and output.startswith("bwrap: "):
        raise SandboxUnavailable(f"the sandbox could not be set up: {output.strip()}")
    return Outcome(rc == 0 and not timed_out, _reason(rc, timed_out, full), rc, output)


def _reason(rc: int, timed_out: bool, output_full: bool) -> str:
    if timed_out:
        return "timeout"
    if rc == 0:
        return "passed"
    if rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        return "cpu_limit"
    if output_full or rc in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ):
        return "output_limit"
    if rc < 0 or rc > 128:
        return "killed"
    return "failed"
