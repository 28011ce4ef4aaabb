"""Each elicitation method's default prompts: Jinja templates shipped in this package.

``load("self_refine.critique")`` reads ``self_refine.critique.jinja``. A recipe overrides any
template field inline or with ``{path: file.jinja}`` (see `kdata.steps.base.Template`).
"""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def load(name: str) -> str:
    """The text of the packaged template ``<name>.jinja``."""
    return resources.files(__name__).joinpath(f"{name}.jinja").read_text(encoding="utf-8")
