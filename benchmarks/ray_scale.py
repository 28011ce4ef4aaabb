"""Ray against local: a label step on the stand-in and MinHash dedup, side by side.

    python benchmarks/ray_scale.py [--label-rows 10000] [--in-flight 1000] [--minhash-rows 1000000]
        [--label-block-rows 1000] [--minhash-block-rows 10000] [--workloads label minhash]

Starts a two-node Ray cluster on 127.0.0.1 (`ray.cluster_utils.Cluster`, 2 logical CPUs per
node) and the loopback OpenAI stand-in (``tests/openai_standin.py``, a process of its own,
0.2-0.5 s per answer), then builds each recipe twice, each build a child process: with the
local executor, and with ``execution: {executor: ray, address: <the cluster>}`` (2 teacher
workers). For each build: the driver's wall time, CPU time and peak RSS (``os.wait4``), and, for
the Ray build, the CPU seconds and peak RSS (``VmHWM``) of every Ray worker process it used,
and the highest of each part of its RSS (`sample`), sampled from ``/proc`` every 0.2 s, with
the responses each teacher worker stored (its ``cache/<host>-<pid>.sqlite``). Every build's
final dataset is checked to hold the local build's rows. To compare with older code, run this
script from a checkout of it, then from this one: one cluster's worker processes keep the kdata
they first imported, so two versions cannot share it. Results go to
``benchmarks/results/ray_scale.json`` (with fewer ``--workloads``,
``ray_scale_<workloads>.json``).

The recipes: ``label`` is seeds -> label (one teacher, ``max_concurrency`` = ``--in-flight``);
``minhash`` is seeds -> exact_dedup -> minhash_dedup on ``benchmarks/scale.py``'s synthetic
instructions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO / "tests")]
from ray_cluster import descendants, loopback_cluster  # noqa: E402
from scale import write_seeds  # noqa: E402

LABEL = """\
name: label
teachers:
  t:
    model: openai/t
    api_base: http://127.0.0.1:{port}/v1
    api_key: ${{KDATA_TEST_KEY}}
    max_concurrency: {in_flight}
    params: {{temperature: 0, max_tokens: 32, seed: 0}}
steps:
  - {{type: seeds, path: seeds.jsonl}}
  - {{type: label, teacher: t, prompt: "{{{{ instruction }}}}", output: answer}}
execution: {{block_rows: {block_rows}{ray}}}
report: {{diversity: false}}
"""
MINHASH = """\
name: minhash
steps:
  - {{type: seeds, path: seeds.jsonl}}
  - {{type: exact_dedup, columns: [instruction]}}
  - {{type: minhash_dedup, columns: [instruction]}}
execution: {{block_rows: {block_rows}{ray}}}
report: {{diversity: false}}
"""
MEMORY = ("VmHWM", "RssAnon", "RssFile", "RssShmem")
CHILD = "import sys, kdata; kdata.build(kdata.load_recipe(sys.argv[1]), run_dir=sys.argv[2])"


def sample(pid: int) -> tuple[str, float, dict[str, int]] | None:
    """(name, CPU seconds, memory in kB) of a process; None once it is gone. Memory: ``VmHWM``
    (peak RSS) and the RSS now split as ``/proc`` splits it: ``RssAnon`` (the process's own
    heap), ``RssFile`` (mapped files: shared libraries) and ``RssShmem`` (shared memory: Ray's
    object store, mapped into every worker that reads an object from it)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        mem = {
            line.split(":")[0]: int(line.split()[1])
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith(MEMORY)
        }
    except (OSError, IndexError, ValueError):
        return None
    return (cmd, cpu, mem) if len(mem) == len(MEMORY) else None


class Watch:
    """Samples the Ray worker processes and the teacher workers' stores while a build runs."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.first, self.last, self.stored = run_dir, {}, {}, {}
        self.peak: dict[int, dict[str, int]] = {}  # per worker: the highest of each Rss* seen
        self.driver: int | None = None  # the build's pid, once it runs
        self.step_cpu: dict[str, float] = {}  # the driver's CPU seconds when each step ended
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop)

    def _loop(self) -> None:
        while not self.stop.is_set():
            for pid in descendants(os.getpid()):
                s = sample(pid)
                if s is not None and s[0].startswith("ray::"):
                    if pid not in self.first:  # a worker kept from an earlier build: its
                        with contextlib.suppress(OSError):  # peak RSS counts from now
                            Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: VmHWM
                    self.first.setdefault(pid, s)
                    self.last[pid] = s
                    seen = self.peak.setdefault(pid, {})
                    for k, v in s[2].items():
                        seen[k] = max(v, seen.get(k, 0))
            steps = self.run_dir / "steps"
            for stats in sorted(steps.glob("*/stats.json")) if self.driver else []:
                s = sample(self.driver)
                if stats.parent.name not in self.step_cpu and s is not None:
                    self.step_cpu[stats.parent.name] = s[1]
            for p in (self.run_dir / "cache").glob("*.sqlite"):
                try:
                    with sqlite3.connect(p) as db:
                        n = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
                except sqlite3.Error:
                    continue
                self.stored[p.stem] = max(n, self.stored.get(p.stem, 0))
            time.sleep(0.2)

    def result(self) -> dict:
        workers = []
        for pid, (name, cpu, mem) in self.last.items():
            used = cpu - self.first[pid][1]
            peak = self.peak[pid]
            if used >= 0.05:  # the worker processes this build kept busy
                workers.append(
                    {
                        "pid": pid,
                        "name": name,
                        "cpu_seconds": round(used, 1),
                        "peak_rss_mb": round(mem["VmHWM"] / 1024),
                        # the highest sampled of each part of RSS (each peaks on its own)
                        "peak_anon_mb": round(peak["RssAnon"] / 1024),
                        "peak_file_mb": round(peak["RssFile"] / 1024),
                        "peak_shmem_mb": round(peak["RssShmem"] / 1024),
                    }
                )
        ends = sorted(self.step_cpu.items(), key=lambda kv: kv[1])
        driver = {k: round(v - (ends[i - 1][1] if i else 0), 1) for i, (k, v) in enumerate(ends)}
        return {
            "driver_cpu_per_step": driver,
            "workers": sorted(workers, key=lambda w: -w["cpu_seconds"]),
            "stored": self.stored,
        }


def build(recipe: Path, run_dir: Path, on_ray: bool) -> dict:
    """Build ``recipe`` in a child process with this checkout's kdata."""
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    w = Watch(run_dir)
    w.thread.start()
    t0 = time.monotonic()
    # -P: not the working directory first on sys.path, so that PYTHONPATH picks the kdata
    proc = subprocess.Popen([sys.executable, "-P", "-c", CHILD, str(recipe), str(run_dir)], env=env)
    w.driver = proc.pid
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    w.stop.set()
    w.thread.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"build of {recipe} failed")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    out = {
        "seconds": round(wall, 1),
        "driver_cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "driver_peak_rss_mb": round(usage.ru_maxrss / 1024),
        "steps": {s["name"]: s["stats"]["seconds"] for s in manifest["steps"]},
        "rows_out": manifest["steps"][-1]["stats"]["rows_out"],
    }
    out.update(w.result())
    if on_ray:
        out["workers_cpu_seconds"] = round(sum(x["cpu_seconds"] for x in out["workers"]), 1)
    return out


def same_rows(a: Path, b: Path) -> bool:
    import pyarrow.parquet as pq

    def rows(d: Path) -> list:
        return [pq.read_table(p).to_pylist() for p in sorted((d / "data").glob("*.parquet"))]

    return rows(a) == rows(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label-rows", type=int, default=10_000)
    ap.add_argument("--in-flight", type=int, default=1000)
    ap.add_argument("--minhash-rows", type=int, default=1_000_000)
    ap.add_argument("--label-block-rows", type=int, default=1_000)
    ap.add_argument("--minhash-block-rows", type=int, default=10_000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/kdata-ray-scale"))
    ap.add_argument("--workloads", nargs="+", default=["label", "minhash"])
    a = ap.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="kray", dir="/tmp"))
    os.environ["KDATA_TEST_KEY"] = "unused"
    cluster = loopback_cluster(ray_tmp)
    standin = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "openai_standin.py"), "--latency", "0.2", "0.5"],
        stdout=subprocess.PIPE,
        text=True,
    )
    port = int(standin.stdout.readline().split()[1])
    ray_exec = f", executor: ray, address: '{cluster.address}', workers: 2"
    results = {"cores": os.cpu_count(), "cluster": "2 nodes x 2 logical CPUs, loopback"}
    try:
        for name, text, rows, block_rows in (
            ("label", LABEL, a.label_rows, a.label_block_rows),
            ("minhash", MINHASH, a.minhash_rows, a.minhash_block_rows),
        ):
            if name not in a.workloads:
                continue
            folder = a.work / name
            folder.mkdir()
            write_seeds(folder / "seeds.jsonl", rows)
            runs = {}
            builds = [("local", ""), ("ray", ray_exec)]
            for ex, extra in builds:
                recipe = folder / f"{ex}.yaml"
                recipe.write_text(
                    text.format(port=port, in_flight=a.in_flight, block_rows=block_rows, ray=extra)
                )
                runs[ex] = build(recipe, folder / f"run_{ex}", ex != "local")
                print(name, ex, json.dumps({k: v for k, v in runs[ex].items() if k != "workers"}))
            loc = runs["local"]
            runs["rows"] = rows
            runs["same_rows"] = all(
                same_rows(folder / "run_local", folder / f"run_{ex}") for ex, *_ in builds[1:]
            )
            for ex, *_ in builds[1:]:
                on = runs[ex]
                runs[f"{ex}_over_local"] = {
                    "seconds": round(on["seconds"] / loc["seconds"], 2),
                    "cpu_seconds": round(
                        (on["driver_cpu_seconds"] + on["workers_cpu_seconds"])
                        / loc["driver_cpu_seconds"],
                        2,
                    ),
                }
            results[name] = runs
    finally:
        standin.terminate()
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"ray_scale{'' if len(a.workloads) == 2 else '_' + '_'.join(a.workloads)}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
