"""What a failed teacher call was, whether to try again, and how long to wait first.

The pool's retry loop and the batch API client share these: litellm's and the fast path's
exceptions mapped to kdata's error classes, the server's ``Retry-After``, and exponential
backoff with full jitter.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time

from kdata.teachers import openai_http

BACKOFF_BASE_S = 1.0  # first retry waits up to this long (full jitter), doubling each time
BACKOFF_CAP_S = 60.0
MAX_RETRY_AFTER_S = 300.0  # a server asking for a longer wait fails the request instead

# litellm exception name -> (error class, retryable). Checked most specific first.
_ERRORS: list[tuple[str, str, bool]] = [
    ("ContextWindowExceededError", "context_window", False),
    ("ContentPolicyViolationError", "content_policy", False),
    ("RateLimitError", "rate_limit", True),
    ("Timeout", "timeout", True),
    ("AuthenticationError", "auth", False),
    ("PermissionDeniedError", "permission", False),
    ("NotFoundError", "not_found", False),
    ("BadRequestError", "bad_request", False),
    ("UnprocessableEntityError", "bad_request", False),
    ("UnsupportedParamsError", "bad_request", False),
    ("ServiceUnavailableError", "server_error", True),
    ("InternalServerError", "server_error", True),
    ("BadGatewayError", "server_error", True),
    ("APIConnectionError", "connection_error", True),
]
# Exception names that mean the connection failed before an answer came, wherever they sit in the
# chain of causes: litellm reports a reset as an InternalServerError caused by one of them.
_CONNECTION = {
    "APIConnectionError",  # openai, litellm
    "ConnectionError",  # ConnectionResetError, ConnectionRefusedError, BrokenPipeError...
    "ClientConnectionError",  # aiohttp, ServerDisconnectedError included
    "NetworkError",  # httpx ConnectError, ReadError, WriteError
    "RemoteProtocolError",  # httpx: the server closed the connection without an answer
}
_TIMEOUT = {"Timeout", "TimeoutError", "TimeoutException", "APITimeoutError"}


def classify(error: BaseException) -> tuple[str, bool]:
    """The error class of a failed call and whether retrying could help."""
    if isinstance(error, openai_http.StatusError):
        return error.error_class, error.retryable
    if isinstance(error, asyncio.TimeoutError):
        return "timeout", True
    if _lost_connection(error):
        return "connection_error", True
    names = {c.__name__ for c in type(error).__mro__}
    for cls_name, error_class, retryable in _ERRORS:
        if cls_name in names:
            return error_class, retryable
    status = getattr(error, "status_code", None)
    if status == 429:
        return "rate_limit", True
    if isinstance(status, int) and status >= 500:
        return "server_error", True
    return type(error).__name__, False


def _lost_connection(error: BaseException) -> bool:
    """Whether the first timeout or connection failure in the error's chain is a connection one."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        names = {c.__name__ for c in type(link).__mro__}
        if names & _TIMEOUT:
            return False
        if names & _CONNECTION:
            return True
        link = link.__cause__ or link.__context__
    return False


def retry_after(error: BaseException) -> float | None:
    """Seconds the server asked us to wait (``Retry-After`` or ``retry-after-ms``), if any."""
    headers = getattr(error, "litellm_response_headers", None)
    if headers is None:
        headers = getattr(error, "headers", None)  # the fast path's StatusError
    if headers is None:
        headers = getattr(getattr(error, "response", None), "headers", None)
    if not headers:
        return None
    try:
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000
        value = headers.get("retry-after")
    except (TypeError, ValueError, AttributeError):
        return None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):  # neither seconds nor an HTTP-date: back off as usual
        return None
    return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def backoff_delay(attempt: int, after: float | None) -> float:
    """Exponential backoff with full jitter, never shorter than the server's Retry-After."""
    jittered = random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1)))
    return jittered if after is None else after + jittered * 0.1


def describe(error: BaseException) -> str:
    """The error's message, cut at 2,000 characters."""
    text = str(error).strip() or type(error).__name__
    return text if len(text) < 2000 else text[:2000] + "..."
