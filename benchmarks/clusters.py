"""Clustering stored neighbours: this checkout's `Neighbours.clusters` against an older commit's.

    python benchmarks/clusters.py NEIGHBOURS.npz --threshold 0.95 [--old c506c2e] [--timeout 600]

``NEIGHBOURS.npz``: the neighbours a near-duplicate step stored in a run directory
(``<run>/neighbours/*.npz``, e.g. of ``benchmarks/scale.py --recipe semantic``). Each side loads
them and clusters them at ``--threshold`` in input order, in a child process (``PYTHONPATH`` its
checkout; the old one a git worktree under /tmp), stopped after ``--timeout`` seconds; its wall
and CPU seconds, and its peak RSS (``os.wait4``: the child's own ``ru_maxrss``) are reported, with
the groups' sizes and whether both sides chose the same kept texts and similarities. Results in
``benchmarks/results/clusters_<name>.json``, ``--name`` (default: the file's stem).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from scale import RESULTS, old_checkout

REPO = Path(__file__).resolve().parent.parent
CHILD = """\
import sys, time
from pathlib import Path
import numpy as np
import kdata
from kdata.steps.clusters import Neighbours
print("kdata from", kdata.__file__, flush=True)
path, threshold, out = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
with np.load(path) as z:
    n = int(z["n"])
graph = Neighbours.load(path, n)
t0 = time.monotonic()
canonical, similarity = graph.clusters(None, threshold)
np.savez(out, canonical=canonical, similarity=similarity, seconds=time.monotonic() - t0)
"""


def side(code: Path, path: Path, threshold: float, out: Path, timeout: float) -> dict:
    """Cluster ``path`` at ``threshold`` with the kdata at ``code`` in a child process."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    args = [sys.executable, "-c", CHILD, str(path), str(threshold), str(out)]
    t0 = time.monotonic()
    proc = subprocess.Popen(args, env=env, cwd=out.parent)  # not this checkout: "" is on sys.path
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    timer.cancel()
    wall = time.monotonic() - t0
    result = {
        "seconds": round(wall, 1),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),  # Linux: kilobytes
    }
    if os.waitstatus_to_exitcode(status) != 0:
        return {"ok": False, "stopped_after_s": timeout, **result}
    with np.load(out) as z:
        result["clustering_seconds"] = round(float(z["seconds"]), 2)
    return {"ok": True, **result}


def groups(path: Path, threshold: float) -> dict:
    """How many texts the pairs at ``threshold`` join, and the largest group's size."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    with np.load(path) as z:
        n, pairs = int(z["n"]), z["pairs"][:, z["similarity"] >= threshold]
    graph = coo_matrix((np.ones(pairs.shape[1]), (pairs[0], pairs[1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    size = np.bincount(label)
    return {"texts_in_groups": int(size[size > 1].sum()), "largest_group": int(size.max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("neighbours", type=Path)
    ap.add_argument("--threshold", type=float, required=True)
    ap.add_argument("--old", default="c506c2e", help="commit of the baseline ('' for none)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--name", help="of the results file (default: the neighbours file's stem)")
    a = ap.parse_args()
    with np.load(a.neighbours) as z:
        n, metric = int(z["n"]), str(z["metric"])
    result = {"texts": n, "metric": metric, "threshold": a.threshold, "cores": os.cpu_count()}
    result |= groups(a.neighbours, a.threshold)
    print(json.dumps(result), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = {"new": Path(tmp) / "new.npz", "old": Path(tmp) / "old.npz"}
        result["new"] = side(REPO, a.neighbours, a.threshold, out["new"], a.timeout)
        print("new", json.dumps(result["new"]), flush=True)
        if a.old:
            code = old_checkout(a.old)
            result["old"] = side(code, a.neighbours, a.threshold, out["old"], a.timeout)
            print("old", json.dumps(result["old"]), flush=True)
        if a.old and result["old"]["ok"] and result["new"]["ok"]:
            new, old = np.load(out["new"]), np.load(out["old"])
            differ = new["similarity"] != old["similarity"]
            result["compare"] = {
                "kept": int((new["canonical"] == np.arange(n)).sum()),
                "same_canonical": bool((new["canonical"] == old["canonical"]).all()),
                "similarities_differing": int(differ.sum()),
                "largest_similarity_difference": float(
                    np.abs(new["similarity"] - old["similarity"]).max(initial=0)
                ),
                "seconds_new_over_old": round(
                    result["new"]["clustering_seconds"] / result["old"]["clustering_seconds"], 4
                ),
                "rss_new_over_old": round(
                    result["new"]["peak_rss_mb"] / result["old"]["peak_rss_mb"], 3
                ),
            }
    RESULTS.mkdir(parents=True, exist_ok=True)
    dest = RESULTS / f"clusters_{a.name or a.neighbours.stem}.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result.get("compare", {})), "written", dest, flush=True)


if __name__ == "__main__":
    main()
