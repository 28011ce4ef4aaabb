"""Teacher steps that elicit knowledge. `label`: a teacher answers each row."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from kdata.steps.base import ParseError, TeacherStep

if TYPE_CHECKING:
    from kdata.teachers.pool import Completion


class LabelStep(TeacherStep):
    """A teacher answers each row from a Jinja prompt; the answer goes to ``output``.

    With ``n`` > 1 each row gives ``n`` rows, one per sample.
    """

    type: Literal["label"] = "label"
    output: str = "response"

    def parse(self, row: dict, completion: Completion) -> dict[str, Any]:
        text = (completion.text or "").strip()
        if not text:
            raise ParseError(f"empty response (finish_reason={completion.finish_reason})")
        return {self.output: text}
