"""What the multi-call elicitation steps share: rendering with plain variables, strict parsers.

The parsers raise `ParseError` when a reply lacks the structure asked for; the step records that
as a failure with the raw text. They skip chatter around the structure (a preamble such as "Here
are five tasks:") but never guess at a broken structure: a list whose numbering jumps, a field
out of order or a JSON object that does not validate is an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from kdata.steps.base import ParseError, _compiled

T = TypeVar("T")

_ITEM = re.compile(r"^\s*(\d+)\s*[.)]\s+(.*\S)\s*$")
_FENCE = re.compile(r"^```[\w-]*\s*\n(.*?)\n?```$", re.S)
# "Example 2", "Pair 3:" and the like: headers between the items of a labelled-field reply.
_HEADER = re.compile(r"^\W*(?:example|pair|item)\s*\d+\W*$", re.IGNORECASE)


def render(template: str, variables: dict[str, Any]) -> str:
    """Render a Jinja template in the steps' sandbox (an undefined variable is an error)."""
    return _compiled(template).render(variables)


def numbered_list(text: str | None) -> list[str]:
    """The items of a numbered list (``1. item`` or ``1) item``), numbered consecutively.

    A line right after an item line continues that item; other text (a preamble, a closing
    remark after a blank line) is ignored. The list may start at any number.

    Raises:
        ParseError: no numbered item, or the numbering jumps.
    """
    items: list[str] = []
    numbers: list[int] = []
    open_item = False
    for line in (text or "").splitlines():
        m = _ITEM.match(line)
        if m:
            numbers.append(int(m.group(1)))
            items.append(m.group(2))
            open_item = True
        elif not line.strip():
            open_item = False
        elif open_item:
            items[-1] += " " + line.strip()
    if not items:
        raise ParseError("no numbered list in the reply")
    for prev, cur in zip(numbers, numbers[1:], strict=False):
        if cur != prev + 1:
            raise ParseError(f"the list's numbering jumps from {prev} to {cur}")
    return items


def labelled_fields(text: str | None, labels: Sequence[str]) -> list[tuple[str, str]]:
    """The ``Label: value`` fields of a reply, in order, as (label as given in ``labels``, value).

    A value runs on over the following lines up to the next label or an ``Example N`` header;
    text before the first label is ignored. Labels match case-insensitively, also in markdown
    bold (``**Input:**``).
    """
    names = {lab.lower(): lab for lab in labels}
    pattern = re.compile(
        r"^[\s*#_-]*(" + "|".join(re.escape(lab) for lab in labels) + r")[\s*_]*:[\s*_]*(.*)$",
        re.IGNORECASE,
    )
    out: list[tuple[str, list[str]]] = []
    for line in (text or "").splitlines():
        m = pattern.match(line)
        if m:
            out.append((names[m.group(1).lower()], [m.group(2)]))
        elif _HEADER.match(line):
            out.append(("", []))  # closes the value before it
        elif out:
            out[-1][1].append(line)
    return [(lab, "\n".join(lines).strip()) for lab, lines in out if lab]


def json_object(text: str | None, model: type[BaseModel]) -> BaseModel:
    """The reply as a JSON object validated by ``model`` (strictly: ``"7"`` is not an integer).

    The whole reply must be the object; one markdown code fence around it is allowed.

    Raises:
        ParseError: not JSON, not an object, or not valid against the model's schema.
    """
    data = _json_dict(text)
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'object'}: {err['msg']}"
            for err in e.errors()
        )
        raise ParseError(f"JSON does not match the schema: {problems}") from None


def schema_object(text: str | None, schema: dict[str, Any]) -> dict[str, Any]:
    """The reply as a JSON object valid against a JSON schema (one code fence allowed).

    Raises:
        ParseError: not JSON, not an object, or not valid against the schema.
    """
    import jsonschema

    data = _json_dict(text)
    problems = [
        f"{'.'.join(str(p) for p in e.absolute_path) or 'object'}: {e.message}"
        for e in jsonschema.Draft202012Validator(schema).iter_errors(data)
    ]
    if problems:
        raise ParseError(f"JSON does not match the schema: {'; '.join(problems)}")
    return data


def _json_dict(text: str | None) -> dict[str, Any]:
    """The whole reply as a JSON object (one markdown code fence around it allowed).

    Raises:
        ParseError: not JSON, or not an object.
    """
    body = (text or "").strip()
    if m := _FENCE.match(body):
        body = m.group(1).strip()
    try:
        data = json.loads(body)
    except ValueError as e:
        raise ParseError(f"not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ParseError(f"expected a JSON object, got {type(data).__name__}")
    return data
