"""`NoveltyIndex`: the ROUGE-L of a new text against every text of a growing pool, fast.

Self-Instruct keeps a generated instruction only when its ROUGE-L to every instruction in the
pool is below a threshold. Comparing with each of thousands of pool texts by dynamic programming
is slow, so the index bounds the score first. ROUGE-L F1 is ``2·LCS / (len(a) + len(b))``, and
the longest common subsequence of two token lists is at most the size of their multiset
intersection ``m``. So ``2·m / (len(a) + len(b))`` bounds the score from above; ``m`` for every
pool text comes from an inverted index in a few numpy operations. Only texts whose bound reaches
the threshold get the exact LCS, best bound first, and the search stops as soon as no remaining
bound can beat the best exact score found. Scores are exactly those of `kdata.answers.rouge_l`.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from kdata.answers import rouge_l_tokens, words

_SLACK = 1e-9


class _Postings:
    """Pool positions holding a token, and how many times, in arrays grown by doubling."""

    __slots__ = ("count", "index", "size")

    def __init__(self) -> None:
        self.index = np.empty(4, dtype=np.int64)
        self.count = np.empty(4, dtype=np.int32)
        self.size = 0

    def append(self, i: int, c: int) -> None:
        if self.size == len(self.index):
            self.index = np.resize(self.index, 2 * self.size)
            self.count = np.resize(self.count, 2 * self.size)
        self.index[self.size], self.count[self.size] = i, c
        self.size += 1


class NoveltyIndex:
    """A pool of texts and the most similar of them to a query, by ROUGE-L."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self._tokens: list[list[str]] = []
        self._lengths = np.empty(16, dtype=np.int64)
        self._postings: dict[str, _Postings] = {}

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: str) -> None:
        """Put a text into the pool."""
        i = len(self.texts)
        tokens = words(text)
        self.texts.append(text)
        self._tokens.append(tokens)
        if i == len(self._lengths):
            self._lengths = np.resize(self._lengths, 2 * i)
        self._lengths[i] = len(tokens)
        for tok, c in Counter(tokens).items():
            self._postings.setdefault(tok, _Postings()).append(i, c)

    def most_similar(self, text: str, threshold: float) -> tuple[int, float] | None:
        """The pool text most similar to ``text`` and its ROUGE-L, if that reaches ``threshold``.

        Returns:
            ``(position in the pool, score)`` of the most similar text when its score is at or
            above ``threshold``; ``None`` when every pool text scores below it.
        """
        tokens = words(text)
        n = len(self.texts)
        if not tokens or n == 0:
            return None
        shared = np.zeros(n, dtype=np.int64)
        for tok, c in Counter(tokens).items():
            p = self._postings.get(tok)
            if p is not None:
                shared[p.index[: p.size]] += np.minimum(p.count[: p.size], c)
        # The bound and the exact score are equal when LCS = m but are computed differently:
        # _SLACK keeps float rounding from hiding a text whose exact score reaches the threshold.
        bound = 2.0 * shared / (len(tokens) + self._lengths[:n]) + _SLACK
        candidates = np.flatnonzero(bound >= threshold)
        if len(candidates) == 0:
            return None
        order = candidates[np.argsort(-bound[candidates], kind="stable")]
        best: tuple[int, float] | None = None
        for j in order:
            if best is not None and bound[j] <= best[1]:
                break
            score = rouge_l_tokens(tokens, self._tokens[j])
            if score >= threshold and (best is None or score > best[1]):
                best = (int(j), score)
        return best
