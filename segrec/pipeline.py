"""The library API behind the CLI: settings in, results out, no printing.

Each function opens the workspace, calls one stage, and closes it again, so an HTTP API or
a notebook can call the same functions the CLI does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segrec.cluster import ALGORITHMS, Clustering, bootstrap_stability, choose_k, cluster_vectors
from segrec.config import Settings
from segrec.data import IngestReport, ItemColumns, LogColumns, load_dataset
from segrec.embed import SentenceTransformerEncoder
from segrec.errors import InputError, WorkspaceError
from segrec.gates import tally_segments
from segrec.label import SegmentDoc, label_segments
from segrec.llm import make_llm
from segrec.llm.base import LLM, GenerationParams, RetryPolicy
from segrec.profile import Profile, ProfileStats, Vocabulary, profile_users
from segrec.segments import (
    SegmentFacts,
    assign_users,
    effective_min_size,
    item_matrix,
    merge_small,
    segment_facts,
    user_vectors,
)
from segrec.store import (
    Assignment,
    IngestStats,
    ProfileRecord,
    RunRecord,
    SegmentRecord,
    Store,
    natural_key,
)
from segrec.templates import load_prompt


@dataclass(frozen=True)
class IngestResult:
    report: IngestReport
    stats: IngestStats


def ingest(
    settings: Settings,
    log: Path,
    items: Path,
    attributes: Path | None = None,
    *,
    log_columns: LogColumns = LogColumns(),
    item_columns: ItemColumns = ItemColumns(),
    delimiter: str = ",",
    skip_bad_rows: bool = False,
    attribute_user_column: str | None = None,
) -> IngestResult:
    """Validate the files completely, then load them in one transaction.

    Validation happens before the workspace is opened, so a bad file leaves it untouched
    (not even created).
    """
    dataset = load_dataset(
        log,
        items,
        attributes,
        log_columns=log_columns,
        item_columns=item_columns,
        delimiter=delimiter,
        skip_bad_rows=skip_bad_rows,
        attribute_user_column=attribute_user_column,
    )
    source = {
        "log": str(log),
        "items": str(items),
        "attributes": str(attributes) if attributes else None,
        "log_columns": log_columns.__dict__,
        "item_columns": item_columns.__dict__,
    }
    with Store.open(settings.workspace, create=True) as store:
        stats = store.ingest(dataset, source=source)
    return IngestResult(report=dataset.report, stats=stats)


@dataclass(frozen=True)
class Selection:
    user_ids: list[str]
    total: int
    notes: list[str] = field(default_factory=list)


def select_users(
    settings: Settings, *, users: Sequence[str] | None = None, limit: int | None = None
) -> Selection:
    """The users a run covers: all, the named ones, or the first ``limit`` (said in notes)."""
    with Store.open(settings.workspace) as store:
        known = store.user_ids()
        ingested = store.user_ids(source="ingest")
    if not known:
        raise WorkspaceError(
            f"{settings.workspace}: no users ingested yet — run `segrec profile RATINGS --items "
            "ITEMS`"
        )
    notes = []
    # Users saved by `segrec chat` keep the profile their answers gave unless named.
    chosen = ingested
    if users is None and len(ingested) < len(known):
        notes.append(
            f"{len(known) - len(ingested)} chat user(s) kept their chat profile "
            "(name them with --users to re-profile)"
        )
    if users is not None:
        known_set = set(known)
        missing = [u for u in users if u not in known_set]
        if missing:
            raise InputError(
                f"--users: unknown user id {missing[0]!r} — list users with `segrec users`"
            )
        chosen = list(users)
    if limit is not None and limit < len(chosen):
        chosen = chosen[:limit]
        notes.append(f"limited to the first {limit} of {len(known)} users (--limit)")
    elif users is not None:
        notes.append(f"{len(chosen)} of {len(known)} users selected (--users)")
    return Selection(user_ids=chosen, total=len(known), notes=notes)


def generation_params(settings: Settings) -> GenerationParams:
    return GenerationParams(
        temperature=settings.temperature,
        max_tokens=settings.max_tokens,
        repeat_penalty=settings.repeat_penalty,
        seed=settings.seed,
    )


def run_profiles(
    settings: Settings,
    user_ids: Sequence[str],
    *,
    llm: LLM | None = None,
    on_progress: Callable[[ProfileStats], None] | None = None,
) -> ProfileStats:
    """Profile users with the configured backend (or ``llm``), resuming from the cache."""
    backend = llm if llm is not None else make_llm(settings)
    with Store.open(settings.workspace) as store:
        return profile_in(store, settings, user_ids, llm=backend, on_progress=on_progress)


def profile_in(
    store: Store,
    settings: Settings,
    user_ids: Sequence[str],
    *,
    llm: LLM,
    on_progress: Callable[[ProfileStats], None] | None = None,
) -> ProfileStats:
    """`profile_users` on an open store with the settings' prompt, parameters and limits."""
    return profile_users(
        store,
        user_ids,
        llm=llm,
        prompt=load_prompt("profile"),
        params=generation_params(settings),
        domain=settings.domain,
        max_items=settings.max_history_items,
        max_tokens=settings.max_history_tokens,
        attempts=settings.validation_attempts,
        retry=RetryPolicy(attempts=settings.retries),
        on_progress=on_progress,
    )


def show_profile(settings: Settings, user_id: str) -> ProfileRecord:
    with Store.open(settings.workspace) as store:
        record = store.profile(user_id)
        exists = record is not None or store.has_user(user_id)
    if record is None:
        if exists:
            raise WorkspaceError(
                f"user {user_id!r} has no profile yet — run `segrec profile --users {user_id}`"
            )
        raise InputError(f"unknown user id {user_id!r} — list users with `segrec users`")
    return record


def list_users(settings: Settings) -> list[dict[str, Any]]:
    with Store.open(settings.workspace) as store:
        counts = store.interaction_counts()
        profiles = {p.user_id: p for p in store.profiles()}
        failures = store.failures()
    rows = []
    for user_id, n in counts.items():
        record = profiles.get(user_id)
        status = (
            "failed"
            if user_id in failures
            else "none"
            if record is None
            else "fallback"
            if record.fallback
            else "llm"
        )
        rows.append({"user": user_id, "interactions": n, "profile": status})
    return rows


# ---------------------------------------------------------------------------- clustering


@dataclass(frozen=True)
class ClusterResult:
    run: RunRecord
    segments: list[SegmentRecord]


def _encoder(settings: Settings) -> SentenceTransformerEncoder:
    return SentenceTransformerEncoder(settings.encoder)


def _profiles(store: Store) -> dict[str, Profile]:
    return {r.user_id: Profile.model_validate(r.profile) for r in store.profiles()}


def _vectors_for(
    store: Store,
    encoder: SentenceTransformerEncoder,
    user_ids: Sequence[str],
    profiles: Mapping[str, Profile],
    represent: str,
    interactions: pd.DataFrame,
) -> np.ndarray:
    """The clustered vectors of ``user_ids``, with item and text embeddings cached."""
    item_ids: list[str] = []
    item_vectors = None
    if represent in ("items", "mix"):
        items = store.items_frame()
        items = items[items["item_id"].isin(set(interactions["item_id"]))]
        item_ids = list(items["item_id"])
        item_vectors = item_matrix(items, encoder, cache=store)
    return user_vectors(
        represent,
        user_ids,
        profile_texts={u: profiles[u].embedding_text() for u in user_ids},
        interactions=interactions,
        item_ids=item_ids,
        item_vectors=item_vectors,
        encoder=encoder,
        cache=store,
    )


def run_clustering(
    settings: Settings,
    *,
    k: int | None,
    algorithm: str = "kmeans",
    pca: int | None = None,
    small: str = "merge",
    k_max: int = 10,
    llm: LLM | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> ClusterResult:
    """Embed profiled users, cluster them, name the segments, and store the run (active).

    ``k=None`` chooses k by silhouette and bootstrap stability. Everything is validated
    before the first write, so a bad flag leaves the workspace untouched.
    """
    stage = on_stage or (lambda _: None)
    if algorithm not in ALGORITHMS:
        raise InputError(
            f"--algorithm {algorithm!r}: unknown — choose one of {', '.join(ALGORITHMS)}"
        )
    if small not in ("merge", "unnamed"):
        raise InputError(f"--small {small!r}: choose merge or unnamed")
    with Store.open(settings.workspace) as store:
        profiles = _profiles(store)
        user_ids = sorted(profiles, key=natural_key)
        n = len(user_ids)
        if n == 0:
            raise WorkspaceError(
                f"{settings.workspace}: no profiles yet — run `segrec profile` first"
            )
        if k is not None and k < 2:
            raise InputError(f"--k {k}: need at least 2 segments")
        if k is not None and k > n:
            raise InputError(f"--k {k}: only {n} profiled users — lower --k or profile more users")
        if n < 3:
            raise InputError(f"only {n} profiled users: clustering needs at least 3")
        encoder = _encoder(settings)
        stage("embedding")
        interactions = store.interactions_frame(user_ids)
        X = _vectors_for(store, encoder, user_ids, profiles, settings.represent, interactions)
        notes: list[str] = []
        curve: list[dict[str, float]] = []
        k_requested: int | str = "auto" if k is None else k
        if k is None:
            stage("choosing k")
            choice = choose_k(X, k_max=min(k_max, n - 1), algorithm=algorithm, seed=settings.seed)
            k, curve = choice.k, choice.curve
            notes.append(f"--k auto chose {k} (silhouette among stable k; see the curve)")
        stage("clustering")
        clustering = cluster_vectors(X, k=k, algorithm=algorithm, seed=settings.seed, pca=pca)
        min_size, lowered = effective_min_size(settings.min_segment_size, n, clustering.k)
        if lowered:
            notes.append(lowered)
        if small == "merge":
            clustering, merged = merge_small(X, clustering, min_size)
            notes += merged
        stage("stability")
        stability = bootstrap_stability(X, clustering, n_boot=10, seed=settings.seed)
        items = store.items_frame()
        summaries = {u: p.summary for u, p in profiles.items()}
        facts = segment_facts(
            clustering,
            user_ids,
            interactions=interactions,
            items=items,
            summaries=summaries,
            stability=stability,
        )
        stage("naming segments")
        described = [f for f in facts if f.size >= min_size]
        undescribed = [f for f in facts if f.size < min_size]
        if undescribed:
            notes.append(
                f"{len(undescribed)} segment(s) under {min_size} members are not described "
                "(privacy threshold; --small unnamed)"
            )
        docs = [
            _segment_doc(f, clustering, X, user_ids, profiles, interactions, items)
            for f in described
        ]
        labels = (
            label_segments(
                docs,
                llm=llm if llm is not None else make_llm(settings),
                params=generation_params(settings),
                vocabulary=Vocabulary.from_items(items).categories,
                attempts=settings.validation_attempts,
                domain=settings.domain,
            )
            if docs
            else []
        )
        by_id = {d.segment_id: label for d, label in zip(docs, labels, strict=True)}
        segments = []
        for f in facts:
            label = by_id.get(f.segment_id)
            segments.append(
                SegmentRecord(
                    segment_id=f.segment_id,
                    name=label.name if label else f"Unnamed segment {f.segment_id}",
                    description=label.description
                    if label
                    else f"Fewer than {min_size} members: not described (privacy threshold).",
                    fallback=bool(label and label.fallback),
                    described=label is not None,
                    size=f.size,
                    centroid=clustering.centroids[f.segment_id],
                    facts={
                        **f.as_dict(),
                        "fallback_reason": label.fallback_reason if label else None,
                    },
                )
            )
        _, _, margins = assign_users(X, clustering.centroids)
        assignments = [
            Assignment(u, int(label), float(distance), float(gap))
            for u, label, distance, gap in zip(
                user_ids, clustering.labels, clustering.distances, margins, strict=True
            )
        ]
        metrics = {
            "users": n,
            "k": clustering.k,
            "silhouette": _round(clustering.silhouette),
            "stability": _round(float(np.nanmean(stability))) if len(stability) else None,
            "fallback_labels": sum(s.fallback for s in segments),
            "curve": curve,
        }
        params = {
            "k": clustering.k,
            "k_requested": k_requested,
            "algorithm": algorithm,
            "seed": settings.seed,
            "pca": pca,
            "represent": settings.represent,
            "encoder_id": encoder.encoder_id,
            "min_segment_size": min_size,
            "small": small,
        }
        run_id = store.save_run(
            params=params, metrics=metrics, notes=notes, segments=segments, assignments=assignments
        )
        run = store.run(run_id)
        assert run is not None
        return ClusterResult(run=run, segments=store.segments(run_id))


def _round(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 4)


def _segment_doc(
    facts: SegmentFacts,
    clustering: Clustering,
    X: np.ndarray,
    user_ids: Sequence[str],
    profiles: Mapping[str, Profile],
    interactions: pd.DataFrame,
    items: pd.DataFrame,
    members_n: int = 8,
    contrast_n: int = 5,
) -> SegmentDoc:
    """Members nearest the centroid, and the non-members nearest it (contrast, as Clio)."""
    j = facts.segment_id
    centroid = clustering.centroids[j]
    distances = np.linalg.norm(X - centroid, axis=1)
    inside = clustering.labels == j
    order = np.argsort(distances, kind="stable")
    members = [user_ids[i] for i in order if inside[i]][:members_n]
    contrast = [user_ids[i] for i in order if not inside[i]][:contrast_n]
    member_set = {user_ids[i] for i in np.flatnonzero(inside)}
    mine = interactions[interactions["user_id"].isin(member_set)]
    categories = mine["item_id"].map(items.set_index("item_id")["categories"]).explode()
    shares = categories.value_counts(normalize=True)
    return SegmentDoc(
        segment_id=j,
        size=facts.size,
        members=[profiles[u].model_dump() for u in members],
        contrast=[profiles[u].model_dump() for u in contrast],
        categories={str(c): round(float(v), 4) for c, v in shares.items()},
        top_items=[t["title"] for t in facts.top_items],
        lift_categories=tuple(c["category"] for c in facts.top_categories),
    )


def _active_run(store: Store, settings: Settings, run_id: int | None = None) -> RunRecord:
    run = store.run(run_id) if run_id is not None else store.active_run()
    if run is None:
        if run_id is not None:
            raise InputError(f"--run {run_id}: no such clustering run — see `segrec segments`")
        raise WorkspaceError(
            f"{settings.workspace}: no clustering run yet — run `segrec cluster --k 5` first"
        )
    return run


def segments_report(settings: Settings, run_id: int | None = None) -> dict[str, Any]:
    """The active (or given) run as the JSON object `segrec segments --json` prints."""
    with Store.open(settings.workspace) as store:
        run = _active_run(store, settings, run_id)
        segments = store.segments(run.id)
    return {
        "run": {
            "id": run.id,
            "created_at": run.created_at,
            "params": run.params,
            "notes": run.notes,
        },
        "segments": [
            {
                "id": s.segment_id,
                "name": s.name,
                "description": s.description,
                "size": s.size,
                "share": s.facts["share"],
                "top_items": s.facts["top_items"],
                "top_categories": s.facts["top_categories"],
                "silhouette": s.facts["silhouette"],
                "stability": s.facts["stability"],
                "fallback": s.fallback,
                "described": s.described,
            }
            for s in segments
        ],
        "metrics": run.metrics,
        "text": tally_segments(segments).as_json(),
    }


def list_runs(settings: Settings, *, activate: int | None = None) -> list[dict[str, Any]]:
    """Every clustering run, oldest first; ``activate`` makes that run the active one."""
    with Store.open(settings.workspace) as store:
        if activate is not None:
            store.set_active_run(activate)
        active = store.active_run()
        return [
            {
                "id": run.id,
                "created_at": run.created_at,
                "active": active is not None and run.id == active.id,
                "params": run.params,
                "metrics": {k: v for k, v in run.metrics.items() if k != "curve"},
            }
            for run in store.runs()
        ]


def segment_detail(settings: Settings, segment_id: int) -> tuple[RunRecord, SegmentRecord]:
    with Store.open(settings.workspace) as store:
        run = _active_run(store, settings)
        for segment in store.segments(run.id):
            if segment.segment_id == segment_id:
                return run, segment
    raise InputError(
        f"segment {segment_id}: not in run {run.id} — list them with `segrec segments`"
    )


def assign_users_to_run(
    settings: Settings, user_ids: Sequence[str] | None = None
) -> tuple[list[Assignment], int]:
    """Nearest-centroid assignment, in the active run, of users profiled after it.

    Returns the assignments of ``user_ids`` (default: every profiled user) and how many of
    them were made now; users the run already holds keep theirs. No active run: ``([], 0)``.
    """
    with Store.open(settings.workspace) as store:
        run = store.active_run()
        if run is None:
            return [], 0
        profiles = _profiles(store)
        known = store.assignments(run.id)
        wanted = list(user_ids) if user_ids is not None else sorted(profiles, key=natural_key)
        for user in wanted:
            if user not in profiles:
                if store.has_user(user):
                    raise WorkspaceError(
                        f"user {user!r} has no profile yet — run `segrec profile --users {user}`"
                    )
                raise InputError(f"unknown user id {user!r} — list users with `segrec users`")
        pending = [u for u in wanted if u not in known]
        if pending:
            encoder = SentenceTransformerEncoder(settings.encoder)
            if encoder.encoder_id != run.params["encoder_id"]:
                raise WorkspaceError(
                    f"run {run.id} was built with encoder {run.params['encoder_id']}, but the "
                    f"configured one is {encoder.encoder_id} — rerun `segrec cluster`"
                )
            X = _vectors_for(
                store,
                encoder,
                pending,
                profiles,
                run.params["represent"],
                store.interactions_frame(pending),
            )
            centroids = np.stack([s.centroid for s in store.segments(run.id)])
            labels, distances, margins = assign_users(X, centroids)
            fresh = [
                Assignment(u, int(lab), float(d), float(m), late=True)
                for u, lab, d, m in zip(pending, labels, distances, margins, strict=True)
            ]
            store.add_assignments(run.id, fresh)
            known = store.assignments(run.id)
        return [known[u] for u in wanted], len(pending)
