"""Mathematical equivalence of a response's answer and a reference, through ``math-verify``.

math-verify parses both sides with sympy (LaTeX, fractions, sets, intervals, units and percent
signs stripped) and compares the expressions. Its own timeouts use ``SIGALRM``, which works only
in a process's main thread, and a pathological expression can keep sympy busy for minutes; so
every check runs in the main thread of a worker process, where those timeouts hold, and a
worker that still does not answer in time is replaced.
"""

from __future__ import annotations

import atexit
import multiprocessing
import threading
from typing import Any

from kdata.answers import answers_match, extract_answer
from kdata.errors import KdataError

PARSE_TIMEOUT_S = 5  # math-verify's own, per parse and per comparison
_pool: Any = None
_lock = threading.Lock()


def _parse_reference(reference: str) -> list:
    from math_verify import parse

    # A LaTeX, set or interval reference (``\{1, 2\}``) parses whole only inside math
    # delimiters (bare, it reads as its last number); a plain one parses best as it is.
    wrapped = f"${reference}$"
    latex = any(c in reference for c in "\\{}()[]^_")
    first, then = (wrapped, reference) if latex else (reference, wrapped)
    return parse(first, parsing_timeout=PARSE_TIMEOUT_S) or parse(
        then, parsing_timeout=PARSE_TIMEOUT_S
    )


def _check(response: str, reference: str) -> tuple[bool, str | None]:
    """In the worker: (equivalent, the answer math-verify read in the response)."""
    from math_verify import parse, verify

    gold = _parse_reference(reference)
    pred = parse(response, parsing_timeout=PARSE_TIMEOUT_S)
    if not pred:
        return False, None
    if not gold:  # not mathematics (a word, a name): the plain comparison
        answer = extract_answer(response)
        return answers_match(answer, reference), answer
    ok = verify(gold, pred, timeout_seconds=PARSE_TIMEOUT_S)
    return bool(ok), str(pred[-1])


def _workers():
    global _pool
    with _lock:
        if _pool is None:
            ctx = multiprocessing.get_context("forkserver")
            _pool = ctx.Pool(processes=max(1, min(4, multiprocessing.cpu_count())))
        return _pool


def _close() -> None:
    global _pool
    with _lock:
        if _pool is not None:
            _pool.terminate()
            _pool = None


atexit.register(_close)  # once: a replaced pool is closed by the same call


def available() -> None:
    """Raise unless math-verify is installed.

    Raises:
        KdataError: saying how to install it.
    """
    try:
        import math_verify  # noqa: F401
    except ImportError:
        raise KdataError(
            "verify.math needs the math-verify package: pip install 'kdata[math]'"
        ) from None


def equivalent(response: str, reference: str, timeout_s: float) -> tuple[bool | None, str | None]:
    """Whether ``response``'s final answer equals ``reference`` mathematically.

    Returns:
        (True or False, or None when the check ran out of ``timeout_s``; the answer read in
        the response, or None when none was found).
    """
    job = _workers().apply_async(_check, (response, reference))
    try:
        return job.get(timeout=timeout_s)
    except multiprocessing.TimeoutError:
        _close()  # a worker stuck past sympy's own timeouts: start afresh
        return None, None
