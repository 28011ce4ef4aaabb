"""The Ray executor on a real two-node Ray cluster on loopback (one for the whole module).

Teachers are the loopback OpenAI stand-in; the cluster is `ray.cluster_utils.Cluster` (a head
and one more node, 2 logical CPUs each, bound to 127.0.0.1), which each build joins through
``execution.address``. Every test compares with, or checks the guarantees of, the local executor.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from openai_standin import Config, StandIn
from ray_cluster import ENV, descendants, loopback_cluster

import kdata
from kdata.blocks import read_dataset, read_table
from kdata.errors import BudgetExceeded, KdataError
from kdata.steps.semantic import MINILM

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs kdata[ray]"),
]

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-kdata-ray-secret-7f3a"


@pytest.fixture(scope="module")
def cluster():
    """A head and a second node on 127.0.0.1, 2 CPUs each; Ray's files in a short temp dir."""
    tmp = Path(tempfile.mkdtemp(prefix="kray", dir="/tmp"))  # Ray's socket paths must be short
    saved = {k: os.environ.get(k) for k in [*ENV, "RAY_TMPDIR"]}
    c = loopback_cluster(tmp)
    c.tmp = tmp
    yield c
    c.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    shutil.rmtree(tmp, ignore_errors=True)


def on_standin(recipe: kdata.Recipe, port: int, **teacher) -> kdata.Recipe:
    """The recipe with every teacher answered by the stand-in at ``port``."""
    for name, t in recipe.teachers.items():
        recipe.teachers[name] = t.model_copy(
            update={
                "model": f"openai/{name}",
                "api_base": f"http://127.0.0.1:{port}/v1",
                "api_key": "${KDATA_TEST_KEY}",
                "cost_per_1k_tokens": None,
                **teacher,
            }
        )
    recipe.report.diversity = False
    recipe.validation = None
    return recipe


def on_ray(recipe: kdata.Recipe, cluster, **execution) -> kdata.Recipe:
    recipe = recipe.model_copy(deep=True)
    recipe.execution = recipe.execution.model_copy(
        update={"executor": "ray", "address": cluster.address, **execution}
    )
    return recipe


def step_tables(run_dir: Path) -> dict:
    """Every step's rows, dropped and failed records and counts, as the run directory has them."""
    out = {}
    for folder in sorted((run_dir / "steps").iterdir()):
        stats = json.loads((folder / "stats.json").read_text())
        out[folder.name] = {
            "counts": {k: stats[k] for k in ("expected", "rows_out", "dropped", "failed")},
            **{
                kind: read_table(folder, kind).to_pylist() for kind in ("rows", "dropped", "failed")
            },
        }
    return out


def dedup_recipe(folder: Path, port: int, n: int, repeats: int = 3, **top) -> kdata.Recipe:
    """Seeds, a label step on the stand-in, a filter, decontamination, exact and MinHash dedup;
    each text is there ``repeats`` times, and texts differ in one word."""
    rows = [
        {"q": f"please tell me about topic {i % (n // repeats)} and its history in region {i % 5}"}
        for i in range(n)
    ]
    (folder / "seeds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = [{"question": f"topic {k} and its history in region {k % 5}"} for k in range(0, n, 7)]
    (folder / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bench))
    extra = "".join(f"{k}: {v}\n" for k, v in top.items())
    text = f"""name: dedup
teachers:
  t:
    model: openai/t
    api_base: http://127.0.0.1:{port}/v1
    api_key: ${{KDATA_TEST_KEY}}
    max_retries: 8
    params: {{temperature: 0, max_tokens: 32, seed: 0}}
    cost_per_1k_tokens: {{input: 1.0, output: 1.0}}
steps:
  - {{type: seeds, path: seeds.jsonl}}
  - {{type: label, teacher: t, prompt: "{{{{ q }}}}", output: a}}
  - {{type: filter, column: a, min_chars: 3}}
  - type: decontaminate
    columns: [q]
    benchmarks: [{{name: bench, path: bench.jsonl, columns: [question]}}]
  - {{type: exact_dedup, columns: [q]}}
  - {{type: minhash_dedup, columns: [q], threshold: 0.6}}
execution: {{block_rows: 25}}
report: {{diversity: false}}
{extra}"""
    return kdata.recipe_from_yaml(text, folder)


def _same_as_local(local: kdata.Run, on: kdata.Run) -> None:
    assert step_tables(on.dir) == step_tables(local.dir)
    assert read_dataset(on.dir).to_pylist() == read_dataset(local.dir).to_pylist()
    assert [(s.requests, round(s.cost_usd, 9)) for s in on.steps] == [
        (s.requests, round(s.cost_usd, 9))
        for s in local.steps  # sums in another order
    ]
    with sqlite3.connect(on.dir / "cache.sqlite") as db:  # the workers' stores, merged
        stored = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    assert stored == sum(s.requests for s in local.steps)
    assert not list((on.dir / "cache").glob("*.sqlite"))


def test_quickstart_on_ray_gives_the_local_rows_on_loopback_only(
    cluster, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("KDATA_TEST_KEY", SECRET)
    with StandIn(Config()) as s:
        recipe = on_standin(kdata.load_recipe(ROOT / "recipes" / "quickstart.yaml"), s.port)
        local = kdata.build(recipe, run_dir=tmp_path / "local")
        run = _built_on_loopback(on_ray(recipe, cluster), tmp_path / "ray")
        assert {r.authorization for r in s.records} == {f"Bearer {SECRET}"}
    _same_as_local(local, run)
    for folder in (cluster.tmp, tmp_path / "ray"):  # Ray's logs and session files, the run
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "gsm8k_cot",
        "curate",
        "expand",
        "preferences",
        "self_instruct",
        "ultrachat",
        "dpo_validate",
        "r1_distill",
        "code_verified",
    ],  # magpie needs a template it can read: a local teacher, not the stand-in
)
def test_every_recipe_gives_the_local_rows_on_ray(cluster, tmp_path: Path, name: str) -> None:
    with StandIn(Config()) as s:
        recipe = on_standin(kdata.load_recipe(ROOT / "recipes" / f"{name}.yaml"), s.port)
        local = kdata.build(recipe, run_dir=tmp_path / "local")
        on = kdata.build(on_ray(recipe, cluster), run_dir=tmp_path / "ray")
    _same_as_local(local, on)


def test_dedup_and_filter_steps_keep_the_local_rows(cluster, tmp_path: Path) -> None:
    with StandIn(Config()) as s:
        recipe = dedup_recipe(tmp_path, s.port, 300)
        local = kdata.build(recipe, run_dir=tmp_path / "local")
        on = kdata.build(on_ray(recipe, cluster), run_dir=tmp_path / "ray")
    tables = step_tables(on.dir)
    assert tables == step_tables(local.dir)
    for step in ("03_decontaminate", "04_exact_dedup", "05_minhash_dedup"):
        assert tables[step]["counts"]["dropped"] > 0, step  # each had work to do


def planted_recipe(folder: Path, n: int, keep: str = "longest") -> kdata.Recipe:
    """Seeds with planted duplicates: exact repeats (case and spacing changed) and near
    repeats (one word more), then exact and MinHash dedup."""
    rows = []
    for i in range(n):
        t = f"record {i // 4} tells of river {i // 4 % 13} and the mill at bend {i // 4 % 7}"
        if i % 4 == 1:
            t = "  " + t.upper()  # an exact duplicate once normalised
        elif i % 4 == 2:
            t += " today"  # a near duplicate, longer
        elif i % 4 == 3:
            t = f"row {i} is unlike the others"
        rows.append({"text": t})
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = f"""name: planted
steps:
  - {{type: seeds, path: rows.jsonl}}
  - {{type: exact_dedup, columns: [text]}}
  - {{type: minhash_dedup, columns: [text], threshold: 0.5, keep: {keep}}}
execution: {{block_rows: 40}}
report: {{diversity: false}}
"""
    return kdata.recipe_from_yaml(text, folder)


def test_planted_duplicates_are_dropped_on_ray_as_locally(cluster, tmp_path: Path) -> None:
    recipe = planted_recipe(tmp_path, 400)
    local = kdata.build(recipe, run_dir=tmp_path / "local")
    on = kdata.build(on_ray(recipe, cluster), run_dir=tmp_path / "ray")
    tables = step_tables(on.dir)
    assert tables == step_tables(local.dir)
    assert tables["01_exact_dedup"]["counts"]["dropped"] == 100  # the planted exact repeats
    assert tables["02_minhash_dedup"]["counts"]["dropped"] >= 100  # and the near ones
    kept = {r["_kdata"]["id"] for r in tables["01_exact_dedup"]["rows"]}
    for d in tables["01_exact_dedup"]["dropped"]:
        detail = json.loads(d["detail"])
        assert detail["similarity"] == 1.0 and detail["duplicate_of"] in kept


def test_the_dedup_decisions_run_in_tasks_on_both_nodes(cluster, tmp_path: Path) -> None:
    import asyncio

    import ray

    from kdata.blocks import input_blocks
    from kdata.executors.local import Blocks, LocalExecutor
    from kdata.executors.ray_executor import _RayBlocks, connect
    from kdata.steps.base import StepContext
    from kdata.steps.dedup import ExactDedupStep, MinHashDedupStep
    from kdata.storage import Files

    kdata.build(planted_recipe(tmp_path, 400), run_dir=tmp_path / "run")
    seeds = tmp_path / "run" / "steps" / "00_seeds"
    ctx = StepContext(name="dedup", base_dir=tmp_path, pool=None)
    local = LocalExecutor(40)
    steps = [ExactDedupStep(columns=["text"]), MinHashDedupStep(columns=["text"], threshold=0.5)]
    connect(cluster.address)
    try:
        for step in steps:
            here = Blocks(local, lambda columns: input_blocks(seeds, 40, columns))
            there = _RayBlocks(seeds, 40, partitions=4, files=Files(str(tmp_path / "run")))
            mine = asyncio.run(step.decide(here, ctx))
            theirs = asyncio.run(step.decide(there, ctx))
            for b in range(10):
                k, ids, sim = mine.of(b).blocks.get(b, ([], [], []))
                k2, ids2, sim2 = theirs.of(b).blocks.get(b, ([], [], []))
                assert (list(k), ids, list(sim)) == (list(k2), ids2, list(sim2)), (step.type, b)
            assert len(there.nodes) == 2, step.type  # the reduce tasks ran on both nodes
    finally:
        ray.shutdown()
        local.close()


def embedding_recipe(folder: Path) -> kdata.Recipe:
    """30 sentences (MiniLM cosine 0.82 at most between two), each also with a word more and a
    word changed (0.95 or more); a benchmark of two of them reworded. Decontamination and dedup
    by MiniLM embeddings (a sentence-transformers model: steps whose `gpu()` is true)."""
    who = "baker sailor neighbour mayor astronomer gardener violinist detective beekeeper "
    who += "librarian pilot chemist shepherd tailor glassblower"
    does = [
        "repairs old clocks in the attic", "counts comets over the harbour",
        "breeds rare orchids each spring", "paints lighthouses along the coast",
        "writes letters about tax reform", "trains falcons on the moor",
        "collects maps of sunken ships", "brews cider from wild apples",
        "studies frogs in the marsh", "restores stained glass windows",
        "teaches chess to prisoners", "grows pumpkins for the fair",
        "builds kites from newspaper", "translates poems from Finnish",
        "carves spoons from cherry wood",
    ]  # fmt: skip
    base = [
        f"the {w} {d}"
        for k in (0, 5)
        for w, d in zip(who.split(), does[k:] + does[:k], strict=True)
    ]
    rows = [{"text": t} for b in base for t in (b, b + " today", b.replace("the ", "that ", 1))]
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = [{"question": base[k].replace(" in ", " up in ")} for k in (0, 8)]
    (folder / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bench))
    text = f"""name: embedding
steps:
  - {{type: seeds, path: rows.jsonl}}
  - type: decontaminate
    method: semantic
    model: {MINILM}
    columns: [text]
    benchmarks: [{{name: bench, path: bench.jsonl, columns: [question]}}]
  - {{type: semantic_dedup, columns: [text], model: {MINILM}}}
execution: {{block_rows: 45}}
report: {{diversity: false}}
"""
    return kdata.recipe_from_yaml(text, folder)


def _actors_seen(build: Callable[[], kdata.Run]) -> tuple[kdata.Run, set[str]]:
    """``build()``'s run, and the names of the Ray processes seen while it ran."""
    names: set[str] = set()
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(run=build()))
    thread.start()
    while thread.is_alive():
        for pid in descendants(os.getpid()):
            with contextlib.suppress(OSError):
                names.add(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode())
        time.sleep(0.1)
    thread.join()
    return box["run"], names


@contextlib.contextmanager
def gpu_node(cluster):
    """One more node on 127.0.0.1 for the test's duration, declaring one logical GPU (there is
    no GPU here: Ray schedules by what a node declares, and torch sees no CUDA)."""
    node = cluster.add_node(num_cpus=2, num_gpus=1, node_ip_address="127.0.0.1")
    try:
        cluster.wait_for_nodes()
        yield node
    finally:
        cluster.remove_node(node)
        cluster.wait_for_nodes()  # gone from the live nodes before the next test counts them


def test_gpu_passes_go_to_the_gpu_node_only_when_the_cluster_has_one(
    cluster, tmp_path: Path, caplog
) -> None:
    """A pass that asks for a GPU (``blocks.map(..., gpu=True)``): on a cluster without GPUs
    nothing asks for one (a request for one would never be scheduled: the pass would hang);
    with a node declaring one, every block runs there, given GPU 0, and the driver warns that
    torch sees no CUDA device on it; a pass that does not ask gets none."""
    import asyncio

    import ray

    from kdata.executors.ray_executor import _RayBlocks, connect
    from kdata.storage import Files

    def probe(block) -> tuple:
        import os

        import ray

        node = ray.get_runtime_context().get_node_id()
        return node, tuple(ray.get_gpu_ids()), os.environ.get("CUDA_VISIBLE_DEVICES")

    def probes(gpu: bool) -> set:
        connect(cluster.address)
        try:
            blocks = _RayBlocks(seeds, 40, 4, Files(str(tmp_path / "run")))
            return set(asyncio.run(blocks.map(probe, gpu=gpu)))
        finally:
            ray.shutdown()

    kdata.build(planted_recipe(tmp_path, 120), run_dir=tmp_path / "run")
    seeds = tmp_path / "run" / "steps" / "00_seeds"
    assert {ids for _, ids, _ in probes(gpu=True)} == {()}
    assert "GPU actors" not in caplog.text
    with gpu_node(cluster) as node:
        assert probes(gpu=True) == {(node.node_id, (0,), "0")}  # the 3 blocks, on its GPU
        assert {ids for _, ids, _ in probes(gpu=False)} == {()}
    assert "1 of 1 GPU actors embed on CPU" in caplog.text


@pytest.mark.slow
def test_embedding_steps_keep_the_local_rows_with_and_without_a_gpu(
    cluster, tmp_path: Path
) -> None:
    """MiniLM decontamination and dedup: the same rows locally, on the cluster (tasks) and
    with a GPU node (its `GpuWorker` actors: the embedding ran there)."""
    recipe = embedding_recipe(tmp_path)
    local = kdata.build(recipe, run_dir=tmp_path / "local")
    on_cpus, seen = _actors_seen(
        lambda: kdata.build(on_ray(recipe, cluster), run_dir=tmp_path / "cpus")
    )
    assert not any("GpuWorker" in n for n in seen)
    with gpu_node(cluster):
        on_gpu, seen = _actors_seen(
            lambda: kdata.build(on_ray(recipe, cluster), run_dir=tmp_path / "gpu")
        )
    assert any("GpuWorker" in n for n in seen)
    tables = step_tables(local.dir)
    assert step_tables(on_cpus.dir) == tables
    assert step_tables(on_gpu.dir) == tables
    assert tables["01_decontaminate"]["counts"]["dropped"] > 0
    assert tables["02_semantic_dedup"]["counts"]["dropped"] > 0


def _listening(pids: set[int]) -> list[str]:
    """The local addresses (hex, as /proc/net/tcp* writes them) that ``pids`` listen on."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:  # it exited meanwhile
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # LISTEN
                out.append(f[1].rsplit(":", 1)[0])
    return out


@pytest.mark.slow
def test_rpm_holds_across_two_workers(cluster, tmp_path: Path) -> None:
    rpm = 1200  # 20 a second, a bucket 20 deep
    with StandIn(Config(latency=0.05)) as s:
        recipe = dedup_recipe(tmp_path, s.port, 300)  # 100 questions
        recipe.teachers["t"] = recipe.teachers["t"].model_copy(update={"rpm": rpm})
        kdata.build(on_ray(recipe, cluster, workers=2), run_dir=tmp_path / "run")
        arrivals = sorted(r.arrival for r in s.records)
    assert len(arrivals) >= 100
    rate = depth = rpm / 60
    for i, t in enumerate(arrivals):  # no second holds more than the bucket allows
        j = next((k for k in range(i, len(arrivals)) if arrivals[k] > t + 1.0), len(arrivals))
        assert j - i <= depth + rate * 1.0
    assert arrivals[-1] - arrivals[0] >= (len(arrivals) - depth) / rate - 0.1


def test_the_budget_holds_across_two_workers(cluster, tmp_path: Path) -> None:
    with StandIn(Config(latency=0.05)) as s:
        recipe = dedup_recipe(tmp_path, s.port, 600, budget_usd=3.0)  # 200 questions
        with pytest.raises(BudgetExceeded):
            kdata.build(on_ray(recipe, cluster, workers=2), run_dir=tmp_path / "run")
        answered = len(s.records)
    with sqlite3.connect(tmp_path / "run" / "cache.sqlite") as db:  # every store, merged
        spent, stored = db.execute("SELECT SUM(cost_usd), COUNT(*) FROM responses").fetchone()
    assert 40 < stored == answered < 200  # the budget stopped the step partway
    assert 3.0 - 0.1 < spent <= 3.0  # and spent it nearly all, never past it


def _built_on_loopback(recipe: kdata.Recipe, run_dir: Path) -> kdata.Run:
    """``recipe`` built, checking while it runs that every process of the cluster, workers
    included, listens on loopback only."""
    loopback = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
    seen: list[str] = []
    box = {}
    build = threading.Thread(target=lambda: box.update(run=kdata.build(recipe, run_dir=run_dir)))
    build.start()
    while build.is_alive():
        seen += _listening(descendants(os.getpid()))
        time.sleep(0.2)
    build.join()
    assert len(seen) > 3  # gcs, raylets, object managers, workers...
    assert set(seen) <= loopback, set(seen) - loopback
    return box["run"]


def test_a_cluster_joined_through_ray_client_gives_the_local_rows(cluster, tmp_path) -> None:
    class Client:  # the head's Ray Client server, ray://127.0.0.1:<port>
        address = cluster.client_address

    with StandIn(Config()) as s:
        # every question once: two workers asking the same one at the same moment both pay
        recipe = dedup_recipe(tmp_path, s.port, 150, repeats=1)
        local = kdata.build(recipe, run_dir=tmp_path / "local")
        s.clear()
        # the Ray Client server's processes for this client listen on loopback too
        on = _built_on_loopback(on_ray(recipe, Client, workers=2), tmp_path / "ray")
    _same_as_local(local, on)


def test_a_run_at_a_url_needs_no_filesystem_the_nodes_share(
    cluster, tmp_path: Path, monkeypatch
) -> None:
    """The driver and each node have stages of their own (the fixture gives each node its
    ``KDATA_STAGE``), as machines with no filesystem in common: the input parts the tasks read
    and the responses the workers stored reach the others through the URL alone."""
    from kdata.steps.semantic import SemanticDedupStep
    from kdata.storage import Remote

    with StandIn(Config()) as s:
        # every question once: a response stored on one node reaches the other at its
        # block's end, so one asked again in a block running meanwhile elsewhere is paid twice
        recipe = dedup_recipe(tmp_path, s.port, 300, repeats=1)
        recipe.steps.append(SemanticDedupStep(columns=["q"], threshold=0.97))  # static model
        local = kdata.build(recipe, run_dir=tmp_path / "local")
        s.clear()
        monkeypatch.setenv("KDATA_STAGE", str(tmp_path / "driver"))
        url = f"file://{tmp_path}/bucket/run"
        on = kdata.build(on_ray(recipe, cluster, workers=2), run_dir=url)
        answered = len(s.records)
    _same_as_local(local, on)  # the workers' responses, every one, in the driver's cache
    assert answered == sum(s.requests for s in local.steps)  # none paid twice
    nodes = [Remote(url, cluster.tmp / n).local for n in ("stage-head", "stage-node")]
    fetched = [p for n in nodes for p in n.glob("steps/*/rows/*.parquet")]
    assert fetched  # the tasks read their blocks from the URL, into their node's stage
    assert [p for n in nodes for p in n.glob("cache/*-*.sqlite")]  # the workers' own stores
    assert [n for n in nodes if (n / "embeddings" / "store.sqlite").exists()]  # embedded there
    assert not [p for n in nodes for p in n.glob("tmp/*/*")]  # their block files: sent, gone
    root = tmp_path / "bucket" / "run"
    assert read_dataset(root).to_pylist() == read_dataset(local.dir).to_pylist()
    assert not [p for p in root.rglob("tmp/**/*") if p.is_file()]  # the scratch, removed
    with sqlite3.connect(root / "cache.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == answered


def test_a_batch_teacher_sends_its_batches_from_the_driver(cluster, tmp_path, monkeypatch) -> None:
    # Its requests are the provider's work: no actor asks them online at twice the price.
    from batch_standin import BatchStandIn
    from batch_standin import Config as BatchConfig

    monkeypatch.setenv("KDATA_TEST_KEY", SECRET)
    (tmp_path / "seeds.jsonl").write_text(
        "".join(json.dumps({"q": f"what is {i} plus {i}?"}) + "\n" for i in range(12))
    )
    with BatchStandIn(BatchConfig(api_key=SECRET, complete_after_s=0.1)) as s:
        text = f"""name: batch-on-ray
teachers:
  t:
    model: openai/standin-model
    api_base: {s.openai_base}
    api_key: ${{KDATA_TEST_KEY}}
    batch: true
    batch_poll_s: 0.05
steps:
  - type: seeds
    path: seeds.jsonl
  - type: label
    teacher: t
    prompt: "{{{{ q }}}}"
execution: {{executor: ray, address: {cluster.address}, block_rows: 5}}
report: {{diversity: false}}
"""
        run = kdata.build(kdata.recipe_from_yaml(text, tmp_path), run_dir=tmp_path / "run")
        assert s.online == [] and len(s.creates) == 3  # one batch per block, none online
        assert sorted(s.custom_ids()) == sorted(set(s.custom_ids()))
    assert len(read_dataset(run.dir)) == 12


def test_more_workers_than_cpus_is_an_error_not_a_hang(cluster, tmp_path: Path) -> None:
    recipe = on_standin(kdata.load_recipe(ROOT / "recipes" / "quickstart.yaml"), 1)
    with pytest.raises(KdataError, match="execution.workers is 5, but the Ray cluster has 4 CPUs"):
        kdata.build(on_ray(recipe, cluster, workers=5), run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "cache.sqlite").exists()


def test_without_ray_the_cli_says_how_to_install_it(tmp_path: Path) -> None:
    hide = tmp_path / "no_ray"
    hide.mkdir()
    (hide / "ray.py").write_text("raise ImportError('hidden by the test')\n")
    (hide / "sitecustomize.py").write_text(
        "import importlib.util as u\n_f = u.find_spec\n"
        "u.find_spec = lambda n, *a: None if n == 'ray' else _f(n, *a)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{hide}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdata.cli",
            "build",
            "recipes/quickstart.yaml",
            "--executor",
            "ray",
            "-o",
            str(tmp_path / "run"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert "pip install 'kdata[ray]'" in res.stderr
    assert "execution.executor" in res.stderr
    assert not (tmp_path / "run").exists()  # nothing written


def _kill_when_stored(folder: Path, at_least: int, stop: threading.Event) -> list[int]:
    """SIGKILL the first worker whose store holds ``at_least`` responses; its pid."""
    killed: list[int] = []
    while not stop.is_set() and not killed:
        for p in (folder / "cache").glob("*.sqlite"):
            try:
                with sqlite3.connect(p) as db:
                    n = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
            except sqlite3.Error:
                continue
            if n >= at_least:
                pid = int(p.stem.rsplit("-", 1)[1])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
        time.sleep(0.05)
    return killed


@pytest.mark.slow
def test_a_worker_killed_mid_step_costs_at_most_its_window(cluster, tmp_path: Path) -> None:
    window = 8  # max_concurrency 16 over 2 workers
    with StandIn(Config(latency=0.05)) as s:
        recipe = dedup_recipe(tmp_path, s.port, 600, repeats=1)  # no request asked twice
        local = kdata.build(recipe, run_dir=tmp_path / "local")
        s.clear()
        stop = threading.Event()
        killed: list[int] = []
        killer = threading.Thread(
            target=lambda: killed.extend(_kill_when_stored(tmp_path / "ray", 60, stop))
        )
        killer.start()
        try:
            on = kdata.build(on_ray(recipe, cluster, workers=2), run_dir=tmp_path / "ray")
        finally:
            stop.set()
            killer.join()
        answered = [r for r in s.records if r.status == 200]
    assert killed, "no worker was killed"
    assert step_tables(on.dir) == step_tables(local.dir)  # every row exactly once, as local
    assert 600 <= len(answered) <= 600 + window


_DRIVER = """
import sys
import kdata
sys.path.insert(0, {tests!r})
from test_ray import dedup_recipe, on_ray
class C: address = {address!r}
recipe = dedup_recipe(__import__("pathlib").Path({folder!r}), {port}, 600, repeats=1)
kdata.build(on_ray(recipe, C, workers=2), run_dir={run!r})
"""


@pytest.mark.slow
def test_a_killed_driver_resumes_from_its_blocks_and_the_stores(cluster, tmp_path: Path) -> None:
    with StandIn(Config(latency=0.05)) as s:
        recipe = dedup_recipe(tmp_path, s.port, 600, repeats=1)
        local = kdata.build(recipe, run_dir=tmp_path / "local")
        s.clear()
        run = tmp_path / "ray"
        code = _DRIVER.format(
            tests=str(ROOT / "tests"),
            address=cluster.address,
            folder=str(tmp_path),
            port=s.port,
            run=str(run),
        )
        driver = subprocess.Popen([sys.executable, "-c", code], env=os.environ.copy())
        try:
            blocks = run / "steps" / "01_label" / "blocks"
            while driver.poll() is None and len(list(blocks.glob("*.json"))) < 6:
                time.sleep(0.05)
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait()
        first = len([r for r in s.records if r.status == 200])
        assert 0 < first < 600
        on = kdata.build(on_ray(recipe, cluster, workers=2), run_dir=run)
        answered = len([r for r in s.records if r.status == 200])
    assert step_tables(on.dir) == step_tables(local.dir)
    assert answered <= 600 + 16  # what the killed driver's workers had in flight, at most


@pytest.mark.slow
def test_a_fault_storm_on_ray_keeps_the_local_rows(cluster, tmp_path: Path) -> None:
    with StandIn(Config(fault_rate=0.3, hang_s=2.0, retry_after_s=0.05)) as s:
        recipe = dedup_recipe(tmp_path, s.port, 300)
        recipe.teachers["t"] = recipe.teachers["t"].model_copy(update={"timeout": 1.0})
        local = kdata.build(recipe, run_dir=tmp_path / "local")
        faults = sum(r.status != 200 for r in s.records)
        s.clear()  # the same faults again: they are decided by body hash and attempt
        on = kdata.build(on_ray(recipe, cluster, workers=2), run_dir=tmp_path / "ray")
    assert faults > 20  # the storm happened
    assert step_tables(on.dir) == step_tables(local.dir)


_LOCAL_INSTANCE = """
import sys
sys.path.insert(0, {tests!r})
import kdata
from test_ray import on_standin
recipe = on_standin(kdata.load_recipe({recipe!r}), {port})
recipe.execution.executor = "ray"
run = kdata.build(recipe, run_dir={run!r})
print("ROWS", run.steps[-1].rows_out)
"""


@pytest.mark.slow
def test_without_an_address_a_local_instance_runs_the_recipe(tmp_path: Path) -> None:
    ray_tmp = Path(tempfile.mkdtemp(prefix="kray", dir="/tmp"))  # socket paths must be short
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}  # the instance's own files go here
    for k in ENV:
        env.pop(k, None)  # the executor sets them itself
    with StandIn(Config()) as s:
        code = _LOCAL_INSTANCE.format(
            tests=str(ROOT / "tests"),
            recipe=str(ROOT / "recipes" / "quickstart.yaml"),
            port=s.port,
            run=str(tmp_path / "run"),
        )
        res = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert len(s.records) == 20
    assert "ROWS 20" in res.stdout
    assert list((ray_tmp / "ray").glob("session_*"))  # Ray ran from RAY_TMPDIR
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_200k_rows_dedup_as_local(cluster, tmp_path: Path) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(5000)]
    base = [" ".join(rng.choice(words, 12)) for _ in range(60_000)]
    rows = []
    for i in range(200_000):
        t = base[i % len(base)].split()
        if i % 3 == 0:
            t[rng.integers(len(t))] = "x"
        rows.append({"text": " ".join(t)})
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = """name: big
steps:
  - {type: seeds, path: rows.jsonl}
  - {type: exact_dedup, columns: [text]}
  - {type: minhash_dedup, columns: [text], threshold: 0.7}
report: {diversity: false}
"""
    recipe = kdata.recipe_from_yaml(text, tmp_path)
    local = kdata.build(recipe, run_dir=tmp_path / "local")
    on = kdata.build(on_ray(recipe, cluster), run_dir=tmp_path / "ray")
    assert read_dataset(on.dir).to_pylist() == read_dataset(local.dir).to_pylist()
    assert step_tables(on.dir) == step_tables(local.dir)  # every step's rows and drops
    assert on.steps[1].dropped > 0 and on.steps[2].dropped > 0
