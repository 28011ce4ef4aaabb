"""Teacher-call throughput: kdata's TeacherPool on both its paths, the OpenAI SDK, bare HTTP.

One command: ``nice -n 10 python benchmarks/teacher_throughput.py [--requests N]
[--concurrency C] [--rounds R] [--clients a,b,...]``.

The OpenAI stand-in (tests/openai_standin.py) runs in a process of its own and answers every
request after a uniform 200-500 ms delay. Each client then runs in a fresh process of its own, so
that its CPU time (``time.process_time``, every thread of the process) is measured alone:

- ``kdata-fast``: ``TeacherPool`` with an ``openai/`` teacher at ``max_concurrency=C``,
  ``client: auto`` (kdata's own aiohttp client), ``await pool.complete(...)`` for N distinct
  messages, each stored in the cache as it arrives;
- ``kdata-litellm``: the same with ``client: litellm``;
- ``openai``: ``openai.AsyncOpenAI`` (its default httpx client) under ``asyncio.Semaphore(C)``;
- ``aiohttp``: the floor: bare aiohttp POSTs and ``json.loads``, same concurrency;
- ``httpx``: the same floor over httpx, to choose the fast path's HTTP client.

Each client first sends a few warm-up requests (not measured: litellm's first call imports and
builds a great deal). The clients run in R interleaved rounds (the order rotates each round), so
that a machine shared with other work loads them alike; reported per client are the medians over
the rounds of sustained requests/s (N / wall time), client CPU-ms per request, the stand-in's
CPU-ms per request (to show the server was not the limit) and the client's peak RSS; then the
ratios to the aiohttp floor, and the 1-minute load average seen between runs. Printed as a table
and written to benchmarks/results/teacher_throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
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


async def _run_kdata(base_url: str, n: int, concurrency: int, warmup: int, client: str) -> dict:
    from kdata.recipe import Teacher
    from kdata.teachers.cache import RequestCache
    from kdata.teachers.pool import TeacherPool

    teacher = Teacher(
        model="openai/standin-model",
        api_base=base_url,
        api_key="${" + KEY_VAR + "}",
        max_concurrency=concurrency,
        timeout=60.0,
        client=client,
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
        out = await _measure(lambda i: one(i, "kdata"), n)
        await pool.aclose()
        return out


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


async def _run_httpx(base_url: str, n: int, concurrency: int, warmup: int) -> dict:
    """The same floor over httpx (what the OpenAI SDK uses), to choose the fast path's client."""
    import httpx

    url = base_url + "/chat/completions"
    headers = {"Authorization": "Bearer " + os.environ[KEY_VAR]}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, headers=headers, timeout=60.0) as session:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int, tag: str) -> bool:
            msgs = [{"role": "user", "content": f"{tag} request {i}: say something"}]
            body = {"model": "standin-model", "messages": msgs}
            async with sem:
                try:
                    r = await session.post(url, json=body)
                    data = r.json()
                except Exception:
                    return False
            return r.status_code == 200 and bool(data["choices"][0]["message"]["content"])

        await asyncio.gather(*(one(i, "warmup") for i in range(warmup)))
        return await _measure(lambda i: one(i, "httpx"), n)


async def _measure(make, n: int) -> dict:
    cpu0, t0 = time.process_time(), time.perf_counter()
    results = await asyncio.gather(*(make(i) for i in range(n)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "ok": sum(results),
        "errors": n - sum(results),
        "peak_rss_mib": rss_mib,
    }


CLIENTS = {
    "kdata-fast": lambda *a: _run_kdata(*a, client="auto"),
    "kdata-litellm": lambda *a: _run_kdata(*a, client="litellm"),
    "openai": _run_openai,
    "aiohttp": _run_aiohttp,
    "httpx": _run_httpx,
}
LABELS = {
    "kdata-fast": "kdata (fast path, client: auto)",
    "kdata-litellm": "kdata (client: litellm)",
    "openai": "openai.AsyncOpenAI (httpx)",
    "aiohttp": "bare aiohttp (the floor)",
    "httpx": "bare httpx",
}
FLOOR = "aiohttp"


def _phase(args: argparse.Namespace) -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    run = CLIENTS[args.phase]
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
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported")
    ap.add_argument(
        "--clients", default=",".join(CLIENTS), help="comma-separated, of " + ", ".join(CLIENTS)
    )
    ap.add_argument("--warmup", type=int, default=50, help="unmeasured requests first")
    ap.add_argument("--profile", default=None, help="write cProfile stats to PATH.<client>.prof")
    ap.add_argument("--output", default=str(RESULTS))
    ap.add_argument("--phase", choices=list(CLIENTS), help=argparse.SUPPRESS)
    ap.add_argument("--base-url", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase:
        _phase(args)
        return
    clients = args.clients.split(",")
    unknown = set(clients) - set(CLIENTS)
    if unknown:
        raise SystemExit(f"unknown clients: {sorted(unknown)}; choose from {list(CLIENTS)}")

    server, base_url = _start_server()
    runs: dict[str, list[dict]] = {c: [] for c in clients}
    load = []
    try:
        for r in range(args.rounds):
            order = clients[r % len(clients) :] + clients[: r % len(clients)]  # rotate the order
            for c in order:
                load.append(os.getloadavg()[0])
                runs[c].append(_client(c, base_url, args, server.pid))
                print(f"round {r + 1} {c}: {_line(runs[c][-1])}", flush=True)
            load.append(os.getloadavg()[0])
    finally:
        server.terminate()
        server.wait(10)
    medians = {c: _medians(rs) for c, rs in runs.items()}
    report = {
        "benchmark": "teacher_throughput",
        "requests": args.requests,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "latency_s": list(LATENCY),
        "ideal_requests_per_s": args.concurrency / (sum(LATENCY) / 2),
        "medians": medians,
        "ratios_over_floor": _ratios(medians, FLOOR) if FLOOR in medians else None,
        "runs": runs,
        "load_average_1min": {
            "min": min(load),
            "median": statistics.median(load),
            "max": max(load),
        },
        "niceness": os.nice(0),
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


METRICS = (
    "requests_per_s",
    "client_cpu_ms_per_request",
    "server_cpu_ms_per_request",
    "peak_rss_mib",
)


def _medians(rs: list[dict]) -> dict:
    out = {m: statistics.median(r[m] for r in rs) for m in METRICS if all(m in r for r in rs)}
    out["errors"] = sum(r["errors"] for r in rs)
    return out


def _ratios(medians: dict, floor: str) -> dict:
    f = medians[floor]
    return {
        c: {
            "requests_per_s": m["requests_per_s"] / f["requests_per_s"],
            "client_cpu_ms_per_request": m["client_cpu_ms_per_request"]
            / f["client_cpu_ms_per_request"],
        }
        for c, m in medians.items()
    }


def _line(x: dict) -> str:
    return (
        f"{x['requests_per_s']:.0f} req/s, {x['client_cpu_ms_per_request']:.3f} CPU-ms/req, "
        f"{x['peak_rss_mib']:.0f} MiB" + (f", {x['errors']} errors" if x["errors"] else "")
    )


def _print(report: dict) -> None:
    load = report["load_average_1min"]
    print(
        f"\n{report['requests']} requests, concurrency {report['concurrency']}, latency "
        f"U{tuple(report['latency_s'])} s (ideal {report['ideal_requests_per_s']:.0f} req/s), "
        f"medians of {report['rounds']} interleaved rounds; 1-min load average "
        f"{load['min']:.1f}-{load['max']:.1f} (median {load['median']:.1f}) on "
        f"{report['machine']['cpus']} CPUs"
    )
    head = (
        f"{'client':<34}{'req/s':>8}{'CPU-ms/req':>12}{'srv CPU-ms':>12}{'peak MiB':>10}"
        f"{'req/s vs floor':>16}{'CPU vs floor':>14}"
    )
    print(head)
    print("-" * len(head))
    ratios = report["ratios_over_floor"] or {}
    for name, x in report["medians"].items():
        q = ratios.get(name)
        srv = x.get("server_cpu_ms_per_request")
        print(
            f"{LABELS[name]:<34}{x['requests_per_s']:>8.0f}{x['client_cpu_ms_per_request']:>12.3f}"
            f"{(f'{srv:.3f}' if srv is not None else '-'):>12}{x['peak_rss_mib']:>10.0f}"
            + (
                f"{q['requests_per_s']:>15.2f}x{q['client_cpu_ms_per_request']:>13.2f}x"
                if q
                else ""
            )
            + (f"   ({x['errors']} errors)" if x["errors"] else "")
        )


if __name__ == "__main__":
    main()
