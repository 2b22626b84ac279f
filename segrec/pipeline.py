"""The library API behind the CLI: settings in, results out, no printing.

Each function opens the workspace, calls one stage, and closes it again, so an HTTP API or
a notebook can call the same functions the CLI does.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from segrec.cluster import (
    ALGORITHMS,
    AUTO,
    MINIBATCH_ABOVE,
    STABILITY_MAX_POINTS,
    bootstrap_stability,
    centroid_distances,
    choose_k,
    cluster_vectors,
    resolve_algorithm,
)
from segrec.config import Settings
from segrec.data import CHUNK_BYTES, IngestReport, ItemColumns, LogColumns, load_dataset
from segrec.embed import Encoder, SentenceTransformerEncoder, embed_texts
from segrec.errors import InputError, WorkspaceError
from segrec.files import atomic_path
from segrec.gates import TextTally, tally_segments
from segrec.label import SegmentDoc, label_segments
from segrec.llm import make_llm
from segrec.llm.base import LLM, GenerationParams, RetryPolicy
from segrec.profile import Profile, ProfileRunner, ProfileStats, Vocabulary, profile_users
from segrec.segments import (
    COLLAB_FIT_USERS,
    COLLAB_N_INIT,
    RECENT_ITEMS,
    CollabSpace,
    Histories,
    assign_users,
    category_shares,
    effective_min_size,
    merge_small,
    segment_facts,
    user_vectors,
)
from segrec.store import (
    Assignment,
    IngestStats,
    ProfileRecord,
    RunRecord,
    RunSpace,
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
    chunk_bytes: int | None = CHUNK_BYTES,
) -> IngestResult:
    """Validate the files completely, then load them in one transaction.

    Validation happens before the workspace is opened, so a bad file leaves it untouched
    (not even created). The log is validated ``chunk_bytes`` at a time (None: at once).
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
        chunk_bytes=chunk_bytes,
    )
    _check_disk_space(settings.workspace, Path(log))
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


DISK_PER_LOG_BYTE = 3
"""Free space an ingest needs, per byte of the log (SQLite's table and key index of the
interactions, and the write-ahead log of the one transaction; measured in bench_scale)."""


def _check_disk_space(workspace: Path, log: Path) -> None:
    """Refuse, before writing anything, a log too large for the workspace's free disk space."""
    folder = Path(workspace).absolute()
    while not folder.exists():
        folder = folder.parent
    need = log.stat().st_size * DISK_PER_LOG_BYTE
    free = shutil.disk_usage(folder).free
    if need > free:
        raise InputError(
            f"{log}: loading it needs about {need / 1e9:.1f} GB free on the disk of "
            f"{workspace}, but only {free / 1e9:.1f} GB are free — free some space or pass "
            "--workspace on a larger disk"
        )


def _named_users(users: Sequence[str], known: Sequence[str]) -> list[str]:
    """``users`` as a list, once every one is known (else one line naming the first not)."""
    known_set = set(known)
    missing = [u for u in users if u not in known_set]
    if missing:
        raise InputError(
            f"--users: unknown user id {missing[0]!r} — list users with `segrec users`"
        )
    return list(users)


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
        chosen = _named_users(users, known)
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
    """Profile users with the configured backend (or ``llm``), resuming from the cache.

    With ``executor = "ray"`` the LLM calls run on Ray actors that each build the backend;
    this process still stores every result.
    """
    if settings.executor == "ray" and llm is None:
        from segrec.batch import profile_runner

        with profile_runner(settings) as runner, Store.open(settings.workspace) as store:
            return profile_in(store, settings, user_ids, runner=runner, on_progress=on_progress)
    backend = llm if llm is not None else make_llm(settings)
    with Store.open(settings.workspace) as store:
        return profile_in(store, settings, user_ids, llm=backend, on_progress=on_progress)


def profile_in(
    store: Store,
    settings: Settings,
    user_ids: Sequence[str],
    *,
    llm: LLM | None = None,
    runner: ProfileRunner | None = None,
    on_progress: Callable[[ProfileStats], None] | None = None,
) -> ProfileStats:
    """`profile_users` on an open store with the settings' prompt, parameters and limits."""
    return profile_users(
        store,
        user_ids,
        llm=llm,
        runner=runner,
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


MEMBERS_SHOWN = 5
"""Members nearest its centroid that naming a segment shows the LLM (profiled on demand)."""
CONTRAST_SHOWN = 3
"""Non-members nearest the centroid shown as the contrast set (profiled on demand)."""


def llm_call_bound(k: int, attempts: int) -> int:
    """The most LLM calls naming ``k`` segments makes when no call fails in transport: per
    segment, a profile for each member and contrast user shown and the label, each up to
    ``attempts`` tries (k·m with m = (MEMBERS_SHOWN + CONTRAST_SHOWN + 1)·attempts)."""
    return k * (MEMBERS_SHOWN + CONTRAST_SHOWN + 1) * attempts


def _encoder(settings: Settings) -> Encoder:
    if settings.executor == "ray":  # batches encoded on Ray actors; same encoder id and cache
        from segrec.batch import ray_encoder

        return ray_encoder(settings)
    return SentenceTransformerEncoder(settings.encoder)


def _profiles(store: Store) -> dict[str, Profile]:
    return {r.user_id: Profile.model_validate(r.profile) for r in store.profiles()}


def _profiles_of(store: Store, user_ids: Sequence[str]) -> dict[str, Profile]:
    """The stored profiles of ``user_ids`` (users without one are absent)."""
    found = {}
    for user in user_ids:
        record = store.profile(user)
        if record is not None:
            found[user] = Profile.model_validate(record.profile)
    return found


def _histories(store: Store, user_ids: Sequence[str], *, everyone: bool = False) -> Histories:
    """The users' histories over the items they touched, read from SQL in batches."""
    catalogue = store.item_ids()
    rows, cols = store.interaction_pairs(user_ids, catalogue, everyone=everyone)
    used, cols = np.unique(cols, return_inverse=True)
    return Histories.from_pairs(user_ids, [catalogue[c] for c in used], rows, cols)


def _vectors_for(
    store: Store,
    encoder: Encoder,
    histories: Histories,
    profiles: Mapping[str, Profile],
    represent: str,
    space: CollabSpace | None = None,
) -> np.ndarray:
    """The clustered vectors of the histories' users, with item and text embeddings cached
    (``collab``: projected with the fitted ``space``)."""
    if represent == "collab":
        if space is None:
            raise WorkspaceError(
                "this run's collab space is missing from the workspace — rerun `segrec cluster`"
            )
        return space.project(histories)
    item_vectors = None
    if represent in ("items", "mix"):
        texts = store.items_frame().set_index("item_id")["text"]
        item_vectors = embed_texts(list(texts.loc[histories.item_ids]), encoder, cache=store)
    return user_vectors(
        represent,
        histories.user_ids,
        profile_texts={u: p.embedding_text() for u, p in profiles.items()},
        histories=histories,
        item_vectors=item_vectors,
        encoder=encoder,
        cache=store,
    )


def _population(
    store: Store, settings: Settings, users: Sequence[str] | None, sample: int | None
) -> tuple[list[str], bool, list[str]]:
    """The users a clustering run covers, whether that is every user with interactions, and
    notes: every ingested user, the named ones, or a seeded sample of either."""
    everyone = store.user_ids()
    ingested = store.user_ids(source="ingest")
    if not ingested:
        raise WorkspaceError(
            f"{settings.workspace}: no users ingested yet — run `segrec ingest RATINGS --items "
            "ITEMS`"
        )
    notes: list[str] = []
    chosen = ingested
    if users is not None:
        chosen = _named_users(users, everyone)
        notes.append(f"{len(chosen)} of {len(everyone)} users selected (--users)")
    if sample is not None:
        if sample < 3 or sample > len(chosen):
            raise InputError(
                f"--sample {sample}: must be between 3 and the {len(chosen)} users there are "
                "to sample from — lower it, or leave it out to cluster everyone"
            )
        rows = np.sort(np.random.default_rng(settings.seed).choice(len(chosen), sample, False))
        chosen = [chosen[i] for i in rows]
        notes.append(
            f"clustered a seeded sample of {sample} of {len(everyone)} users (--sample, seed "
            f"{settings.seed}); others get their nearest segment with `segrec assign`"
        )
    return chosen, len(chosen) == len(everyone), notes


def run_clustering(
    settings: Settings,
    *,
    k: int | None,
    algorithm: str = AUTO,
    pca: int | None = None,
    small: str = "merge",
    k_max: int = 10,
    users: Sequence[str] | None = None,
    sample: int | None = None,
    llm: LLM | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> ClusterResult:
    """Cluster every ingested user (or ``users``, or a seeded ``sample``), name the segments,
    and store the run (active).

    With ``represent=items`` no profile is needed: only the members and contrast users that
    naming shows the LLM are profiled, through the normal cache (at most
    :func:`llm_call_bound` calls). ``k=None`` chooses k by silhouette and bootstrap
    stability. Everything is validated before the first write, so a bad flag leaves the
    workspace untouched.
    """
    stage = on_stage or (lambda _: None)
    if algorithm != AUTO and algorithm not in ALGORITHMS:
        raise InputError(
            f"--algorithm {algorithm!r}: unknown — choose {AUTO}, {', '.join(ALGORITHMS)}"
        )
    if small not in ("merge", "unnamed"):
        raise InputError(f"--small {small!r}: choose merge or unnamed")
    if k is not None and k < 2:
        raise InputError(f"--k {k}: need at least 2 segments")
    represent = settings.represent
    with Store.open(settings.workspace) as store:
        user_ids, everyone, notes = _population(store, settings, users, sample)
        n = len(user_ids)
        if k is not None and k > n:
            raise InputError(f"--k {k}: only {n} users to cluster — lower --k")
        if n < 3:
            raise InputError(f"only {n} users: clustering needs at least 3")
        profiles: dict[str, Profile] = {}
        if represent in ("profile", "mix"):
            profiles = _profiles_of(store, user_ids)
            if len(profiles) < n:
                raise WorkspaceError(
                    f"--represent {represent}: {n - len(profiles)} of {n} users have no profile "
                    "— run `segrec profile` to make them (or use --represent items, which needs "
                    "none)"
                )
        chosen = resolve_algorithm(algorithm, n)
        if algorithm == AUTO:
            notes.append(
                f"--algorithm auto chose {chosen} ({n} users; minibatch above {MINIBATCH_ABOVE})"
            )
        encoder = _encoder(settings)
        stage("reading histories")
        histories = _histories(store, user_ids, everyone=everyone)
        space: CollabSpace | None = None
        n_init: int | None = None
        if represent == "collab":
            stage("fitting the collab space")
            space = CollabSpace.fit(histories, seed=settings.seed)
            n_init = COLLAB_N_INIT
        stage("embedding")
        X = _vectors_for(store, encoder, histories, profiles, represent, space)
        curve: list[dict[str, float]] = []
        k_requested: int | str = "auto" if k is None else k
        if k is None:
            stage("choosing k")
            choice = choose_k(
                X, k_max=min(k_max, n - 1), algorithm=chosen, seed=settings.seed, n_init=n_init
            )
            k, curve = choice.k, choice.curve
            notes.append(f"--k auto chose {k} (silhouette among stable k; see the curve)")
            if choice.sample:
                notes.append(f"--k auto scanned a seeded sample of {choice.sample} of {n} users")
        stage("clustering")
        clustering = cluster_vectors(
            X, k=k, algorithm=chosen, seed=settings.seed, pca=pca, n_init=n_init
        )
        if clustering.params.get("silhouette_sample"):
            notes.append(
                f"silhouette computed on a seeded sample of "
                f"{clustering.params['silhouette_sample']} of {n} users"
            )
        min_size, lowered = effective_min_size(settings.min_segment_size, n, clustering.k)
        if lowered:
            notes.append(lowered)
        if small == "merge":
            clustering, merged = merge_small(X, clustering, min_size)
            notes += merged
        stage("stability")
        stability = bootstrap_stability(X, clustering, n_boot=10, seed=settings.seed)
        if n > STABILITY_MAX_POINTS:
            notes.append(
                f"bootstrap stability computed on a seeded sample of {STABILITY_MAX_POINTS} "
                f"of {n} users"
            )
        items = store.items_frame()
        sizes = np.bincount(clustering.labels[clustering.labels >= 0], minlength=clustering.k)
        described = [j for j in range(clustering.k) if sizes[j] >= min_size]
        if len(described) < clustering.k:
            notes.append(
                f"{clustering.k - len(described)} segment(s) under {min_size} members are not "
                "described (privacy threshold; --small unnamed)"
            )
        distances = centroid_distances(X, clustering.centroids)
        shown = {j: _shown(distances[:, j], clustering.labels == j, user_ids) for j in described}
        backend = None
        if described:
            backend = llm if llm is not None else make_llm(settings)
            wanted = list(
                dict.fromkeys(u for members, contrast in shown.values() for u in members + contrast)
            )
            if represent in ("items", "collab"):
                stage(f"profiling the {len(wanted)} users shown to the LLM")
                profile_in(store, settings, wanted, llm=backend)
            profiles = {**profiles, **_profiles_of(store, [u for u in wanted if u not in profiles])}
        facts = segment_facts(
            clustering,
            histories,
            items=items,
            summaries={u: p.summary for u, p in profiles.items()},
            stability=stability,
        )
        stage("naming segments")
        docs = [
            SegmentDoc(
                segment_id=j,
                size=int(sizes[j]),
                members=[profiles[u].model_dump() for u in shown[j][0] if u in profiles],
                contrast=[profiles[u].model_dump() for u in shown[j][1] if u in profiles],
                categories=category_shares(
                    histories, items, np.flatnonzero(clustering.labels == j)
                ),
                top_items=[t["title"] for t in facts[j].top_items],
                lift_categories=tuple(c["category"] for c in facts[j].top_categories),
                shown_categories=tuple(c["category"] for c in facts[j].top_categories),
            )
            for j in described
        ]
        labels = (
            label_segments(
                docs,
                llm=backend,
                params=generation_params(settings),
                vocabulary=Vocabulary.from_items(items).categories,
                attempts=settings.validation_attempts,
                domain=settings.domain,
            )
            if backend is not None
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
            "algorithm": chosen,
            "algorithm_requested": algorithm,
            "seed": settings.seed,
            "pca": pca,
            "represent": represent,
            "encoder_id": encoder.encoder_id,
            "min_segment_size": min_size,
            "small": small,
            "sample": sample,
        }
        if space is not None:
            params["collab"] = {
                "dim": space.dim,
                "recent_items": RECENT_ITEMS,
                "fit_users": min(n, COLLAB_FIT_USERS),
                "n_init": n_init,
            }
        run_id = store.save_run(
            params=params,
            metrics=metrics,
            notes=notes,
            segments=segments,
            assignments=assignments,
            space=None
            if space is None
            else RunSpace("collab", space.item_ids, space.vectors, space.counts),
        )
        run = store.run(run_id)
        assert run is not None
        return ClusterResult(run=run, segments=store.segments(run_id))


def _round(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 4)


def _shown(
    distances: np.ndarray, inside: np.ndarray, user_ids: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Members nearest the centroid, and the non-members nearest it (contrast, as Clio)."""
    order = np.argsort(distances, kind="stable")
    members = order[inside[order]][:MEMBERS_SHOWN]
    contrast = order[~inside[order]][:CONTRAST_SHOWN]
    return [user_ids[i] for i in members], [user_ids[i] for i in contrast]


def active_run(store: Store, settings: Settings, run_id: int | None = None) -> RunRecord:
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
        run = active_run(store, settings, run_id)
        segments = store.segments(run.id)
        hierarchy = store.hierarchy(run.id)
    parents = hierarchy.parents if hierarchy else []
    parent_of = hierarchy.segment_parents() if hierarchy else {}
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
                # under the privacy threshold: no facts about the members are published
                "top_items": s.published_facts["top_items"],
                "top_categories": s.published_facts["top_categories"],
                "silhouette": s.facts["silhouette"],
                "stability": s.facts["stability"],
                "fallback": s.fallback,
                "described": s.described,
                "parent": parent_of.get(s.segment_id),
            }
            for s in segments
        ],
        "parents": [
            {
                "id": p.parent_id,
                "level": p.level,
                "name": p.name,
                "description": p.description,
                "size": p.size,
                "share": p.facts["share"],
                "top_categories": p.facts["top_categories"],
                "children": p.children,
                "parent": p.parent,
                "fallback": p.fallback,
                "fallback_reason": p.facts["fallback_reason"],
                "described": p.described,
            }
            for p in parents
        ],
        "hierarchy": {"params": hierarchy.params, "notes": hierarchy.notes} if hierarchy else None,
        "metrics": run.metrics,
        "text": _label_tally(segments, parents).as_json(),
    }


def _label_tally(segments: list[SegmentRecord], parents: list[Any]) -> TextTally:
    """The segment labels and parent names of a run, counted by kind."""
    tally = tally_segments(segments)
    tally.update(tally_segments(parents, kind="parent"))
    return tally


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
        run = active_run(store, settings)
        for segment in store.segments(run.id):
            if segment.segment_id == segment_id:
                return run, replace(segment, facts=segment.published_facts)
    raise InputError(
        f"segment {segment_id}: not in run {run.id} — list them with `segrec segments`"
    )


def run_vectors(
    store: Store,
    settings: Settings,
    run: RunRecord,
    user_ids: Sequence[str],
    profiles: Mapping[str, Profile] | None = None,
    *,
    encoder: Encoder | None = None,
) -> np.ndarray:
    """Users' vectors in ``run``'s space (its representation and encoder), from the cache."""
    if encoder is None:
        encoder = SentenceTransformerEncoder(settings.encoder)
    if encoder.encoder_id != run.params["encoder_id"]:
        raise WorkspaceError(
            f"run {run.id} was built with encoder {run.params['encoder_id']}, but the "
            f"configured one is {encoder.encoder_id} — rerun `segrec cluster`"
        )
    represent = run.params["represent"]
    if profiles is None:
        profiles = {} if represent in ("items", "collab") else _profiles_of(store, user_ids)
    return _vectors_for(
        store,
        encoder,
        _histories(store, user_ids),
        profiles,
        represent,
        run_collab_space(store, run) if represent == "collab" else None,
    )


def run_collab_space(store: Store, run: RunRecord) -> CollabSpace:
    """The collab space fitted by ``run`` (``--represent collab``), as stored with it."""
    stored = store.run_space(run.id)
    if stored is None or stored.kind != "collab":
        raise WorkspaceError(
            f"run {run.id}: its collab space is missing from the workspace — rerun "
            "`segrec cluster --represent collab`"
        )
    return CollabSpace(stored.item_ids, stored.vectors, stored.counts)


def show_segment(
    settings: Settings, segment_id: int, *, llm: LLM | None = None
) -> tuple[RunRecord, SegmentRecord, list[str]]:
    """One segment of the active run, with a profile summary for each member it shows.

    Members shown without a summary (not profiled when the run was named, e.g. under the
    privacy threshold) are profiled now, each alone, through the normal cache.
    """
    run, segment = segment_detail(settings, segment_id)
    nearest = segment.facts.get("nearest", [])
    missing = [m["user_id"] for m in nearest if not m.get("summary")]
    notes: list[str] = []
    if missing:
        with Store.open(settings.workspace) as store:
            profiles = _profiles_of(store, missing)
            todo = [u for u in missing if u not in profiles]
            if todo:
                profile_in(
                    store, settings, todo, llm=llm if llm is not None else make_llm(settings)
                )
                notes.append(f"profiled {len(todo)} member(s) shown here (cached for next time)")
                profiles |= _profiles_of(store, todo)
        shown = [
            {
                **m,
                "summary": m.get("summary")
                or (p.summary if (p := profiles.get(m["user_id"])) else ""),
            }
            for m in nearest
        ]
        segment = replace(segment, facts={**segment.facts, "nearest": shown})
    return run, segment, notes


EXPORT_SUFFIXES = (".parquet", ".pq", ".csv")
_EXPORT_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("segment", pa.int64()),
        ("segment_name", pa.string()),
        ("distance", pa.float64()),
        ("margin", pa.float64()),
    ]
)


def export_assignments(
    settings: Settings, out: Path, *, run_id: int | None = None
) -> tuple[RunRecord, int]:
    """Write every user's segment in the active (or given) run to ``out`` (.parquet or .csv):
    user_id, segment, segment_name, distance, margin. Written to a temporary file beside
    ``out`` and renamed into place, so a reader never sees half a file. Returns the run and
    the number of rows."""
    suffix = out.suffix.lower()
    if suffix not in EXPORT_SUFFIXES:
        raise InputError(
            f"--out {out}: unknown extension {suffix or '(none)'!r} — use .parquet or .csv"
        )
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: folder {out.parent} does not exist — create it first")
    if out.is_dir():
        raise InputError(f"--out {out}: is a directory — pass a file name")
    with Store.open(settings.workspace) as store:
        run = active_run(store, settings, run_id)
        rows = 0
        writer_class = pa_csv.CSVWriter if suffix == ".csv" else pq.ParquetWriter
        with atomic_path(out) as partial, writer_class(str(partial), _EXPORT_SCHEMA) as writer:
            for batch in store.assignment_batches(run.id):
                rows += len(batch)
                writer.write_table(
                    pa.Table.from_pandas(batch, schema=_EXPORT_SCHEMA, preserve_index=False)
                )
    return run, rows


def assign_users_to_run(
    settings: Settings, user_ids: Sequence[str] | None = None, *, llm: LLM | None = None
) -> tuple[list[Assignment], int]:
    """Nearest-centroid assignment, in the active run, of users it does not hold yet.

    Returns the assignments of ``user_ids`` (default: every profiled user, as `segrec
    profile` assigns after profiling) and how many of them were made now; users the run
    already holds keep theirs. A run on ``items`` vectors needs no profile; on ``profile`` or
    ``mix`` vectors a user without one is profiled first, alone, through the normal cache.
    No active run: ``([], 0)``.
    """
    with Store.open(settings.workspace) as store:
        return assign_in(
            store,
            settings,
            lambda: SentenceTransformerEncoder(settings.encoder),
            user_ids,
            llm=(lambda: llm) if llm is not None else None,
        )


def assign_in(
    store: Store,
    settings: Settings,
    encoder: Callable[[], Encoder],
    user_ids: Sequence[str] | None = None,
    *,
    llm: Callable[[], LLM] | None = None,
) -> tuple[list[Assignment], int]:
    """`assign_users_to_run` on an open store; ``encoder`` (and ``llm``, default: the
    settings' backend) are called only when some user needs a vector (or a profile)."""
    run = store.active_run()
    if run is None:
        return [], 0
    if user_ids is None:
        wanted = sorted(store.profile_keys(), key=natural_key)
    else:
        wanted = list(user_ids)
        for user in wanted:
            if not store.has_user(user):
                raise InputError(f"unknown user id {user!r} — list users with `segrec users`")
    known = store.assignments(run.id, wanted)
    pending = [u for u in wanted if u not in known]
    if pending:
        represent = run.params["represent"]
        profiles: dict[str, Profile] = {}
        if represent in ("profile", "mix"):
            profiles = _profiles_of(store, pending)
            todo = [u for u in pending if u not in profiles]
            if todo:
                backend = llm() if llm is not None else make_llm(settings)
                profile_in(store, settings, todo, llm=backend)
                profiles |= _profiles_of(store, todo)
            failed = [u for u in pending if u not in profiles]
            if failed:
                why = store.failures().get(failed[0], "unknown error")
                raise WorkspaceError(f"user {failed[0]!r}: profiling failed ({why}) — rerun later")
        X = run_vectors(store, settings, run, pending, profiles, encoder=encoder())
        centroids = np.stack([s.centroid for s in store.segments(run.id)])
        labels, distances, margins = assign_users(X, centroids)
        fresh = [
            Assignment(u, int(lab), float(d), float(m), late=True)
            for u, lab, d, m in zip(pending, labels, distances, margins, strict=True)
        ]
        store.add_assignments(run.id, fresh)
        known = store.assignments(run.id, wanted)
    return [known[u] for u in wanted], len(pending)
