"""The exceptions kdata raises. Every message says what went wrong, where, and what to do."""

from __future__ import annotations


class KdataError(Exception):
    """Base class of every error kdata raises on purpose."""


class RecipeError(KdataError):
    """A recipe that cannot be loaded: bad YAML, an unknown key, a missing variable.

    Attributes:
        path: the recipe file, when the recipe came from one.
        line: 1-based line in that file, when known.
        step: ``"steps[1] (label)"`` style location of the step, when the error is in one.
        field: dotted name of the offending field, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        step: str | None = None,
        field: str | None = None,
    ) -> None:
        self.path, self.line, self.step, self.field = path, line, step, field
        self.message = message
        where = ":".join(str(p) for p in (path, line) if p is not None)
        parts = [where] if where else []
        if step:
            parts.append(step)
        if field:
            parts.append(f"field '{field}'")
        super().__init__(f"{', '.join(parts)}: {message}" if parts else message)


class TeacherError(KdataError):
    """A teacher call that failed for good.

    Attributes:
        error_class: short name of the failure (``rate_limit``, ``auth``, ``context_window``...).
        retryable: whether the failure class is one that retries could fix.
        attempts: how many times the request was sent.
    """

    def __init__(self, error_class: str, message: str, *, retryable: bool, attempts: int = 1):
        self.error_class, self.retryable, self.attempts = error_class, retryable, attempts
        super().__init__(f"{error_class}: {message}")


class BudgetExceeded(KdataError):
    """Sending one more request could exceed the recipe's ``budget_usd``."""


class RunLocked(KdataError):
    """Another build holds the run directory's lock (the CLI exits with code 4)."""


class CacheError(KdataError):
    """The request cache is damaged, holds less than the run stored, or vanished during a build."""
