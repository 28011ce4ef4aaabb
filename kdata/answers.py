"""Final answers and reference comparison: extraction, matching, ROUGE-L.

One place for what verification (``label`` with ``verify``), ``self_consistency``, ``consensus``
and SFT validation all need: pull the final answer out of a response, decide whether it matches a
reference, and score free text against a reference with ROUGE-L.
"""

from __future__ import annotations

import math
import re
import string

# Markers of a final answer, most explicit first; the last match in the text wins.
_MARKERS = (
    re.compile(r"####\s*(.+)"),  # GSM8K references and answers in that style
    re.compile(r"\\boxed\{([^{}]*)\}"),
    re.compile(r"final answer\s*(?:is)?\s*[:=]?\s*([^\s:=].*)", re.IGNORECASE),
    re.compile(r"the answer is\s*[:=]?\s*([^\s:=].*)", re.IGNORECASE),
)
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_WORD = re.compile(r"\w+")


def extract_answer(text: str | None) -> str | None:
    """The final answer of a response, or ``None`` when it has none.

    An explicit marker (``#### 42``, ``\\boxed{42}``, ``Final answer: 42``, ``The answer is 42``)
    wins, its last occurrence taken; otherwise the last number in the text. A marker's answer
    is cut at the end of its line and stripped of a trailing full stop.
    """
    if not text:
        return None
    marked = split_final_answer(text)
    if marked is not None:
        return marked[1]
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def split_final_answer(text: str | None) -> tuple[str, str] | None:
    """``(reasoning, answer)`` at the explicit marker `extract_answer` would take, else ``None``.

    The reasoning is the text before that marker, stripped; the answer is the marker's answer.
    No fallback to the last number: this is for responses asked to state their final answer.
    """
    if not text:
        return None
    for marker in _MARKERS:
        found = list(marker.finditer(text))
        if found:
            last = found[-1]
            answer = last.group(1).strip()
            answer = answer.splitlines()[0].rstrip(".").strip() if answer else ""
            if answer:
                return text[: last.start()].strip(), answer
    return None


def parse_number(text: str | None) -> float | None:
    """The number a short answer states (``$1,234.50`` → 1234.5, ``40%`` → 40), else ``None``."""
    if text is None:
        return None
    found = _NUMBER.findall(text)
    if len(found) != 1:
        return None
    try:
        return float(found[0].replace("$", "").replace(",", ""))
    except ValueError:
        return None


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD normalisation)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def answers_match(pred: str | None, ref: str | None, *, tolerance: float = 1e-6) -> bool:
    """Whether an extracted answer matches a reference.

    Two numbers match within ``tolerance`` (absolute, or relative to the reference's size);
    anything else matches when equal after `normalize`.
    """
    if pred is None or ref is None:
        return False
    a, b = parse_number(pred), parse_number(ref)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=tolerance, abs_tol=tolerance)
    return normalize(pred) == normalize(ref)


def group_answers(answers: list[str | None], *, tolerance: float = 1e-6) -> list[list[int]]:
    """The vote of self-consistency and consensus: indices of matching answers, grouped.

    Each answer joins the first group whose first answer it matches (`answers_match`); ``None``
    answers are left out. Largest group first; groups of equal size in order of first appearance.
    """
    groups: list[list[int]] = []
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        for group in groups:
            if answers_match(answer, answers[group[0]], tolerance=tolerance):
                group.append(i)
                break
        else:
            groups.append([i])
    return sorted(groups, key=len, reverse=True)  # a stable sort, reverse included


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1: the longest common subsequence of lower-cased word tokens.

    0.0 when either side has no words. Used by self-instruct's novelty filter and by SFT
    validation (the measure MiniLLM reports).
    """
    return rouge_l_tokens(words(pred), words(ref))


def words(text: str) -> list[str]:
    """The lower-cased word tokens that `rouge_l` compares."""
    return _WORD.findall(text.lower())


def rouge_l_tokens(a: list[str], b: list[str]) -> float:
    """`rouge_l` of two texts already split by `words` (for callers that tokenise once)."""
    if not a or not b:
        return 0.0
    lcs = _lcs(a, b)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]
