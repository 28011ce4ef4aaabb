"""What the end-of-build diversity report costs, at a baseline commit and in this checkout.

One command: ``python benchmarks/report_cost.py [--rows 100000] [--semantic-rows 1500]
[--embed-sample 300] [--baseline REV]``.

The baseline is ``git archive REV`` unpacked into a temporary folder; each case runs in a fresh
process per checkout (``PYTHONPATH`` at the checkout), one after the other, on the same data:

1. ``curate``: ``--rows`` rows (GSM8K questions, ``../shared/data/gsm8k_train_6000.jsonl`` or
   the 200 of ``recipes/data``, each with a random suffix so that texts differ; a tenth of them
   repeated) through ``seeds -> exact_dedup -> filter (min_words)``, report on: the issue's case.
2. ``rethreshold``: ``--semantic-rows`` rows through ``seeds -> semantic_dedup`` (built first,
   untimed), then ``kdata rethreshold`` of the dedup step to 0.85: the re-cut clusters stored
   neighbours; what is left is the report.
3. ``curate_off`` (this checkout only): case 1 with ``report: {diversity: false}``.

Per case: wall seconds of the build, the seconds its steps took (from their stats), the rest
(``outside``: writing the dataset, the report, the manifest), texts encoded by the embedding
model, and the process's peak RSS. The embedding model runs at about 20 texts/s on the 2 shared
cores this was written on, so the report's embedding sample is cut to ``--embed-sample`` rows
per side in both checkouts (``SAMPLE`` at the baseline, ``EMBED_SAMPLE`` here); the ratio is
what counts. Written to benchmarks/results/report_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CORPUS = [ROOT.parent / "shared" / "data" / "gsm8k_train_6000.jsonl"]
CORPUS.append(ROOT / "recipes" / "data" / "gsm8k_200.jsonl")

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import kdata
import kdata.steps.diversity as diversity
import kdata.steps.semantic as semantic
case, folder, sample = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
# the embedding sample: EMBED_SAMPLE here, SAMPLE (the only sample) at the baseline
setattr(diversity, "EMBED_SAMPLE" if hasattr(diversity, "EMBED_SAMPLE") else "SAMPLE", sample)
encoded = [0]
load = semantic._load_model
def counting(name):
    model = load(name)
    if not getattr(model, "_counted", False):
        encode = model.encode
        def counted(texts, **kw):
            encoded[0] += len(texts)
            return encode(texts, **kw)
        model.encode = counted
        model._counted = True
    return model
semantic._load_model = counting
recipe = kdata.load_recipe(folder / "recipe.yaml")
t0 = time.perf_counter()
if case == "rethreshold":
    from kdata.rethreshold import rethreshold
    run = rethreshold(folder / "run", "dedup", 0.85)
else:
    run = kdata.build(recipe, run_dir=folder / "run")
wall = time.perf_counter() - t0
steps = sum(s.seconds for s in run.steps if not s.reused)
print(json.dumps({
    "wall_s": round(wall, 2), "steps_s": round(steps, 2), "outside_s": round(wall - steps, 2),
    "rows_out": len(run.rows()), "texts_encoded": encoded[0],
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
}))
"""

CURATE = """name: report_cost
steps:
  - {{type: seeds, path: seeds.jsonl}}
  - {{type: exact_dedup, columns: [text]}}
  - {{type: filter, column: text, min_words: 12}}
{extra}"""
SEMANTIC = """name: report_cost
steps:
  - {type: seeds, path: seeds.jsonl}
  - {type: semantic_dedup, name: dedup, columns: [text]}
"""


def corpus(n: int, seed: int = 0) -> list[dict]:
    path = next(p for p in CORPUS if p.exists())
    questions = [json.loads(line)["question"] for line in path.read_text().splitlines() if line]
    rng = random.Random(seed)
    words = ["apples", "boxes", "trains", "hours", "miles", "coins", "pages", "shelves"]
    rows = []
    for i in range(n):
        if i and rng.random() < 0.1:
            rows.append(dict(rows[rng.randrange(len(rows))]))  # an exact repeat
            continue
        q = rng.choice(questions)
        rows.append({"text": f"{q} Count the {rng.choice(words)} ({rng.randrange(10**6)})."})
    return rows


def write(folder: Path, rows: list[dict], recipe: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "seeds.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (folder / "recipe.yaml").write_text(recipe)
    return folder


def child(checkout: Path, case: str, folder: Path, sample: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    out = subprocess.run(
        [sys.executable, "-c", CHILD, case, str(folder), str(sample)],
        env=env,
        cwd=folder,
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise SystemExit(f"{case} at {checkout} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--semantic-rows", type=int, default=1_500)
    ap.add_argument("--embed-sample", type=int, default=300)
    ap.add_argument("--baseline", default="HEAD")
    ap.add_argument("--cases", default="curate,rethreshold,curate_off")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "report_cost.json")
    args = ap.parse_args()
    cases = args.cases.split(",")
    work = Path(tempfile.mkdtemp(prefix="report_cost_"))
    base = work / "baseline"
    tar = subprocess.run(["git", "archive", args.baseline], cwd=ROOT, capture_output=True)
    with tarfile.open(fileobj=BytesIO(tar.stdout)) as archive:
        archive.extractall(base, filter="data")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", args.baseline], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    big, small = corpus(args.rows), corpus(args.semantic_rows, seed=1)
    results: dict[str, dict] = {}
    for case in cases:
        for label, checkout in (("baseline", base), ("this", ROOT)):
            if case == "curate_off" and label == "baseline":
                continue  # the baseline cannot turn the report off
            folder = work / f"{case}_{label}"
            extra = "report: {diversity: false}\n" if case == "curate_off" else ""
            if case == "rethreshold":
                write(folder, small, SEMANTIC)
                child(checkout, "build", folder, args.embed_sample)  # untimed: the first build
            else:
                write(folder, big, CURATE.format(extra=extra))
            t = time.perf_counter()
            results.setdefault(case, {})[label] = child(checkout, case, folder, args.embed_sample)
            print(case, label, results[case][label], f"({time.perf_counter() - t:.0f} s)")
        pair = results[case]
        if "baseline" in pair:
            pair["ratio_outside"] = round(
                pair["this"]["outside_s"] / pair["baseline"]["outside_s"], 3
            )
            pair["ratio_wall"] = round(pair["this"]["wall_s"] / pair["baseline"]["wall_s"], 3)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "baseline": commit,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "rows": args.rows,
        "semantic_rows": args.semantic_rows,
        "embed_sample": args.embed_sample,
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(work)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
