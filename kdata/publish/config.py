"""The recipe's ``publish:`` section."""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from pydantic import Field

from kdata.errors import KdataError
from kdata.steps.base import StrictModel

SHIPPED_TEMPLATES = ("default",)


def shipped_templates() -> Traversable:
    """The folder of the shipped card templates, the repository's top-level ``hub_cards/``.

    An installed kdata (a wheel, or ``pip install -e .``) has it as the package
    ``kdata.hub_cards``, where pyproject.toml maps it. kdata imported from a source checkout
    whose editable install predates that mapping finds no such package: it reads the checkout's
    folder (reinstall with ``pip install -e .`` to end this).
    """
    try:
        return files("kdata.hub_cards")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "hub_cards"


class PublishConfig(StrictModel):
    """Where and how a finished run is published.

    ``repo_id``, ``private``, ``split`` and ``commit_message`` drive ``kdata push``; ``dir`` writes
    the same Hub-layout folder locally at the end of every complete build. The remaining fields
    go into the dataset card. A token never belongs here: it comes from ``HF_TOKEN`` or the
    Hugging Face login.
    """

    repo_id: str | None = Field(default=None, pattern=r"^[\w.-]+/[\w.-]+$")
    private: bool = False
    split: str = Field(default="train", pattern=r"^\w+$")
    commit_message: str | None = None
    dir: str | None = None
    template: str = "default"
    license: str = "other"
    description: str | None = None
    language: list[str] = ["en"]
    task_categories: list[str] = ["text-generation"]
    tags: list[str] = []

    def template_text(self, base_dir: Path) -> str:
        """The card template's text: a shipped one by name, or a file relative to ``base_dir``.

        Raises:
            KdataError: neither a shipped template nor a readable file.
        """
        if self.template in SHIPPED_TEMPLATES:
            return shipped_templates().joinpath(f"{self.template}.md").read_text("utf-8")
        path = base_dir / self.template
        try:
            return path.read_text(encoding="utf-8")
        except OSError as e:
            raise KdataError(
                f"card template '{self.template}' is neither a shipped template "
                f"({', '.join(SHIPPED_TEMPLATES)}) nor a readable file ({path}: {e.strerror})"
            ) from None
