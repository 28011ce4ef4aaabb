"""The embedded teacher as a litellm provider: parameters, logprobs, GGUF paths."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from kdata import RecipeError, recipe_from_yaml
from kdata.recipe import Teacher
from kdata.teachers.cache import RequestCache
from kdata.teachers.local import embedded_gguf
from kdata.teachers.pool import TeacherPool

MSG = [{"role": "user", "content": "Name a colour."}]


def ask(
    tmp_path: Path,
    model: str = "local/smollm2-135m-instruct",
    request: dict | None = None,
    structured_output: bool | None = None,
    **params,
):
    pool = TeacherPool(
        {"t": Teacher(model=model, params=params, structured_output=structured_output)},
        RequestCache(tmp_path / f"{len(list(tmp_path.iterdir()))}.sqlite"),
    )
    return asyncio.run(pool.complete("t", MSG, route_key="r", params=request))


def test_logprobs_are_captured_per_token(tmp_path: Path) -> None:
    c = ask(tmp_path, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = c.logprobs["content"]
    assert len(content) == c.completion_tokens
    assert all(len(tok["top_logprobs"]) == 3 and tok["logprob"] <= 0 for tok in content)
    assert "".join(tok["token"] for tok in content).strip() == c.text.strip()


def test_seed_and_temperature_reach_llama_cpp(tmp_path: Path) -> None:
    a = ask(tmp_path, max_tokens=24, temperature=1.0, seed=3)
    b = ask(tmp_path, max_tokens=24, temperature=1.0, seed=3)
    others = {ask(tmp_path, max_tokens=24, temperature=1.0, seed=s).text for s in (4, 5, 6)}
    assert a.text == b.text  # same seed, same sample
    assert others - {a.text}  # other seeds give other samples
    short = ask(tmp_path, max_tokens=2, temperature=0)
    assert short.completion_tokens == 2 and short.finish_reason == "length"


def test_time_in_line_for_the_model_is_not_timed(tmp_path: Path) -> None:
    # 100 requests in flight for a model that answers one at a time: the last waits for 99
    # generations, past the timeout, though each (one token) takes a small part of it.
    smol = "local/smollm2-135m-instruct"
    teachers = {
        "warm": Teacher(model=smol, params={"max_tokens": 1}),
        "t": Teacher(
            model=smol,
            params={"max_tokens": 1, "temperature": 0.7, "seed": 0},
            timeout=3,
            max_retries=0,
            max_concurrency=100,  # a recipe may allow this; the model still takes one at a time
        ),
    }
    pool = TeacherPool(teachers, RequestCache(tmp_path / "cache.sqlite"))

    async def ask_all():
        # The first call (model load, first decode) can take seconds on a busy machine: it goes
        # to a teacher with the default timeout.
        await pool.complete("warm", MSG, route_key="w")
        return await asyncio.gather(
            *(
                pool.complete("t", [{"role": "user", "content": f"Say {i}."}], route_key=str(i))
                for i in range(100)
            ),
            return_exceptions=True,
        )

    answers = asyncio.run(ask_all())
    assert [a for a in answers if isinstance(a, Exception)] == []
    assert all(a.completion_tokens == 1 and not a.cached for a in answers)
    ledger = pool.ledgers["t"]
    assert ledger.requests == ledger.responses == 100 and not ledger.failures


def test_any_gguf_path_runs(tmp_path: Path) -> None:
    c = ask(tmp_path, model=f"local/{embedded_gguf()}", max_tokens=4, temperature=0)
    assert c.text and c.model == f"local/{embedded_gguf()}"


@pytest.mark.parametrize("model", ["local/nope.gguf", "local/some-other-model"])
def test_unknown_local_model_is_a_recipe_error(model: str) -> None:
    r = recipe_from_yaml(
        f"name: t\nteachers:\n  x: {{model: {model}}}\nsteps:\n"
        "  - {type: label, teacher: x, prompt: hi}\n"
    )
    with pytest.raises(RecipeError) as info:
        r.check_runtime()
    assert info.value.field == "teachers.x.model" and "local" in str(info.value)


def test_a_json_schema_constrains_the_reply(tmp_path: Path) -> None:
    """llama.cpp turns the schema into a grammar: the 135M model, which answers in prose when
    free, writes JSON of the schema's shape; a teacher set not to take schemas never sees it."""

    class Colour(BaseModel):
        name: str
        warm: bool

    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "Colour", "schema": Colour.model_json_schema()},
    }
    free = ask(tmp_path, max_tokens=48, temperature=0)
    with pytest.raises(ValidationError):
        Colour.model_validate_json(free.text)
    guided = ask(tmp_path, request={"response_format": fmt}, max_tokens=48, temperature=0)
    assert Colour.model_validate_json(guided.text).name
    off = ask(
        tmp_path,
        request={"response_format": fmt},
        structured_output=False,
        max_tokens=48,
        temperature=0,
    )
    assert off.text == free.text and off.request_hash == free.request_hash
