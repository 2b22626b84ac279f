"""The default ranker, `segrec recommend`, `segrec explain` and `segrec eval`.

Ranker logic runs on synthetic matrices; the commands on the example data with the real
encoder (the ranker needs no LLM). Explain's reasons use the real bundled model in the slow
test; elsewhere a fake LLM stands in.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import segrec_cmd, snapshot
from typer.testing import CliRunner

from segrec import pipeline, serving
from segrec.cli import app
from segrec.config import Settings
from segrec.evaluate import evaluate_scores, protocol_split, top_k, validation_split
from segrec.files import current_umask
from segrec.ranker import (
    EASE_MAX_ITEMS,
    Ranker,
    RankerSpec,
    default_spec,
    split_signals,
    tune_ranker,
)
from segrec.recommend import EASE
from segrec.store import Store
from segrec.testing import FakeLLM, schema_answer

runner = CliRunner()


# ------------------------------------------------------------------------------ ranker


def _random_log(seed: int = 0, users: int = 60, items: int = 40) -> pd.DataFrame:
    """Users with tastes over two item blocks, so collaborative signals mean something."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        block = u % 2
        pool = np.arange(items // 2) + block * (items // 2)
        picks = rng.choice(pool, size=rng.integers(6, 14), replace=False)
        extra = rng.choice(items, size=2, replace=False)
        for t, i in enumerate([*picks, *extra]):
            rows.append((f"u{u}", f"i{i}", 4.0, 1000 * u + t))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "value", "timestamp"])


def test_ranker_never_recommends_seen_items_and_contributions_add_up() -> None:
    split = protocol_split(_random_log())
    spec = RankerSpec(weights={"long": {"ease": 1.0, "pop": 0.5}, "short": {"pop": 1.0}})
    ranker = Ranker(spec).fit(split.fit)
    recs = ranker.recommend(split.train, 5, batch=7)
    for row in range(split.train.shape[0]):
        seen = set(split.train[row].indices)
        picked = [c for c in recs.indices[row] if c >= 0]
        assert picked and not seen & set(picked)
    total = sum(recs.contributions.values())
    assert np.allclose(total, recs.scores)
    assert (np.diff(recs.scores, axis=1) <= 1e-12).all()  # best first


def test_ranker_scores_only_the_signals_some_weight_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal with weight 0 in every weight set of a batch is not scored (the serving
    path's cost), and the answer is the one scoring every signal gives."""
    split = protocol_split(_random_log(4))
    spec = RankerSpec(
        weights={"long": {"ease": 1.0, "pop": 0.5}, "short": {"itemknn": 1.0}},
        ease_lambda=5.0,
        short_history=int(np.median(np.diff(split.train.indptr))),  # both groups present
    )
    ranker = Ranker(spec, names=["ease", "itemknn", "pop"]).fit(split.fit)
    groups = ranker.groups(split.train)
    assert {"long", "short"} <= set(groups)
    long_rows = np.flatnonzero(groups == "long")
    assert ranker.weighted(groups[long_rows]) == ["ease", "pop"]
    assert ranker.weighted(groups) == ["ease", "itemknn", "pop"]
    everything, parts = ranker.blend(ranker.signals(split.train), groups)

    scored: list[list[str]] = []
    signals = Ranker.signals

    def recording(self: Ranker, *args: object, **kwargs: object) -> dict[str, np.ndarray]:
        out = signals(self, *args, **kwargs)
        scored.append(sorted(out))
        return out

    monkeypatch.setattr(Ranker, "signals", recording)
    one = ranker.recommend(split.train[long_rows], 5)
    assert scored == [["ease", "pop"]]
    assert np.all(one.contributions["itemknn"] == 0)
    recs = ranker.recommend(split.train, 5)
    expected = top_k(everything, 5, split.train)
    np.testing.assert_array_equal(recs.indices, expected)
    for name, part in parts.items():
        np.testing.assert_array_equal(
            recs.contributions[name], np.take_along_axis(part, expected, axis=1)
        )


def test_blend_with_one_signal_ranks_exactly_like_that_signal() -> None:
    split = protocol_split(_random_log(1))
    spec = RankerSpec(weights={"long": {"ease": 1.0}, "short": {"ease": 1.0}}, ease_lambda=5.0)
    ranker = Ranker(spec).fit(split.fit)
    blended, _ = ranker.blend(ranker.signals(split.train), ranker.groups(split.train))
    ease = EASE(5.0).fit(split.fit).score(split.train)
    assert evaluate_scores(blended, split) == evaluate_scores(ease, split)


def test_short_histories_use_the_short_weights() -> None:
    X = sp.csr_matrix(np.array([[1, 0, 0, 0], [1, 1, 1, 0]], dtype=np.float32))
    spec = RankerSpec(weights={"long": {"itemknn": 1.0}, "short": {"pop": 1.0}}, short_history=2)
    ranker = Ranker(spec).fit(X)
    assert list(ranker.groups(X)) == ["short", "long"]
    _, parts = ranker.blend(ranker.signals(X), ranker.groups(X))
    assert np.all(parts["pop"][1] == 0) and np.all(parts["itemknn"][0] == 0)


def test_spec_round_trips_and_large_catalogues_leave_ease_out() -> None:
    spec = default_spec(100)
    assert RankerSpec.from_dict(json.loads(json.dumps(spec.as_dict()))) == spec
    big = default_spec(EASE_MAX_ITEMS + 1)
    assert big.ease_lambda is None and "ease" not in big.signals
    assert big.neighbours is not None and "itemknn" in big.weights["long"]


def test_tuned_blend_is_never_worse_than_its_best_signal_on_validation() -> None:
    split = protocol_split(_random_log(2, users=80))
    spec = tune_ranker(split, item_vectors_for=None)
    assert spec.tuned and set(spec.weights) == {"long", "short", "chat", "chat_start"}
    validation = validation_split(split)
    names = ["ease", "itemknn", "pop", "transition", "recent_pop", "rp3"]
    signals = split_signals(validation, spec, names, item_vectors=None)
    ranker = Ranker(spec)
    blended, _ = ranker.blend(signals, np.full(len(validation.users), "long"))
    best_single = max(evaluate_scores(signals[n], validation)["ndcg@10"] for n in names)
    assert evaluate_scores(blended, validation)["ndcg@10"] >= best_single - 1e-12
    assert spec.validation["long"]["ndcg@10"] >= max(
        spec.validation["long"]["single_signals"].values()
    )


def test_too_few_users_gives_marked_default_weights() -> None:
    split = protocol_split(_random_log(3, users=8))
    spec = tune_ranker(split, item_vectors_for=None)
    assert not spec.tuned and "not tuned" in spec.notes[0]


# ------------------------------------------------------------------------------ commands


@pytest.fixture(scope="module")
def workspace(
    tmp_path_factory: pytest.TempPathFactory, example_ratings: Path, example_movies: Path
) -> Settings:
    settings = Settings(workspace=tmp_path_factory.mktemp("serve") / "ws", domain="movie")
    pipeline.ingest(settings, example_ratings, example_movies)
    return settings


def _ws(settings: Settings) -> list[str]:
    return ["-w", str(settings.workspace)]


def test_recommend_all_writes_unseen_items_for_every_user(
    workspace: Settings, tmp_path: Path
) -> None:
    for suffix in (".parquet", ".csv", ".json"):
        out = tmp_path / f"recs{suffix}"
        result = runner.invoke(
            app, ["recommend", "--all", "--n", "7", "--out", str(out), *_ws(workspace)]
        )
        assert result.exit_code == 0, result.output
        assert "wrote 252 recommendations for 36 users" in result.stderr
    table = pd.read_parquet(tmp_path / "recs.parquet")
    assert set(table.columns) >= {"user_id", "rank", "item_id", "title", "score"}
    with Store.open(workspace.workspace) as store:
        seen = store.interactions_frame()
        spec = store.ranker_spec(store.data_version(), None)
    assert spec is not None and spec["tuned"]  # stored with the data version
    pairs = set(zip(seen["user_id"], seen["item_id"], strict=True))
    assert not pairs & set(zip(table["user_id"], table["item_id"], strict=True))
    assert (table.groupby("user_id")["rank"].max() == 7).all()
    csv = pd.read_csv(tmp_path / "recs.csv", dtype={"user_id": str, "item_id": str})
    assert list(csv["item_id"]) == list(table["item_id"])
    modes = {p.stat().st_mode & 0o777 for p in tmp_path.glob("recs.*")}
    assert modes == {0o666 & ~current_umask()}  # shareable, as a plain open() makes them


def test_recommend_one_user_json_and_filters(workspace: Settings) -> None:
    user = pipeline.select_users(workspace).user_ids[0]
    result = runner.invoke(
        app,
        [
            "recommend",
            "--user",
            user,
            "--n",
            "5",
            "--category",
            "comedy",
            "--json",
            *_ws(workspace),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["user"] == user and len(data["items"]) == 5
    with Store.open(workspace.workspace) as store:
        items = store.items_frame().set_index("item_id")
    for item in data["items"]:
        assert "Comedy" in items.loc[item["item_id"], "categories"]
    first = data["items"][0]["item_id"]
    result = runner.invoke(
        app,
        [
            "recommend",
            "--user",
            user,
            "--n",
            "5",
            "--category",
            "Comedy",
            "--exclude",
            first,
            "--json",
            *_ws(workspace),
        ],
    )
    assert first not in [i["item_id"] for i in json.loads(result.stdout)["items"]]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["recommend", "--user", "nobody"], "list users with `segrec users`"),
        (["explain", "--user", "nobody"], "list users with `segrec users`"),
        (["recommend", "--user", "{user}", "--n", "0"], "--n 0: must be between 1 and 1000"),
        (["explain", "--user", "{user}", "--n", "5000"], "--n 5000"),
        (["recommend", "--user", "{user}", "--category", "Jazz"], "--category 'Jazz'"),
        (["explain", "--user", "{user}", "--category", "Jazz"], "--category 'Jazz'"),
        (["recommend", "--user", "{user}", "--exclude", "nope"], "unknown item id 'nope'"),
        (["recommend", "--all"], "add --out"),
        (["recommend", "--all", "--out", "recs.xlsx"], "unknown format '.xlsx'"),
        (["recommend"], "pass either --user ID or --all"),
    ],
)
def test_bad_recommend_and_explain_input_is_one_line_and_writes_nothing(
    tmp_path: Path,
    example_ratings: Path,
    example_movies: Path,
    args: list[str],
    expected: str,
) -> None:
    settings = Settings(workspace=tmp_path / "ws")
    pipeline.ingest(settings, example_ratings, example_movies)
    user = pipeline.select_users(settings).user_ids[0]
    before = snapshot(settings.workspace)
    args = [a.replace("{user}", user) for a in args]
    result = runner.invoke(app, [*args, *_ws(settings)])
    assert result.exit_code == 2, result.output
    assert expected in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert snapshot(settings.workspace) == before


def test_explain_json_has_exactly_the_documented_shape(workspace: Settings) -> None:
    user = pipeline.select_users(workspace).user_ids[1]
    data, notes = serving.explain(workspace, user, n=4, llm=FakeLLM(default=schema_answer))
    assert set(data) == {"user", "profile", "segment", "items"}
    assert data["segment"] is None  # no clustering yet
    assert any("no clustering run yet" in n for n in notes)
    assert data["profile"]["summary"].startswith("This user")
    assert len(data["items"]) == 4
    for item in data["items"]:
        assert set(item) == {
            "item_id",
            "title",
            "score",
            "signals",
            "reason",
            "reason_fallback",
            "reason_fallback_why",
        }
        assert abs(sum(item["signals"].values()) - item["score"]) < 1e-3
    assert any(not i["reason_fallback"] for i in data["items"])


# ------------------------------------------------------------------------------ eval


def test_eval_json_holds_every_track_on_the_same_users(
    tmp_path: Path, example_ratings: Path, example_movies: Path
) -> None:
    out = tmp_path / "eval.json"
    result = runner.invoke(
        app,
        [
            "eval",
            str(example_ratings),
            "--items",
            str(example_movies),
            "--users",
            "20",
            "--seed",
            "3",
            "--tracks",
            "warm,cold,segments",
            "--no-llm",
            "--k",
            "3",
            "--json",
            str(out),
            "-w",
            str(tmp_path / "evalws"),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["users"] == 20 and data["sampled"] is True and data["seed"] == 3
    for track in ("warm", "cold"):
        rows = data["tracks"][track]
        assert {"MostPop", "ItemKNN", "EASE", "segrec", "cosine:items"} <= set(rows)
        for metrics in rows.values():
            assert set(metrics) == {"ndcg@10", "recall@20"}
            assert 0.0 <= metrics["ndcg@10"] <= 1.0
    assert set(data["tracks"]["segments"]) >= {"items", "deterministic-profile"}
    assert "random sample of 20" in result.stderr
    assert "warm track · 20 users (random sample, seed 3)" in result.stdout


def test_eval_rejects_unknown_tracks(
    tmp_path: Path, example_ratings: Path, example_movies: Path
) -> None:
    result = runner.invoke(
        app,
        [
            "eval",
            str(example_ratings),
            "--items",
            str(example_movies),
            "--tracks",
            "warm,vibes",
            "-w",
            str(tmp_path / "e"),
        ],
    )
    assert result.exit_code == 2 and "unknown track 'vibes'" in result.stderr
    assert not (tmp_path / "e").exists()


# ------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_explain_on_the_real_model_gives_grounded_reasons(
    tmp_path: Path, example_ratings: Path, example_movies: Path
) -> None:
    """`segrec explain --json` end to end: real model profiles the user and writes reasons;
    every LLM reason cites something from the user's history, every template is marked."""
    ws = tmp_path / "ws"
    settings = Settings(workspace=ws)
    pipeline.ingest(settings, example_ratings, example_movies)
    user = pipeline.select_users(settings).user_ids[2]
    result = subprocess.run(
        [
            *segrec_cmd(),
            "explain",
            "--user",
            user,
            "--n",
            "4",
            "--json",
            "--threads",
            "2",
            "--domain",
            "movie",
            "-w",
            str(ws),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"user", "profile", "segment", "items", "llm_calls", "text"}
    assert data["segment"] is None
    # The profile (made now) and the reasons are LLM calls; the gates say what they kept.
    assert data["llm_calls"] >= 2
    assert set(data["text"]) >= {"reason"}
    with Store.open(ws) as store:
        history = store.interactions_frame([user])
        items = store.items_frame().set_index("item_id")
    # What the issue allows a reason to cite: items and categories the user interacted with.
    seen = history["item_id"]
    titles = {items.loc[i, "title"].lower() for i in seen}
    titles |= {re.sub(r"\s*\(\d{4}\)$", "", t) for t in titles}
    categories = {c.lower() for i in seen for c in items.loc[i, "categories"]}
    for item in data["items"]:
        assert item["item_id"] not in set(history["item_id"])
        if item["reason_fallback"]:
            continue
        text = item["reason"].lower()
        assert text.startswith("because you liked ")
        assert any(name in text for name in titles | categories), item["reason"]
    assert "profiled now" in result.stderr


def test_ranker_tunes_with_segment_labels_once_a_run_exists(
    tmp_path: Path, example_ratings: Path, example_movies: Path
) -> None:
    """With an active run the segment signal is tuned too (stacked cold rows repeat users,
    so labels must be looked up by id), and the spec is stored under that run."""
    settings = Settings(workspace=tmp_path / "ws", domain="movie")
    pipeline.ingest(settings, example_ratings, example_movies)
    users = pipeline.select_users(settings).user_ids
    pipeline.run_profiles(settings, users, llm=FakeLLM(default=schema_answer))
    run = pipeline.run_clustering(settings, k=3, llm=FakeLLM(default=schema_answer)).run
    result = serving.recommend(settings, [users[0]], n=5)
    assert len(result.table) == 5
    with Store.open(settings.workspace) as store:
        spec = store.ranker_spec(store.data_version(), run.id)
    assert spec is not None and spec["tuned"]
    assert "segment_pop" in spec["validation"]["long"]["single_signals"]
    data, _ = serving.explain(settings, users[0], n=3, llm=FakeLLM(default=schema_answer))
    assert data["segment"]["run"] == run.id and data["segment"]["why"]


def test_cosine_user_vectors_follow_the_active_runs_representation(
    tmp_path: Path, example_ratings: Path, example_movies: Path
) -> None:
    """A run built on profile vectors makes the recommender's cosine signal use profile
    vectors too, whatever the settings of the process reading it say."""
    from segrec.ranker import history_vectors
    from segrec.workspace import Workspace

    settings = Settings(workspace=tmp_path / "ws", domain="movie")
    pipeline.ingest(settings, example_ratings, example_movies)
    users = pipeline.select_users(settings).user_ids
    pipeline.run_profiles(settings, users, llm=FakeLLM(default=schema_answer))
    profiled = settings.model_copy(update={"represent": "profile"})
    pipeline.run_clustering(profiled, k=3, llm=FakeLLM(default=schema_answer))
    assert settings.represent == "items"
    with Workspace(settings) as ws:
        recommender = ws.recommender()
        assert recommender.represent == "profile"
        X_rows, _, vectors, _ = recommender.histories(users[:3])
        assert vectors is not None
        history = history_vectors(X_rows, recommender.served.item_vectors)
        assert not np.allclose(vectors, history)


def test_the_served_ranker_reads_event_times_and_a_loaded_set_ranks_the_same(
    workspace: Settings, example_ratings: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`recommend` passes each user's event times to the ranker (the transition and
    recent-popularity signals read their order, as in `segrec eval`), and the next process,
    which loads the saved set instead of refitting, holds the same times and ranks alike."""
    from segrec.ranker import Ranker
    from segrec.workspace import Workspace

    seen: list[object] = []
    original = Ranker.recommend

    def spy(self: Ranker, *args: object, **kwargs: object) -> object:
        seen.append(kwargs.get("times"))
        return original(self, *args, **kwargs)

    ratings = pd.read_csv(example_ratings)
    with Workspace(workspace) as ws:
        recommender = ws.recommender()
        users = recommender.served.users[:4]
        X_rows, _, _, times = recommender.histories(users)
        assert times is not None
        for row, user in enumerate(users):
            mine = ratings[ratings["userId"].astype(str) == user]
            stamp = dict(zip(mine["movieId"].astype(str), mine["timestamp"], strict=False))
            cols = X_rows[row].indices
            assert list(times[row].indices) == list(cols)  # a time for every known item
            by_time = [recommender.served.item_ids[c] for c in cols[np.argsort(times[row].data)]]
            assert [stamp[i] for i in by_time] == sorted(stamp[i] for i in by_time)
        monkeypatch.setattr(Ranker, "recommend", spy)
        first = recommender.rank(users, n=10)[1].indices
        assert seen and seen[-1] is not None
        assert (seen[-1] != times).nnz == 0  # type: ignore[operator]
    with Workspace(workspace) as ws:
        loaded = ws.recommender()
        assert not loaded.fitted
        assert loaded.served.times is not None
        assert (loaded.served.times != recommender.served.times).nnz == 0
        np.testing.assert_array_equal(loaded.rank(users, n=10)[1].indices, first)


def test_rows_of_gathers_the_rows_scipy_indexing_gives_and_empty_rows_for_minus_one() -> None:
    rng = np.random.default_rng(0)
    matrix = sp.random(30, 200, density=0.1, format="csr", random_state=1, dtype=np.float32)
    matrix.data = rng.integers(1, 10**6, matrix.nnz).astype(np.float32)
    for rows in ([3], [0, 5, 5, 29], list(range(30))):
        got, want = serving._rows_of(matrix, rows), matrix[rows]
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(got.indptr, want.indptr)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.data, want.data)
    mixed = serving._rows_of(matrix, [2, -1, 7, -1])
    np.testing.assert_array_equal(mixed.toarray()[[0, 2]], matrix[[2, 7]].toarray())
    assert mixed.shape == (4, 200) and mixed[1].nnz == 0 and mixed[3].nnz == 0
    assert serving._rows_of(matrix, [-1]).nnz == 0
