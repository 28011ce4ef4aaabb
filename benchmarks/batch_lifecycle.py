"""Batch teachers: what a ``batch: true`` build costs on kdata's side, against the same build
online (the baseline), side by side.

One command: ``python benchmarks/batch_lifecycle.py [--rows N]``.

The batch stand-in (tests/batch_standin.py, which also answers ``/v1/chat/completions`` at once)
runs in a process of its own; each build runs in a fresh process, so that its CPU time
(``time.process_time``, every thread) and peak RSS are its own. The recipe: seeds of N questions,
one ``label`` step, ``block_rows: N`` (one block, so one batch), a priced ``openai/`` teacher,
once with ``batch: true`` (polled every 0.2 s, growing) and once without. Reported per mode:
wall seconds of the build, CPU-ms per request, peak RSS, dollars spent; then batch/online
ratios. The stand-in answers a batch 0.5 s after it is created and online requests at once, so
the wall times say nothing about a real provider's (up to 24 h); the CPU, memory and dollar
ratios are the figures. Written to benchmarks/results/batch_lifecycle.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "batch_lifecycle.json"
PRICE = (0.15, 0.6)  # USD per 1k prompt and completion tokens, online


def _recipe(base: str, n: int, batch: bool) -> str:
    return f"""name: bench
teachers:
  t:
    model: openai/standin-model
    api_base: {base}
    api_key: ${{KDATA_BENCH_KEY}}
    max_concurrency: 256
    batch: {"true" if batch else "false"}
    batch_poll_s: 0.2
    cost_per_1k_tokens: {{input: {PRICE[0]}, output: {PRICE[1]}}}
    params: {{temperature: 0.0, max_tokens: 16}}
steps:
  - type: seeds
    path: seeds.jsonl
  - type: label
    teacher: t
    prompt: "Question {{{{ id }}}}: {{{{ question }}}}"
execution: {{block_rows: {n}}}
report: {{diversity: false}}
"""


def _child(base: str, n: int, mode: str) -> None:
    """One build in this process; prints its figures as JSON."""
    import kdata

    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "seeds.jsonl"), "w", encoding="utf-8") as fh:
            for i in range(n):
                fh.write(json.dumps({"id": i, "question": f"what is {i} times {i + 7}?"}) + "\n")
        recipe = kdata.recipe_from_yaml(_recipe(base, n, mode == "batch"), tmp)
        t0, c0 = time.monotonic(), time.process_time()
        run = kdata.build(recipe, run_dir=os.path.join(tmp, "run"))
        wall, cpu = time.monotonic() - t0, time.process_time() - c0
        rows = len(run.rows())
    print(
        json.dumps(
            {
                "mode": mode,
                "rows": rows,
                "wall_s": round(wall, 2),
                "cpu_ms_per_request": round(cpu * 1000 / n, 3),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                "cost_usd": round(run.cost_usd_total, 6),
            }
        )
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--child", nargs=2, metavar=("BASE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args.child[0], args.rows, args.child[1])

    env = {**os.environ, "KDATA_BENCH_KEY": "sk-bench", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    server = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "batch_standin.py"), "--complete-after", "0.5"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        base = f"http://127.0.0.1:{server.stdout.readline().split()[1]}/v1"
        results = {}
        for mode in ("online", "batch"):
            cmd = [sys.executable, __file__, "--rows", str(args.rows), "--child", base, mode]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        server.terminate()
        served = json.loads(server.communicate(timeout=30)[0].strip().splitlines()[-1])
    on, ba = results["online"], results["batch"]
    ratios = {k: round(ba[k] / on[k], 3) for k in ("cpu_ms_per_request", "peak_rss_mb", "cost_usd")}
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "rows": args.rows,
        "online": on,
        "batch": ba,
        "batch_over_online": ratios,
        "standin": served,
    }
    print(f"{'mode':8} {'rows':>7} {'wall s':>8} {'CPU-ms/req':>11} {'peak MB':>8} {'$':>9}")
    for r in (on, ba):
        print(
            f"{r['mode']:8} {r['rows']:>7} {r['wall_s']:>8} {r['cpu_ms_per_request']:>11} "
            f"{r['peak_rss_mb']:>8} {r['cost_usd']:>9}"
        )
    print("batch / online:", ratios, "| stand-in served:", served)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
