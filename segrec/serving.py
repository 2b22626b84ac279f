"""Recommend and explain from a workspace: the library API behind `segrec recommend` and
`segrec explain` (settings in, results out, no printing).

The ranker's weights are tuned once per data version and clustering run and stored in the
workspace (table ``rankers``); each call refits the models on every interaction (EASE takes
seconds on a 9k-item catalogue) and scores only the users asked for.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from segrec.config import Settings
from segrec.embed import SentenceTransformerEncoder, embed_present
from segrec.errors import InputError, WorkspaceError
from segrec.evaluate import Split, protocol_split
from segrec.llm import make_llm
from segrec.llm.base import LLM, RetryPolicy
from segrec.pipeline import assign_users_to_run, generation_params, run_profiles
from segrec.profile import Event, Profile, Vocabulary, user_events, value_scales
from segrec.ranker import SIGNALS, Ranker, RankerSpec, Recommendations, tune_ranker
from segrec.reasons import Candidate, write_reasons
from segrec.segments import item_matrix
from segrec.store import RunRecord, Store

MAX_N = 1000
OUT_FORMATS = (".parquet", ".csv", ".json")
BECAUSE_TITLES = 2


@dataclass
class Filters:
    """Optional restrictions on what may be recommended (on top of "never seen")."""

    categories: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)


@dataclass
class Served:
    """A fitted ranker over the workspace catalogue, and what it needs to score a user."""

    ranker: Ranker
    items: pd.DataFrame  # catalogue in column order: item_id, title, categories, text
    item_vectors: np.ndarray
    X: sp.csr_matrix  # every user with interactions × catalogue, binary
    users: list[str]
    labels: np.ndarray  # segment per row of X in the active run, -1 when none
    run: RunRecord | None
    notes: list[str]

    def rows(self, user_ids: Sequence[str]) -> np.ndarray:
        index = {u: r for r, u in enumerate(self.users)}
        return np.array([index[u] for u in user_ids], dtype=np.int64)


def check_n(n: int) -> int:
    if not 1 <= n <= MAX_N:
        raise InputError(f"--n {n}: must be between 1 and {MAX_N}")
    return n


def check_out(path: Path) -> Path:
    """Refuse an output path segrec cannot write before any work is done."""
    if path.suffix.lower() not in OUT_FORMATS:
        raise InputError(
            f"--out {path}: unknown format {path.suffix or '(none)'!r} — use a name ending in "
            + ", ".join(OUT_FORMATS)
        )
    if path.is_dir():
        raise InputError(f"--out {path}: is a directory — give a file name")
    if not path.parent.exists():
        raise InputError(f"--out {path}: folder {path.parent} does not exist — create it first")
    return path


def _check_users(store: Store, user_ids: Sequence[str]) -> None:
    for user in user_ids:
        if not store.has_user(user):
            raise InputError(f"unknown user id {user!r} — list users with `segrec users`")


def _allowed(items: pd.DataFrame, filters: Filters) -> np.ndarray | None:
    """Boolean mask over the catalogue, or None when nothing is filtered."""
    if not filters.categories and not filters.exclude:
        return None
    mask = np.ones(len(items), dtype=bool)
    if filters.categories:
        known = {c for cats in items["categories"] for c in cats}
        lower = {c.lower(): c for c in known}
        wanted = set()
        for category in filters.categories:
            match = lower.get(category.strip().lower())
            if match is None:
                examples = ", ".join(sorted(known)[:8])
                raise InputError(
                    f"--category {category!r}: no item has this category — known ones include "
                    f"{examples}"
                )
            wanted.add(match)
        mask &= np.array([bool(wanted & set(cats)) for cats in items["categories"]])
    if filters.exclude:
        index = pd.Index(items["item_id"])
        positions = index.get_indexer(filters.exclude)
        if (positions < 0).any():
            missing = filters.exclude[int(np.flatnonzero(positions < 0)[0])]
            raise InputError(f"--exclude: unknown item id {missing!r} — not in the catalogue")
        mask[positions] = False
    return mask


def _labels(store: Store, run: RunRecord | None, users: Sequence[str]) -> np.ndarray:
    if run is None:
        return np.full(len(users), -1, dtype=np.int64)
    known = store.assignments(run.id)
    return np.array([known[u].segment_id if u in known else -1 for u in users], dtype=np.int64)


def load_ranker(
    store: Store, settings: Settings, *, on_stage: Callable[[str], None] | None = None
) -> Served:
    """The workspace's ranker: tuned weights from the store (tuned now if missing), fitted."""
    stage = on_stage or (lambda _: None)
    items = store.items_frame().reset_index(drop=True)
    interactions = store.interactions_frame()
    if interactions.empty:
        raise WorkspaceError(
            f"{settings.workspace}: no interactions yet — run `segrec profile RATINGS --items "
            "ITEMS` first"
        )
    stage("embedding items")
    encoder = SentenceTransformerEncoder(settings.encoder)
    item_vectors = item_matrix(items, encoder, cache=store)
    item_index = pd.Index(items["item_id"])
    users = list(pd.unique(interactions["user_id"]))
    user_index = pd.Index(users)
    rows = user_index.get_indexer(interactions["user_id"])
    cols = item_index.get_indexer(interactions["item_id"])
    X = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(users), len(items))
    )
    X.sum_duplicates()
    X.data[:] = 1.0
    run = store.active_run()
    labels = _labels(store, run, users)
    notes: list[str] = []
    if run is None:
        notes.append("no clustering run yet: the segment signal is off (run `segrec cluster`)")

    version = store.data_version()
    stored = store.ranker_spec(version, run.id if run else None)
    if stored is not None:
        spec = RankerSpec.from_dict(stored)
    else:
        stage("tuning the ranker on a validation split (once per data and run)")
        split = protocol_split(interactions.rename(columns={"seq": "line"}))
        vectors_by_id = dict(zip(items["item_id"], item_vectors, strict=True))

        def vectors_for(part: Split) -> np.ndarray:
            return np.stack([vectors_by_id[i] for i in part.items])

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
            seed=settings.seed,
            on_stage=stage,
        )
        if run is not None:
            spec.notes.append(
                f"segment signal from run {run.id}, whose clustering saw full histories"
            )
        store.save_ranker_spec(version, run.id if run else None, spec.as_dict())
    notes += spec.notes
    stage("fitting the ranker")
    ranker = Ranker(spec, item_vectors).fit(X, labels)
    return Served(ranker, items, item_vectors, X, users, labels, run, notes)


def _user_vectors(
    store: Store, settings: Settings, served: Served, user_ids: Sequence[str]
) -> np.ndarray | None:
    """The cosine signal's user vectors per ``represent`` (None: the history mean)."""
    if settings.represent == "items":
        return None
    from segrec.ranker import history_vectors

    history = history_vectors(served.X[served.rows(user_ids)], served.item_vectors)
    encoder = SentenceTransformerEncoder(settings.encoder)
    texts = []
    for user in user_ids:
        record = store.profile(user)
        texts.append(Profile.model_validate(record.profile).embedding_text() if record else "")
    profile, missing = embed_present(texts, encoder, cache=store)
    profile[missing] = history[missing]
    if settings.represent == "profile":
        return profile
    from segrec.embed import mix_vectors
    from segrec.segments import MIX_WEIGHT

    return mix_vectors(profile, history, MIX_WEIGHT)


@dataclass
class RecommendResult:
    table: pd.DataFrame  # user_id, rank, item_id, title, score, one column per signal
    notes: list[str]
    spec: RankerSpec


def _table(served: Served, user_ids: Sequence[str], recs: Recommendations) -> pd.DataFrame:
    n = recs.indices.shape[1]
    valid = recs.indices >= 0
    user_col = np.repeat(np.asarray(user_ids, dtype=object), n)[valid.ravel()]
    rank = np.tile(np.arange(1, n + 1), len(user_ids))[valid.ravel()]
    cols = recs.indices[valid]
    frame = pd.DataFrame(
        {
            "user_id": user_col,
            "rank": rank,
            "item_id": served.items["item_id"].to_numpy()[cols],
            "title": served.items["title"].to_numpy()[cols],
            "score": recs.scores[valid],
        }
    )
    for name in SIGNALS:
        if name in recs.contributions:
            frame[name] = recs.contributions[name][valid]
    return frame


def recommend(
    settings: Settings,
    user_ids: Sequence[str] | None,
    *,
    n: int = 10,
    filters: Filters | None = None,
    on_stage: Callable[[str], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> RecommendResult:
    """Top-n unseen items for the given users (None: every user with interactions)."""
    check_n(n)
    with Store.open(settings.workspace) as store:
        if user_ids is not None:
            _check_users(store, user_ids)
        # Filters are checked before the ranker is tuned (and stored): bad input writes nothing.
        allowed = _allowed(store.items_frame(), filters or Filters())
        served = load_ranker(store, settings, on_stage=on_stage)
        wanted = list(user_ids) if user_ids is not None else served.users
        X_rows, labels, vectors = _histories(store, settings, served, wanted)
    done = 0

    def progress(batch: int) -> None:
        nonlocal done
        done += batch
        if on_progress is not None:
            on_progress(done, len(wanted))

    recs = served.ranker.recommend(
        X_rows, n, labels=labels, user_vectors=vectors, allowed=allowed, on_batch=progress
    )
    notes = list(served.notes)
    short = int((served.ranker.groups(X_rows) == "short").sum())
    if short:
        notes.append(
            f"{short} user(s) with ≤ {served.ranker.spec.short_history} known items ranked "
            "with the short-history weights"
        )
    return RecommendResult(_table(served, wanted, recs), notes, served.ranker.spec)


def _histories(
    store: Store, settings: Settings, served: Served, user_ids: Sequence[str]
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray | None]:
    """History rows, segment labels and cosine vectors of users (empty for new users)."""
    index = {u: r for r, u in enumerate(served.users)}
    rows = [index.get(u, -1) for u in user_ids]
    empty = sp.csr_matrix((1, served.X.shape[1]), dtype=np.float32)
    X_rows = sp.csr_matrix(sp.vstack([served.X[r] if r >= 0 else empty for r in rows]))
    labels = np.array([served.labels[r] if r >= 0 else -1 for r in rows], dtype=np.int64)
    if served.run is not None and (labels < 0).any():
        known = store.assignments(served.run.id)
        labels = np.array(
            [known[u].segment_id if u in known else -1 for u in user_ids], dtype=np.int64
        )
    return X_rows, labels, _user_vectors(store, settings, served, user_ids)


def write_table(frame: pd.DataFrame, path: Path) -> None:
    """Write atomically (temp file + rename): an interrupted write leaves no half file."""
    check_out(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            frame.to_parquet(tmp, index=False)
        elif suffix == ".csv":
            frame.to_csv(tmp, index=False)
        else:
            frame.to_json(tmp, orient="records", force_ascii=False, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ------------------------------------------------------------------------------ explain


def because_titles(
    served: Served, item_col: int, liked_cols: Sequence[int], titles: Sequence[str]
) -> tuple[str, ...]:
    """Titles of the liked history items most similar (embedding cosine) to the item."""
    if not liked_cols:
        return ()
    sims = served.item_vectors[list(liked_cols)] @ served.item_vectors[item_col]
    order = np.argsort(-sims, kind="stable")[:BECAUSE_TITLES]
    return tuple(titles[i] for i in order)


def _segment_info(
    store: Store, settings: Settings, served: Served, user_id: str, profile: Profile
) -> dict[str, Any] | None:
    if served.run is None:
        return None
    assignments, _ = assign_users_to_run(settings, [user_id])
    if not assignments:
        return None
    assignment = assignments[0]
    segment = next(
        s for s in store.segments(served.run.id) if s.segment_id == assignment.segment_id
    )
    top = [
        c["category"] if isinstance(c, dict) else str(c)
        for c in segment.facts.get("top_categories", [])
    ]
    shared = [like for like in profile.likes if like in top]
    why = (
        f"nearest segment centroid (distance {assignment.distance:.3f}; the next segment is "
        f"{assignment.margin:.3f} further)"
    )
    if shared:
        why += f"; shares the segment's taste for {', '.join(shared)}"
    return {
        "id": segment.segment_id,
        "name": segment.name,
        "description": segment.description,
        "label_fallback": segment.fallback,
        "run": served.run.id,
        "distance": round(float(assignment.distance), 4),
        "margin": round(float(assignment.margin), 4),
        "shared_likes": shared,
        "why": why,
    }


def explain(
    settings: Settings,
    user_id: str,
    *,
    n: int = 10,
    filters: Filters | None = None,
    llm: LLM | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The explain object for one user (see `segrec explain --json`) and notes for humans.

    A user without a profile is profiled first, through the normal cached pipeline.
    """
    check_n(n)
    stage = on_stage or (lambda _: None)
    with Store.open(settings.workspace) as store:
        _check_users(store, [user_id])
        allowed = _allowed(store.items_frame(), filters or Filters())
        record = store.profile(user_id)
    backend = llm if llm is not None else make_llm(settings)
    notes: list[str] = []
    if record is None:
        stage("profiling the user")
        run_profiles(settings, [user_id], llm=backend)
        notes.append("the user had no profile: profiled now (cached for next time)")
    with Store.open(settings.workspace) as store:
        record = store.profile(user_id)
        if record is None:
            failure = store.failures().get(user_id, "unknown error")
            raise WorkspaceError(f"user {user_id!r}: profiling failed ({failure}) — rerun later")
        profile = Profile.model_validate(record.profile)
        served = load_ranker(store, settings, on_stage=stage)
        notes += served.notes
        X_rows, labels, vectors = _histories(store, settings, served, [user_id])
        segment = _segment_info(store, settings, served, user_id, profile)
        interactions = store.interactions_frame([user_id])
        events = user_events(interactions, served.items, value_scales(store.interactions_frame()))
        history: list[Event] = events.get(user_id, [])
    recs = served.ranker.recommend(X_rows, n, labels=labels, user_vectors=vectors, allowed=allowed)
    group = str(served.ranker.groups(X_rows)[0])
    weights = served.ranker.spec.weights.get(group, {})
    item_pos = {item: c for c, item in enumerate(served.items["item_id"])}
    liked = [e for e in history if e.strength > 0]
    liked_cols = [item_pos[e.item_id] for e in liked]
    liked_titles = [e.title for e in liked]
    candidates = []
    for rank, col in enumerate(recs.indices[0]):
        if col < 0:
            break
        row = served.items.iloc[int(col)]
        candidates.append(
            Candidate(
                item_id=str(row["item_id"]),
                title=str(row["title"]),
                categories=tuple(row["categories"]),
                score=float(recs.scores[0, rank]),
                signals={
                    k: float(v[0, rank]) for k, v in recs.contributions.items() if weights.get(k)
                },
                because=because_titles(served, int(col), liked_cols, liked_titles),
            )
        )
    stage("writing reasons")
    reasons = write_reasons(
        candidates,
        history,
        llm=backend,
        params=generation_params(settings),
        vocabulary=Vocabulary.from_items(served.items).categories,
        segment_name=segment["name"] if segment else None,
        attempts=settings.validation_attempts,
        domain=settings.domain,
        retry=RetryPolicy(attempts=settings.retries),
    )
    fallbacks = sum(r.fallback for r in reasons)
    if fallbacks:
        notes.append(f"{fallbacks} of {len(reasons)} reasons are templates (marked)")
    result = {
        "user": user_id,
        "profile": {**profile.model_dump(), "fallback": record.fallback},
        "segment": segment,
        "items": [
            {
                "item_id": c.item_id,
                "title": c.title,
                "score": round(c.score, 4),
                "signals": {k: round(v, 4) for k, v in c.signals.items()},
                "reason": r.reason,
                "reason_fallback": r.fallback,
                "reason_fallback_why": r.fallback_reason,
            }
            for c, r in zip(candidates, reasons, strict=True)
        ],
    }
    return result, notes
