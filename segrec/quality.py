"""`segrec eval`: the PROTOCOL tracks on any dataset, every method on the same users.

The split, metrics and baselines come from `segrec.evaluate` and `segrec.recommend`; the
default ranker and its tuning from `segrec.ranker`. LLM profiles are made from train
interactions only, through the normal cached pipeline, in an evaluation workspace of their
own (train rows only, so no prompt ever sees a test item); reruns reuse them.

Methods (rows of each track's table):

* ``MostPop``, ``ItemKNN``, ``EASE`` — the PROTOCOL baselines (EASE λ tuned on validation).
* ``segrec`` — the default ranker (`segrec.ranker`), weights tuned on validation.
* ``cosine:items`` / ``cosine:llm-profile`` / ``cosine:deterministic-profile`` — content
  only: cosine between item embeddings and the mean item embedding of the user's known
  items, the embedding of their LLM profile, or of the deterministic profile built from the
  same history without an LLM.
* ``segrec:llm-profile`` / ``segrec:deterministic-profile`` — the default ranker with its
  content signal taken from that profile instead of the item mean (same weights): what
  the LLM profile adds to the ranker, against the profile any history gives for free.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from segrec.cluster import cluster_vectors, seed_ari
from segrec.config import Settings
from segrec.data import Dataset, ItemColumns, LogColumns, load_dataset
from segrec.embed import SentenceTransformerEncoder, embed_present, embed_texts
from segrec.errors import InputError
from segrec.evaluate import (
    Split,
    cold_split,
    evaluate_scores,
    fold_rows,
    protocol_split,
    ranking_metrics,
    subsample,
    top_k,
    validation_split,
)
from segrec.llm import make_llm
from segrec.llm.base import LLM
from segrec.pipeline import generation_params, profile_in
from segrec.profile import (
    Profile,
    build_request,
    fallback_profile,
    user_events,
    value_scales,
)
from segrec.ranker import (
    DEFAULT_WEIGHTS,
    MIN_TUNING_USERS,
    SIGNALS,
    TUNE_USERS,
    Ranker,
    RankerSpec,
    chat_group,
    kmeans_labels,
    tune_ranker,
)
from segrec.recommend import ALS, MostPop, cosine_scores, reuse_ease_fits, tune_als
from segrec.store import Store
from segrec.templates import load_prompt

TRACKS = ("warm", "cold", "segments", "grounding", "chat", "text")
CHAT_CHECKPOINTS = (1, 3, 5)
CHAT_TUNE_AT = (1, 3)
COLD_KNOWN = 3
LLM_METHODS = ("cosine:llm-profile", "segrec:llm-profile")
# The PROTOCOL baselines and the sequence-aware peer: the ranker's signals used alone.
PEER_SIGNALS = {"MostPop": "pop", "ItemKNN": "itemknn", "EASE": "ease", "Transitions": "transition"}
SCORE_BATCH = 512  # users scored at once: bounds memory at batch × catalogue per signal
PROFILE_METHOD_USERS = 2_000  # without the LLM, profile methods run up to this many users


def parse_tracks(text: str, known: Sequence[str] = TRACKS) -> list[str]:
    tracks = [t.strip() for t in text.split(",") if t.strip()]
    if not tracks:
        raise InputError(f"--tracks: empty — choose from {', '.join(known)}")
    for track in tracks:
        if track not in known:
            raise InputError(f"--tracks: unknown track {track!r} — choose from {', '.join(known)}")
    return list(dict.fromkeys(tracks))


def _fingerprint(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:10]


class _Context:
    """What every track shares: the split, the sample, item vectors, the tuned ranker."""

    def __init__(
        self,
        settings: Settings,
        dataset: Dataset,
        split: Split,
        evaluated: Split,
        store: Store,
        encoder: SentenceTransformerEncoder,
    ) -> None:
        self.settings = settings
        self.dataset = dataset
        self.split = split
        self.evaluated = evaluated
        self.store = store
        self.encoder = encoder
        items = dataset.items.set_index("item_id")
        texts = list(items.loc[split.items, "text"])
        self.item_vectors = embed_texts(texts, encoder, cache=store)
        self.position = {item: i for i, item in enumerate(split.items)}
        self.categories = [tuple(c) for c in items.loc[split.items, "categories"]]
        self.seed = 0

    def vectors_for(self, part: Split) -> np.ndarray:
        return self.item_vectors[[self.position[i] for i in part.items]]

    def categories_for(self, part: Split) -> list[tuple[str, ...]]:
        return [self.categories[self.position[i]] for i in part.items]


def run_eval(
    settings: Settings,
    ratings: Path,
    items: Path,
    *,
    users: int | None = None,
    seed: int = 0,
    tracks: Sequence[str] = TRACKS,
    k: int = 5,
    use_llm: bool = True,
    llm: LLM | None = None,
    log_columns: LogColumns = LogColumns(),
    item_columns: ItemColumns = ItemColumns(),
    on_stage: Callable[[str], None] | None = None,
    on_profiles: Callable[[Any], None] | None = None,
    show_samples: int = 0,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Every requested track as the JSON object `segrec eval --json` writes.

    ``on_progress(track, done, total)`` follows the users scored per track."""
    stage = on_stage or (lambda _: None)
    started = time.perf_counter()
    if users is not None and users < 1:
        raise InputError(f"--users {users}: must be at least 1")
    if k < 2:
        raise InputError(f"--k {k}: need at least 2 segments")
    if show_samples < 0:
        raise InputError(f"--show-samples {show_samples}: must be 0 or more")
    stage("reading the data")
    dataset = load_dataset(ratings, items, log_columns=log_columns, item_columns=item_columns)
    text: dict[str, Any] | None = None
    if "text" in tracks:
        if not use_llm:
            raise InputError("--tracks text needs the LLM: leave out --no-llm")
        text = text_track(
            settings.model_copy(
                update={"workspace": Path(settings.workspace) / f"{ratings.stem}-text"}
            ),
            dataset,
            users=users or TEXT_USERS,
            seed=seed,
            llm=llm if llm is not None else make_llm(settings),
            show_samples=show_samples,
            stage=stage,
        )
        if list(tracks) == ["text"]:
            return {
                "dataset": str(ratings),
                "users": text["users"],
                "sampled": True,
                "seed": seed,
                "tracks": {"text": text},
                "notes": [f"text track: a seeded sample of {text['users']} users"],
                "wall_s": round(time.perf_counter() - started, 1),
            }
    split = protocol_split(dataset.interactions)
    if not split.users:
        raise InputError(f"{ratings}: no user has a test item left after the split")
    sampled = users is not None and users < len(split.users)
    evaluated = subsample(split, users, seed=seed) if sampled and users else split
    notes = list(evaluated.notes)
    need_profiles = (
        "grounding" in tracks
        or "segments" in tracks
        or (use_llm and ("warm" in tracks or "cold" in tracks))
    )
    if need_profiles and not use_llm and len(evaluated.users) > PROFILE_METHOD_USERS:
        need_profiles = False
        notes.append(
            f"deterministic-profile methods left out: {len(evaluated.users)} users > "
            f"{PROFILE_METHOD_USERS} (embedding a profile per user is the slow part); "
            "evaluate a sample of users to include them"
        )
    progress = on_progress or (lambda *_: None)
    ranking = [t for t in ("warm", "cold", "chat") if t in tracks]
    workspace = Path(settings.workspace) / f"{ratings.stem}-{_fingerprint(ratings, items)}"
    result: dict[str, Any] = {
        "dataset": str(ratings),
        "users": len(evaluated.users),
        "sampled": sampled,
        "seed": seed,
        "tracks": {},
    }
    with Store.open(workspace, create=True) as store:
        encoder = SentenceTransformerEncoder(settings.encoder)
        stage("embedding items")
        ctx = _Context(settings, dataset, split, evaluated, store, encoder)
        ctx.seed = seed
        cold = cold_split(evaluated, COLD_KNOWN, seed=seed) if "cold" in tracks else None
        profiles: dict[str, dict[str, Profile]] = {}
        if need_profiles:
            backend = llm if (llm is not None or not use_llm) else make_llm(settings)
            profiles = _profiles(ctx, cold, backend, stage, on_profiles)
            if not use_llm:
                notes.append("--no-llm: methods that need LLM profiles were left out")
        spec: RankerSpec | None = None
        if ranking:
            stage("tuning the ranker on validation")
            labels_for = kmeans_labels(split, ctx.vectors_for, k, seed)
            spec = tune_ranker(
                split,
                item_vectors_for=ctx.vectors_for,
                labels_for=labels_for,
                categories_for=ctx.categories_for,
                seed=seed,
                on_stage=stage,
            )
            result["ranker"] = spec.as_dict()
        # The chat track runs first: the cold track's folds are its folds, so the cold
        # track reuses its EASE fits.
        with reuse_ease_fits():
            if "chat" in tracks:
                stage("chat track (simulated users)")
                user_llm = None
                if use_llm:
                    user_llm = llm if llm is not None else make_llm(settings)
                result["tracks"]["chat"], chat_notes, spec = _chat_track(
                    ctx,
                    spec,
                    k,
                    seed,
                    user_llm,
                    stage,
                    lambda done, total: progress("chat", done, total),
                )
                result["ranker"] = spec.as_dict()
                notes += chat_notes
                if user_llm is None:
                    notes.append("--no-llm: the chat track ran the rule-based simulated user only")
            peers: dict[str, Any] = {}
            if "warm" in tracks or "cold" in tracks:
                stage("tuning ALS on validation")
                peers = _tune_peers(split, seed)
                result["peers"] = peers
            for track, part in (("warm", evaluated), ("cold", cold)):
                if part is None or track not in tracks:
                    continue
                assert spec is not None
                stage(f"{track} track")
                result["tracks"][track] = _ranking_track(
                    ctx,
                    part,
                    spec,
                    labels_for,
                    profiles,
                    track,
                    peers["als"],
                    lambda done, total, track=track: progress(track, done, total),
                )
        if "segments" in tracks:
            stage("segments track")
            result["tracks"]["segments"] = _segments_track(ctx, profiles, k, seed)
        if "grounding" in tracks and "llm" in profiles:
            result["tracks"]["grounding"] = _grounding_track(ctx, store)
    if text is not None:
        result["tracks"]["text"] = text
        notes.append(f"text track: a seeded sample of {text['users']} users")
    result["notes"] = notes
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def _rows(ctx: _Context, frames: pd.DataFrame) -> pd.DataFrame:
    """The dataset rows behind a split's frames, in the store's shape (user_id, item_id,
    behavior, value, timestamp, seq)."""
    interactions = ctx.dataset.interactions
    rows = interactions[interactions["line"].isin(set(frames["line"]))]
    return rows.rename(columns={"line": "seq"})


def _train_dataset(ctx: _Context, cold: Split | None) -> Dataset:
    """The rows the evaluation workspace holds: train interactions only, plus each
    evaluated user's cold history under the id ``cold:<user>``."""
    interactions = ctx.dataset.interactions
    train_lines = set(ctx.split.train_frames["line"])
    train = interactions[interactions["line"].isin(train_lines)]
    frames = [train]
    if cold is not None:
        cold_lines = set(cold.train_frames["line"])
        cold_rows = interactions[interactions["line"].isin(cold_lines)].copy()
        cold_rows["user_id"] = "cold:" + cold_rows["user_id"].astype(str)
        frames.append(cold_rows)
    return replace(ctx.dataset, interactions=pd.concat(frames, ignore_index=True))


def _profiles(
    ctx: _Context,
    cold: Split | None,
    llm: LLM | None,
    stage: Callable[[str], None],
    on_profiles: Callable[[Any], None] | None,
) -> dict[str, dict[str, Profile]]:
    """LLM (when ``llm``) and deterministic profiles of the evaluated users, from train
    histories (warm) and from their first items (cold)."""
    settings, store = ctx.settings, ctx.store
    stage("loading train rows into the evaluation workspace")
    store.ingest(_train_dataset(ctx, cold), source={"eval": "train rows of the PROTOCOL split"})
    warm_ids = list(ctx.evaluated.users)
    cold_ids = [f"cold:{u}" for u in cold.users] if cold is not None else []
    wanted = warm_ids + cold_ids
    out: dict[str, dict[str, Profile]] = {}
    if llm is not None:
        stage(f"profiling {len(wanted)} histories with the LLM (cached)")
        profile_in(store, settings, wanted, llm=llm, on_progress=on_profiles)
        records = {r.user_id: r for r in store.profiles()}
        out["llm"] = {u: Profile.model_validate(records[u].profile) for u in wanted if u in records}
    items = store.items_frame()
    stored = store.interactions_frame(wanted)
    events = user_events(stored, items, value_scales(store.interactions_frame()))
    prompt = load_prompt("profile")
    params = generation_params(settings)
    out["deterministic"] = {
        u: fallback_profile(
            build_request(
                u,
                events.get(u, []),
                prompt=prompt,
                model_id="-",
                params=params,
                max_items=settings.max_history_items,
                max_tokens=settings.max_history_tokens,
            )
        )
        for u in wanted
    }
    return out


def _profile_vectors(
    ctx: _Context, profiles: dict[str, Profile], ids: Sequence[str]
) -> tuple[np.ndarray, int]:
    """Profile embeddings for ``ids`` (zero vector, counted, for a user without one)."""
    texts = [profiles[u].embedding_text() if u in profiles else "" for u in ids]
    vectors, missing = embed_present(texts, ctx.encoder, cache=ctx.store)
    return vectors, int(missing.sum())


def _ranked_metrics(ranked: np.ndarray, part: Split) -> dict[str, float]:
    """Mean NDCG@10 / Recall@20 of top-20 rankings (rows in ``part.users`` order)."""
    per_user = ranking_metrics(ranked, part.test, len(part.items))
    return {m: round(float(v.mean()), 4) if v.size else 0.0 for m, v in per_user.items()}


def _ranking_track(
    ctx: _Context,
    part: Split,
    spec: RankerSpec,
    labels_for: Any,
    profiles: dict[str, dict[str, Profile]],
    track: str,
    als_settings: dict[str, Any],
    progress: Callable[[int, int], None],
) -> dict[str, dict[str, float]]:
    """Baselines, peers and segrec's rankers on one track (warm or cold), same users.

    Every model is fit once (warm) or once per fold (cold), then users are scored in
    batches: each method's top 20 is kept, never a users × catalogue matrix per method.
    The PROTOCOL baselines and the transition peer are the ranker's own signals alone
    (MostPop ranks like the log-scaled counts; ItemKNN and EASE with the tuned settings).
    """
    vectors = ctx.vectors_for(part)
    names = [n for n in SIGNALS if n in spec.signals or n in ("pop", "itemknn", "cosine")]
    names = [*names, *(n for n in ("ease", "transition") if n not in names)]
    if spec.ease_lambda is None:
        names.remove("ease")
    fit_labels, user_labels = labels_for(part)
    ids = [f"cold:{u}" for u in part.users] if track == "cold" else list(part.users)
    user_vectors = {
        kind: _profile_vectors(ctx, profiles[kind], ids)[0]
        for kind in ("llm", "deterministic")
        if kind in profiles
    }
    n_users = len(part.users)
    ranked: dict[str, np.ndarray] = {}
    done = 0

    def keep(method: str, rows: np.ndarray, scores: np.ndarray, seen: sp.csr_matrix) -> None:
        if method not in ranked:
            ranked[method] = np.full((n_users, 20), -1, dtype=np.int64)
        ranked[method][rows] = top_k(scores, 20, seen)

    for fit_rows, user_rows in fold_rows(part):
        ranker = Ranker(spec, vectors, names=names, categories=ctx.categories_for(part)).fit(
            part.fit[fit_rows],
            fit_labels[fit_rows],
            times=part.fit_time[fit_rows] if part.fit_time is not None else None,
        )
        als = ALS(**als_settings, seed=ctx.seed).fit(part.fit[fit_rows])
        for start in range(0, len(user_rows), SCORE_BATCH):
            rows = user_rows[start : start + SCORE_BATCH]
            seen = part.train[rows]
            signals = ranker.signals(
                seen,
                labels=user_labels[rows],
                times=None if part.train_time is None else part.train_time[rows],
            )
            for method, signal in PEER_SIGNALS.items():
                if signal in signals:
                    keep(method, rows, signals[signal], seen)
            keep("ALS", rows, als.score(seen), seen)
            groups = ranker.groups(seen)
            own = {n: signals[n] for n in spec.signals}
            keep("segrec", rows, ranker.blend(own, groups)[0], seen)
            segment_blend = ranker.blend(own, groups, user_labels[rows])[0]
            keep("segrec:per-segment", rows, segment_blend, seen)
            keep("cosine:items", rows, signals["cosine"], seen)
            for kind, matrix in user_vectors.items():
                content = cosine_scores(matrix[rows], vectors, normalise_items=False)
                keep(f"cosine:{kind}-profile", rows, content, seen)
                if "cosine" in own:
                    swapped = ranker.blend({**own, "cosine": content}, groups)[0]
                    keep(f"segrec:{kind}-profile", rows, swapped, seen)
            done += len(rows)
            progress(done, n_users)
    order = [*PEER_SIGNALS, "ALS", "segrec", "segrec:per-segment", "cosine:items"]
    methods = [m for m in order if m in ranked] + [m for m in ranked if m not in order]
    return {m: _ranked_metrics(ranked[m], part) for m in methods}


def _tune_peers(split: Split, seed: int) -> dict[str, Any]:
    """ALS's factors, regularisation and alpha, tuned on the validation split the ranker is
    tuned on (a seeded sample of at most `TUNE_USERS` users)."""
    validation = subsample(validation_split(split), TUNE_USERS, seed=seed)
    settings, tried = tune_als(validation, seed=seed)
    return {"als": settings, "validation": {"als_ndcg@10": tried, "users": len(validation.users)}}


def _segments_track(
    ctx: _Context, profiles: dict[str, dict[str, Profile]], k: int, seed: int
) -> dict[str, dict[str, Any]]:
    """PROTOCOL track 4 for each user representation: lift, seed ARI, silhouette."""
    part = ctx.evaluated
    if len(part.users) < max(k, 3):
        raise InputError(f"segments track: {len(part.users)} users cannot make {k} segments")
    X_train = sp.csr_matrix(part.train, dtype=np.float32)
    pop = np.asarray(X_train.sum(axis=0)).ravel()
    mostpop = evaluate_scores(np.tile(pop, (len(part.users), 1)), part)["ndcg@10"]
    from segrec.ranker import history_vectors
    from segrec.segments import COLLAB_N_INIT, CollabSpace, Histories

    reps = {"items": history_vectors(part.train, ctx.vectors_for(part))}
    # collab: fitted on the evaluated users' train histories only (as `segrec cluster` fits
    # on the population it clusters), then every user projected with it.
    histories = Histories.from_frame(part.train_frames, part.users, part.items)
    reps["collab"] = CollabSpace.fit(histories, seed=seed).project(histories)
    for kind in ("llm", "deterministic"):
        if kind in profiles:
            reps[f"{kind}-profile"], _ = _profile_vectors(ctx, profiles[kind], part.users)
    out: dict[str, dict[str, Any]] = {}
    for name, X in reps.items():
        n_init = COLLAB_N_INIT if name == "collab" else None
        clustering = cluster_vectors(X, k=k, seed=seed, n_init=n_init)
        counts = np.stack(
            [np.asarray(X_train[clustering.labels == j].sum(axis=0)).ravel() for j in range(k)]
        )
        segment_ndcg = evaluate_scores(counts[clustering.labels], part)["ndcg@10"]
        out[name] = {
            "lift": round(segment_ndcg / mostpop, 4) if mostpop > 0 else None,
            "segment_pop_ndcg@10": round(segment_ndcg, 4),
            "stability_ari": round(seed_ari(X, k=k, seeds=range(seed, seed + 5), n_init=n_init), 4),
            "silhouette": round(float(clustering.silhouette), 4),
            "sizes": sorted(np.bincount(clustering.labels, minlength=k).tolist(), reverse=True),
        }
    return out


def _grounding_track(ctx: _Context, store: Store) -> dict[str, Any]:
    """PROTOCOL track 5 over the evaluated users' LLM profiles (warm histories).

    ``hallucination_rate_raw``: share of profiles whose model output named a category or
    title absent from the history (removed by grounding before storing);
    ``hallucination_rate_stored``: the same check on what was stored (likes, dislikes,
    favourite items), which grounding should hold at 0.
    """
    ids = set(ctx.evaluated.users)
    records = [r for r in store.profiles() if r.user_id in ids]
    if not records:
        return {}
    items = store.items_frame()
    events = user_events(
        store.interactions_frame(list(ids)), items, value_scales(store.interactions_frame())
    )
    bad = 0
    for record in records:
        history = events.get(record.user_id, [])
        categories = {c for e in history for c in e.categories}
        titles = {e.title for e in history}
        profile = Profile.model_validate(record.profile)
        if (
            set(profile.likes + profile.dislikes) - categories
            or set(profile.favourite_items) - titles
        ):
            bad += 1
    n = len(records)
    return {
        "profiles": n,
        "hallucination_rate_raw": round(sum(bool(r.removed) for r in records) / n, 4),
        "claims_removed_per_profile": round(sum(len(r.removed) for r in records) / n, 4),
        "hallucination_rate_stored": round(bad / n, 4),
        "fallback_rate": round(sum(r.fallback for r in records) / n, 4),
    }


_Snapshot = tuple[list[int], int, np.ndarray | None, tuple[list[str], list[str]]]
"""What a chat knew: liked items, segment, draft vector, (liked, disliked) categories."""


@dataclass
class _ChatState:
    """What the chats knew at one checkpoint, one row per chatting user."""

    liked: sp.csr_matrix  # users × items: the liked (named or picked) items
    labels: np.ndarray  # the segment each chat placed its user in (-1: none yet)
    vectors: np.ndarray  # the draft vectors (zero while nothing is liked)
    categories: sp.csr_matrix  # users × the ranker's categories: +1 liked, -1 disliked

    @property
    def told(self) -> np.ndarray:
        """Users who named or picked an item or a category."""
        return (np.diff(self.liked.indptr) > 0) | (np.diff(self.categories.indptr) > 0)

    def groups(self, spec: RankerSpec) -> np.ndarray:
        """Each user's weight set, as `ChatSession.group` decides."""
        return np.array(
            [
                chat_group(int(n), bool(t), spec.weights, spec.short_history)
                for n, t in zip(np.diff(self.liked.indptr), self.told, strict=True)
            ]
        )


@dataclass
class _ChatRun:
    """Simulated chats on one split: per (simulated user, checkpoint) what the chat knew."""

    split: Split  # no known history (cold, 0 items), folds as on the cold track
    rankers: dict[int, Ranker]
    states: dict[tuple[str, int], _ChatState]
    segments: int
    sure: float
    llm_failures: int = 0


def _simulate_chats(
    ctx: _Context,
    base: Split,
    spec: RankerSpec,
    k: int,
    seed: int,
    simulators: dict[str, Callable[[list[Any]], Any]],
    checkpoints: Sequence[int],
    stage: Callable[[str], None],
    progress: Callable[[int, int], None] = lambda *_: None,
    folds: int = 5,
) -> _ChatRun:
    """Run a chat for every evaluated user of ``base`` with each simulated user, recording
    the liked items and categories, segment and draft vector after each checkpoint's answer.

    Segments come from k-means on every user's mean item embedding in ``base``'s fit (what
    `segrec cluster` does by default); rankers are fit in ``folds`` folds of users (2 when
    tuning), never on the chatting user's history. Questions use the template wording: the
    choices, which alone matter to the ranking, are the same with or without the LLM.
    """
    from segrec.chat import ChatContext, ChatSession, SegmentCandidate
    from segrec.ranker import history_vectors
    from segrec.segments import Histories, assign_users, segment_facts
    from segrec.serving import Served

    chat = cold_split(base, 0, folds=folds, seed=seed)
    assert chat.folds is not None
    vectors = ctx.vectors_for(chat)
    items = ctx.dataset.items.set_index("item_id").loc[chat.items].reset_index()
    fit_vectors = history_vectors(chat.fit, vectors)
    clustering = cluster_vectors(fit_vectors, k=min(k, fit_vectors.shape[0]), seed=seed)
    facts = segment_facts(
        clustering,
        Histories.from_frame(base.train_frames, chat.fit_users, list(items["item_id"])),
        items=items,
        summaries={},
        stability=np.full(clustering.k, np.nan),
    )
    segments = [
        SegmentCandidate.from_facts(
            f.segment_id,
            f"segment {f.segment_id}",
            "",
            clustering.centroids[f.segment_id],
            f.as_dict(),
            f.size,
        )
        for f in facts
    ]
    _, _, margins = assign_users(fit_vectors, clustering.centroids)
    sure = float(np.median(margins))
    known = _rows(ctx, base.train_frames)
    events = user_events(known[known["user_id"].isin(set(chat.users))], items, value_scales(known))
    n_users, n_items = len(chat.users), len(chat.items)
    liked: dict[tuple[str, int], list[list[int]]] = {}
    told: dict[tuple[str, int], list[tuple[list[str], list[str]]]] = {}
    labels = {(w, c): np.full(n_users, -1, dtype=np.int64) for w in simulators for c in checkpoints}
    draft = {
        (w, c): np.zeros((n_users, vectors.shape[1]), dtype=np.float32)
        for w in simulators
        for c in checkpoints
    }
    for key in labels:
        liked[key] = [[] for _ in range(n_users)]
        told[key] = [([], []) for _ in range(n_users)]
    run = _ChatRun(chat, {}, {}, len(segments), sure)
    candidates = [n for n in SIGNALS if n != "ease" or spec.ease_lambda is not None]
    all_rows = np.arange(chat.fit.shape[0])
    folds = np.unique(chat.folds)
    chatted = 0
    for fold in folds:
        members = np.flatnonzero(chat.folds == fold)
        fit_rows = np.setdiff1d(all_rows, members)
        stage(f"simulated chats: fold {int(fold) + 1} of {len(folds)}")
        # Every signal, not only those the spec weights: tuning the chat weights tries them.
        ranker = Ranker(spec, vectors, names=candidates, categories=ctx.categories_for(chat)).fit(
            chat.fit[fit_rows],
            clustering.labels[fit_rows],
            times=None if chat.fit_time is None else chat.fit_time[fit_rows],
        )
        run.rankers[int(fold)] = ranker
        served = Served(
            ranker,
            items,
            vectors,
            chat.fit[fit_rows],
            [chat.fit_users[r] for r in fit_rows],
            clustering.labels[fit_rows],
            None,
            [],
        )
        context = ChatContext(
            served=served,
            segments=segments,
            encoder=ctx.encoder,
            llm=None,
            domain=ctx.settings.domain,
            represent="items",
            sure_margin=sure,
        )
        for row in members:
            history = events.get(chat.users[row], [])
            for who, make in simulators.items():
                sim = make(history)
                session = ChatSession(context, max_questions=max(checkpoints))
                snapshots: dict[int, _Snapshot] = {}
                asked = 0
                while (question := session.next_question()) is not None:
                    session.answer(sim.answer(question))
                    asked += 1
                    if asked in checkpoints:
                        snapshots[asked] = _snapshot(session)
                final = _snapshot(session)  # stopped early: the final state stands
                for checkpoint in checkpoints:
                    items_liked, label, vector, categories = snapshots.get(checkpoint, final)
                    key = (who, checkpoint)
                    liked[key][row] = items_liked
                    told[key][row] = categories
                    labels[key][row] = label
                    if vector is not None:
                        draft[key][row] = vector
                run.llm_failures += getattr(sim, "failures", 0)
            chatted += 1
            progress(chatted, n_users)
    for key, rows in liked.items():
        indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
        indices = np.array([c for r in rows for c in r], dtype=np.int64)
        X = sp.csr_matrix(
            (np.ones(len(indices), dtype=np.float32), indices, indptr), shape=(n_users, n_items)
        )
        first = next(iter(run.rankers.values()))
        categories = sp.csr_matrix(
            sp.vstack([first.category_row(*pair) for pair in told[key]])
            if told[key]
            else sp.csr_matrix((0, len(first.category_names)), dtype=np.float32)
        )
        categories.eliminate_zeros()
        run.states[key] = _ChatState(X, labels[key], draft[key], categories)
    return run


def _snapshot(session: Any) -> _Snapshot:
    placement = session.placement
    return (
        list(session.liked_items),
        placement.segment_id if placement is not None else -1,
        session.vector(),
        (list(session.liked_categories), list(session.disliked_categories)),
    )


def _chat_signals(
    run: _ChatRun, key: tuple[str, int], names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Every named signal for the chatting users at one checkpoint (per-fold rankers)."""
    state = run.states[key]
    X = state.liked
    out = {n: np.zeros(X.shape, dtype=np.float32) for n in names}
    assert run.split.folds is not None
    for fold, ranker in run.rankers.items():
        members = np.flatnonzero(run.split.folds == fold)
        signals = ranker.signals(
            X[members],
            labels=state.labels[members],
            user_vectors=state.vectors[members],
            names=names,
            user_categories=state.categories[members],
        )
        for name in names:
            out[name][members] = signals[name]
    return out


def _tune_chat_weights(
    ctx: _Context, spec: RankerSpec, k: int, seed: int, stage: Callable[[str], None]
) -> RankerSpec:
    """The "chat" and "chat_start" weights, tuned like the others on the validation split:
    simulated chats (rule-based user) of the validation users (a seeded sample of at most
    `TUNE_USERS`), scored on their validation items after 1 and after 3 answers, stacked;
    each group on the chats that `chat_group` puts in it (a group with fewer than
    `MIN_TUNING_USERS` such chats keeps its weights)."""
    from segrec.recommend import tune_blend
    from segrec.simulate import RuleBasedUser

    validation = subsample(validation_split(ctx.split), TUNE_USERS, seed=seed)
    run = _simulate_chats(
        ctx, validation, spec, k, seed, {"rule": RuleBasedUser}, CHAT_TUNE_AT, stage, folds=2
    )
    names = [n for n in SIGNALS if n != "ease" or spec.ease_lambda is not None]
    # Chat weights serve users who named or picked an item or a category (the others get the
    # short-history weights), so they are tuned on those; liked items are never recommended.
    both = RankerSpec.from_dict(spec.as_dict())
    for group in ("chat", "chat_start"):
        both.weights.setdefault(group, dict(DEFAULT_WEIGHTS[group]))
    states = {c: run.states[("rule", c)] for c in CHAT_TUNE_AT}
    signals = {c: _chat_signals(run, ("rule", c), names) for c in CHAT_TUNE_AT}
    spec = RankerSpec.from_dict(spec.as_dict())
    for group in ("chat", "chat_start"):
        parts = []
        for checkpoint, state in states.items():
            rows = np.flatnonzero(state.groups(both) == group)
            parts.append((rows, state.liked[rows], signals[checkpoint]))
        n_rows = sum(len(rows) for rows, _, _ in parts)
        if n_rows < MIN_TUNING_USERS:
            spec.weights[group] = both.weights[group]
            spec.notes.append(
                f"{group} weights not tuned: {n_rows} simulated chats fall in that group"
            )
            continue
        scored = replace(
            run.split,
            users=[run.split.users[r] for rows, _, _ in parts for r in rows],
            train=sp.csr_matrix(sp.vstack([X for _, X, _ in parts])),
            test=[run.split.test[r] for rows, _, _ in parts for r in rows],
        )
        stage(f"tuning {group} weights")
        stacked = {n: np.concatenate([m[n][rows] for rows, _, m in parts]) for n in names}
        blend, trace = tune_blend(stacked, scored)
        spec.weights[group] = blend.weights
        spec.validation[group] = {
            "users": len(validation.users),
            "rows": n_rows,
            "answers": list(CHAT_TUNE_AT),
            "ndcg@10": round(max(float(t["ndcg@10"]) for t in trace), 4),
        }
        spec.notes.append(
            f"{group} weights tuned on simulated chats of the validation users after "
            + " and ".join(map(str, CHAT_TUNE_AT))
            + " answers, stacked"
        )
    return spec


def _chat_track(
    ctx: _Context,
    spec: RankerSpec,
    k: int,
    seed: int,
    user_llm: LLM | None,
    stage: Callable[[str], None],
    progress: Callable[[int, int], None],
) -> tuple[dict[str, dict[str, float]], list[str], RankerSpec]:
    """PROTOCOL track 3: each evaluated user starts with no history and answers the chat's
    questions as a simulated user who knows only their train history (`segrec.simulate`);
    the recommendations after 1, 3 and 5 answers are scored on their test items, beside
    MostPop fit the same way (folds)."""
    from segrec.simulate import LLMUser, RuleBasedUser

    stage("tuning chat weights on simulated validation chats")
    spec = _tune_chat_weights(ctx, spec, k, seed, stage)
    simulators: dict[str, Callable[[list[Any]], Any]] = {"rule": RuleBasedUser}
    if user_llm is not None:
        params = generation_params(ctx.settings)
        simulators["llm"] = lambda history: LLMUser(history, user_llm, params, ctx.settings.domain)
    run = _simulate_chats(
        ctx, ctx.evaluated, spec, k, seed, simulators, CHAT_CHECKPOINTS, stage, progress
    )
    chat = run.split
    assert chat.folds is not None
    popular = np.full((len(chat.users), 20), -1, dtype=np.int64)
    for fit_rows, members in fold_rows(chat):
        counts = MostPop().fit(chat.fit[fit_rows]).score(chat.train[:1])
        popular[members] = top_k(counts, 20)[0]
    table = {"MostPop": _ranked_metrics(popular, chat)}
    for (who, checkpoint), state in run.states.items():
        ranked = np.full((len(chat.users), 20), -1, dtype=np.int64)
        for fold, ranker in run.rankers.items():
            members = np.flatnonzero(chat.folds == fold)
            ranked[members] = ranker.recommend(
                state.liked[members],
                20,
                labels=state.labels[members],
                user_vectors=state.vectors[members],
                groups=state.groups(spec)[members],
                user_categories=state.categories[members],
            ).indices
        suffix = "" if who == "rule" else ":llm-user"
        table[f"segrec@{checkpoint}{suffix}"] = _ranked_metrics(ranked, chat)
    notes = [
        f"chat track: {run.segments} segments from k-means on every train user's mean item "
        f"embedding; chats stop early at margin ≥ {run.sure:.3f} (the median member margin); "
        f"chat weights {spec.weights['chat']}, chat_start weights {spec.weights.get('chat_start')}"
    ]
    if user_llm is not None:
        notes.append(
            f"chat track: the LLM user gave no usable answer {run.llm_failures} time(s) "
            "(counted as an empty answer)"
        )
    return table, notes, spec


# ------------------------------------------------------------------------------ text track


@dataclass
class _Timed:
    """Passes calls to the backend and adds each call's seconds to the current kind.

    ``plain``: every schema loses its patterns and enums (:func:`plain_schema`), so the
    same prompts run under a plain JSON grammar — what the constraints buy, measured.
    """

    llm: LLM
    kind: str = "summary"
    plain: bool = False
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        return str(self.llm.model_id)

    @property
    def concurrency(self) -> int:
        return int(getattr(self.llm, "concurrency", 1))

    def complete(self, messages: Any, *, params: Any, schema: Any = None) -> Any:
        if self.plain and schema is not None:
            schema = plain_schema(schema)
        start = time.perf_counter()
        try:
            return self.llm.complete(messages, params=params, schema=schema)
        finally:
            self.seconds[self.kind] = self.seconds.get(self.kind, 0.0) + (
                time.perf_counter() - start
            )


def plain_schema(schema: Any) -> Any:
    """``schema`` without its ``pattern`` and ``enum`` constraints: the same fields, types
    and lengths, as a plain JSON grammar enforces them."""
    if isinstance(schema, dict):
        return {k: plain_schema(v) for k, v in schema.items() if k not in ("pattern", "enum")}
    if isinstance(schema, list):
        return [plain_schema(v) for v in schema]
    return schema


TEXT_KINDS = ("summary", "segment", "parent", "reason", "question")
TEXT_USERS = 25  # the text track's default sample: every text costs LLM seconds


@dataclass
class _Shown:
    """Every displayed text of the text track: what it says, who wrote it, what the gates
    say of it now, and the facts a reader sees beside it."""

    tally: Any
    texts: list[dict[str, Any]] = field(default_factory=list)

    def add(
        self,
        kind: str,
        text: str,
        *,
        replaced: bool,
        why: str | None,
        check: Callable[[], object],
        facts: str,
        ungrounded: bool | None = None,
    ) -> None:
        from segrec.gates import GateError

        self.tally.add(kind, replaced=replaced, why=why)
        try:
            check()
        except GateError as exc:
            failure: str | None = f"{exc.gate}/{exc.code}"
        else:
            failure = None
        self.texts.append(
            {
                "kind": kind,
                "text": text,
                "template": replaced,
                "gate_failure": failure,
                "ungrounded": ungrounded,
                "facts": facts,
            }
        )


def _segment_check(
    store: Store, run_id: int, segment: Any, vocabulary: Any
) -> tuple[Callable[[], None], bool, str]:
    """The label gates on a stored segment, against facts rebuilt from the store (category
    shares of its members' interactions, its stored top items and top categories), whether
    it names a category the members lack, and the facts shown beside it."""
    from segrec.grounding import absent_categories
    from segrec.label import SegmentDoc, check_label_gates

    members = [
        u for u, a in store.assignments(run_id).items() if a.segment_id == segment.segment_id
    ]
    seen = store.interactions_frame(members).drop_duplicates(["user_id", "item_id"])
    item_categories = store.items_frame().set_index("item_id")["categories"]
    counts = seen["item_id"].map(item_categories).explode().dropna().value_counts()
    shares = {str(c): round(float(n / counts.sum()), 4) for c, n in counts.items()}
    top_categories = [c["category"] for c in segment.facts.get("top_categories", [])]
    top_items = [t["title"] for t in segment.facts.get("top_items", [])]
    doc = SegmentDoc(
        segment_id=segment.segment_id,
        size=segment.size,
        members=[],
        contrast=[],
        categories=shares,
        top_items=top_items,
        lift_categories=tuple(top_categories),
    )
    categories = vocabulary.categories
    absent = absent_categories(f"{segment.name}. {segment.description}", shares, categories)
    by_share = sorted(shares.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    facts = (
        f"{segment.size} users; top categories: {', '.join(top_categories)}; by share: "
        f"{', '.join(f'{c} {v:.0%}' for c, v in by_share)}; top items: {'; '.join(top_items[:3])}"
    )
    return (
        lambda: check_label_gates(segment.name, segment.description, doc, categories),
        bool(absent),
        facts,
    )


def _reason_check(
    item: dict[str, Any],
    history: Sequence[Any],
    categories: dict[str, tuple[str, ...]],
    vocabulary: Any,
) -> tuple[Callable[[], None], bool, str]:
    """The reason gates on a displayed reason (its candidate rebuilt from the shown item:
    title, categories, signals; ``because`` the liked titles it cites), whether it names
    what the history lacks, and the facts shown beside it."""
    from segrec.gates import mentioned
    from segrec.grounding import SENTENCE
    from segrec.reasons import (
        Candidate,
        ReasonContext,
        anchors,
        check_reason_gates,
        shared_categories,
    )

    liked = [e.title for e in history if e.strength > 0]
    reason = str(item["reason"])
    candidate = Candidate(
        item_id=str(item["item_id"]),
        title=str(item["title"]),
        categories=tuple(categories.get(str(item["item_id"]), ())),
        score=float(item["score"]),
        signals=dict(item["signals"]),
        because=tuple(mentioned(reason, liked)),
    )
    context = ReasonContext.build(history)
    options = anchors(candidate, history)
    claims = [c for s in SENTENCE.split(reason) for c in context.claims(s, candidate, vocabulary)]
    signals = ", ".join(k for k, v in candidate.signals.items() if v > 0) or "none"
    facts = (
        f"item: {candidate.title} [{', '.join(candidate.categories)}]; shares with the "
        f"user's likes: {', '.join(shared_categories(candidate, history)[:3]) or 'nothing'}; "
        f"liked: {'; '.join(liked[-3:])}; signals: {signals}"
    )
    return (
        lambda: check_reason_gates(reason, candidate, context, vocabulary, options),
        bool(claims),
        facts,
    )


def _parent_check(
    parent: Any, segments: Sequence[Any], vocabulary: Any
) -> tuple[Callable[[], None], str]:
    """The label gates on a stored level-1 parent, against the top categories stored beside
    it (and its children's top items, which its prompt and template quote)."""
    from segrec.label import SegmentDoc, check_label_gates

    top = {t["category"]: t["share"] for t in parent.facts.get("top_categories", [])}
    children = sorted(
        (s for s in segments if s.segment_id in parent.children), key=lambda s: -s.size
    )
    items = [t["title"] for child in children for t in child.facts.get("top_items", [])]
    doc = SegmentDoc(
        segment_id=parent.parent_id,
        size=parent.size,
        members=[],
        contrast=[],
        categories=top,
        top_items=list(dict.fromkeys(items))[:5],
        shown_categories=tuple(top),
    )
    facts = f"{parent.size} users; top categories: {', '.join(top)}"
    return (
        lambda: check_label_gates(parent.name, parent.description, doc, vocabulary.categories),
        facts,
    )


def _question_check(question: Any) -> tuple[Callable[[], None], str]:
    from segrec.gates import Lexicon, check_fluent, check_question_consistent

    labels = [o.label for o in question.options]

    def check() -> None:
        check_fluent(question.text, Lexicon.from_names(labels), names=labels)
        check_question_consistent(question.text, labels)

    return check, "choices: " + "; ".join(labels)


def text_track(
    settings: Settings,
    dataset: Dataset,
    *,
    users: int = 25,
    seed: int = 0,
    llm: LLM,
    reasons_per_user: int = 3,
    chats: int = 5,
    k: int = 3,
    show_samples: int = 0,
    constrained: bool = True,
    stage: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Every kind of displayed text, written on a seeded sample of users through the normal
    stages (profile, cluster, explain, chat) in a workspace of its own, and counted.

    Per kind: texts, share kept (written by the LLM, passed every gate), share replaced by
    a template and why, the share of displayed texts (kept and templates) that pass the
    gates when checked again, the share that name something ungrounded, and LLM seconds per
    text. ``texts`` lists every displayed text with the facts shown beside it;
    ``show_samples`` adds that many kept and replaced texts per kind. ``constrained=False``
    runs the same prompts under a plain JSON grammar (no patterns, no enums).
    """
    from segrec.chat import ChatSession
    from segrec.gates import TextTally
    from segrec.grounding import SENTENCE
    from segrec.hierarchy import build_hierarchy
    from segrec.pipeline import run_clustering, run_profiles
    from segrec.profile import Vocabulary, check_summary_gates, ungrounded_claims
    from segrec.serving import explain
    from segrec.simulate import RuleBasedUser
    from segrec.workspace import Workspace

    all_users = sorted(dataset.interactions["user_id"].unique())
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(all_users, size=min(users, len(all_users)), replace=False))
    rows = dataset.interactions[dataset.interactions["user_id"].isin(set(picked))]
    used = dataset.items[dataset.items["item_id"].isin(set(rows["item_id"]))]
    sample = replace(dataset, interactions=rows, items=used.reset_index(drop=True))
    key = "|".join([*map(str, picked), llm.model_id, "" if constrained else "plain"])
    workspace = Path(settings.workspace) / f"text-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    local = settings.model_copy(update={"workspace": workspace})
    timed = _Timed(llm, plain=not constrained)
    tally = TextTally()
    shown = _Shown(tally)

    with Store.open(workspace, create=True) as store:
        store.ingest(sample, source={"eval": f"text track, {len(picked)} users, seed {seed}"})
    stage(f"profiling {len(picked)} users")
    run_profiles(local, picked, llm=timed)
    with Store.open(workspace) as store:
        records = {r.user_id: r for r in store.profiles()}
        items = store.items_frame()
        events = user_events(store.interactions_frame(), items, value_scales(rows))
    vocabulary = Vocabulary.from_items(items)
    item_categories = {
        str(i): tuple(c) for i, c in zip(items["item_id"], items["categories"], strict=True)
    }
    for user in picked:
        record = records[user]
        summary = str(record.profile["summary"])
        request = build_request(
            user,
            events.get(user, []),
            prompt=load_prompt("profile"),
            model_id="-",
            params=generation_params(local),
            max_items=local.max_history_items,
            max_tokens=local.max_history_tokens,
        )
        shown.add(
            "summary",
            summary,
            replaced=record.fallback,
            why=record.fallback_reason,
            check=partial(check_summary_gates, summary, request, vocabulary),
            # sentence by sentence, as the profile stage checks
            ungrounded=any(
                ungrounded_claims(part, request, vocabulary) for part in SENTENCE.split(summary)
            ),
            facts=f"likes: {', '.join(request.like_options[:3])}; favourites: "
            f"{'; '.join(request.favourite_options[:3])}",
        )
    stage("clustering and naming segments")
    timed.kind = "segment"
    # "unnamed": a small sample's tiny segments stay undescribed rather than stop the run.
    clustered = run_clustering(local, k=min(k, len(picked) - 1), small="unnamed", llm=timed)
    with Store.open(workspace) as store:
        for segment in clustered.segments:
            if segment.described:
                check, absent, facts = _segment_check(store, clustered.run.id, segment, vocabulary)
                shown.add(
                    "segment",
                    f"{segment.name} — {segment.description}",
                    replaced=segment.fallback,
                    why=segment.facts.get("fallback_reason"),
                    check=check,
                    ungrounded=absent,
                    facts=facts,
                )
        if sum(s.described for s in clustered.segments) >= 3:  # a hierarchy needs 3
            stage("naming parent segments")
            timed.kind = "parent"
            tree = build_hierarchy(store, clustered.run, levels=2, llm=timed, settings=local)
            for parent in tree.parents:
                if parent.described:
                    check, facts = _parent_check(parent, clustered.segments, vocabulary)
                    shown.add(
                        "parent",
                        f"{parent.name} — {parent.description}",
                        replaced=parent.fallback,
                        why=parent.facts.get("fallback_reason"),
                        check=check,
                        facts=facts,
                    )

    def add_reasons(found: Sequence[dict[str, Any]], history: Sequence[Any]) -> None:
        for item in found:
            check, claims, facts = _reason_check(item, history, item_categories, vocabulary)
            shown.add(
                "reason",
                item["reason"],
                replaced=item["reason_fallback"],
                why=item["reason_fallback_why"],
                check=check,
                ungrounded=claims,
                facts=facts,
            )

    stage(f"explaining {len(picked)} users")
    timed.kind = "reason"
    for user in picked:
        result, _ = explain(local, user, n=reasons_per_user, llm=timed)
        add_reasons(result["items"], events.get(user, []))
    stage(f"{min(chats, len(picked))} simulated chats")
    with Workspace(local, llm=timed) as ws:
        context = ws.recommender().chat_context(ws.llm)
        for user in picked[:chats]:
            session = ChatSession(context, max_questions=3, n=reasons_per_user)
            simulated = RuleBasedUser(events.get(user, []))
            timed.kind = "question"
            while (question := session.next_question()) is not None:
                if not question.open:
                    check, facts = _question_check(question)
                    shown.add(
                        "question",
                        question.text,
                        replaced=question.fallback,
                        why=question.fallback_reason,
                        check=check,
                        facts=facts,
                    )
                session.answer(simulated.answer(question))
            timed.kind = "reason"
            add_reasons(session.finish().items, session.history())
    return _text_summary(
        shown,
        timed,
        users=len(picked),
        seed=seed,
        model=llm.model_id,
        constrained=constrained,
        show_samples=show_samples,
        workspace=workspace,
    )


def _text_summary(
    shown: _Shown,
    timed: _Timed,
    *,
    users: int,
    seed: int,
    model: str,
    constrained: bool,
    show_samples: int,
    workspace: Path,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "users": users,
        "seed": seed,
        "model": model,
        "constrained": constrained,
        "kinds": {},
    }
    for kind in TEXT_KINDS:
        counted = shown.tally.kinds.get(kind)
        if counted is None:
            continue
        texts = [t for t in shown.texts if t["kind"] == kind]
        failures = Counter(t["gate_failure"] for t in texts if t["gate_failure"])
        entry = counted.as_json()
        entry["replaced_share"] = round(counted.replaced / counted.texts, 4)
        checked = [t["ungrounded"] for t in texts if t["ungrounded"] is not None]
        entry["ungrounded"] = sum(checked) if checked else None
        entry["ungrounded_rate"] = round(sum(checked) / len(checked), 4) if checked else None
        entry["displayed_pass_share"] = round(1 - sum(failures.values()) / len(texts), 4)
        entry["displayed_failures"] = dict(sorted(failures.items()))
        entry["seconds_per_text"] = round(timed.seconds.get(kind, 0.0) / counted.texts, 3)
        if show_samples:
            entry["samples"] = {
                outcome: [t["text"] for t in texts if t["template"] == (outcome == "replaced")][
                    :show_samples
                ]
                for outcome in ("kept", "replaced")
            }
        out["kinds"][kind] = entry
    total = len(shown.texts)
    out["texts_shown"] = total
    out["kept_share"] = round(sum(not t["template"] for t in shown.texts) / total, 4)
    out["displayed_pass_share"] = round(
        sum(t["gate_failure"] is None for t in shown.texts) / total, 4
    )
    out["texts"] = shown.texts
    out["workspace"] = str(workspace)
    return out
