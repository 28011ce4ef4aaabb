"""The dataset card: what it says, read from a run directory, rendered from a ``hub_cards/`` card.

Everything in the card comes from files the run already has: ``manifest.json`` (the recipe,
teachers' totals), ``steps/<name>/stats.json`` (the drop waterfall), the final Parquet file
(sample rows), and, when other parts of kdata wrote them, ``diversity/report.json`` and
``validation/section.md``. A section whose input is absent says so; nothing is made up.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from kdata.errors import KdataError
from kdata.publish.config import PublishConfig

# Step type (or "type.field", when that field being set changes the method) -> the method it
# implements and where it comes from. The one place that maps steps to citations.
METHODS: dict[str, dict[str, str]] = {
    "label": {
        "method": "Labeling: a teacher answers each row",
        "cite": "Xu et al. 2024",
        "title": "A Survey on Knowledge Distillation of Large Language Models",
        "url": "https://arxiv.org/abs/2402.13116",
    },
    "label.verify": {
        "method": "Labeling with verified rationales (STaR)",
        "cite": "Zelikman et al. 2022",
        "title": "STaR: Bootstrapping Reasoning With Reasoning",
        "url": "https://arxiv.org/abs/2203.14465",
    },
    "self_instruct": {
        "method": "Self-Instruct",
        "cite": "Wang et al. 2022",
        "title": "Self-Instruct: Aligning Language Models with Self-Generated Instructions",
        "url": "https://arxiv.org/abs/2212.10560",
    },
    "evol_instruct": {
        "method": "Evol-Instruct",
        "cite": "Xu et al. 2023",
        "title": "WizardLM: Empowering Large Language Models to Follow Complex Instructions",
        "url": "https://arxiv.org/abs/2304.12244",
    },
    "magpie": {
        "method": "Magpie",
        "cite": "Xu et al. 2024",
        "title": "Magpie: Alignment Data Synthesis from Scratch by Prompting Aligned LLMs "
        "with Nothing",
        "url": "https://arxiv.org/abs/2406.08464",
    },
    "self_consistency": {
        "method": "Self-consistency",
        "cite": "Wang et al. 2022",
        "title": "Self-Consistency Improves Chain of Thought Reasoning in Language Models",
        "url": "https://arxiv.org/abs/2203.11171",
    },
    "self_refine": {
        "method": "Self-Refine",
        "cite": "Madaan et al. 2023",
        "title": "Self-Refine: Iterative Refinement with Self-Feedback",
        "url": "https://arxiv.org/abs/2303.17651",
    },
    "judge": {
        "method": "LLM-as-a-judge",
        "cite": "Zheng et al. 2023",
        "title": "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena",
        "url": "https://arxiv.org/abs/2306.05685",
    },
    "preferences": {
        "method": "Preference pairs for DPO",
        "cite": "Rafailov et al. 2023",
        "title": "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
        "url": "https://arxiv.org/abs/2305.18290",
    },
    "minhash_dedup": {
        "method": "MinHash near-duplicate removal",
        "cite": "Broder 1997",
        "title": "On the resemblance and containment of documents",
        "url": "https://doi.org/10.1109/SEQUEN.1997.666900",
    },
    "semantic_dedup": {
        "method": "Embedding near-duplicate removal (SemDeDup)",
        "cite": "Abbas et al. 2023",
        "title": "SemDeDup: Data-efficient learning at web-scale through semantic deduplication",
        "url": "https://arxiv.org/abs/2303.09540",
    },
    "decontaminate": {
        "method": "n-gram overlap decontamination",
        "cite": "Brown et al. 2020",
        "title": "Language Models are Few-Shot Learners",
        "url": "https://arxiv.org/abs/2005.14165",
    },
}

# litellm provider -> who serves it, for the terms-of-use warning.
PROVIDERS = {
    "openai": "OpenAI",
    "azure": "Microsoft Azure OpenAI",
    "anthropic": "Anthropic",
    "gemini": "Google (Gemini API)",
    "vertex_ai": "Google Cloud Vertex AI",
    "bedrock": "Amazon Bedrock",
    "mistral": "Mistral AI",
    "cohere": "Cohere",
    "groq": "Groq",
    "together_ai": "Together AI",
    "fireworks_ai": "Fireworks AI",
    "deepseek": "DeepSeek",
    "xai": "xAI",
    "openrouter": "OpenRouter",
}
SELF_HOSTED = {"local", "ollama", "ollama_chat", "hosted_vllm", "llamafile", "lm_studio"}
EMBEDDED_TEACHER = "local/smollm2-135m-instruct"
SAMPLE_ROWS = 3
SAMPLE_CHARS = 600


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` value for ``n`` rows."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < limit:
            return name
    for limit, name in ((10**6, "100K<n<1M"), (10**7, "1M<n<10M"), (10**8, "10M<n<100M")):
        if n < limit:
            return name
    return "100M<n<1B" if n < 10**9 else "1B<n<10B"


def provider(teacher: dict[str, Any]) -> str:
    """Who serves a teacher, in words, derived from its litellm model string."""
    model = teacher["model"]
    if model == EMBEDDED_TEACHER:
        return "kdata's embedded SmolLM2-135M-Instruct (Apache-2.0), run locally"
    try:
        from kdata.teachers.pool import _litellm

        name = _litellm().get_llm_provider(model)[1]
    except Exception:  # litellm does not know it: the prefix is the best guess
        name = model.split("/", 1)[0] if "/" in model else "unknown"
    if name in SELF_HOSTED:
        return f"self-hosted ({name}); the model's own license applies"
    if teacher.get("api_base"):
        return f"an endpoint set by api_base, speaking the {name} API"
    return PROVIDERS.get(name, name)


def method_of(step: dict[str, Any]) -> tuple[str, dict[str, str]] | None:
    """The ``METHODS`` key and entry for a step config, if it implements a cited method."""
    for field, value in step.items():
        key = f"{step['type']}.{field}"
        if value and key in METHODS:
            return key, METHODS[key]
    key = step["type"]
    return (key, METHODS[key]) if key in METHODS else None


def cell(value: Any) -> str:
    """Text safe inside a markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def fence(text: str) -> str:
    """A code fence longer than any run of backticks in ``text``."""
    runs = [len(r) for r in re.findall(r"`+", text)]
    return "`" * max(3, max(runs, default=0) + 1)


def _num(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 100):
        return f"{int(x):,}"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _paths(value: Any) -> list[str]:
    """Every value of a ``path`` key in a step config: the files a recipe reads."""
    if isinstance(value, dict):
        own = [value["path"]] if isinstance(value.get("path"), str) else []
        return own + [p for k, v in value.items() if k != "path" for p in _paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in _paths(v)]
    return []


def published_recipe(manifest: dict) -> dict[str, Any]:
    """The recipe as published: without ``output`` and ``publish.dir``, paths on this machine."""
    recipe = {k: v for k, v in manifest["recipe"].items() if k != "output"}
    recipe["steps"] = [{"type": s["type"], **s} for s in recipe["steps"]]  # type first, to read
    if recipe.get("publish"):
        recipe["publish"] = {k: v for k, v in recipe["publish"].items() if k != "dir"}
    return recipe


def waterfall(run_dir: Path, manifest: dict) -> list[dict[str, Any]]:
    """Each step's rows in and out, its drop reasons and its failures, from its stats.json."""
    out = []
    for m in manifest["steps"]:
        s = _read_json(run_dir / "steps" / m["name"] / "stats.json") or m.get("stats") or {}
        reasons = s.get("drop_reasons") or {}
        failures = s.get("failure_classes") or {}
        out.append(
            {
                "step": m["name"],
                "type": m["type"],
                "rows_in": s.get("rows_in", 0),
                "rows_out": s.get("rows_out", 0),
                "dropped": s.get("dropped", 0),
                "reasons": ", ".join(f"{k}: {v:,}" for k, v in sorted(reasons.items())) or "-",
                "failed": s.get("failed", 0),
                "failure_classes": ", ".join(f"{k}: {v:,}" for k, v in sorted(failures.items()))
                or "-",
            }
        )
    return out


def _diversity_table(report: dict) -> list[dict[str, str]]:
    before, after = report.get("before") or {}, report.get("after") or {}
    names = [
        ("rows", "rows"),
        ("distinct_1", "distinct-1 (unique unigrams / unigrams)"),
        ("distinct_2", "distinct-2 (unique bigrams / bigrams)"),
        ("minhash_cluster_share", "share of rows in MinHash near-duplicate clusters"),
        ("mean_cosine_distance", "mean cosine distance between embeddings"),
        ("kmeans_entropy", "k-means cluster entropy"),
    ]
    table = [
        {"metric": label, "before": _num(before.get(k, "-")), "after": _num(after.get(k, "-"))}
        for k, label in names
    ]
    for k in ("mean", "p10", "p50", "p90", "max"):
        table.append(
            {
                "metric": f"length, {k} (characters)",
                "before": _num((before.get("length") or {}).get(k, "-")),
                "after": _num((after.get("length") or {}).get(k, "-")),
            }
        )
    return table


def _samples(data_files: list[Path]) -> list[dict[str, str]]:
    import pyarrow.parquet as pq

    if not data_files:
        return []
    rows = pq.read_table(data_files[0]).slice(0, SAMPLE_ROWS).to_pylist()
    out = []
    for row in rows:
        row.pop("_kdata", None)
        shown = {
            k: v[:SAMPLE_CHARS] + "…" if isinstance(v, str) and len(v) > SAMPLE_CHARS else v
            for k, v in row.items()
        }
        text = json.dumps(shown, indent=2, ensure_ascii=False, default=str)
        out.append({"json": text, "fence": fence(text)})
    return out


def _is_chat(arrow_type: str) -> bool:
    """Whether a column's Arrow type is a list of chat messages (``role`` and ``content``)."""
    return arrow_type.startswith("list<") and "role:" in arrow_type and "content:" in arrow_type


def card_context(
    run_dir: Path,
    manifest: dict,
    cfg: PublishConfig,
    *,
    repo_id: str | None,
    data_files: list[Path],
    rows: int,
    columns: dict[str, str],
    diversity_plots: dict[str, str],
    validation_plot: str | None,
) -> dict[str, Any]:
    """Every variable a card template can use (the README's Publishing section lists them)."""
    recipe = published_recipe(manifest)
    steps = recipe["steps"]
    totals = manifest.get("teachers") or {}
    called = set(totals) | set(manifest.get("ledger") or {})
    teachers = [
        {
            "name": name,
            "model": t["model"],
            "provider": provider(t),
            "params": cell(json.dumps(t.get("params") or {}, sort_keys=True)),
        }
        for name, t in (recipe.get("teachers") or {}).items()
        if name in called
    ]
    providers = sorted({t["provider"] for t in teachers})
    methods, references = [], {}
    for m, step in zip(manifest["steps"], steps, strict=True):
        found = method_of(step)
        if found:
            key, entry = found
            references[key] = entry
        methods.append(
            {
                "step": m["name"],
                "type": m["type"],
                "method": found[1]["method"] if found else "-",
                "cite": found[1]["cite"] if found else "-",
            }
        )
    falls = waterfall(run_dir, manifest)
    diversity = _read_json(run_dir / "diversity" / "report.json")
    section = run_dir / "validation" / "section.md"
    validation_md = section.read_text(encoding="utf-8").strip() if section.exists() else None
    recipe_yaml = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True).strip()
    cost = {
        "teachers": [
            {
                "name": name,
                "model": (recipe.get("teachers") or {}).get(name, {}).get("model", "?"),
                "responses": _num(t["responses"]),
                "prompt_tokens": _num(t["prompt_tokens"]),
                "completion_tokens": _num(t["completion_tokens"]),
                "cost_usd": f"{t['cost_usd']:.4f}",
            }
            for name, t in sorted(totals.items())
        ],
        "responses": _num(sum(t["responses"] for t in totals.values())),
        "prompt_tokens": _num(sum(t["prompt_tokens"] for t in totals.values())),
        "completion_tokens": _num(sum(t["completion_tokens"] for t in totals.values())),
        "cost_usd": f"{manifest.get('cost_usd_total', 0.0):.4f}",
    }
    types = {s["type"] for s in steps}
    failed = sum(w["failed"] for w in falls)
    limitations = [
        "The rows were written by the teacher models listed above, not by people, and nobody "
        "checked them: they carry those models' mistakes, biases and knowledge cut-offs."
        if teachers
        else "No teacher wrote anything: the rows are the recipe's sources after curation."
    ]
    if any(t["model"] == EMBEDDED_TEACHER for t in teachers):
        limitations.append(
            "The embedded SmolLM2-135M-Instruct teacher has 135M parameters: many of its "
            "answers are wrong. It exists so that kdata runs anywhere; treat this dataset as a "
            "demonstration, not as training data."
        )
    if failed:
        limitations.append(
            f"{failed:,} units of work failed (see the failed column above) and are not in the "
            "dataset, so it may under-represent the inputs that failed."
        )
    if not any("dedup" in t for t in types):
        limitations.append("No deduplication step ran: the rows may repeat each other.")
    if "decontaminate" not in types:
        limitations.append(
            "No decontamination step ran: check the rows against your evaluation sets before "
            "training on them."
        )
    repo = repo_id or cfg.repo_id
    description = cfg.description or (
        f"A synthetic knowledge-distillation dataset of {rows:,} rows, built with kdata from "
        f"the recipe `{recipe['name']}`."
    )
    return {
        "pretty_name": recipe["name"],
        "description": description.strip(),
        "recipe_name": recipe["name"],
        "repo_id": repo,
        "load_id": repo or "path/to/this/folder",
        "split": cfg.split,
        "rows": f"{rows:,}",
        "columns": [{"name": cell(k), "type": cell(v)} for k, v in columns.items()],
        "chat_columns": [k for k, v in columns.items() if _is_chat(v)],
        "data_files": [f"data/{p.name}" for p in data_files],
        "kdata_version": manifest.get("kdata_version", "?"),
        "teachers": teachers,
        "providers": providers,
        "license_id": cfg.license,
        "methods": methods,
        "references": list(references.values()),
        "recipe_yaml": recipe_yaml,
        "recipe_fence": fence(recipe_yaml),
        "input_files": sorted({p for s in steps for p in _paths(s)}),
        "waterfall": falls,
        "final_rows": f"{rows:,}",
        "diversity": diversity,
        "diversity_table": _diversity_table(diversity) if diversity else [],
        "diversity_plots": [{"name": k, "path": v} for k, v in diversity_plots.items()],
        "validation_plot": validation_plot,
        "validation_md": validation_md,
        "samples": _samples(data_files),
        "cost": cost,
        "limitations": limitations,
    }


def render_card(context: dict[str, Any], template: str, cfg: PublishConfig, rows: int) -> str:
    """The card's text: ``template`` rendered through ``DatasetCard.from_template``.

    Raises:
        KdataError: the template does not render, or renders a card without the front matter
            (``---`` / ``{{ card_data }}`` / ``---``) that the Hub and ``load_dataset`` need.
    """
    import jinja2
    from huggingface_hub import DatasetCard, DatasetCardData

    split = cfg.split
    data = DatasetCardData(
        license=cfg.license,
        language=cfg.language,
        task_categories=cfg.task_categories,
        size_categories=[size_category(rows)],
        tags=list(dict.fromkeys(["synthetic", "distillation", "kdata", *cfg.tags])),
        pretty_name=context["pretty_name"],
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": split, "path": f"data/{split}-*.parquet"}],
            }
        ],
    )
    try:
        card = DatasetCard.from_template(data, template_str=template, **context)
    except jinja2.TemplateError as e:
        raise KdataError(f"card template '{cfg.template}': {e}") from None
    text = str(card).strip() + "\n"
    if DatasetCard(text).data.to_dict().get("configs") != data.to_dict()["configs"]:
        raise KdataError(
            f"card template '{cfg.template}' renders no front matter: it must begin with "
            "---, {{ card_data }}, --- (see hub_cards/default.md)"
        )
    return text
