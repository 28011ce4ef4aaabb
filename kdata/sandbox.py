"""Run a teacher's Python code against tests, isolated: the one place kdata executes model output.

Each run gets a fresh temporary folder, the only place it can write, which the program sees at
``/tmp/run`` (so what it prints is the same from run to run). Everything else is
read-only; ``/tmp`` is a private tmpfs that vanishes with the run; there is no network (a new,
empty network namespace), no view of other processes, and an empty environment, so no API key
reaches the code. The home folder is hidden behind an empty tmpfs (only the Python installation
is mounted back), so tokens and configuration stored there cannot be read and printed into a row.
CPU time, address space, file size (output included) and open files are capped with rlimits, and
a wall-clock timeout kills what is left. The number of processes is capped too, so a fork bomb
cannot empty the machine's process table: by ``RLIMIT_NPROC`` for a normal user, and, under
root (whom the kernel exempts from that limit), by a ``pids`` cgroup of the run's own.

Isolation comes from bubblewrap (``bwrap``). Where it is missing or cannot create namespaces, or
kdata runs as root without a ``pids`` cgroup it can create, `run_python` refuses with
`SandboxUnavailable` instead of running the code unconfined.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kdata.errors import KdataError

_runs = itertools.count()


class SandboxUnavailable(KdataError):
    """No isolation to run code in: kdata will not run a teacher's code unconfined."""


@dataclass(frozen=True)
class Limits:
    """What one run may use."""

    timeout_s: float = 10.0  # wall clock; CPU time is capped at the same number of seconds
    memory_mb: int = 1024  # address space
    output_bytes: int = 1 << 20  # stdout + stderr, and any one file it writes
    processes: int = 32  # the run's own processes (for a normal user: beyond those it runs)


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
    if os.getuid() == 0 and _pids_cgroups() is None:
        raise SandboxUnavailable(
            "kdata runs as root, and root is exempt from the process limit, but no pids cgroup "
            "can be created here (/sys/fs/cgroup/pids or a cgroup v2 root with the pids "
            "controller): run kdata as a normal user, so that a fork bomb in a teacher's code "
            "cannot exhaust the machine's processes"
        )
    return path


@functools.cache
def _pids_cgroups() -> Path | None:
    """Where root can make a pids cgroup per run: cgroup v1's pids hierarchy, or v2's root."""
    for base in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
        probe = base / f"kdata-probe-{os.getpid()}"
        try:
            probe.mkdir()
        except OSError:
            continue
        usable = (probe / "pids.max").exists()
        probe.rmdir()
        if usable:
            return base
    return None


@contextlib.contextmanager
def _process_cap(processes: int):
    """Under root, a pids cgroup for one run (yields its ``cgroup.procs``), emptied of whatever
    is left in it and removed after; for a normal user, nothing (``RLIMIT_NPROC`` caps it)."""
    if os.getuid() != 0:
        yield None
        return
    group = _pids_cgroups() / f"kdata-sandbox-{os.getpid()}-{next(_runs)}"
    group.mkdir()
    try:
        (group / "pids.max").write_text(str(processes))
        yield group / "cgroup.procs"
    finally:
        for _ in range(500):
            left = (group / "cgroup.procs").read_text().split()
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.02)
        group.rmdir()


INSIDE = "/tmp/run"  # the program's folder, as the program sees it


def _isolation(workdir: Path) -> list[str]:
    args = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    hidden = [Path("/tmp")]
    home = Path.home().resolve()
    if home != Path("/"):
        args += ["--tmpfs", str(home)]
        hidden.append(home)
    # The Python installation is mounted back, read-only, where a tmpfs hid it (a venv under
    # /tmp, say, and the interpreter it links to under the home folder).
    for prefix in sorted({Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}):
        if any(prefix.is_relative_to(h) for h in hidden):
            args += ["--ro-bind", str(prefix), str(prefix)]
    return [
        *args,
        # At a fixed place: what the program prints (a traceback's paths) is the same each run.
        "--bind", str(workdir), INSIDE,
        "--chdir", INSIDE,
        "--unshare-all",
        "--unshare-user",  # also under root: the code runs as nobody in a namespace of its own
        "--uid", "65534",
        "--gid", "65534",
        "--die-with-parent",
        "--clearenv",
        "--setenv", "PATH", "/usr/bin:/bin",
        "--setenv", "HOME", INSIDE,
    ]  # fmt: skip


def _confine(limits: Limits, procs: Path | None) -> None:
    """In the child, before bwrap: its own process group, the rlimits and the process cap."""
    os.setsid()
    caps = [
        (resource.RLIMIT_CPU, int(limits.timeout_s) + 1),
        (resource.RLIMIT_AS, limits.memory_mb << 20),
        (resource.RLIMIT_FSIZE, limits.output_bytes),
        (resource.RLIMIT_NOFILE, 64),
        (resource.RLIMIT_CORE, 0),
    ]
    if procs is not None:
        procs.write_text(str(os.getpid()))
    else:
        caps.append((resource.RLIMIT_NPROC, _user_processes() + limits.processes))
    for which, value in caps:
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
        with _process_cap(limits.processes) as procs, out_path.open("wb") as out:
            proc = subprocess.Popen(
                [bwrap, *_isolation(workdir), sys.executable, "-I", "main.py"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=functools.partial(_confine, limits, procs),
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
