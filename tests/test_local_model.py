"""The profile stage end to end on the real bundled model (SmolLM2-135M via llama.cpp)."""

from __future__ import annotations

import json
import subprocess
from html import escape
from pathlib import Path

import pytest
from conftest import PROFILE_LIMIT, MainJob, segrec_cmd

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


def run_cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*segrec_cmd(), *args], capture_output=True, text=True, timeout=timeout)


def test_cli_main_job_end_to_end(main_job: MainJob, tmp_path: Path) -> None:
    """profile → cluster → segments → explain → report through the real CLI, model and
    encoder (the profile and cluster steps are the session's shared `main_job`)."""
    ws = str(main_job.copy(tmp_path / "ws"))
    result = main_job.profile
    data = json.loads(result.stdout)
    assert list(data)[:10] == [
        "users",
        "profiled",
        "cached",
        "fallback",
        "failed",
        "removed_claims",
        "prompt_tokens",
        "completion_tokens",
        "seconds",
        "text",
    ]
    limit = PROFILE_LIMIT
    assert data["llm_calls"] >= limit  # at least one call per profiled user
    assert data["users"] == limit and data["profiled"] + data["fallback"] == limit
    summaries = data["text"]["summary"]  # what the quality gates kept, and why not
    assert summaries["texts"] == limit and summaries["kept"] == data["profiled"]
    assert summaries["replaced"] == data["fallback"] == sum(summaries["reasons"].values())
    assert f"limited to the first {limit} of 36 users" in result.stderr
    assert main_job.profiled_before_cluster == limit
    shown = run_cli("profile", "--show", "29", "--workspace", ws, "--json")
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["user"] == "29" and record["profile"]["summary"]

    report = json.loads(main_job.cluster.stdout)
    assert [s["id"] for s in report["segments"]] == [0, 1]
    assert sum(s["size"] for s in report["segments"]) == 36  # every ingested user, profiled or not
    for segment in report["segments"]:
        if segment["described"] and not segment["fallback"]:
            assert 1 <= len(segment["name"].split()) <= 6  # named by the real model
        assert segment["description"]
    listed = run_cli("segments", "--workspace", ws, "--json")
    assert report.pop("llm_calls") >= 0  # the cluster command's own count, not the run's
    assert json.loads(listed.stdout) == report
    one = run_cli("segments", "show", "0", "--workspace", ws)
    assert one.returncode == 0 and "members nearest the centroid" in one.stdout

    # explain: the user's segment in the run just made, and reasons from the real model
    explained = run_cli(
        "explain",
        "--user",
        "29",
        "--n",
        "3",
        "--workspace",
        ws,
        "--threads",
        "2",
        "--domain",
        "movie",
        "--json",
    )
    assert explained.returncode == 0, explained.stderr
    data = json.loads(explained.stdout)
    assert data["user"] == "29" and data["segment"]["id"] in (0, 1)
    assert data["segment"]["name"] == report["segments"][data["segment"]["id"]]["name"]
    assert len(data["items"]) == 3 and all(i["reason"] for i in data["items"])

    # report: the run as one offline HTML page, with the names the real model gave
    page = Path(ws) / "report.html"
    written = run_cli("report", "--out", str(page), "--workspace", ws, "--json")
    assert written.returncode == 0, written.stderr
    result = json.loads(written.stdout)
    assert result["segments"] == 2 and result["users"] == 36 and page.is_file()
    html = page.read_text(encoding="utf-8")
    assert all(escape(s["name"]) in html for s in report["segments"])
