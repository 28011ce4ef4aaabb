"""Publishing: the dataset card of real runs, the Hub-layout folder, and `kdata push`.

Every run here is a real build (the quickstart on the embedded SmolLM2 teacher, and a seeds run
through dedup, filter and decontamination steps). Pushes go through the real ``HfApi`` to
``tests/hub_standin.py``, a loopback fake of the Hub written to the client's contract, on
127.0.0.1 only: nothing here can reach the real Hub (``HF_HUB_OFFLINE`` stays set outside the
``hub`` fixture, and the fixture points ``HF_ENDPOINT`` at the stand-in).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from hub_standin import HubStandIn, card_metadata_errors

import kdata
from kdata.errors import KdataError, RecipeError
from kdata.publish import push, write_folder
from kdata.publish.card import METHODS, method_of, provider

# huggingface_hub's LFS upload passes its file to httpx as data=, which httpx deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
SEED_TASKS = ROOT / "recipes" / "data" / "seed_tasks.jsonl"
SENTINEL = "hf_kdataSentinelToken0123456789abcdef"
SECTIONS = [
    "How it was made",
    "Teachers",
    "Methods",
    "The recipe",
    "From generated rows to the dataset",
    "Diversity",
    "Validation",
    "Sample rows",
    "Cost and tokens",
    "License and terms of use",
    "Limitations",
    "Reproduce",
]

CURATED = """\
name: curated
steps:
  - type: seeds
    path: {seeds}
  - type: exact_dedup
    columns: [name]
    strip_punctuation: true
  - type: minhash_dedup
    columns: [instruction]
    shingle: char
    ngram: 4
    threshold: 0.5
  - type: filter
    column: instruction
    min_words: {min_words}
    max_chars: 250
  - type: decontaminate
    columns: [instruction]
    benchmarks:
      - {{name: bench, path: bench.jsonl, columns: [question], id_column: id}}
publish:
  dir: {publish_dir}
  license: apache-2.0
  description: Self-Instruct seed tasks, deduplicated, filtered and decontaminated.
  tags: [instructions]
"""


def build_curated(folder: Path, min_words: int = 6) -> kdata.Run:
    """A real build: 175 seed tasks through exact and MinHash dedup, a filter, decontamination."""
    folder.mkdir(parents=True, exist_ok=True)
    seeds = [json.loads(line) for line in SEED_TASKS.read_text().splitlines()]
    bench = [r for r in seeds if r["id"] in ("seed_task_0", "seed_task_9", "seed_task_13")]
    (folder / "bench.jsonl").write_text(
        "".join(json.dumps({"id": r["id"], "question": r["instruction"]}) + "\n" for r in bench)
    )
    text = CURATED.format(seeds=SEED_TASKS, min_words=min_words, publish_dir=folder / "published")
    (folder / "recipe.yaml").write_text(text)
    return kdata.build(kdata.load_recipe(folder / "recipe.yaml"), run_dir=folder / "run")


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> kdata.Run:
    return build_curated(tmp_path_factory.mktemp("curated"))


@pytest.fixture(scope="module")
def curated_b(tmp_path_factory) -> kdata.Run:
    """The same recipe with another filter threshold: different rows, so a different push."""
    return build_curated(tmp_path_factory.mktemp("curated_b"), min_words=10)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> kdata.Run:
    """The quickstart recipe as shipped, on the embedded SmolLM2 teacher (about 30 s)."""
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    return kdata.build(kdata.load_recipe(ROOT / "recipes" / "quickstart.yaml"), run_dir=run_dir)


def loopback_only(request) -> None:
    """An httpx request hook: anything but 127.0.0.1 fails the test before it is sent."""
    assert request.url.host == "127.0.0.1", f"request to {request.url} in a test"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    """The Hub stand-in on 127.0.0.1, with offline mode and Xet off for the client, whose HTTP
    session refuses any other host."""
    import huggingface_hub.constants as constants
    from huggingface_hub.utils import _http

    def client():
        # huggingface_hub's own client (httpx in 1.x, httpx2 in 2.x), so that its error
        # handling sees the HTTP library it expects; only the loopback guard is added.
        c = _http.default_client_factory()
        c.event_hooks = {**c.event_hooks, "request": [loopback_only, *c.event_hooks["request"]]}
        return c

    with HubStandIn(token=SENTINEL) as h:
        assert urlsplit(h.url).hostname == "127.0.0.1"
        monkeypatch.setenv("HF_TOKEN", SENTINEL)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        _http.set_client_factory(client)
        try:
            yield h
        finally:
            _http.set_client_factory(_http.default_client_factory)


def headings(card: str) -> list[str]:
    return re.findall(r"^#{2,3} (.+)$", card, flags=re.M)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def download(hub: HubStandIn, repo_id: str, dest: Path) -> Path:
    """Every file of a repository, through the real client (list_repo_files, hf_hub_download)."""
    from huggingface_hub import HfApi, hf_hub_download

    for f in HfApi(endpoint=hub.url).list_repo_files(repo_id, repo_type="dataset"):
        hf_hub_download(repo_id, f, repo_type="dataset", local_dir=dest, endpoint=hub.url)
    return dest


def load(folder: Path, tmp_path: Path):
    """``datasets.load_dataset(folder)``, with a cache of its own: datasets keys its cache of a
    local folder by the folder's name and the files' mtimes, so two test folders could meet."""
    import datasets

    return datasets.load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "cache"))


def assert_no_token(*places: Path | dict) -> None:
    for place in places:
        items = folder_bytes(place).items() if isinstance(place, Path) else place.items()
        for name, data in items:
            assert SENTINEL.encode() not in data, name


def png() -> bytes:
    """A real 1x1 PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
        + chunk(b"IEND", b"")
    )


# --- the card ------------------------------------------------------------------------------


def test_card_of_the_quickstart_tells_how_it_was_made(quickstart, tmp_path) -> None:
    from huggingface_hub import DatasetCard

    files = write_folder(quickstart.dir, tmp_path / "pub", repo_id="alice/qs")
    diversity = [f"diversity/{p.name}" for p in (quickstart.dir / "diversity").glob("*.*")]
    assert "diversity/report.json" in diversity  # every build writes its diversity report
    assert sorted(files) == sorted(
        [
            "README.md",
            "data/train-00000-of-00001.parquet",
            "kdata/recipe.yaml",
            "kdata/stats.json",
            *diversity,
        ]
    )
    text = (tmp_path / "pub" / "README.md").read_text()
    assert card_metadata_errors(text) == []
    card = DatasetCard.load(tmp_path / "pub" / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "other"  # the quickstart sets none
    assert meta["size_categories"] == ["n<1K"] and meta["language"] == ["en"]
    assert meta["task_categories"] == ["text-generation"]
    assert meta["tags"] == ["synthetic", "distillation", "kdata"]
    assert meta["configs"] == [
        {
            "config_name": "default",
            "data_files": [{"split": "train", "path": "data/train-*.parquet"}],
        }
    ]
    assert [h for h in headings(text) if h in SECTIONS] == SECTIONS

    manifest = json.loads((quickstart.dir / "manifest.json").read_text())
    # Teachers, their parameters, the method and its citation.
    assert re.search(r"\| smol \| `local/smollm2-135m-instruct` \| kdata's embedded", text)
    assert '`{"max_tokens": 128, "seed": 0, "temperature": 0.7}`' in text
    assert "| 01_label | `label` | Labeling: a teacher answers each row | Xu et al. 2024 |" in text
    assert "https://arxiv.org/abs/2402.13116" in text
    # The recipe itself, embedded.
    block = re.search(r"```yaml\n(.*?)\n```", text, flags=re.S).group(1)
    assert yaml.safe_load(block) == {k: v for k, v in manifest["recipe"].items() if k != "output"}
    # The waterfall, from the steps' own stats.
    label = next(s["stats"] for s in manifest["steps"] if s["name"] == "01_label")
    assert "| 00_seeds | `seeds` | 0 | 20 | 0 | - | 0 | - |" in text
    assert f"| 01_label | `label` | 20 | {label['rows_out']} | 0 | - | {label['failed']} |" in text
    assert f"**{quickstart.steps[-1].rows_out} rows** in the dataset." in text
    # Sample rows are the dataset's first rows.
    rows = quickstart.rows()
    assert json.dumps(rows[0]["response"][:600], ensure_ascii=False) in text.replace("…", "")
    # Token totals are the cache's.
    tot = manifest["teachers"]["smol"]
    assert (
        f"| smol | `local/smollm2-135m-instruct` | {tot['responses']} | {tot['prompt_tokens']:,} "
        f"| {tot['completion_tokens']:,} | {tot['cost_usd']:.4f} |"
    ) in text
    # License warning names who served the teacher; limitations; absent sections say so.
    assert "served by: kdata's embedded SmolLM2-135M-Instruct" in text
    assert "135M parameters" in text and "No deduplication step ran" in text
    diversity = json.loads((quickstart.dir / "diversity" / "report.json").read_text())
    assert f"Measured on the `{diversity['text_column']}` column" in text
    assert "No SFT validation ran for this dataset." in text
    assert "hf download alice/qs kdata/recipe.yaml --repo-type dataset" in text
    assert "`data/seed_tasks.jsonl`" in text
    # The folder loads with datasets to exactly the run's rows.
    ds = load(tmp_path / "pub", tmp_path)
    assert ds.to_list() == rows


def test_build_writes_the_publish_dir_and_its_card_has_the_waterfall(curated, tmp_path) -> None:
    from huggingface_hub import DatasetCard

    folder = curated.dir.parent / "published"  # publish.dir in the recipe
    text = (folder / "README.md").read_text()
    card = DatasetCard.load(folder / "README.md")
    assert card.data.license == "apache-2.0" and "instructions" in card.data.tags
    assert card_metadata_errors(text) == []
    assert "Self-Instruct seed tasks, deduplicated, filtered and decontaminated." in text
    assert load(folder, tmp_path).to_list() == curated.rows()

    dropping = [s for s in curated.steps if s.dropped]
    assert len(dropping) >= 3  # dedup, filter and decontamination each removed rows here
    for s in curated.steps:
        reasons = ", ".join(f"{k}: {v:,}" for k, v in sorted(s.drop_reasons.items())) or "-"
        row = (
            f"| {s.name} | `{s.type}` | {s.rows_in} | {s.rows_out} | {s.dropped} | {reasons} | "
            f"{s.failed} | - |"
        )
        assert row in text
    assert f"**{curated.steps[-1].rows_out} rows** in the dataset." in text
    for cite in ("Broder 1997", "Brown et al. 2020"):
        assert cite in text
    assert "No teacher answered anything" in text and "No deduplication step ran" not in text
    # The published recipe carries no local paths.
    recipe = yaml.safe_load((folder / "kdata" / "recipe.yaml").read_text())
    assert "output" not in recipe and "dir" not in recipe["publish"]
    stats = json.loads((folder / "kdata" / "stats.json").read_text())
    assert [s["stats"]["rows_out"] for s in stats["steps"]] == [s.rows_out for s in curated.steps]
    # Writing it again gives the same bytes (so an unchanged run pushes nothing).
    write_folder(curated.dir, tmp_path / "again")
    assert folder_bytes(tmp_path / "again") == folder_bytes(folder)


def test_card_includes_diversity_and_validation_reports(curated, tmp_path) -> None:
    """The build's own diversity report, and a real SFT validation of a copy of the run (a tiny
    random student, two steps on CPU): the card reads both, links the plots and ships the files."""
    from kdata.validation import ValidationConfig, validate_run

    run = tmp_path / "run"
    shutil.copytree(curated.dir, run)
    config = ValidationConfig(
        student="tiny",
        prompt="{{ instruction }}",
        response="{{ instances[0].output }}",
        eval={"holdout": 4},
        max_steps=2,
        batch_size=2,
        max_length=128,
        max_new_tokens=4,
    )
    validate_run(run, config, base_dir=ROOT / "recipes")
    report = json.loads((run / "diversity" / "report.json").read_text())
    plots = {name: p for name, p in report["plots"].items() if p}
    assert plots, "the build drew no diversity plot"

    files = write_folder(run, tmp_path / "pub")
    for f in [*plots.values(), "diversity/report.json", "validation/report.json"]:
        assert f in files
    assert "validation/loss.png" in files
    for p in plots.values():
        assert (tmp_path / "pub" / p).read_bytes() == (run / p).read_bytes()
    text = (tmp_path / "pub" / "README.md").read_text()
    assert f"Measured on the `{report['text_column']}` column" in text
    rows = f"| rows | {report['before']['rows']} | {report['after']['rows']} |"
    assert rows in text
    for name, p in plots.items():
        assert f"![{name}]({p})" in text
    section = (run / "validation" / "section.md").read_text()
    assert section.strip() in text and text.count("validation/loss.png") == 1


def test_a_recipe_names_its_own_card_template(tmp_path, seeds) -> None:
    (tmp_path / "card.md").write_text(
        "---\n{{ card_data }}\n---\n\n# {{ pretty_name }}\n\n{{ rows }} rows; "
        "{{ waterfall | length }} steps; {{ teachers | length }} teachers.\n"
    )
    recipe = (
        f"name: mine\nsteps:\n  - {{type: seeds, path: {seeds}}}\n"
        f"publish: {{dir: {tmp_path / 'pub'}, template: card.md}}\n"
    )
    (tmp_path / "r.yaml").write_text(recipe)
    kdata.build(kdata.load_recipe(tmp_path / "r.yaml"), run_dir=tmp_path / "run")
    text = (tmp_path / "pub" / "README.md").read_text()
    assert "# mine\n\n5 rows; 1 steps; 0 teachers." in text
    assert card_metadata_errors(text) == []

    missing = kdata.recipe_from_yaml(recipe.replace("card.md", "nope.md"), base_dir=tmp_path)
    with pytest.raises(RecipeError, match="'nope.md' is neither a shipped template") as e:
        missing.check_runtime()
    assert e.value.field == "publish.template"
    (tmp_path / "card.md").write_text("# no front matter\n")
    with pytest.raises(KdataError, match="renders no front matter"):
        write_folder(tmp_path / "run", tmp_path / "pub")


def test_methods_and_providers() -> None:
    cites = {
        "self_instruct": "Wang et al. 2022",
        "evol_instruct": "Xu et al. 2023",
        "self_consistency": "Wang et al. 2022",
        "self_refine": "Madaan et al. 2023",
        "judge": "Zheng et al. 2023",
        "preferences": "Rafailov et al. 2023",
        "minhash_dedup": "Broder 1997",
        "semantic_dedup": "Abbas et al. 2023",
    }
    for step_type, cite in cites.items():
        assert method_of({"type": step_type})[1]["cite"] == cite
    assert method_of({"type": "label", "verify": {"column": "answer"}})[1]["cite"] == (
        "Zelikman et al. 2022"
    )
    assert method_of({"type": "label", "verify": None})[0] == "label"
    assert method_of({"type": "filter"}) is None
    assert all(set(m) == {"method", "cite", "title", "url"} for m in METHODS.values())

    assert provider({"model": "openai/gpt-4o-mini"}) == "OpenAI"
    assert provider({"model": "gpt-4o-mini"}) == "OpenAI"
    assert provider({"model": "anthropic/claude-3-5-haiku-20241022"}) == "Anthropic"
    assert provider({"model": "ollama_chat/llama3.1"}).startswith("self-hosted (ollama_chat)")
    assert provider(
        {"model": "openai/Qwen/Qwen2.5-7B-Instruct", "api_base": "http://gpu:8000/v1"}
    ).startswith("an endpoint set by api_base")
    assert "SmolLM2" in provider({"model": "local/smollm2-135m-instruct"})


def test_incomplete_runs_and_foreign_folders_are_refused(curated, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(curated.dir, run)
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
    with pytest.raises(KdataError, match="not complete .status: interrupted."):
        write_folder(run, tmp_path / "pub")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("do not delete")
    with pytest.raises(KdataError, match="is not a folder kdata wrote"):
        write_folder(curated.dir, tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "do not delete"
    with pytest.raises(KdataError, match="no repository named"):
        push(curated.dir, dry_run=True)


# --- the push ------------------------------------------------------------------------------


def test_push_round_trip_and_no_commit_when_nothing_changed(hub, curated, tmp_path) -> None:
    from huggingface_hub import DatasetCard

    res = push(curated.dir, repo_id="alice/curated", endpoint=hub.url)
    commits = hub.commits("alice/curated")
    assert len(commits) == 2 and res.commit == commits[-1].oid  # create_repo's, then ours
    assert hub.stages().count("commit") == 1
    assert "lfs_upload" in hub.stages()  # the Parquet went up through LFS
    assert commits[-1].files["data/train-00000-of-00001.parquet"].lfs
    assert not commits[-1].files["README.md"].lfs  # inline, base64 in the NDJSON
    assert res.uploaded == res.files and res.deleted == []

    dl = download(hub, "alice/curated", tmp_path / "dl")
    assert folder_bytes(dl / "data") == folder_bytes(res.folder / "data")
    got = folder_bytes(dl)
    assert {k: v for k, v in got.items() if not k.startswith(".")} == folder_bytes(res.folder)
    assert load(dl, tmp_path).to_list() == curated.rows()
    card = DatasetCard.load(dl / "README.md")
    assert card.data.license == "apache-2.0" and card.data.configs[0]["config_name"] == "default"
    assert 'load_dataset("alice/curated", split="train")' in card.text

    n_requests = len(hub.log)
    again = push(curated.dir, repo_id="alice/curated", endpoint=hub.url)
    assert again.commit is None and again.uploaded == [] and again.deleted == []
    assert again.head == res.commit and len(hub.commits("alice/curated")) == 2
    assert {s for s, *_ in hub.log[n_requests:]} == {"whoami", "info", "tree"}
    assert_no_token(curated.dir, curated.dir.parent / "published", dl, hub.files("alice/curated"))


def test_push_removes_stale_data_files_and_keeps_other_files(hub, curated, curated_b) -> None:
    push(curated.dir, repo_id="alice/ds", endpoint=hub.url)
    stale = "data/train-00000-of-00002.parquet"
    hub.commit_as_someone_else("alice/ds", {stale: b"old shard", "notes.md": b"by hand"})
    res = push(curated_b.dir, repo_id="alice/ds", endpoint=hub.url)
    assert res.deleted == [stale] and "data/train-00000-of-00001.parquet" in res.uploaded
    files = hub.files("alice/ds")
    assert stale not in files and files["notes.md"] == b"by hand"
    assert files["README.md"] == (curated_b.dir / "hub" / "README.md").read_bytes()


@pytest.mark.parametrize(
    ("stage", "status"),
    [("preupload", 403), ("lfs_batch", 403), ("lfs_upload", 403), ("commit", 500)],
)
def test_a_failed_stage_leaves_the_repo_unchanged_and_the_rerun_commits_once(
    hub, curated, curated_b, stage, status
) -> None:
    push(curated.dir, repo_id="alice/ds", endpoint=hub.url)
    before, n = hub.files("alice/ds"), len(hub.commits("alice/ds"))
    hub.fail(stage, status)
    with pytest.raises(KdataError, match="no commit was made and the repository is unchanged"):
        push(curated_b.dir, repo_id="alice/ds", endpoint=hub.url)
    assert (stage, status) in [(s, st) for s, _, _, st in hub.log]
    assert hub.files("alice/ds") == before and len(hub.commits("alice/ds")) == n

    res = push(curated_b.dir, repo_id="alice/ds", endpoint=hub.url)
    assert len(hub.commits("alice/ds")) == n + 1 and res.commit == hub.commits("alice/ds")[-1].oid
    files = hub.files("alice/ds")
    assert {k: v for k, v in files.items() if k != ".gitattributes"} == folder_bytes(res.folder)


def test_a_transient_upload_error_is_retried_within_the_push(hub, curated) -> None:
    hub.fail("lfs_upload", 503)
    res = push(curated.dir, repo_id="alice/ds", endpoint=hub.url)
    uploads = [st for s, _, _, st in hub.log if s == "lfs_upload"]
    assert uploads[0] == 503 and uploads[1:] == [200] * (len(uploads) - 1) and len(uploads) >= 2
    assert res.commit and len(hub.commits("alice/ds")) == 2


def test_a_concurrent_change_fails_the_push_and_is_not_clobbered(hub, curated, curated_b) -> None:
    push(curated.dir, repo_id="alice/ds", endpoint=hub.url)
    theirs = {}
    hub.on(
        "preupload",
        lambda: theirs.update(
            oid=hub.commit_as_someone_else("alice/ds", {"README.md": b"their card"})
        ),
    )
    with pytest.raises(KdataError, match="changed while pushing .* nothing was overwritten"):
        push(curated_b.dir, repo_id="alice/ds", endpoint=hub.url)
    assert hub.commits("alice/ds")[-1].oid == theirs["oid"]
    assert hub.files("alice/ds")["README.md"] == b"their card"
    res = push(curated_b.dir, repo_id="alice/ds", endpoint=hub.url)  # on top of their commit
    assert hub.commits("alice/ds")[-2].oid == theirs["oid"] and res.commit
    assert hub.files("alice/ds")["README.md"] == (res.folder / "README.md").read_bytes()


def test_token_problems_are_clear_and_the_token_never_lands_in_a_file(
    hub, curated, tmp_path, monkeypatch, seeds
) -> None:
    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(KdataError, match="no Hugging Face token: set HF_TOKEN or run"):
        push(curated.dir, repo_id="alice/ds", endpoint=hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(KdataError, match="refused the token .HTTP 401."):
        push(curated.dir, repo_id="alice/ds", endpoint=hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(KdataError, match="HF_HUB_OFFLINE is set"):
        push(curated.dir, repo_id="alice/ds", endpoint=hub.url)
    assert hub.repos == {}

    # A token pasted into a recipe ends up in the card: the push refuses to send it.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_pastedIntoTheRecipe0123456789")
    recipe = kdata.recipe_from_yaml(
        f"name: leak\nsteps: [{{type: seeds, path: {seeds}}}]\n"
        "publish: {description: 'my token is hf_pastedIntoTheRecipe0123456789'}\n"
    )
    kdata.build(recipe, run_dir=tmp_path / "leak")
    with pytest.raises(KdataError, match="token appears in README.md: refusing to push"):
        push(tmp_path / "leak", repo_id="alice/leak", endpoint=hub.url)
    assert hub.repos == {}


def test_cli_push_dry_run_then_push(hub, curated) -> None:
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": SENTINEL,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
    }

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "kdata.cli", "push", str(curated.dir), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )

    dry = cli("--repo", "alice/cli", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    staged = folder_bytes(curated.dir / "hub")
    assert f"would push {len(staged)} files to alice/cli, written to {curated.dir / 'hub'}" in (
        dry.stdout
    )
    assert "data/train-00000-of-00001.parquet" in dry.stdout
    assert hub.log == []  # a dry run sends nothing

    done = cli("--repo", "alice/cli", "--private")
    assert done.returncode == 0, done.stderr
    assert (
        "pushed alice/cli: commit" in done.stdout
        and f"({len(staged)} files updated, 0 removed)" in done.stdout
    )
    assert hub.repos["alice/cli"].private
    files = hub.files("alice/cli")
    assert {k: v for k, v in files.items() if k != ".gitattributes"} == staged  # what dry-run wrote

    same = cli("--repo", "alice/cli")
    assert same.returncode == 0 and "already holds this run" in same.stdout
    assert len(hub.commits("alice/cli")) == 2
    bad = cli("--repo", "not-a-repo")
    assert bad.returncode == 1 and "is not of the form USER/NAME" in bad.stderr
    assert_no_token(curated.dir, files)
    assert SENTINEL not in done.stdout + done.stderr + dry.stdout + dry.stderr


def test_a_refused_create_repo_is_a_clear_error_not_a_raw_hub_exception(
    hub, curated, curated_b
) -> None:
    # No rights on the namespace: the Hub answers 403 and the repository does not exist.
    with pytest.raises(KdataError, match="cannot push to bob/ds: .*nothing was committed"):
        push(curated.dir, repo_id="bob/ds", endpoint=hub.url)
    assert "bob/ds" not in hub.repos
    # A token that may write to an existing repository but not create one (the Hub answers
    # create_repo with 403): the push to the existing repository goes through.
    push(curated.dir, repo_id="alice/ds", endpoint=hub.url)
    hub.fail("create_repo", 403)
    n_requests = len(hub.log)
    res = push(curated_b.dir, repo_id="alice/ds", endpoint=hub.url)
    assert res.commit == hub.commits("alice/ds")[-1].oid
    assert "create_repo" not in {s for s, *_ in hub.log[n_requests:]}


def test_the_card_says_which_columns_hold_chat_messages(tmp_path) -> None:
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    rows = [{"topic": f"t{i}", "messages": chat} for i in range(3)]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = (
        "name: chats\nsteps:\n  - {type: seeds, path: s.jsonl}\n"
        f"publish: {{dir: {tmp_path / 'pub'}}}\n"
    )
    (tmp_path / "r.yaml").write_text(recipe)
    kdata.build(kdata.load_recipe(tmp_path / "r.yaml"), run_dir=tmp_path / "run")
    text = (tmp_path / "pub" / "README.md").read_text()
    assert "\n`messages` holds chat messages (`role`, `content`;" in text
    assert card_metadata_errors(text) == []
