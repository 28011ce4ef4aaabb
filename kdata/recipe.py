"""Recipes: the pydantic models of a recipe and `load_recipe`, which reads one from YAML.

A recipe is loaded with PyYAML's ``SafeLoader`` only, at most 1 MiB of it, with aliases bounded;
every model forbids unknown keys; steps are a discriminated union on ``type``. Errors name the
file, line, step and field, and propose a fix.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdata.blocks import DEFAULT_BLOCK_ROWS
from kdata.errors import RecipeError
from kdata.publish.config import PublishConfig
from kdata.steps.base import StrictModel
from kdata.steps.conversation import ConversationStep
from kdata.steps.curate import CurateStep
from kdata.steps.decontaminate import DecontaminateStep
from kdata.steps.dedup import ExactDedupStep, MinHashDedupStep
from kdata.steps.diversity import DiversityStep
from kdata.steps.elicit import ConsensusStep, LabelStep
from kdata.steps.embedders import STATIC
from kdata.steps.evol import EvolInstructStep
from kdata.steps.expand import SelfInstructStep
from kdata.steps.features import FeaturesStep
from kdata.steps.feedback import JudgeStep, PreferencesStep
from kdata.steps.filters import FilterStep
from kdata.steps.magpie import MagpieStep
from kdata.steps.self_knowledge import SelfConsistencyStep, SelfRefineStep
from kdata.steps.semantic import SemanticDedupStep
from kdata.steps.sources import SeedsStep
from kdata.storage import is_url
from kdata.validation import ValidationConfig

# Every step type there is: the recipe's discriminated union is built from this tuple.
STEP_CLASSES = (
    SeedsStep,
    LabelStep,
    ConsensusStep,
    SelfConsistencyStep,
    SelfRefineStep,
    ConversationStep,
    FeaturesStep,
    FilterStep,
    DecontaminateStep,
    ExactDedupStep,
    MinHashDedupStep,
    SemanticDedupStep,
    SelfInstructStep,
    EvolInstructStep,
    CurateStep,
    MagpieStep,
    JudgeStep,
    PreferencesStep,
    DiversityStep,
)
Step = Annotated[typing.Union[STEP_CLASSES], Field(discriminator="type")]  # noqa: UP007
STEP_TYPES: dict[str, type[BaseModel]] = {
    typing.get_args(cls.model_fields["type"].annotation)[0]: cls for cls in STEP_CLASSES
}

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}")
_ENV_ONLY = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")

MAX_RECIPE_BYTES = 1 << 20  # 1 MiB: hand-written recipes are a few KB; data belongs in files
MAX_ALIASED_NODES = 10_000  # YAML nodes that aliases may add by repeating anchored ones


class Price(StrictModel):
    """USD per 1,000 tokens, for models litellm cannot price."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)


class GenerationParams(StrictModel):
    """Generation parameters sent with every request of a teacher."""

    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None  # OpenAI o-series
    thinking: dict[str, Any] | None = None  # Anthropic: {type: enabled, budget_tokens: N}
    extra_body: dict[str, Any] | None = None

    def sent(self) -> dict[str, Any]:
        """The parameters as sent to litellm, unset ones left out."""
        return self.model_dump(exclude_none=True)


class Teacher(StrictModel):
    """A name in the recipe bound to a litellm model.

    ``api_key`` is never a literal: it must be a reference such as ``${OPENAI_API_KEY}``, read from
    the environment when the teacher is called, so a key never lives in a recipe, cache or log.

    ``structured_output``: whether requests that expect JSON (judges) carry their JSON schema as
    ``response_format``, for the backend to constrain decoding to it. Unset: yes for local GGUF
    teachers and for models litellm knows to support response schemas; set it true for an
    OpenAI-compatible server with guided decoding (vLLM, SGLang, llama.cpp's server), false to
    never send it. kdata validates every reply against the schema either way.

    ``think_tags``: the server writes its reasoning inline, as ``<think>...</think>`` before the
    answer (a reasoning model behind a server without a reasoning parser); kdata splits it off
    into the reasoning column. It changes how stored responses are read, not what is sent, so
    toggling it re-reads the cache and pays for nothing.

    ``client``: ``auto`` sends the requests of a teacher that speaks OpenAI's chat completions
    (``openai/...``, ``hosted_vllm/...``) over kdata's own HTTP client, every other through
    litellm (see `kdata.teachers.openai_http`); ``litellm`` sends them all through litellm. Either
    way the requests, the cache and the ledger are the same.
    ``batch``: send this teacher's requests through the provider's batch API (OpenAI Batch,
    Anthropic Message Batches) at half the online price, answered within 24 hours; see
    `kdata.teachers.batch`. ``batch_fallback``: what happens to a request its batch did not
    answer (expired, cancelled, failed, or a retryable error): sent ``online``, sent in a new
    ``batch`` (at most ``max_retries`` times), or ``none`` (the row fails with the class).
    ``batch_poll_s``: seconds before a batch's first status check; the wait grows 1.5 times
    per check, up to 20 times this.
    """

    model: str = Field(min_length=1)
    params: GenerationParams = GenerationParams()
    api_base: str | None = None
    api_key: str | None = None
    max_concurrency: int = Field(default=16, ge=1)
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    cost_per_1k_tokens: Price | None = None
    max_retries: int = Field(default=5, ge=0)
    timeout: float = Field(default=120.0, gt=0)
    structured_output: bool | None = None
    think_tags: bool = False  # split an inline <think>...</think> off the answer as reasoning
    client: Literal["auto", "litellm"] = "auto"
    batch: bool = False
    batch_fallback: Literal["online", "batch", "none"] = "online"
    batch_poll_s: float = Field(default=30.0, gt=0)

    @field_validator("api_base")
    @classmethod
    def _empty_base_is_none(cls, v: str | None) -> str | None:
        return v or None

    @field_validator("api_key")
    @classmethod
    def _key_from_env(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_ONLY.match(v):
            raise ValueError(
                "api_key must name an environment variable, like ${OPENAI_API_KEY}; "
                "keys are never written in recipes"
            )
        return v

    @property
    def api_key_var(self) -> str | None:
        """The environment variable holding the key, if any."""
        m = _ENV_ONLY.match(self.api_key or "")
        return m.group(1) if m else None


class Output(StrictModel):
    """Where the run directory goes (relative paths are relative to the working directory)."""

    dir: str


class ReportConfig(StrictModel):
    """The recipe's ``report:`` section: what a build measures once its steps are done.

    ``diversity``: write the diversity report on the final rows (``diversity/``, for the card);
    false skips it and removes an earlier one. ``diversity`` steps write theirs either way.
    ``model``: the embedding model of its embedding figures, as ``semantic_dedup``'s ``model``
    (default ``static``).
    """

    diversity: bool = True
    model: str = Field(default=STATIC, min_length=1)


class Execution(StrictModel):
    """How a build runs: ``block_rows``, the most rows a block holds (see `kdata.blocks`).

    Memory is bounded by block size times blocks in flight; the rows, their order and their
    ids do not depend on it. ``executor``: ``local`` (this process) or ``ray``
    (`kdata.executors.ray_executor`), which joins the cluster at ``address`` or, without one,
    starts a Ray instance on this machine; ``workers``: its teacher actors (default one per
    node).
    """

    block_rows: int = Field(default=DEFAULT_BLOCK_ROWS, ge=1)
    executor: Literal["local", "ray"] = "local"
    address: str | None = None
    workers: int | None = Field(default=None, ge=1)


class Recipe(StrictModel):
    """A whole recipe: teachers, steps, output, an optional budget and how to publish."""

    name: str = Field(min_length=1)
    teachers: dict[str, Teacher] = {}
    steps: list[Step] = Field(min_length=1)
    output: Output | None = None
    budget_usd: float | None = Field(default=None, gt=0)
    execution: Execution = Execution()
    # The recipe's `validate:` section (a field may not be called `validate` on a pydantic model).
    validation: ValidationConfig | None = Field(default=None, alias="validate")
    publish: PublishConfig | None = None
    report: ReportConfig = ReportConfig()

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    # Set by load_recipe; not part of the recipe's own fields.
    _source_path: str | None = None
    _base_dir: Path = Path(".")
    _lines: dict[tuple, int] = {}

    @model_validator(mode="after")
    def _check_references(self) -> Recipe:
        names: set[str] = set()
        for i, step in enumerate(self.steps):
            where = f"steps[{i}] ({step.type})"
            if step.name in names:
                raise ValueError(f"{where}: step name '{step.name}' is used twice")
            names.add(step.name or "")
            self._check_teachers(where, step.teacher_names())
            try:
                step.check_teachers({n: t.model for n, t in self.teachers.items()})
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        if self.validation and self.validation.judge:
            self._check_teachers("validate.judge", self.validation.judge.judge_teachers())
        return self

    def _check_teachers(self, where: str, names: set[str]) -> None:
        for t in sorted(names):
            if t not in self.teachers:
                raise ValueError(
                    f"{where}: unknown teacher '{t}'"
                    + _did_you_mean(t, self.teachers)
                    + (f"; the recipe defines {sorted(self.teachers)}" if self.teachers else "")
                )

    @property
    def source_path(self) -> str | None:
        """The recipe file this recipe was loaded from, if any."""
        return self._source_path

    @property
    def base_dir(self) -> Path:
        """Directory that relative input paths in steps are resolved against."""
        return self._base_dir

    @property
    def run_dir(self) -> Path | str:
        """The run directory named by ``output.dir`` (default ``runs/<name>``): a path, or a
        URL (``s3://…``: `kdata.storage`)."""
        where = self.output.dir if self.output else f"runs/{self.name}"
        return where if is_url(where) else Path(where)

    def step_names(self) -> list[str]:
        """Each step's name: its ``name`` field or ``NN_type``."""
        return [s.name or f"{i:02d}_{s.type}" for i, s in enumerate(self.steps)]

    def used_teachers(self) -> list[str]:
        """Teachers that at least one step calls, in recipe order."""
        used = set().union(*(s.teacher_names() for s in self.steps))
        return [t for t in self.teachers if t in used]

    def check_runtime(self) -> None:
        """Check what only the environment can tell: keys present, prices known under a budget,
        each step's input files readable (see `StepBase.check_inputs`).

        Raises:
            RecipeError: naming the teacher or step, its line and the fix.
        """
        from kdata.errors import KdataError
        from kdata.teachers.batch_api import provider
        from kdata.teachers.local import model_path
        from kdata.teachers.pool import prices

        if self.execution.executor == "ray" and importlib.util.find_spec("ray") is None:
            raise self._error(
                "Ray is not installed; install it with: pip install 'kdata[ray]'",
                ("execution", "executor"),
            )
        for name in self.used_teachers():
            t = self.teachers[name]
            if t.model.startswith("local/"):
                try:
                    model_path(t.model)
                except KdataError as e:
                    raise self._error(str(e), ("teachers", name, "model")) from None
            var = t.api_key_var
            if var and var not in os.environ:
                raise self._error(
                    f"environment variable {var} is not set (teacher '{name}' needs it); "
                    f"export {var}=... before running",
                    ("teachers", name, "api_key"),
                )
            if t.batch:
                try:
                    provider(t)
                except ValueError as e:
                    raise self._error(str(e), ("teachers", name, "batch")) from None
            if self.budget_usd is not None and prices(t) is None:
                raise self._error(
                    f"litellm has no price for model '{t.model}' and budget_usd is set; "
                    "add cost_per_1k_tokens: {input: ..., output: ...} to this teacher "
                    "or remove budget_usd",
                    ("teachers", name, "model"),
                )
        if self.publish is not None:
            try:
                self.publish.template_text(self.base_dir)
            except KdataError as e:
                raise self._error(str(e), ("publish", "template")) from None
        for i, step in enumerate(self.steps):
            try:
                step.check_inputs(self.base_dir)
            except KdataError as e:
                field = "path" if "path" in type(step).model_fields else None
                raise RecipeError(
                    str(e),
                    path=self._source_path,
                    line=_line_for(self._lines, ("steps", i, field)),
                    step=f"steps[{i}] ({step.type})",
                    field=field,
                ) from None

    def _error(self, message: str, loc: tuple) -> RecipeError:
        return RecipeError(
            message,
            path=self._source_path,
            line=_line_for(self._lines, loc),
            field=".".join(str(p) for p in loc),
        )


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read a recipe from a YAML file.

    Args:
        path: the recipe file, at most `MAX_RECIPE_BYTES` of UTF-8.

    Returns:
        The validated recipe; relative input paths in it resolve against the file's folder.

    Raises:
        RecipeError: with file, line, step, field and a proposed fix.
    """
    p = Path(path)
    try:
        with p.open("rb") as fh:
            raw = fh.read(MAX_RECIPE_BYTES + 1)  # never more: a huge file is refused unread
    except OSError as e:
        raise RecipeError(f"cannot read recipe: {e.strerror}", path=str(p)) from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise _too_large(str(p))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(
            f"not UTF-8 text (byte 0x{raw[e.start]:02x}); save the recipe as UTF-8",
            path=str(p),
            line=raw.count(b"\n", 0, e.start) + 1,
        ) from None
    return _parse(text, str(p), p.parent)


def recipe_from_yaml(text: str, base_dir: str | os.PathLike = ".") -> Recipe:
    """Parse a recipe given as YAML text (paths resolve against ``base_dir``)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_RECIPE_BYTES:
        raise _too_large(None)
    return _parse(text, None, Path(base_dir))


def _too_large(path: str | None) -> RecipeError:
    return RecipeError(
        f"recipe is larger than {MAX_RECIPE_BYTES >> 20} MiB, the most kdata reads; keep data "
        "(seeds, topics, benchmark items) in files that the recipe names by path",
        path=path,
    )


def _parse(text: str, path: str | None, base_dir: Path) -> Recipe:
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            # Checked before constructing: merge keys (<<) would copy what an alias bomb expands.
            lines = _line_map(node, path)
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        hint = ""
        if "python/" in str(e) or "could not determine a constructor" in str(e):
            hint = "; recipes are plain YAML, language-specific tags are refused"
        raise RecipeError(
            f"invalid YAML: {problem}{hint}",
            path=path,
            line=mark.line + 1 if mark else None,
        ) from None
    except RecursionError:
        raise RecipeError("invalid YAML: nested too deeply", path=path) from None
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a YAML mapping with name, teachers and steps", path=path)
    data = _interpolate(data, (), path, lines)
    try:
        recipe = Recipe.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as e:
        raise _explain(e, data, path, lines) from None
    recipe._source_path, recipe._base_dir, recipe._lines = path, base_dir, lines
    return recipe


def _line_map(root: yaml.Node | None, path: str | None) -> dict[tuple, int]:
    """Map each location (tuple of keys and indices) to its 1-based line.

    The walk follows aliases, so it is where the two ways aliases blow up are refused, before
    anything expands them: a node that contains itself, and more than `MAX_ALIASED_NODES` nodes
    reached again through aliases (an "alias bomb": a few hundred bytes that expand to billions).
    """
    out: dict[tuple, int] = {}
    seen: set[int] = set()  # every node walked so far
    inside: set[int] = set()  # the nodes on the path from the root to this one
    aliased = 0

    def walk(node: yaml.Node, loc: tuple, line: int, alias_line: int | None) -> None:
        # line: where the node is used (its key's line, or its sequence's); alias_line: the
        # line of the alias being expanded, if inside one.
        nonlocal aliased
        if id(node) in inside:
            raise RecipeError(
                "an alias refers to a node that contains it; a recipe must be finite",
                path=path,
                line=line,
            )
        if alias_line is None and id(node) in seen:
            alias_line = line
        if alias_line is not None:
            aliased += 1
            if aliased > MAX_ALIASED_NODES:
                raise RecipeError(
                    f"aliases expand the recipe by more than {MAX_ALIASED_NODES:,} YAML nodes "
                    "(an alias bomb?); write the values out or use fewer, smaller aliases",
                    path=path,
                    line=alias_line,
                )
        seen.add(id(node))
        out[loc] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            inside.add(id(node))
            for k, v in node.value:
                key = (*loc, k.value)
                walk(v, key, k.start_mark.line + 1, alias_line)
                out[key] = k.start_mark.line + 1
            inside.discard(id(node))
        elif isinstance(node, yaml.SequenceNode):
            inside.add(id(node))
            for i, v in enumerate(node.value):
                walk(v, (*loc, i), out[loc], alias_line)
            inside.discard(id(node))

    if root is not None:
        walk(root, (), root.start_mark.line + 1, None)
    return out


def _line_for(lines: dict[tuple, int], loc: tuple) -> int | None:
    while loc and loc not in lines:
        loc = loc[:-1]
    return lines.get(loc)


def _interpolate(value: Any, loc: tuple, path: str | None, lines: dict[tuple, int]) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in strings; api_key stays a reference."""
    if isinstance(value, dict):
        return {k: _interpolate(v, (*loc, k), path, lines) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, (*loc, i), path, lines) for i, v in enumerate(value)]
    if not isinstance(value, str) or (loc and loc[-1] == "api_key"):
        return value

    def sub(m: re.Match) -> str:
        var, has_default, default = m.group(1), m.group(2), m.group(3)
        if var in os.environ:
            return os.environ[var]
        if has_default is not None:
            return default
        raise RecipeError(
            f"environment variable {var} is not set; export {var}=... "
            f"or give a default: ${{{var}:-value}}",
            path=path,
            line=_line_for(lines, loc),
            step=_step_label(loc, None),
            field=_field_name(loc),
        )

    return _ENV_REF.sub(sub, value)


def _step_label(loc: tuple, data: dict | None) -> str | None:
    if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
        kind = None
        if data is not None:
            steps = data.get("steps")
            if isinstance(steps, list) and loc[1] < len(steps) and isinstance(steps[loc[1]], dict):
                kind = steps[loc[1]].get("type")
        return f"steps[{loc[1]}]" + (f" ({kind})" if kind else "")
    return None


def _field_name(loc: tuple) -> str | None:
    rest = loc[2:] if len(loc) >= 2 and loc[0] == "steps" else loc
    return ".".join(str(p) for p in rest) or None


def _did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _model_at(model: type[BaseModel] | None, loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that holds the last element of ``loc``, walking down from ``model``."""
    i = 0
    while model is not None and i < len(loc) - 1:
        field = model.model_fields.get(str(loc[i]))
        if field is None:
            return None
        i += 2 if _is_container(field.annotation) else 1  # skip a dict key or list index
        model = _submodel(field.annotation)
    return model


def _is_container(annotation: Any) -> bool:
    if typing.get_origin(annotation) in (dict, list):
        return True
    return any(_is_container(a) for a in typing.get_args(annotation))


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _submodel(arg)
        if found:
            return found
    return None


def _explain(err: ValidationError, data: dict, path: str | None, lines: dict) -> RecipeError:
    """Turn pydantic's first error into a RecipeError with line, step, field and a fix.

    Unknown keys and step types come first: a misspelt key also shows up as a missing one.
    """
    first = {"extra_forbidden": 0, "union_tag_invalid": 0, "union_tag_not_found": 0}
    errors = sorted(err.errors(), key=lambda x: first.get(x["type"], 1))
    e = errors[0]
    loc = tuple(e["loc"])
    # Discriminated unions put the tag into the location: steps, 1, label, field.
    if len(loc) >= 3 and loc[0] == "steps" and loc[2] in STEP_TYPES:
        step_type, loc = loc[2], (*loc[:2], *loc[3:])
    else:
        step_type = None
    step = _step_label(loc, data)
    kind = e["type"]
    msg = e["msg"]
    field = _field_name(loc)
    if kind == "union_tag_invalid":
        tag = e.get("ctx", {}).get("tag")
        msg = f"unknown step type '{tag}'" + _did_you_mean(tag, STEP_TYPES)
        msg += f"; known types: {', '.join(STEP_TYPES)}"
        loc, field = (*loc, "type"), "type"
    elif kind == "union_tag_not_found":
        msg = f"a step needs a 'type'; known types: {', '.join(STEP_TYPES)}"
        field = "type"
    elif kind == "extra_forbidden":
        key = loc[-1]
        model = _model_at(STEP_TYPES[step_type], loc[2:]) if step_type else _model_at(Recipe, loc)
        allowed = list(model.model_fields) if model else []
        msg = f"unknown key '{key}'" + _did_you_mean(str(key), allowed)
        if allowed:
            msg += f"; allowed keys here: {', '.join(allowed)}"
    elif kind == "missing":
        msg = f"required field '{loc[-1]}' is missing"
    elif msg.startswith("Value error, "):
        msg = msg.removeprefix("Value error, ")
        if loc == () and msg.startswith("steps["):
            # A recipe-level check that names a step: point at it.
            idx = int(msg[len("steps[") : msg.index("]")])
            step, msg = msg.split(": ", 1)
            loc, field = ("steps", idx, "teacher"), "teacher"
            if idx < len(data.get("steps", [])) and "teacher" not in data["steps"][idx]:
                loc, field = ("steps", idx), None
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return RecipeError(msg, path=path, line=_line_for(lines, loc), step=step, field=field)
