"""The sandbox against hostile code: each escape it must stop, tried for real in bubblewrap."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from kdata import sandbox
from kdata.sandbox import Limits, SandboxUnavailable, run_python

QUICK = Limits(timeout_s=3)

if shutil.which("bwrap") is None and not os.environ.get("CI"):
    pytest.skip(
        "bubblewrap is not installed (apt-get install bubblewrap); CI installs it",
        allow_module_level=True,
    )


def test_a_passing_and_a_failing_program() -> None:
    ok = run_python("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('fine')")
    assert ok.passed and ok.reason == "passed" and ok.output == "fine\n"
    bad = run_python("assert sum([1, 2]) == 4, 'wrong sum'")
    assert not bad.passed and bad.reason == "failed" and "AssertionError: wrong sum" in bad.output


@pytest.mark.parametrize(
    "code",
    ["while True:\n    pass", "import time\ntime.sleep(60)"],
    ids=["busy loop", "sleep"],
)
def test_a_program_that_never_ends_is_stopped(code: str) -> None:
    out = run_python(code, QUICK)
    assert not out.passed and out.reason in {"timeout", "cpu_limit"}


def test_a_fork_bomb_is_contained_and_leaves_nothing_behind() -> None:
    bomb = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    before = sandbox._user_processes()
    out = run_python(bomb, QUICK)
    assert not out.passed and out.reason == "timeout"
    assert sandbox._user_processes() <= before + 5  # no survivor keeps forking


def test_the_process_cap_holds() -> None:
    # Children that sleep: the parent counts how many forks succeed before one is refused.
    code = (
        "import os, time\n"
        "n = 0\n"
        "while n < 1000:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30)\n"
        "            os._exit(0)\n"
        "    except OSError:\n"
        "        break\n"
        "    n += 1\n"
        "print(n)\n"
    )
    out = run_python(code, Limits(timeout_s=5, processes=16))
    assert out.passed, out.output
    assert 0 < int(out.output) < 16


def test_writing_outside_its_folder_fails_and_tmp_is_private() -> None:
    target = Path(__file__).parent / "written-by-sandboxed-code.txt"
    out = run_python(f"open({str(target)!r}, 'w').write('x')", QUICK)
    escaped = target.exists()
    target.unlink(missing_ok=True)
    # Refused as read-only, or not there at all (a checkout under /tmp is behind the tmpfs).
    refused = "Read-only file system" in out.output or "No such file or directory" in out.output
    assert not out.passed and refused and not escaped
    out = run_python("open('/tmp/kdata-escape', 'w').write('x')\nopen('here.txt', 'w')", QUICK)
    assert out.passed and not Path("/tmp/kdata-escape").exists()


def test_no_network_even_to_loopback() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        out = run_python(code, QUICK)
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):  # the kernel queued no connection from the code
            server.accept()
    assert not out.passed and "Connection refused" in out.output


def test_secrets_do_not_reach_the_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-kdataSandboxSentinel")
    # A home outside /tmp (which the sandbox replaces anyway), holding a token file.
    home = Path(tempfile.mkdtemp(prefix=".sandbox-home-", dir=Path(__file__).parent))
    (home / ".cache" / "huggingface").mkdir(parents=True)
    (home / ".cache" / "huggingface" / "token").write_text("hf_kdataSandboxSentinel")
    monkeypatch.setenv("HOME", str(home))
    code = (
        "import os, pathlib\n"
        "print(sorted(os.environ))\n"
        f"p = pathlib.Path({str(home)!r})\n"
        "print(sorted(str(f) for f in p.rglob('*')))\n"
    )
    try:
        out = run_python(code, QUICK)
    finally:
        shutil.rmtree(home)
    assert out.passed, out.output
    assert "Sentinel" not in out.output and "OPENAI_API_KEY" not in out.output
    assert out.output.splitlines()[1] == "[]"  # the home folder is an empty tmpfs


def test_output_and_memory_are_capped() -> None:
    flood = run_python("while True:\n    print('x' * 1000)", Limits(timeout_s=3, output_bytes=4096))
    assert not flood.passed and flood.reason == "output_limit" and len(flood.output) <= 4096
    big = run_python("b = bytearray(8 << 30)", Limits(timeout_s=3, memory_mb=512))
    assert not big.passed and "MemoryError" in big.output


def test_without_bubblewrap_it_refuses_to_run(monkeypatch: pytest.MonkeyPatch) -> None:
    sandbox._bwrap.cache_clear()
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    try:
        with pytest.raises(SandboxUnavailable, match="install bubblewrap"):
            run_python("print('never')")
    finally:
        sandbox._bwrap.cache_clear()
