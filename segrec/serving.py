"""Recommend, explain and place users from a fitted ranker: the service behind `segrec
recommend`, `segrec explain`, `segrec assign`, `segrec chat` and `segrec serve`.

A :class:`Recommender` is the fitted ranker for one data version and clustering run, built
(or loaded from the files a previous process saved) by :meth:`segrec.workspace.Workspace.
recommender`. Everything a request needs is in memory or memory-mapped, so scoring one user
costs milliseconds. Explanations are assembled once, in :func:`explained_items`, for the
CLI, the chat and the HTTP API.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from segrec.config import Settings
from segrec.errors import InputError, WorkspaceError
from segrec.files import atomic_path
from segrec.llm.base import LLM, GenerationParams, RetryPolicy
from segrec.profile import Event, Profile, ValueScale, Vocabulary, user_events, value_scales
from segrec.ranker import SIGNALS, Ranker, RankerSpec, Recommendations
from segrec.reasons import Candidate, Reason, ReasonCache, template_reason, write_reasons
from segrec.store import RunRecord, SegmentRecord, Store

if TYPE_CHECKING:
    from segrec.chat import ChatContext
    from segrec.segments import CollabSpace
    from segrec.workspace import Workspace

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
    # When each pair of X happened (same rows and columns; see `segrec.evaluate.event_times`):
    # the order the transition and recent-popularity signals read. None: every known item
    # counts as the latest (a caller that keeps no order).
    times: sp.csr_matrix | None = None

    def __post_init__(self) -> None:
        # Looked up on every request: built once (pandas' Arrow strings convert slowly).
        self.item_ids = self.items["item_id"].to_numpy(dtype=object)
        self.titles = self.items["title"].to_numpy(dtype=object)
        self.user_rows = {u: r for r, u in enumerate(self.users)}


@dataclass(frozen=True)
class ModelVersion:
    """Which data and clustering run an answer came from (what a client can compare)."""

    data_version: str
    run_id: int | None

    def __str__(self) -> str:
        return f"{self.data_version};run={self.run_id or 0}"


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


class UnknownUserError(InputError):
    """A user id the workspace does not hold (the HTTP API answers 404)."""


def check_users(store: Store, user_ids: Sequence[str]) -> None:
    for user in user_ids:
        if not store.has_user(user):
            raise UnknownUserError(f"unknown user id {user!r} — list users with `segrec users`")


def allowed_items(items: pd.DataFrame, filters: Filters) -> np.ndarray | None:
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


def check_filters(store: Store, filters: Filters | None) -> None:
    """Refuse unknown categories or items before anything is fitted or saved."""
    if filters is not None and (filters.categories or filters.exclude):
        allowed_items(store.items_frame(), filters)


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
            "item_id": served.item_ids[cols],
            "title": served.titles[cols],
            "score": recs.scores[valid],
        }
    )
    for name in SIGNALS:
        if name in recs.contributions:
            frame[name] = recs.contributions[name][valid]
    return frame


def write_table(frame: pd.DataFrame, path: Path) -> None:
    """Write atomically (temp file + rename): an interrupted write leaves no half file."""
    check_out(path)
    with atomic_path(path) as tmp:
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            frame.to_parquet(tmp, index=False)
        elif suffix == ".csv":
            frame.to_csv(tmp, index=False)
        else:
            frame.to_json(tmp, orient="records", force_ascii=False, indent=1)


# ------------------------------------------------------------------------------ explanations


def because_titles(
    served: Served, item_col: int, liked_cols: Sequence[int], titles: Sequence[str]
) -> tuple[str, ...]:
    """Titles of the liked history items most similar (embedding cosine) to the item."""
    if not liked_cols:
        return ()
    sims = served.item_vectors[list(liked_cols)] @ served.item_vectors[item_col]
    order = np.argsort(-sims, kind="stable")[:BECAUSE_TITLES]
    return tuple(titles[i] for i in order)


@dataclass(frozen=True)
class ReasonWriter:
    """How reasons are written (``llm=None``: templates, saying ``why_template``)."""

    llm: LLM | None
    params: GenerationParams = field(default_factory=GenerationParams)
    domain: str = "item"
    attempts: int = 3
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    cache: ReasonCache | None = None
    why_template: str = "no LLM"


def explained_items(
    served: Served,
    cols: Sequence[int],
    scores: Sequence[float],
    parts: dict[str, np.ndarray],
    *,
    group: str,
    history: Sequence[Event],
    liked_cols: Sequence[int],
    writer: ReasonWriter,
    segment_name: str | None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Recommended items with their signals and a reason each, and notes for humans.

    ``cols``/``scores``/``parts`` are one user's top items (catalogue columns), blended
    scores and per-signal contributions; only the signals the user's weight ``group`` uses
    are shown. The one place explanations are put together (explain, chat, HTTP).
    """
    weights = served.ranker.spec.weights.get(group, {})
    titles = served.titles
    categories = served.items["categories"].to_numpy()
    liked_titles = [str(titles[c]) for c in liked_cols]
    candidates = [
        Candidate(
            item_id=str(served.item_ids[col]),
            title=str(titles[col]),
            categories=tuple(categories[col]),
            score=float(scores[rank]),
            signals={k: float(v[rank]) for k, v in parts.items() if weights.get(k)},
            because=because_titles(served, col, liked_cols, liked_titles),
        )
        for rank, col in enumerate(cols)
    ]
    if writer.llm is not None:
        reasons = write_reasons(
            candidates,
            history,
            llm=writer.llm,
            params=writer.params,
            vocabulary=Vocabulary.from_items(served.items).categories,
            segment_name=segment_name,
            attempts=writer.attempts,
            domain=writer.domain,
            retry=writer.retry,
            cache=writer.cache,
        )
    else:
        reasons = [
            Reason(
                item_id=c.item_id,
                reason=template_reason(c, history, segment_name=segment_name, domain=writer.domain),
                fallback=True,
                fallback_reason=writer.why_template,
            )
            for c in candidates
        ]
    notes = []
    fallbacks = sum(r.fallback for r in reasons)
    if fallbacks:
        notes.append(f"{fallbacks} of {len(reasons)} reasons are templates (marked)")
    items = [
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
    ]
    return items, notes


def segment_json(run: RunRecord, segment: SegmentRecord) -> dict[str, Any]:
    """One segment as `segrec segments show --json` and `GET /v1/segments/{id}` give it."""
    return {
        "run": run.id,
        "id": segment.segment_id,
        "name": segment.name,
        "description": segment.description,
        "fallback": segment.fallback,
        "described": segment.described,
        **segment.published_facts,
    }


# ------------------------------------------------------------------------------ recommender


class Recommender:
    """The fitted ranker of one (data version, run), over one workspace.

    Read-only once built, so threads share it; a server swaps in a new one when the data or
    the active run change, and requests in flight finish on the one they started with.
    """

    def __init__(
        self,
        workspace: Workspace,
        served: Served,
        version: ModelVersion,
        *,
        segments: Sequence[SegmentRecord] = (),
        fitted: bool = False,
    ) -> None:
        self.workspace = workspace
        self.served = served
        self.version = version
        self.segments = list(segments)
        self.fitted = fitted  # fitted in this process (False: loaded from saved files)
        self._lock = threading.Lock()
        self._scales: dict[str, ValueScale] | None = None
        self._chat: dict[int, ChatContext] = {}

    @property
    def run(self) -> RunRecord | None:
        return self.served.run

    @property
    def notes(self) -> list[str]:
        return list(self.served.notes)

    @property
    def represent(self) -> str:
        """The user space of the cosine signal: the active run's (what its segments were
        built on), else the settings' for a workspace without a run."""
        run = self.served.run
        if run is not None:
            return str(run.params.get("represent", "items"))
        return self.workspace.settings.represent

    # ---------------------------------------------------------------- histories

    def histories(
        self, user_ids: Sequence[str]
    ) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray | None, sp.csr_matrix | None]:
        """History rows, segment labels, cosine vectors and event times of users (empty
        rows for users who arrived after the fit; times None when the ranker keeps none)."""
        served = self.served
        rows = [served.user_rows.get(u, -1) for u in user_ids]
        X_rows = _rows_of(served.X, rows)
        times = None if served.times is None else _rows_of(served.times, rows)
        labels = np.array([served.labels[r] if r >= 0 else -1 for r in rows], dtype=np.int64)
        if served.run is not None and (labels < 0).any():
            known = self.workspace.store.assignments(served.run.id)
            labels = np.array(
                [known[u].segment_id if u in known else -1 for u in user_ids], dtype=np.int64
            )
        return X_rows, labels, self._user_vectors(X_rows, user_ids), times

    def _user_vectors(self, X_rows: sp.csr_matrix, user_ids: Sequence[str]) -> np.ndarray | None:
        """The cosine signal's user vectors per ``represent`` (None: the history mean; a
        ``collab`` run's content signal is the history mean too)."""
        represent = self.represent
        if represent in ("items", "collab"):
            return None
        from segrec.embed import embed_present, mix_vectors
        from segrec.ranker import history_vectors
        from segrec.segments import MIX_WEIGHT

        store = self.workspace.store
        history = history_vectors(X_rows, self.served.item_vectors)
        texts = []
        for user in user_ids:
            record = store.profile(user)
            texts.append(Profile.model_validate(record.profile).embedding_text() if record else "")
        profile, missing = embed_present(texts, self.workspace.encoder, cache=store)
        profile[missing] = history[missing]
        if represent == "profile":
            return profile
        return mix_vectors(profile, history, MIX_WEIGHT)

    def allowed(self, filters: Filters | None) -> np.ndarray | None:
        return allowed_items(self.served.items, filters or Filters())

    # ---------------------------------------------------------------- recommend

    def recommend(
        self,
        user_ids: Sequence[str] | None,
        *,
        n: int = 10,
        filters: Filters | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> RecommendResult:
        """Top-n unseen items for known users (None: every user with interactions)."""
        wanted, recs, notes = self.rank(user_ids, n=n, filters=filters, on_progress=on_progress)
        return RecommendResult(_table(self.served, wanted, recs), notes, self.served.ranker.spec)

    def rank(
        self,
        user_ids: Sequence[str] | None,
        *,
        n: int = 10,
        filters: Filters | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> tuple[list[str], Recommendations, list[str]]:
        """The users ranked, their top-n as column indices and scores, and notes: what
        :meth:`recommend` tabulates, without a DataFrame (the server's per-request path)."""
        check_n(n)
        allowed = self.allowed(filters)
        if user_ids is not None:
            # Users the fitted ranker holds need no query; others may have arrived since.
            unknown = [u for u in user_ids if u not in self.served.user_rows]
            if unknown:
                check_users(self.workspace.store, unknown)
        wanted = list(user_ids) if user_ids is not None else self.served.users
        X_rows, labels, vectors, times = self.histories(wanted)
        done = 0

        def progress(batch: int) -> None:
            nonlocal done
            done += batch
            if on_progress is not None:
                on_progress(done, len(wanted))

        ranker = self.served.ranker
        recs = ranker.recommend(
            X_rows,
            n,
            labels=labels,
            user_vectors=vectors,
            allowed=allowed,
            times=times,
            on_batch=progress,
        )
        notes = self.notes
        short = int((ranker.groups(X_rows) == "short").sum())
        if short:
            notes.append(
                f"{short} user(s) with ≤ {ranker.spec.short_history} known items ranked "
                "with the short-history weights"
            )
        return wanted, recs, notes

    # ---------------------------------------------------------------- segments

    def segment_of(self, user_id: str, profile: Profile | None = None) -> dict[str, Any] | None:
        """The user's segment in the active run (assigned now if profiled after it)."""
        run = self.run
        if run is None:
            return None
        assignment = self.workspace.assign([user_id])[0]
        segment = next(s for s in self.segments if s.segment_id == assignment.segment_id)
        top = [
            c["category"] if isinstance(c, dict) else str(c)
            for c in segment.published_facts.get("top_categories", [])
        ]
        shared = [like for like in profile.likes if like in top] if profile else []
        why = (
            f"nearest segment centroid (distance {assignment.distance:.3f}; the next segment "
            f"is {assignment.margin:.3f} further)"
        )
        if shared:
            why += f"; shares the segment's taste for {', '.join(shared)}"
        return {
            "id": segment.segment_id,
            "name": segment.name,
            "description": segment.description,
            "label_fallback": segment.fallback,
            "run": run.id,
            "distance": round(float(assignment.distance), 4),
            "margin": round(float(assignment.margin), 4),
            "shared_likes": shared,
            "why": why,
        }

    # ---------------------------------------------------------------- explain

    def writer(self, llm: LLM | None) -> ReasonWriter:
        from segrec.pipeline import generation_params

        settings = self.workspace.settings
        return ReasonWriter(
            llm,
            params=generation_params(settings),
            domain=settings.domain,
            attempts=settings.validation_attempts,
            retry=RetryPolicy(attempts=settings.retries),
            cache=self.workspace,
        )

    def history(self, user_id: str) -> list[Event]:
        """The user's events as reasons read them (rating scales from every interaction)."""
        store = self.workspace.store
        with self._lock:
            if self._scales is None:
                self._scales = value_scales(store.interactions_frame())
        events = user_events(store.interactions_frame([user_id]), self.served.items, self._scales)
        return events.get(user_id, [])

    def explain(
        self,
        user_id: str,
        *,
        n: int = 10,
        filters: Filters | None = None,
        writer: ReasonWriter,
        on_stage: Callable[[str], None] | None = None,
    ) -> tuple[dict[str, Any], list[str]]:
        """The explain object for one user (see `segrec explain --json`) and notes.

        A user without a profile is profiled first (with the writer's LLM, through the
        normal cached pipeline; a deterministic profile without an LLM).
        """
        check_n(n)
        stage = on_stage or (lambda _: None)
        store = self.workspace.store
        check_users(store, [user_id])
        allowed = self.allowed(filters)
        notes = self.notes
        record = store.profile(user_id)
        if record is None:
            stage("profiling the user")
            from segrec.pipeline import profile_in

            llm = writer.llm if writer.llm is not None else self.workspace.llm
            profile_in(store, self.workspace.settings, [user_id], llm=llm)
            notes.append("the user had no profile: profiled now (cached for next time)")
            record = store.profile(user_id)
            if record is None:
                failure = store.failures().get(user_id, "unknown error")
                raise WorkspaceError(
                    f"user {user_id!r}: profiling failed ({failure}) — rerun later"
                )
        profile = Profile.model_validate(record.profile)
        segment = self.segment_of(user_id, profile)
        X_rows, labels, vectors, times = self.histories([user_id])
        ranker = self.served.ranker
        recs = ranker.recommend(
            X_rows, n, labels=labels, user_vectors=vectors, allowed=allowed, times=times
        )
        history = self.history(user_id)
        item_pos = {item: c for c, item in enumerate(self.served.item_ids)}
        liked_cols = [item_pos[e.item_id] for e in history if e.strength > 0]
        valid = recs.indices[0] >= 0
        stage("writing reasons")
        items, more = explained_items(
            self.served,
            [int(c) for c in recs.indices[0][valid]],
            [float(s) for s in recs.scores[0][valid]],
            {k: v[0][valid] for k, v in recs.contributions.items()},
            group=str(ranker.groups(X_rows)[0]),
            history=history,
            liked_cols=liked_cols,
            writer=writer,
            segment_name=segment["name"] if segment else None,
        )
        result = {
            "user": user_id,
            "profile": {**profile.model_dump(), "fallback": record.fallback},
            "segment": segment,
            "items": items,
        }
        return result, notes + more

    # ---------------------------------------------------------------- new users

    def chat_context(self, llm: LLM | None) -> ChatContext:
        """The chat's view of this recommender (one per LLM backend, built once)."""
        from segrec.chat import SURE_MARGIN, ChatContext, SegmentCandidate

        with self._lock:
            context = self._chat.get(id(llm))
            if context is not None:
                return context
            run = self.run
            sure = SURE_MARGIN
            if run is not None:
                encoder_id = self.workspace.encoder.encoder_id
                if encoder_id != run.params.get("encoder_id"):
                    raise WorkspaceError(
                        f"run {run.id} was built with encoder {run.params.get('encoder_id')}, "
                        f"but the configured one is {encoder_id} — rerun `segrec cluster`"
                    )
                margins = [
                    a.margin
                    for a in self.workspace.store.assignments(run.id).values()
                    if not a.late
                ]
                if margins:
                    sure = float(np.median(margins))
            writer = self.writer(llm)
            context = ChatContext(
                served=self.served,
                segments=[
                    SegmentCandidate.from_facts(
                        s.segment_id, s.name, s.description, s.centroid, s.facts, s.size
                    )
                    for s in self.segments
                ],
                encoder=self.workspace.encoder,
                llm=llm,
                params=writer.params,
                domain=writer.domain,
                represent=str(run.params.get("represent", "items")) if run else "items",
                space=self._collab_space(run),
                run_id=run.id if run else None,
                sure_margin=sure,
                attempts=writer.attempts,
                retry=writer.retry,
                cache=writer.cache,
            )
            self._chat[id(llm)] = context
            return context

    def _collab_space(self, run: RunRecord | None) -> CollabSpace | None:
        """A ``collab`` run's fitted space (the chat places newcomers in it)."""
        if run is None or run.params.get("represent") != "collab":
            return None
        from segrec.pipeline import run_collab_space

        return run_collab_space(self.workspace.store, run)

    def item_columns(self, item_ids: Sequence[str]) -> list[int]:
        """Catalogue columns of item ids, refusing unknown ones."""
        index = pd.Index(self.served.items["item_id"])
        positions = index.get_indexer(list(item_ids))
        if (positions < 0).any():
            missing = item_ids[int(np.flatnonzero(positions < 0)[0])]
            raise InputError(f"items: unknown item id {missing!r} — not in the catalogue")
        return list(dict.fromkeys(int(p) for p in positions))

    def for_items(
        self, item_ids: Sequence[str], *, n: int = 10
    ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """An anonymous visitor who liked ``item_ids``: their nearest segment and top-n
        items, the way a chat places and ranks a new user (nothing is stored)."""
        from segrec.chat import ChatSession

        check_n(n)
        context = self.chat_context(None)
        session = ChatSession(context, n=n)
        session.like_items(self.item_columns(item_ids))
        placement = session.placement
        segment = None
        if placement is not None:
            description = next(
                s.description for s in context.segments if s.segment_id == placement.segment_id
            )
            segment = placement.as_dict(description, context.run_id)
        cols, scores, parts = session.recommend()
        weights = self.served.ranker.spec.weights.get(session.group, {})
        items = [
            {
                "item_id": context.item_ids[col],
                "title": context.titles[col],
                "score": round(scores[rank], 4),
                "signals": {
                    k: round(float(v[rank]), 4) for k, v in parts.items() if weights.get(k)
                },
            }
            for rank, col in enumerate(cols)
        ]
        return segment, items


# ------------------------------------------------------------------------------ library API


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
    from segrec.workspace import Workspace

    check_n(n)
    with Workspace(settings) as workspace:
        # Input is checked before the ranker is tuned and saved: bad input writes nothing.
        if user_ids is not None:
            check_users(workspace.store, user_ids)
        check_filters(workspace.store, filters)
        recommender = workspace.recommender(on_stage=on_stage)
        return recommender.recommend(user_ids, n=n, filters=filters, on_progress=on_progress)


def explain(
    settings: Settings,
    user_id: str,
    *,
    n: int = 10,
    filters: Filters | None = None,
    llm: LLM | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The explain object for one user (see `segrec explain --json`) and notes for humans."""
    from segrec.workspace import Workspace

    check_n(n)
    with Workspace(settings, llm=llm) as workspace:
        check_users(workspace.store, [user_id])
        check_filters(workspace.store, filters)
        recommender = workspace.recommender(on_stage=on_stage)
        return recommender.explain(
            user_id,
            n=n,
            filters=filters,
            writer=recommender.writer(workspace.llm),
            on_stage=on_stage,
        )


def _rows_of(matrix: sp.csr_matrix, rows: Sequence[int]) -> sp.csr_matrix:
    """These rows of a users × items matrix; -1 gives an empty row (a user it lacks).

    The same arrays as ``matrix[rows]``, gathered straight from the CSR parts: the
    per-request path of the server, where scipy's fancy indexing was ~0.2 ms a call.
    """
    wanted = np.asarray(rows, dtype=np.int64).reshape(-1)
    present = wanted >= 0
    safe = np.where(present, wanted, 0)
    starts = np.where(present, matrix.indptr[safe], 0).astype(np.int64)
    lengths = np.where(present, matrix.indptr[safe + 1] - starts, 0).astype(np.int64)
    indptr = np.zeros(wanted.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    take = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1], dtype=np.int64)
    return sp.csr_matrix(
        (
            np.asarray(matrix.data[take]),
            np.asarray(matrix.indices[take]),
            indptr.astype(matrix.indptr.dtype),  # a subset: fits the matrix's index type
        ),
        shape=(wanted.size, matrix.shape[1]),
    )
