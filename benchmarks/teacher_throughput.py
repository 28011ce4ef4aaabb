"""Teacher-call throughput: kdata's TeacherPool against the raw ``openai.AsyncOpenAI`` client.

One command: ``python benchmarks/teacher_throughput.py [--requests N] [--concurrency C]``.

The OpenAI stand-in (tests/openai_standin.py) runs in a process of its own and answers every
request after a uniform 200-500 ms delay. Each client then runs in a fresh process of its own, so
that its CPU time (``time.process_time``, every thread of the process) is measured alone:

(a) kdata: ``TeacherPool(teachers, RequestCache(tmp), None)`` with ``max_concurrency=C``, and
    ``await pool.complete("bench", messages, route_key=str(i))`` for N distinct messages;
(b) baseline: ``openai.AsyncOpenAI`` under ``asyncio.Semaphore(C)``, N distinct messages;
(c) for reference only, a floor: bare ``aiohttp`` POSTs and ``json.loads``, same concurrency.

Each client first sends a few warm-up requests (not measured: litellm's first call imports and
builds a great deal). Reported per client: sustained requests/s (N / wall time), client CPU-ms
per request, and the stand-in's CPU-ms per request (to show the server was not the limit); then
the ratios kdata/baseline. Printed as a table and written to
benchmarks/results/teacher_throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "teacher_throughput.json"
KEY_VAR = "KDATA_BENCH_KEY"
LATENCY = (0.2, 0.5)


# ---------------------------------------------------------------------------------------------
# The clients, each run in a process of its own (``--phase``).


async def _run_kdata(base_url: str, n: int, concurrency: int, warmup: int) -> dict:
    from kdata.recipe import Teacher
    from kdata.teachers.cache import RequestCache
    from kdata.teachers.pool import TeacherPool

    teacher = Teacher(
        model="openai/standin-model",
        api_base=base_url,
        api_key="${" + KEY_VAR + "}",
        max_concurrency=concurrency,
        timeout=60.0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        pool = TeacherPool({"bench": teacher}, RequestCache(Path(tmp) / "cache.sqlite"), None)

        async def one(i: int, tag: str) -> bool:
            msgs = [{"role": "user", "content": f"{tag} request {i}: say something"}]
            try:
                c = await pool.complete("bench", msgs, route_key=str(i))
            except Exception:
                return False
            return bool(c.text)

        await asyncio.gather(*(one(i, "warmup") for i in range(warmup)))
        return await _measure(lambda i: one(i, "kdata"), n)


async def _run_openai(base_url: str, n: int, concurrency: int, warmup: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(
        base_url=base_url, api_key=os.environ[KEY_VAR], max_retries=0, timeout=60.0
    )
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int, tag: str) -> bool:
        msgs = [{"role": "user", "content": f"{tag} request {i}: say something"}]
        async with sem:
            try:
                r = await client.chat.completions.create(model="standin-model", messages=msgs)
            except Exception:
                return False
        return bool(r.choices[0].message.content)

    await asyncio.gather(*(one(i, "warmup") for i in range(warmup)))
    out = await _measure(lambda i: one(i, "openai"), n)
    await client.close()
    return out


async def _run_aiohttp(base_url: str, n: int, concurrency: int, warmup: int) -> dict:
    """Reference floor, not the baseline: one bare aiohttp POST and json.loads per request."""
    import aiohttp

    url = base_url + "/chat/completions"
    headers = {"Authorization": "Bearer " + os.environ[KEY_VAR]}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def one(i: int, tag: str) -> bool:
            msgs = [{"role": "user", "content": f"{tag} request {i}: say something"}]
            body = {"model": "standin-model", "messages": msgs}
            try:
                async with session.post(url, json=body) as r:
                    data = await r.json()
            except Exception:
                return False
            return r.status == 200 and bool(data["choices"][0]["message"]["content"])

        await asyncio.gather(*(one(i, "warmup") for i in range(warmup)))
        return await _measure(lambda i: one(i, "aiohttp"), n)


async def _measure(make, n: int) -> dict:
    cpu0, t0 = time.process_time(), time.perf_counter()
    results = await asyncio.gather(*(make(i) for i in range(n)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"wall_s": wall, "cpu_s": cpu, "ok": sum(results), "errors": n - sum(results)}


def _phase(args: argparse.Namespace) -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    run = {"kdata": _run_kdata, "openai": _run_openai, "aiohttp": _run_aiohttp}[args.phase]
    coro = run(args.base_url, args.requests, args.concurrency, args.warmup)
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        out = asyncio.run(coro)
        prof.disable()
        Path(args.profile).parent.mkdir(parents=True, exist_ok=True)
        prof.dump_stats(args.profile)
    else:
        out = asyncio.run(coro)
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------
# The orchestrator.


def _cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) used so far by a process, from /proc (Linux only)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tests" / "openai_standin.py"),
            "--latency",
            str(LATENCY[0]),
            str(LATENCY[1]),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise SystemExit(f"the stand-in did not start: {line!r}")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}/v1"


def _client(phase: str, base_url: str, args: argparse.Namespace, server_pid: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--phase",
        phase,
        "--base-url",
        base_url,
        "--requests",
        str(args.requests),
        "--concurrency",
        str(args.concurrency),
        "--warmup",
        str(args.warmup),
    ]
    if args.profile:
        cmd += ["--profile", str(Path(args.profile).with_suffix(f".{phase}.prof"))]
    env = {
        **os.environ,
        KEY_VAR: "sk-bench-not-a-real-key",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    server_cpu0 = _cpu_s(server_pid)
    out, _ = proc.communicate()
    server_cpu = _cpu_s(server_pid)
    if proc.returncode != 0:
        raise SystemExit(f"{phase} client failed (exit {proc.returncode})")
    res = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
    n = args.requests
    res["requests_per_s"] = n / res["wall_s"]
    res["client_cpu_ms_per_request"] = 1000 * res["cpu_s"] / n
    if server_cpu0 is not None and server_cpu is not None:
        # includes the warm-up and the client's start-up idle time; the server is idle then
        res["server_cpu_ms_per_request"] = 1000 * (server_cpu - server_cpu0) / (n + args.warmup)
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=50, help="unmeasured requests first")
    ap.add_argument("--profile", default=None, help="write cProfile stats to PATH.<client>.prof")
    ap.add_argument("--output", default=str(RESULTS))
    ap.add_argument("--phase", choices=["kdata", "openai", "aiohttp"], help=argparse.SUPPRESS)
    ap.add_argument("--base-url", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase:
        _phase(args)
        return

    server, base_url = _start_server()
    try:
        results = {
            "kdata": _client("kdata", base_url, args, server.pid),
            "openai": _client("openai", base_url, args, server.pid),
            "aiohttp": _client("aiohttp", base_url, args, server.pid),
        }
    finally:
        server.terminate()
        server.wait(10)
    k, b = results["kdata"], results["openai"]
    ratio = {
        "requests_per_s": k["requests_per_s"] / b["requests_per_s"],
        "client_cpu_ms_per_request": k["client_cpu_ms_per_request"]
        / b["client_cpu_ms_per_request"],
    }
    ideal = args.concurrency / (sum(LATENCY) / 2)
    report = {
        "benchmark": "teacher_throughput",
        "requests": args.requests,
        "concurrency": args.concurrency,
        "warmup": args.warmup,
        "latency_s": list(LATENCY),
        "ideal_requests_per_s": ideal,
        "results": results,
        "ratio_kdata_over_openai": ratio,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _print(report)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {out}")


def _print(report: dict) -> None:
    r = report["results"]
    print(
        f"{report['requests']} requests, concurrency {report['concurrency']}, latency "
        f"U{tuple(report['latency_s'])} s (ideal {report['ideal_requests_per_s']:.0f} req/s)"
    )
    head = f"{'client':<14}{'req/s':>10}{'client CPU-ms/req':>20}{'server CPU-ms/req':>20}"
    print(head)
    print("-" * len(head))
    for name, label in (
        ("kdata", "kdata pool"),
        ("openai", "openai raw"),
        ("aiohttp", "aiohttp floor"),
    ):
        x = r[name]
        srv = x.get("server_cpu_ms_per_request")
        print(
            f"{label:<14}{x['requests_per_s']:>10.0f}{x['client_cpu_ms_per_request']:>20.3f}"
            f"{(f'{srv:.3f}' if srv is not None else '-'):>20}"
            + (f"   ({x['errors']} errors)" if x["errors"] else "")
        )
    q = report["ratio_kdata_over_openai"]
    print(
        f"{'kdata/openai':<14}{q['requests_per_s']:>10.2f}x{q['client_cpu_ms_per_request']:>19.2f}x"
    )
    print(
        "(openai raw: the default AsyncOpenAI, i.e. httpx; aiohttp floor: bare aiohttp POSTs, "
        "a lower bound on client cost, not the baseline)"
    )


if __name__ == "__main__":
    main()
