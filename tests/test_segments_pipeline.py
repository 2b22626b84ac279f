"""`segrec cluster` end to end on the example data: real encoder, fake LLM for speed.

The real bundled model names segments in tests/test_label.py and in the real-model end to
end test at the bottom of this file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import snapshot
from typer.testing import CliRunner

from segrec import pipeline
from segrec.cli import app
from segrec.config import Settings
from segrec.llm.counting import count_calls, counted
from segrec.store import Store
from segrec.testing import FakeLLM, schema_answer

runner = CliRunner()


@pytest.fixture(scope="module")
def profiled(
    tmp_path_factory: pytest.TempPathFactory, example_ratings: Path, example_movies: Path
) -> Settings:
    settings = Settings(workspace=tmp_path_factory.mktemp("seg") / "ws", domain="movie")
    pipeline.ingest(settings, example_ratings, example_movies)
    users = pipeline.select_users(settings).user_ids
    # leave the last user unprofiled: clustering needs no profile
    stats = pipeline.run_profiles(settings, users[:-1], llm=FakeLLM(default=schema_answer))
    assert stats.profiled == len(users) - 1
    return settings


@pytest.mark.slow
def test_cluster_stores_a_deterministic_run(profiled: Settings) -> None:
    llm = FakeLLM(default=schema_answer)
    first = pipeline.run_clustering(profiled, k=3, llm=llm)
    second = pipeline.run_clustering(profiled, k=3, llm=llm)
    assert first.run.id != second.run.id
    with Store.open(profiled.workspace) as store:
        a = store.assignments(first.run.id)
        b = store.assignments(second.run.id)
        assert store.active_run().id == second.run.id  # type: ignore[union-attr]
    assert {u: x.segment_id for u, x in a.items()} == {u: x.segment_id for u, x in b.items()}
    listed = runner.invoke(
        app, ["runs", "--activate", str(first.run.id), "-w", str(profiled.workspace), "--json"]
    )
    assert listed.exit_code == 0, listed.output
    active = [r["id"] for r in json.loads(listed.stdout)["runs"] if r["active"]]
    assert active == [first.run.id]
    assert pipeline.segments_report(profiled)["run"]["id"] == first.run.id
    bad = runner.invoke(app, ["runs", "--activate", "999", "-w", str(profiled.workspace)])
    assert bad.exit_code == 2 and "no clustering run 999" in bad.stderr
    assert len(a) == 36 and sum(s.size for s in first.segments) == 36
    report = pipeline.segments_report(profiled)
    assert report["run"]["params"]["represent"] == "items"
    assert report["metrics"]["users"] == 36 and -1 <= report["metrics"]["silhouette"] <= 1
    assert any("lowered" in note for note in report["run"]["notes"])  # tiny data, said so
    names = [s["name"] for s in report["segments"]]
    assert len({n.lower() for n in names}) == len(names)
    for seg in report["segments"]:
        assert set(seg) >= {
            "id",
            "name",
            "description",
            "size",
            "share",
            "top_items",
            "top_categories",
            "silhouette",
            "stability",
            "fallback",
        }
        assert 0 <= seg["stability"] <= 1
        for item in seg["top_items"]:
            assert item["lift"] > 0 and item["members"] >= 2
    # centroids, variances and nearest members are stored
    seg = first.segments[0]
    assert seg.centroid.shape == (384,) and seg.facts["variance"] > 0
    assert seg.facts["nearest"][0]["summary"].startswith("This user")


@pytest.mark.slow
def test_privacy_threshold_unnamed_and_merge(profiled: Settings) -> None:
    strict = profiled.model_copy(update={"min_segment_size": 10})
    llm = FakeLLM(default=schema_answer)
    unnamed = pipeline.run_clustering(strict, k=6, small="unnamed", llm=llm)
    small = [s for s in unnamed.segments if not s.described]
    assert all(s.name.startswith("Unnamed segment") for s in small)
    assert all("privacy threshold" in s.description for s in small)
    merged = pipeline.run_clustering(strict, k=6, small="merge", llm=llm)
    minimum = merged.run.params["min_segment_size"]
    assert all(s.size >= minimum for s in merged.segments)
    assert sum(s.size for s in merged.segments) == 36


@pytest.mark.slow
def test_new_user_is_assigned_to_the_nearest_centroid(profiled: Settings) -> None:
    *others, last = pipeline.select_users(profiled).user_ids
    pipeline.run_clustering(profiled, k=3, users=others, llm=FakeLLM(default=schema_answer))
    result = runner.invoke(app, ["assign", "--user", last, "-w", str(profiled.workspace), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["user"] == last and data["late"] is True and data["margin"] >= 0
    again, made = pipeline.assign_users_to_run(profiled, [last])
    assert again[0].segment_id == data["segment"] and made == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--k", "1"], "at least 2"),
        (["--k", "99"], "users to cluster — lower --k"),
        (["--k", "three"], "'three'"),
        (["--algorithm", "spectral"], "auto, kmeans, minibatch, hdbscan, agglomerative"),
        (["--sample", "500"], "--sample 500: must be between 3 and the 36 users"),
        (["--users", "29,nobody"], "unknown user id 'nobody'"),
        (["--encoder", "/nonexistent"], "not a sentence-transformers model"),
        (["--represent", "vibes"], "--represent"),
    ],
)
def test_bad_cluster_flags_change_nothing(
    profiled: Settings, args: list[str], expected: str
) -> None:
    before = snapshot(profiled.workspace)
    result = runner.invoke(app, ["cluster", *args, "-w", str(profiled.workspace)])
    assert result.exit_code == 2, result.output
    assert expected in result.stderr and result.stderr.count("\n") == 1
    assert snapshot(profiled.workspace) == before


@pytest.mark.slow
def test_cluster_needs_no_profiles_and_profiles_only_the_users_it_shows(
    tmp_path: Path, example_ratings: Path, example_movies: Path
) -> None:
    """A workspace without a single profile clusters every user; naming profiles only the
    members and contrast users shown to the LLM, and the call count stays within k·m."""
    settings = Settings(workspace=tmp_path / "ws", domain="movie")
    pipeline.ingest(settings, example_ratings, example_movies)
    before = snapshot(settings.workspace)
    mixed = runner.invoke(
        app, ["cluster", "--k", "3", "--represent", "mix", "-w", str(settings.workspace)]
    )
    assert mixed.exit_code == 2 and mixed.stderr.count("\n") == 1
    assert "36 of 36 users have no profile" in mixed.stderr and "segrec profile" in mixed.stderr
    assert snapshot(settings.workspace) == before
    llm = counted(FakeLLM(default=schema_answer))
    with count_calls() as calls:
        result = pipeline.run_clustering(settings, k=3, llm=llm)
    assert sum(s.size for s in result.segments) == 36
    assert "--algorithm auto chose kmeans" in " ".join(result.run.notes)
    with Store.open(settings.workspace) as store:
        assert len(store.assignments(result.run.id)) == 36
        profiled = store.count("profiles")
    described = sum(s.described for s in result.segments)
    assert 0 < profiled <= described * (pipeline.MEMBERS_SHOWN + pipeline.CONTRAST_SHOWN)
    assert described < calls.calls <= pipeline.llm_call_bound(described, 3)
    for seg in result.segments:
        if seg.described:
            assert all(m["summary"].startswith("This user") for m in seg.facts["nearest"])
    result = runner.invoke(app, ["segments", "-w", str(tmp_path / "empty")])
    assert result.exit_code == 2


@pytest.mark.slow
def test_profile_assigns_new_users_when_a_run_is_active(
    tmp_path: Path, example_ratings: Path, example_movies: Path
) -> None:
    """The real model profiles one more user; `segrec profile` places them in a segment."""
    settings = Settings(workspace=tmp_path / "ws", domain="movie")
    pipeline.ingest(settings, example_ratings, example_movies)
    users = pipeline.select_users(settings).user_ids
    pipeline.run_profiles(settings, users[:-1], llm=FakeLLM(default=schema_answer))
    run = pipeline.run_clustering(
        settings, k=3, users=users[:-1], llm=FakeLLM(default=schema_answer)
    ).run
    result = runner.invoke(
        app, ["profile", "--users", users[-1], "-w", str(settings.workspace), "--threads", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "1 user(s) assigned to the active segments" in result.stderr
    with Store.open(settings.workspace) as store:
        assignment = store.assignments(run.id)[users[-1]]
        assert store.profile(users[-1]) is not None
    assert assignment.late and 0 <= assignment.segment_id < 3
