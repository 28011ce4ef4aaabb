"""Scale: seeds -> exact_dedup -> minhash_dedup -> filter on synthetic short instructions.

    python benchmarks/scale.py --rows 100000 1000000 [--old COMMIT] [--with-report]
    python benchmarks/scale.py --label 200000 [--old COMMIT]
    python benchmarks/scale.py --recipe semantic --rows 100000 1000000 --old ba56b0b
    python benchmarks/scale.py --recipe report --rows 1000000 --old ba56b0b

For each size, writes ``N`` short instructions (8 to 14 words from a synthetic vocabulary,
seeded) of which 10% are planted near-duplicates of an earlier row (half of them the same text
in capitals, which exact_dedup removes; half the text with one more word, which minhash_dedup
removes), then builds the recipe with this checkout's runner ("new") and, side by side, with the
runner of ``--old`` (default e5177bb, the commit before blocks), checked out as a git worktree.
Each build is a child process; its wall time, per-step seconds (from the run's manifest) and peak
RSS (``os.wait4``, the child's own ``ru_maxrss``) are reported and written to
``benchmarks/results/scale_<N>.json`` (``scale_<N>_report.json`` with ``--with-report``).

``--label N``: seeds -> a ``label`` step over ``N`` short questions instead, its teacher the
loopback OpenAI stand-in (``tests/openai_standin.py``, in this process) answering 8 KB to each
request; results in ``benchmarks/results/scale_label_<N>.json``.

``--url``: the baseline is this checkout's runner with the run directory at a path, and the
other build the same runner at a ``file://`` URL (`kdata.storage`: a stage under the work
folder, the URL kept up to date block by block); results in ``..._url.json``. It measures what
keeping a URL up to date costs, not an object store's network.

``--recipe semantic``: seeds -> ``semantic_dedup`` (the static model) instead; ``--recipe report``:
seeds -> a ``filter`` (min_words: 3) with the final diversity report kept, which measures the
report; results in ``benchmarks/results/scale_<recipe>_<N>.json``.

The final diversity report is left out by default in both (``kdata.steps.diversity.
final_report`` replaced by a no-op in the child): its cost is measured and fixed elsewhere, and
it would hide what this benchmark is about. ``--with-report`` keeps it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
OLD = "e5177bb"
RECIPE = """\
name: scale
execution: {{block_rows: {block_rows}}}
steps:
  - {{type: seeds, path: seeds.jsonl}}
  - {{type: exact_dedup, columns: [instruction]}}
  - {{type: minhash_dedup, columns: [instruction]}}
  - {{type: filter, column: instruction, min_words: 3}}
"""
RECIPES = {
    "curation": RECIPE,
    "semantic": """\
name: scale_semantic
execution: {{block_rows: {block_rows}}}
steps:
  - {{type: seeds, path: seeds.jsonl}}
  - {{type: semantic_dedup, columns: [instruction]}}
""",
    "report": """\
name: scale_report
execution: {{block_rows: {block_rows}}}
steps:
  - {{type: seeds, path: seeds.jsonl}}
  - {{type: filter, column: instruction, min_words: 3}}
""",
}
LABEL_RECIPE = """\
name: scale_label
{execution}teachers:
  t:
    model: openai/m
    api_base: "http://127.0.0.1:{port}/v1"
    api_key: "${{KDATA_BENCH_KEY}}"
    max_concurrency: 64
steps:
  - {{type: seeds, path: seeds.jsonl}}
  - {{type: label, name: answer, teacher: t, prompt: "{{{{ q }}}}"}}
"""
CHILD = """\
import sys, kdata
if sys.argv[3] == "0":
    import kdata.steps.diversity as d
    d.final_report = lambda *a, **k: {}
kdata.build(kdata.load_recipe(sys.argv[1]), run_dir=sys.argv[2])
"""


def write_seeds(path: Path, n: int, seed: int = 0) -> int:
    """``n`` instructions, 10% planted near-duplicates; returns how many were planted."""
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
        for _ in range(5000)
    ]
    texts: list[str] = []
    planted = 0
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            if texts and rng.random() < 0.1:
                base = texts[rng.randrange(len(texts))]
                text = base.upper() if planted % 2 else f"{base} {rng.choice(vocab)}"
                planted += 1
            else:
                words = rng.choices(vocab, k=rng.randint(8, 14))
                text = "Explain " + " ".join(words)
                texts.append(text)
            fh.write(json.dumps({"id": i, "instruction": text}) + "\n")
    return planted


def run(code: Path, recipe: Path, run_dir: Path, report: bool, url: bool = False) -> dict:
    """Build ``recipe`` with the kdata at ``code`` in a child process: wall time, peak RSS.
    ``url``: at ``file://run_dir``, with its stage in ``run_dir.stage``."""
    stage = run_dir.with_name(run_dir.name + ".stage")
    for d in (run_dir, stage):
        shutil.rmtree(d, ignore_errors=True)  # a fresh build, nothing reused
    env = {**os.environ, "PYTHONPATH": str(code), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    env["KDATA_STAGE"] = str(stage)
    where = f"file://{run_dir}" if url else str(run_dir)
    args = [sys.executable, "-c", CHILD, str(recipe), where, "1" if report else "0"]
    t0 = time.monotonic()
    proc = subprocess.Popen(args, env=env, cwd=recipe.parent)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        return {"ok": False, "exit": proc.returncode, "seconds": round(wall, 1)}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    steps = {s["name"]: s["stats"] for s in manifest["steps"]}
    return {
        "ok": True,
        "seconds": round(wall, 1),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),  # Linux: kilobytes
        "steps": {
            n: {"seconds": s["seconds"], "rows_out": s["rows_out"]} for n, s in steps.items()
        },
        "rows_out": list(steps.values())[-1]["rows_out"],
    }


def final_ids(run_dir: Path) -> list[str]:
    """The row ids of a run's final dataset, in order (every shard)."""
    import pyarrow.parquet as pq

    ids: list[str] = []
    for shard in sorted((run_dir / "data").glob("train-*.parquet")):
        prov = pq.read_table(shard, columns=["_kdata"]).column("_kdata").combine_chunks()
        ids += prov.field("id").to_pylist()
    return ids


def old_checkout(commit: str) -> Path:
    """A git worktree of ``commit`` (made once, under /tmp)."""
    path = Path(f"/tmp/kdata-{commit}")
    if not path.exists():
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(path), commit], cwd=REPO, check=True
        )
    return path


def compare(
    n: int, work: Path, recipe: str, old_commit: str, report: bool, result: dict, url: bool = False
) -> None:
    """Build ``recipe`` (with ``execution``) with this checkout and, without it, with
    ``old_commit``'s runner (``url``: with this checkout at a URL); record both and their
    ratios in ``result`` ("old" is the baseline)."""
    (work / "recipe.yaml").write_text(recipe)
    old_recipe = [line for line in recipe.splitlines() if not line.startswith("execution")]
    (work / "recipe_old.yaml").write_text("\n".join(old_recipe) + "\n")
    result["new"] = run(REPO, work / "recipe.yaml", work / "run_new", report, url=url)
    print(n, "new at a URL" if url else "new", json.dumps(result["new"]), flush=True)
    if url:  # the baseline: the same runner at a path
        old = run(REPO, work / "recipe.yaml", work / "run_old", report)
    elif not old_commit:
        return
    else:
        old = run(old_checkout(old_commit), work / "recipe_old.yaml", work / "run_old", report)
    result["old"] = old
    print(n, "old", json.dumps(old), flush=True)
    if old["ok"] and result["new"]["ok"]:
        result["ratio"] = {
            "seconds_new_over_old": round(result["new"]["seconds"] / old["seconds"], 3),
            "cpu_new_over_old": round(result["new"]["cpu_seconds"] / old["cpu_seconds"], 3),
            "rss_new_over_old": round(result["new"]["peak_rss_mb"] / old["peak_rss_mb"], 3),
            "same_ids_in_order": final_ids(work / "run_new") == final_ids(work / "run_old"),
        }


def label(n: int, block_rows: int, old_commit: str, base: Path, url: bool = False) -> None:
    """The label benchmark: ``n`` questions, each answered 8 KB by the stand-in."""
    sys.path.insert(0, str(REPO / "tests"))
    from openai_standin import Config, StandIn

    work = base / f"label_{n}"
    work.mkdir(parents=True, exist_ok=True)
    with (work / "seeds.jsonl").open("w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": i, "q": f"What is {i} plus {i}?"}) + "\n")
    os.environ["KDATA_BENCH_KEY"] = "sk-bench"  # the stand-in ignores it
    answer = ("All work and no play makes a dull teacher. " * 200)[:8192]
    with StandIn(Config(reply=lambda body: answer), keep_bodies=False) as standin:
        execution = f"execution: {{block_rows: {block_rows}}}\n"
        recipe = LABEL_RECIPE.format(execution=execution, port=standin.port)
        result = {"rows": n, "response_bytes": len(answer), "block_rows": block_rows}
        result["cores"] = os.cpu_count()
        compare(n, work, recipe, old_commit, False, result, url)
        result["requests_served"] = len(standin.records)
    out = RESULTS / f"scale_label_{n}{'_url' if url else ''}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("written", out, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[])
    ap.add_argument("--label", type=int, help="rows of the label benchmark instead")
    ap.add_argument("--block-rows", type=int, default=10_000)
    ap.add_argument("--old", default=OLD, help="commit of the baseline runner ('' for none)")
    ap.add_argument("--with-report", action="store_true", help="keep the diversity report")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="curation")
    ap.add_argument("--url", action="store_true", help="at a file:// URL, against a path")
    ap.add_argument("--work", type=Path, default=Path("/tmp/kdata-scale"))
    a = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if a.label:
        label(a.label, a.block_rows, a.old, a.work, a.url)
    for n in a.rows or ([] if a.label else [100_000]):
        work = a.work / str(n)
        work.mkdir(parents=True, exist_ok=True)
        planted = write_seeds(work / "seeds.jsonl", n)
        report = a.with_report or a.recipe == "report"
        result = {
            "recipe": a.recipe,
            "rows": n,
            "planted_near_duplicates": planted,
            "block_rows": a.block_rows,
            "diversity_report": report,
            "cores": os.cpu_count(),
        }
        recipe = RECIPES[a.recipe].format(block_rows=a.block_rows)
        compare(n, work, recipe, a.old, report, result, a.url)
        name = f"{n}{'_report' if a.with_report else ''}"
        name = name if a.recipe == "curation" else f"{a.recipe}_{n}"
        out = RESULTS / f"scale_{name}{'_url' if a.url else ''}.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print("written", out, flush=True)


if __name__ == "__main__":
    main()
