"""One workspace for the life of a process: its store, and the LLM, encoder and fitted
recommender, each built once, on first use.

Fitted models are saved under ``<workspace>/models/<key>/`` (one ``.npy`` file per array
and a ``manifest.json``), keyed by the data version, the population the models saw, the
active run, the ranker spec and the encoder, so the next process memory-maps them instead of
embedding the catalogue and refitting EASE. A set is written to a temporary folder and
renamed into place (a crash leaves no half set); sets for older data are removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from segrec.config import Settings
from segrec.errors import WorkspaceError
from segrec.evaluate import event_times
from segrec.ranker import Ranker, RankerSpec, csr_from, csr_parts
from segrec.serving import ModelVersion, Recommender, Served
from segrec.store import Assignment, RunRecord, Store

if TYPE_CHECKING:
    from segrec.embed import Encoder
    from segrec.llm.base import LLM

MODELS_DIR = "models"
KEEP_SETS = 4  # saved model sets kept per data version (other runs, specs)
STALE_TMP_S = 3600  # a temporary folder this old belongs to a crashed writer
_ARRAYS = (
    "item_vectors",
    "labels",
    "X_data",
    "X_indices",
    "X_indptr",
    "times_data",
    "times_indices",
    "times_indptr",
)
# Part of every saved set's key: a set written by code that saved less (before the event
# times and ItemKNN's factored path) is refit once instead of served without them.
MODELS_FORMAT = 2


class Workspace:
    """The store (one connection per thread), plus the LLM and encoder built on first use.

    Close it (or use it as a context manager) to close every connection. ``llm`` and
    ``encoder`` replace the configured backends (tests pass fakes).
    """

    def __init__(
        self, settings: Settings, *, llm: LLM | None = None, encoder: Encoder | None = None
    ) -> None:
        self.settings = settings
        self._llm = llm
        self._encoder = encoder
        self._lock = threading.Lock()
        self._local = threading.local()
        self._stores: list[Store] = []
        self.store  # noqa: B018 - open now: a missing workspace is an error here, not later

    @property
    def path(self) -> Path:
        return self.settings.workspace

    @property
    def models_dir(self) -> Path:
        return self.path / MODELS_DIR

    @property
    def store(self) -> Store:
        """This thread's connection (SQLite connections are not shared between threads)."""
        store = getattr(self._local, "store", None)
        if store is None:
            store = Store.open(self.path)
            self._local.store = store
            with self._lock:
                self._stores.append(store)
        return store

    @property
    def llm(self) -> LLM:
        with self._lock:
            if self._llm is None:
                from segrec.llm import make_llm

                self._llm = make_llm(self.settings)
            return self._llm

    @property
    def encoder(self) -> Encoder:
        with self._lock:
            if self._encoder is None:
                from segrec.embed import SentenceTransformerEncoder

                self._encoder = SentenceTransformerEncoder(self.settings.encoder)
            return self._encoder

    def close(self) -> None:
        with self._lock:
            stores, self._stores = self._stores, []
        for store in stores:
            store.close()
        self._local = threading.local()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- state

    def version(self) -> ModelVersion:
        """The data version and active run now (two small queries: cheap to poll)."""
        store = self.store
        return ModelVersion(store.data_version(), store.active_run_id())

    def assign(self, user_ids: Sequence[str]) -> list[Assignment]:
        """The users' assignments in the active run, assigning those it does not hold yet."""
        from segrec.pipeline import assign_in

        found, _ = assign_in(
            self.store, self.settings, lambda: self.encoder, user_ids, llm=lambda: self.llm
        )
        return found

    # ReasonCache, on this thread's connection (reasons are written from worker threads).
    def cached_reason(self, key: str) -> dict[str, Any] | None:
        return self.store.cached_reason(key)

    def cache_reason(self, key: str, reason: dict[str, Any]) -> None:
        self.store.cache_reason(key, reason)

    # ---------------------------------------------------------------- recommender

    def recommender(self, *, on_stage: Callable[[str], None] | None = None) -> Recommender:
        """The fitted recommender for the data and active run now: loaded from saved files
        when a previous process fitted the same thing, else tuned (once per data version
        and run), fitted and saved."""
        stage = on_stage or (lambda _: None)
        store = self.store
        version = self.version()
        population = store.population()
        items = store.items_frame().reset_index(drop=True)
        run = store.run(version.run_id) if version.run_id is not None else None
        notes: list[str] = []
        if run is None:
            notes.append("no clustering run yet: the segment signal is off (run `segrec cluster`)")
        segments = store.segments(run.id) if run is not None else []
        stored = store.ranker_spec(version.data_version, version.run_id)
        encoder_id = self.encoder.encoder_id
        if stored is not None:
            spec = RankerSpec.from_dict(stored)
            key = artifact_key(version, population, spec, encoder_id)
            served = self._load(key, spec, items, run, notes)
            if served is not None:
                return Recommender(self, served, version, segments=segments)
        interactions = store.interactions_frame()
        if interactions.empty:
            raise WorkspaceError(
                f"{self.path}: no interactions yet — run `segrec profile RATINGS --items "
                "ITEMS` first"
            )
        stage("embedding items")
        from segrec.segments import item_matrix

        item_vectors = item_matrix(items, self.encoder, cache=store)
        X, users = history_matrix(interactions, items)
        known = store.assignments(run.id) if run is not None else {}
        labels = np.array(
            [known[u].segment_id if u in known else -1 for u in users], dtype=np.int64
        )
        if stored is None:
            spec = _tune(
                interactions, items, item_vectors, users, labels, run, self.settings, stage
            )
            store.save_ranker_spec(version.data_version, version.run_id, spec.as_dict())
        stage("fitting the ranker")
        times = event_times(interactions.rename(columns={"seq": "line"}), users, items["item_id"])
        categories = [tuple(c) for c in items["categories"]]
        ranker = Ranker(spec, item_vectors, categories=categories).fit(X, labels, times=times)
        served = Served(
            ranker, items, item_vectors, X, users, labels, run, notes + spec.notes, times=times
        )
        key = artifact_key(version, population, spec, encoder_id)
        save_models(self.models_dir, key, served, version)
        return Recommender(self, served, version, segments=segments, fitted=True)

    def _load(
        self,
        key: str,
        spec: RankerSpec,
        items: pd.DataFrame,
        run: RunRecord | None,
        notes: list[str],
    ) -> Served | None:
        loaded = load_models(self.models_dir, key)
        if loaded is None:
            return None
        arrays, manifest = loaded
        if manifest["item_ids"] != [str(i) for i in items["item_id"]]:
            return None  # the catalogue changed under the same version: refit
        X = csr_from(arrays, "X", (len(manifest["users"]), len(items)))
        times = csr_from(arrays, "times", X.shape)
        ranker = Ranker.from_arrays(spec, arrays["item_vectors"], arrays)
        return Served(
            ranker,
            items,
            arrays["item_vectors"],
            X,
            list(manifest["users"]),
            np.asarray(arrays["labels"]),
            run,
            notes + spec.notes,
            times=times,
        )


def history_matrix(interactions: pd.DataFrame, items: pd.DataFrame) -> tuple[sp.csr_matrix, list]:
    """Binary users × catalogue matrix of who interacted with what, and its row users."""
    item_index = pd.Index(items["item_id"])
    users = list(pd.unique(interactions["user_id"]))
    rows = pd.Index(users).get_indexer(interactions["user_id"])
    cols = item_index.get_indexer(interactions["item_id"])
    X = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(users), len(items))
    )
    X.sum_duplicates()
    X.data[:] = 1.0
    return X, users


def _tune(
    interactions: pd.DataFrame,
    items: pd.DataFrame,
    item_vectors: np.ndarray,
    users: list[str],
    labels: np.ndarray,
    run: RunRecord | None,
    settings: Settings,
    stage: Callable[[str], None],
) -> RankerSpec:
    """Weights tuned on a validation split (once per data version and run)."""
    from segrec.evaluate import Split, protocol_split
    from segrec.ranker import tune_ranker

    stage("tuning the ranker on a validation split (once per data and run)")
    split = protocol_split(interactions.rename(columns={"seq": "line"}))
    vectors_by_id = dict(zip(items["item_id"], item_vectors, strict=True))

    def vectors_for(part: Split) -> np.ndarray:
        return np.stack([vectors_by_id[i] for i in part.items])

    categories_by_id = dict(zip(items["item_id"], items["categories"], strict=True))

    def categories_for(part: Split) -> list[tuple[str, ...]]:
        return [tuple(categories_by_id[i]) for i in part.items]

    label_of = dict(zip(users, labels, strict=True))

    def labels_for(part: Split) -> tuple[np.ndarray, np.ndarray]:
        # By id: on a stacked cold split the scored rows repeat the users.
        fit = np.array([label_of.get(u, -1) for u in part.fit_users], dtype=np.int64)
        scored = np.array([label_of.get(u, -1) for u in part.users], dtype=np.int64)
        return fit, scored

    spec = tune_ranker(
        split,
        item_vectors_for=vectors_for,
        labels_for=labels_for if run is not None else None,
        categories_for=categories_for,
        seed=settings.seed,
        on_stage=stage,
    )
    if run is not None:
        spec.notes.append(f"segment signal from run {run.id}, whose clustering saw full histories")
    return spec


# ------------------------------------------------------------------------------ saved models


def artifact_key(version: ModelVersion, population: str, spec: RankerSpec, encoder_id: str) -> str:
    body = json.dumps(
        {
            "data": version.data_version,
            "run": version.run_id,
            "population": population,
            "spec": spec.as_dict(),
            "encoder": encoder_id,
            "format": MODELS_FORMAT,
        },
        sort_keys=True,
    )
    return hashlib.sha256(body.encode()).hexdigest()[:24]


def save_models(root: Path, key: str, served: Served, version: ModelVersion) -> Path:
    """Write a fitted model set atomically (temp folder, then rename) and drop stale sets."""
    root.mkdir(exist_ok=True)
    final = root / key
    if final.is_dir():
        return final
    arrays = {
        "item_vectors": np.asarray(served.item_vectors, dtype=np.float32),
        "labels": np.asarray(served.labels, dtype=np.int64),
        **csr_parts("X", served.X),
        **csr_parts("times", _times_of(served)),
        **served.ranker.arrays(),
    }
    tmp = root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
        manifest = {
            "key": key,
            "data_version": version.data_version,
            "run": version.run_id,
            "created_at": time.time(),
            "arrays": sorted(arrays),
            "users": [str(u) for u in served.users],
            "item_ids": [str(i) for i in served.items["item_id"]],
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
        try:
            os.rename(tmp, final)
        except OSError:  # another process saved the same set first
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    clean_models(root, keep=key, data_version=version.data_version)
    return final


def _times_of(served: Served) -> sp.csr_matrix:
    """The event-time matrix to save (an empty one for a ranker fit without)."""
    if served.times is None:
        return sp.csr_matrix(served.X.shape, dtype=np.float64)
    return sp.csr_matrix(served.times)


def load_models(root: Path, key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """A saved set's arrays, memory-mapped (read-only), and its manifest; None if absent
    or unreadable (then the caller refits)."""
    folder = root / key
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        arrays = {
            name: np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            for name in manifest["arrays"]
        }
    except (OSError, ValueError, KeyError):
        return None
    if manifest.get("key") != key or not set(_ARRAYS) <= set(arrays):
        return None
    return arrays, manifest


def clean_models(root: Path, *, keep: str, data_version: str) -> None:
    """Remove sets of other data versions, all but the newest few of this one, and
    temporary folders left by crashed writers. A process that has a removed set mapped
    keeps reading it (the files live on until unmapped)."""
    sets: list[tuple[float, Path]] = []
    for folder in root.iterdir():
        if folder.name.startswith(".tmp-"):
            if time.time() - folder.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(folder, ignore_errors=True)
            continue
        if folder.name == keep or not folder.is_dir():
            continue
        try:
            manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            shutil.rmtree(folder, ignore_errors=True)
            continue
        if manifest.get("data_version") != data_version:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            sets.append((float(manifest.get("created_at", 0)), folder))
    for _, folder in sorted(sets, reverse=True)[KEEP_SETS - 1 :]:
        shutil.rmtree(folder, ignore_errors=True)
