"""`--represent collab`: segments from behaviour (who did what), not from item text.

The planted data: users in four segments, each segment using its own pool of items, while
item titles and categories are drawn independently of the pools, so the text says nothing
about the segments. The collab space must recover them (and content-only ``items`` vectors
must not, or the test would prove nothing), seeds must agree, and a user placed later (by
`assign`, or a newcomer in the chat with items or only a category) must land where the
users who behave like them are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from segrec import pipeline
from segrec.chat import ChatSession
from segrec.cluster import assign, cluster_vectors, seed_ari
from segrec.config import Settings
from segrec.embed import sparse_mean_vectors
from segrec.errors import InputError, WorkspaceError
from segrec.report import _in_space_of, compare_runs, write_report
from segrec.segments import (
    COLLAB_DIM,
    COLLAB_N_INIT,
    CollabSpace,
    Histories,
    user_vectors,
)
from segrec.store import Store
from segrec.testing import FakeEncoder, FakeLLM, schema_answer
from segrec.workspace import Workspace

POOLS = 4
WORDS = [
    *[
        "amber",
        "basil",
        "cedar",
        "delta",
        "ember",
        "fjord",
        "garnet",
        "harbor",
        "iris",
        "juniper",
        "kestrel",
        "lotus",
    ],
    *[
        "meadow",
        "nectar",
        "onyx",
        "pebble",
        "quartz",
        "raven",
        "saffron",
        "tundra",
        "umber",
        "violet",
        "willow",
    ],
]
COLOURS = ("Red", "Green", "Blue", "Gold")
MARKER = "Marsh Lantern"  # a category only a few pool-2 items carry (the chat's category test)


def planted(n_users: int = 240, n_items: int = 160, per_user: int = 12, seed: int = 0) -> dict:
    """Users, items and events with behaviour segments that the content does not show.

    Item i belongs to pool i % POOLS and has the title and category of template i // POOLS:
    every item has a twin with the same text in each other pool, and users of every pool
    favour the templates alike, so a segment's items read exactly like another's.
    """
    rng = np.random.default_rng(seed)
    templates = n_items // POOLS
    pool = np.arange(n_items) % POOLS
    template = np.arange(n_items) // POOLS
    names = [" ".join(rng.choice(WORDS, 3, replace=False)).title() for _ in range(templates)]
    colours = [str(rng.choice(COLOURS)) for _ in range(templates)]
    titles = [names[t] for t in template]
    categories = [[colours[t]] for t in template]
    for i in np.flatnonzero(pool == 2)[-3:]:  # three rarely picked pool-2 items
        categories[i].append(MARKER)
    segment = np.arange(n_users) % POOLS
    weights = 1.0 / np.sqrt(np.arange(1, templates + 1))  # a few popular templates
    rows, cols = [], []
    for user in range(n_users):
        own = np.flatnonzero(pool == segment[user])  # in template order
        picked = list(rng.choice(own, per_user - 2, replace=False, p=weights / weights.sum()))
        picked += list(rng.choice(n_items, 2, replace=False))  # some noise anywhere
        for item in dict.fromkeys(int(i) for i in picked):
            rows.append(user)
            cols.append(item)
    return {
        "pool": pool,
        "segment": segment,
        "titles": titles,
        "categories": categories,
        "rows": np.array(rows),
        "cols": np.array(cols),
    }


def histories_of(data: dict) -> Histories:
    users = [f"u{u}" for u in range(len(data["segment"]))]
    items = [f"i{i}" for i in range(len(data["pool"]))]
    return Histories.from_pairs(users, items, data["rows"], data["cols"])


def content_vectors(data: dict) -> np.ndarray:
    texts = [
        f"{t} ({', '.join(c)})" for t, c in zip(data["titles"], data["categories"], strict=True)
    ]
    return FakeEncoder().encode_batch(texts)


def test_collab_recovers_behaviour_segments_that_content_cannot() -> None:
    data = planted()
    histories = histories_of(data)
    space = CollabSpace.fit(histories, seed=0)
    assert space.vectors.shape == (160, COLLAB_DIM) and space.counts.sum() == len(data["rows"])
    X = user_vectors(
        "collab",
        histories.user_ids,
        profile_texts={},
        histories=histories,
        item_vectors=None,
        encoder=FakeEncoder(),
        space=space,
    )
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
    collab = cluster_vectors(X, k=POOLS, seed=0, n_init=COLLAB_N_INIT)
    assert adjusted_rand_score(data["segment"], collab.labels) >= 0.9
    assert seed_ari(X, k=POOLS, n_init=COLLAB_N_INIT) >= 0.95
    # The content-only representation of the same users finds nothing: the data is fair.
    items = sparse_mean_vectors(histories.recent, content_vectors(data))
    content = cluster_vectors(items, k=POOLS, seed=0)
    assert adjusted_rand_score(data["segment"], content.labels) < 0.3


def test_collab_places_later_users_with_the_fitted_parts() -> None:
    data = planted()
    histories = histories_of(data)
    space = CollabSpace.fit(histories, seed=0)
    X = space.project(histories)
    clustering = cluster_vectors(X, k=POOLS, seed=0, n_init=COLLAB_N_INIT)
    segment_of_pool = [
        int(np.bincount(clustering.labels[data["segment"] == p]).argmax()) for p in range(POOLS)
    ]
    assert sorted(segment_of_pool) == list(range(POOLS))
    # The fitted users' vectors are what the same rule gives one user at a time.
    one = space.of_items([f"i{c}" for c in histories.recent[7].indices])
    np.testing.assert_allclose(one, X[7], atol=1e-5)
    # A newcomer with three items of pool 1 (and an item the space never saw) lands there.
    pool1 = [f"i{i}" for i in np.flatnonzero(data["pool"] == 1)[:3]]
    newcomer = space.of_items([*pool1, "brand-new-item"])
    labels, _ = assign(newcomer[None], clustering.centroids)
    assert labels[0] == segment_of_pool[1]
    # A newcomer who names only a category: its items, weighted by popularity.
    catalogue = pd.DataFrame({"item_id": histories.item_ids, "categories": data["categories"]})
    by_category = space.of_categories(catalogue, [MARKER])
    labels, _ = assign(by_category[None], clustering.centroids)
    assert labels[0] == segment_of_pool[2]
    assert not space.of_categories(catalogue, ["Nothing Like This"]).any()
    assert not space.of_items(["brand-new-item"]).any()
    # Items unknown to the space move no one; columns are matched by id, not position.
    shuffled = Histories.from_pairs(
        histories.user_ids, histories.item_ids[::-1], data["rows"], 159 - data["cols"]
    )
    np.testing.assert_allclose(space.project(shuffled), X, atol=1e-5)


def test_collab_fit_is_seeded_and_needs_interactions() -> None:
    histories = histories_of(planted())
    a = CollabSpace.fit(histories, seed=3)
    b = CollabSpace.fit(histories, seed=3)
    np.testing.assert_array_equal(a.vectors, b.vectors)
    sampled = CollabSpace.fit(histories, seed=0, max_users=120)  # fit on a sample, project all
    assert sampled.project(histories).shape == (240, COLLAB_DIM)
    empty = Histories.from_pairs(["a", "b"], ["x"], np.array([], int), np.array([], int))
    with pytest.raises(InputError, match="collab: no user has an interaction"):
        CollabSpace.fit(empty)


def write_planted(folder: Path, data: dict) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    movies = pd.DataFrame(
        {
            "movieId": range(len(data["pool"])),
            "title": data["titles"],
            "genres": ["|".join(c) for c in data["categories"]],
        }
    )
    ratings = pd.DataFrame(
        {
            "userId": data["rows"],
            "movieId": data["cols"],
            "rating": 4.0,
            "timestamp": 1_000_000 + np.arange(len(data["rows"])),
        }
    )
    movies.to_csv(folder / "movies.csv", index=False)
    ratings.to_csv(folder / "ratings.csv", index=False)
    return folder / "ratings.csv", folder / "movies.csv"


@pytest.mark.slow
def test_cluster_represent_collab_end_to_end(tmp_path: Path) -> None:
    data = planted()
    ratings, movies = write_planted(tmp_path / "data", data)
    settings = Settings(workspace=tmp_path / "ws", represent="collab", domain="movie")
    pipeline.ingest(settings, ratings, movies)
    users = [str(u) for u in range(len(data["segment"]))]
    held = [users[-4 + p] for p in range(POOLS)]  # one user per pool, assigned afterwards
    clustered = [u for u in users if u not in held]
    llm = FakeLLM(default=schema_answer)
    result = pipeline.run_clustering(settings, k=POOLS, users=clustered, llm=llm)
    run = result.run
    assert run.params["represent"] == "collab"
    assert run.params["collab"]["dim"] == COLLAB_DIM
    assert run.params["collab"]["n_init"] == COLLAB_N_INIT
    with Store.open(settings.workspace) as store:
        assignments = store.assignments(run.id)
        stored = store.run_space(run.id)
    assert stored is not None and stored.kind == "collab" and len(stored.item_ids) > 100
    labels = np.array([assignments[u].segment_id for u in clustered])
    truth = np.array([data["segment"][int(u)] for u in clustered])
    assert adjusted_rand_score(truth, labels) >= 0.9
    segment_of_pool = [int(np.bincount(labels[truth == p]).argmax()) for p in range(POOLS)]

    # A later user is placed with the stored space (no refit), where their pool's users are.
    placed, made = pipeline.assign_users_to_run(settings, held)
    assert made == POOLS
    assert [a.segment_id for a in placed] == [segment_of_pool[int(u) % POOLS] for u in held]

    # Another seed gives the same segments.
    again = pipeline.run_clustering(
        settings.model_copy(update={"seed": 1}), k=POOLS, users=clustered, llm=llm
    )
    with Store.open(settings.workspace) as store:
        other = store.assignments(again.run.id)
        store.set_active_run(run.id)
    assert adjusted_rand_score(labels, [other[u].segment_id for u in clustered]) >= 0.95
    # Two collab runs have their own SVD axes: a comparison recomputes the other run's
    # centroids in this run's space, so the same segments match (member overlap ~ 1).
    with Store.open(settings.workspace) as store:
        moved = _in_space_of(
            store, settings, run, store.segments(again.run.id), store.assignments(again.run.id)
        )
        comparison = compare_runs(
            (again.run.id, moved, store.assignments(again.run.id)),
            (run.id, store.segments(run.id), store.assignments(run.id)),
        )
    assert len(comparison.matches) == POOLS
    assert all(m["overlap"] >= 0.9 and m["distance"] < 0.2 for m in comparison.matches)
    page = write_report(settings, out=tmp_path / "r.html", run_id=run.id, compare=again.run.id)
    assert page.segments == POOLS and "collab vectors" in (tmp_path / "r.html").read_text()

    # The chat places a newcomer in the same space: by items, or by a category alone.
    with Workspace(settings) as ws:
        recommender = ws.recommender()
        context = recommender.chat_context(None)
        pool3 = [f"{i}" for i in np.flatnonzero(data["pool"] == 3)[:3]]
        by_items = ChatSession(context)
        by_items.like_items(recommender.item_columns(pool3))
        assert by_items.placement is not None
        assert by_items.placement.segment_id == segment_of_pool[3]
        segment, ranked = recommender.for_items(pool3, n=5)
        assert segment is not None and segment["id"] == segment_of_pool[3] and ranked
        by_category = ChatSession(context)
        assert by_category.next_question() is not None
        by_category.answer(MARKER)
        assert by_category.liked_categories == [MARKER]
        assert by_category.placement is not None
        assert by_category.placement.segment_id == segment_of_pool[2]
        cols, _, _ = by_category.recommend(5)  # the content signal still gets a content vector
        assert cols

    # The items representation of the same users does not find the planted segments.
    items_run = pipeline.run_clustering(
        settings.model_copy(update={"represent": "items"}), k=POOLS, users=clustered, llm=llm
    )
    with Store.open(settings.workspace) as store:
        content = store.assignments(items_run.run.id)
        assert store.run_space(items_run.run.id) is None
        # A collab run whose stored space went missing says so, not a wrong placement.
        with store.transaction() as db:
            db.execute("DELETE FROM run_spaces WHERE run_id = ?", (run.id,))
        store.set_active_run(run.id)
    assert adjusted_rand_score(truth, [content[u].segment_id for u in clustered]) < 0.3
    pipeline.ingest(settings, *write_planted(tmp_path / "more", _one_more_user(data)))
    with pytest.raises(WorkspaceError, match="collab space is missing"):
        pipeline.assign_users_to_run(settings, ["9999"])


def _one_more_user(data: dict) -> dict:
    """The planted data plus user 9999 (pool 0 items), as a second ingest."""
    items = np.flatnonzero(data["pool"] == 0)[:5]
    return {
        **data,
        "rows": np.full(items.size, 9999),
        "cols": items,
    }
