"""The profile stage end to end on the real bundled model (SmolLM2-135M via llama.cpp)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import segrec_cmd

from segrec import pipeline
from segrec.config import Settings
from segrec.store import Store

pytestmark = pytest.mark.slow


class CountingLLM:
    """Wraps a real backend to count the calls that reach it."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner
        self.model_id = inner.model_id
        self.concurrency = inner.concurrency
        self.calls = 0

    def complete(self, messages, *, params, schema=None):  # type: ignore[no-untyped-def]
        self.calls += 1
        return self.inner.complete(messages, params=params, schema=schema)


def test_real_model_profiles_are_grounded_and_cached(
    tmp_path: Path, local_llm, example_ratings: Path, example_movies: Path
) -> None:
    settings = Settings(workspace=tmp_path / "ws", domain="movie")
    pipeline.ingest(settings, example_ratings, example_movies)
    users = pipeline.select_users(settings, limit=4).user_ids
    llm = CountingLLM(local_llm)
    stats = pipeline.run_profiles(settings, users, llm=llm)
    assert stats.users == 4 and stats.profiled + stats.fallback == 4 and stats.failed == 0
    assert stats.prompt_tokens > 0 and stats.completion_tokens > 0
    assert llm.calls >= 4
    with Store.open(settings.workspace) as store:
        items = store.items_frame().set_index("item_id")
        inter = store.interactions_frame(users)
        for user in users:
            record = store.profile(user)
            assert record is not None and record.model_id == local_llm.model_id
            seen = inter[inter.user_id == user].item_id
            categories = {c for cats in items.loc[seen, "categories"] for c in cats}
            titles = set(items.loc[seen, "title"])
            profile = record.profile
            assert len(profile["summary"]) >= 20
            assert set(profile["likes"]) <= categories
            assert set(profile["dislikes"]) <= categories
            assert not set(profile["likes"]) & set(profile["dislikes"])
            assert set(profile["favourite_items"]) <= titles
            if not record.fallback:
                assert record.raw_output and record.latency_s > 0
    calls_before = llm.calls
    again = pipeline.run_profiles(settings, users, llm=llm)
    assert again.cached == 4 and again.profiled == 0 and llm.calls == calls_before


def test_cli_profile_json_is_one_object(
    tmp_path: Path, example_ratings: Path, example_movies: Path
) -> None:
    workspace = tmp_path / "ws"
    result = subprocess.run(
        [
            *segrec_cmd(),
            "profile",
            str(example_ratings),
            "--items",
            str(example_movies),
            "--workspace",
            str(workspace),
            "--limit",
            "2",
            "--threads",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert list(data) == [
        "users",
        "profiled",
        "cached",
        "fallback",
        "failed",
        "removed_claims",
        "prompt_tokens",
        "completion_tokens",
        "seconds",
    ]
    assert data["users"] == 2 and data["profiled"] + data["fallback"] == 2
    assert "limited to the first 2 of 36 users" in result.stderr
    shown = subprocess.run(
        [*segrec_cmd(), "profile", "--show", "29", "--workspace", str(workspace), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["user"] == "29" and record["profile"]["summary"]
