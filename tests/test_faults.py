"""The fault battery: a misbehaving OpenAI-compatible server never ends a run, and a damaged
workspace is one clear line.

Every fault mode of :mod:`segrec.fakeserver` is driven through ``segrec profile``: every user
ends profiled, fallback or failed (listed), the command exits 0 with its summary, and a
rerun against a healthy server retries exactly the failed users. ``explain``, ``cluster``
and ``chat`` finish with template reasons, fallback labels and template questions.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import segrec_cmd
from typer.testing import CliRunner

from segrec import pipeline, store
from segrec.cli import app
from segrec.config import Settings
from segrec.errors import LLMError, TransientLLMError, WorkspaceError
from segrec.fakeserver import FAULTS, fake_openai_server
from segrec.llm.base import GenerationParams, RetryPolicy, complete_with_retry
from segrec.llm.openai import OpenAILLM, retry_after
from segrec.store import Store
from segrec.testing import FakeLLM

runner = CliRunner()
# Few retries, short waits: each fault costs a fraction of a second per user.
ENV = {"SEGREC_RETRIES": "2", "OPENAI_API_KEY": ""}
USERS = 4

# What each fault's per-user line says, and whether a retry was made.
EXPECTED: dict[str, tuple[str, bool]] = {
    "429": ("HTTP 429", True),
    "500": ("HTTP 500", True),
    "hang": ("APITimeoutError", True),
    "html": ("not JSON", True),
    "badjson": ("malformed JSON", True),
    "nochoices": ("no choices", True),
    "null": ("content is null", True),
    "empty": ("empty content", True),
    "refusal": ("refused", False),
    "oversized": ("ignored max_tokens", False),
}


def invoke(args: list[str], workspace: Path, base_url: str) -> tuple[int, str, str]:
    backend = ["--llm", "openai:fake", "--base-url", base_url, "--timeout", "1"]
    result = runner.invoke(app, [*args, *backend, "-w", str(workspace)], env=ENV)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory, example_ratings, example_movies) -> Path:
    workspace = tmp_path_factory.mktemp("faults") / "ws"
    pipeline.ingest(Settings(workspace=workspace), example_ratings, example_movies)
    return workspace


@pytest.fixture
def workspace(ingested: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ws"
    shutil.copytree(ingested, copy)
    return copy


def test_the_battery_covers_every_fault() -> None:
    assert set(EXPECTED) == set(FAULTS)


@pytest.mark.parametrize("mode", FAULTS)
def test_profile_survives_each_fault_and_a_rerun_retries_the_failed(
    mode: str, workspace: Path
) -> None:
    args = ["profile", "--limit", str(USERS), "--concurrency", "4", "--json"]
    with fake_openai_server(mode, retry_after_s=0.2, hang_s=20) as server:
        code, stdout, stderr = invoke(args, workspace, server.base_url)
        assert code == 0, stderr
        summary = json.loads(stdout)
        assert summary["users"] == USERS and summary["failed"] == USERS, summary
        fragment, retried = EXPECTED[mode]
        assert server.requests == USERS * (2 if retried else 1)
        with Store.open(workspace) as db:
            failures = db.failures()
            assert db.count("profiles") == 0
        assert len(failures) == USERS
        for error in failures.values():
            assert fragment in error and "\n" not in error and "Traceback" not in error

        server.mode = "ok"
        code, stdout, stderr = invoke(args, workspace, server.base_url)
    assert code == 0, stderr
    again = json.loads(stdout)
    assert again["profiled"] == USERS and again["failed"] == 0 and again["cached"] == 0
    with Store.open(workspace) as db:
        assert db.failures() == {} and db.count("profiles") == USERS


def test_failed_users_are_listed_on_the_terminal(workspace: Path) -> None:
    with fake_openai_server("html") as server:
        code, stdout, stderr = invoke(["profile", "--users", "29,35"], workspace, server.base_url)
    assert code == 0, stderr
    assert "2 user(s) failed" in stdout and "29, 35" in stdout and "rerun to retry" in stdout


def test_a_random_mix_ends_with_every_user_profiled_exactly_once(workspace: Path) -> None:
    """Seeded 50% faults, one call at a time (so the draw is repeatable); reruns retry only
    the failed users, and every user ends with one profile."""
    args = ["profile", "--limit", "12", "--concurrency", "1", "--json"]
    with fake_openai_server("mix", failure_rate=0.5, seed=1, retry_after_s=0.1) as server:
        code, stdout, stderr = invoke(args, workspace, server.base_url)
        assert code == 0, stderr
        first = json.loads(stdout)
        assert first["failed"] > 0 and first["profiled"] > 0
        assert first["profiled"] + first["fallback"] + first["failed"] == 12
        assert len(server.served) > 3  # several kinds of fault were drawn
        done, failed, reruns = first["profiled"] + first["fallback"], first["failed"], 0
        while failed and reruns < 10:
            code, stdout, stderr = invoke(args, workspace, server.base_url)
            assert code == 0, stderr
            rerun = json.loads(stdout)
            assert rerun["cached"] == done  # finished users are never asked again
            done, failed, reruns = 12 - rerun["failed"], rerun["failed"], reruns + 1
    assert failed == 0
    with Store.open(workspace) as db:
        assert db.count("profiles") == 12 and db.failures() == {}


def test_sigkill_with_calls_in_flight_then_resume(workspace: Path) -> None:
    """``kill -9`` while several concurrent calls are in flight: the workspace passes its
    integrity check and a rerun profiles every user exactly once, redoing none."""
    db = workspace / store.DB_NAME
    with fake_openai_server("ok", latency_s=0.2) as server:
        command = [*segrec_cmd(), "profile", "--llm", "openai:fake", "--base-url"]
        command += [server.base_url, "--concurrency", "4", "--json", "-w", str(workspace)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while profile_count(db) < 6:
            assert process.poll() is None, process.stderr.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no profiles written in 120 s"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        with sqlite3.connect(db) as conn:
            before = dict(conn.execute("SELECT user_id, created_at FROM profiles").fetchall())
        users = len(pipeline.select_users(Settings(workspace=workspace)).user_ids)
        assert 6 <= len(before) < users, "the kill must land mid-run"
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["cached"] == len(before) and stats["profiled"] == users - len(before)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        after = dict(conn.execute("SELECT user_id, created_at FROM profiles").fetchall())
    assert len(after) == users and all(after[u] == at for u, at in before.items())


def profile_count(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return int(conn.execute("SELECT count(*) FROM profiles").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


# ------------------------------------------------------------------------------ backend


@pytest.mark.parametrize("mode", FAULTS)
def test_the_backend_raises_one_line_per_call_errors(mode: str) -> None:
    params = GenerationParams(max_tokens=64)
    with fake_openai_server(mode, hang_s=20, retry_after_s=7) as server:
        llm = OpenAILLM("fake", base_url=server.base_url, timeout_s=0.5)
        with pytest.raises(LLMError) as caught:
            llm.complete([{"role": "user", "content": "hi"}], params=params, schema=None)
    fragment, retried = EXPECTED[mode]
    assert isinstance(caught.value, TransientLLMError) == retried
    assert fragment in str(caught.value) and "\n" not in str(caught.value)
    if mode == "429":
        assert caught.value.retry_after == 7.0  # type: ignore[attr-defined]


def test_the_fake_server_runs_from_the_command_line() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    command = [sys.executable, "-m", "segrec.fakeserver", "--mode", "html", "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert f"127.0.0.1:{port}/v1" in process.stdout.readline()
        llm = OpenAILLM("fake", base_url=f"http://127.0.0.1:{port}/v1", timeout_s=5)
        with pytest.raises(TransientLLMError, match="not JSON"):
            llm.complete([{"role": "user", "content": "hi"}], params=GenerationParams())
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_backend_accepts_a_valid_reply() -> None:
    schema = {"type": "object", "properties": {"name": {}, "description": {}}}
    with fake_openai_server("ok") as server:
        llm = OpenAILLM("fake", base_url=server.base_url, timeout_s=5)
        reply = llm.complete(
            [{"role": "user", "content": "name it"}], params=GenerationParams(), schema=schema
        )
    assert json.loads(reply.text)["name"] and reply.finish_reason == "stop"
    assert reply.prompt_tokens == 2


def test_retry_after_is_honoured_within_the_cap() -> None:
    slept: list[float] = []
    llm = FakeLLM(
        responses=[
            TransientLLMError("busy", retry_after=5.0),
            TransientLLMError("busy", retry_after=3600.0),
            TransientLLMError("busy"),
        ],
        default="{}",
    )
    policy = RetryPolicy(attempts=4, backoff_s=0.01, max_backoff_s=0.02, max_retry_after_s=30)
    message = [{"role": "user", "content": "x"}]
    complete_with_retry(llm, message, params=GenerationParams(), policy=policy, sleep=slept.append)
    assert slept[0] == 5.0 and slept[1] == 30.0 and slept[2] <= 0.02
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # past date
    assert retry_after({"retry-after": "soon"}) is None and retry_after({}) is None


# ------------------------------------------------------------------------------ damage


def damage(db: Path, how: str) -> None:
    size = db.stat().st_size
    if how == "truncated":
        os.truncate(db, size // 2)
        return
    with db.open("r+b") as handle:
        handle.seek(0 if how == "header" else size // 2)
        handle.write(bytes(range(256)) * 32)


@pytest.mark.parametrize("how", ["truncated", "middle", "header"])
@pytest.mark.parametrize(
    "command", [["recommend", "--user", "29"], ["segments"], ["profile"], ["users"]]
)
def test_a_damaged_workspace_is_one_line_and_untouched(
    how: str, command: list[str], workspace: Path
) -> None:
    db = workspace / store.DB_NAME
    damage(db, how)
    before = db.read_bytes()
    result = runner.invoke(app, [*command, "-w", str(workspace)], env=ENV)
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in result.output
    assert f"{db}: the workspace database is damaged" in line
    assert "restore a copy" in line and "re-create it from the source files" in line
    assert db.read_bytes() == before


def test_damage_met_after_opening_is_the_same_line(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above the quick_check size the open succeeds; SQLite's error on the damaged page
    becomes the same line, and nothing is written."""
    monkeypatch.setattr(store, "QUICK_CHECK_MAX_BYTES", 0)
    db = workspace / store.DB_NAME
    damage(db, "truncated")
    before = db.read_bytes()
    result = runner.invoke(app, ["profile", "-w", str(workspace)], env=ENV)
    assert result.exit_code == 2, result.output
    assert f"{db}: the workspace database is damaged" in result.stderr
    assert db.read_bytes() == before


def test_damage_outside_a_store_block_is_caught_by_the_cli(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def malformed(*args: object, **kwargs: object) -> None:
        Store.open(workspace).close()
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(pipeline, "select_users", malformed)
    result = runner.invoke(app, ["profile", "-w", str(workspace)], env=ENV)
    assert result.exit_code == 2
    assert f"{workspace / store.DB_NAME}: the workspace database is damaged" in result.stderr
    with pytest.raises(WorkspaceError, match="damaged"), Store.open(workspace):
        raise sqlite3.DatabaseError("file is not a database")
    locked = sqlite3.OperationalError("database is locked")
    assert store.damage_error(locked) is None


# ------------------------------------------------------------------------------ stages


@pytest.fixture(scope="module")
def clustered(ingested: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every example user profiled (through the fake, healthy) and one clustering run."""
    workspace = tmp_path_factory.mktemp("clustered") / "ws"
    shutil.copytree(ingested, workspace)
    with fake_openai_server("ok") as server:
        code, _, stderr = invoke(["profile"], workspace, server.base_url)
        assert code == 0, stderr
        code, _, stderr = invoke(["cluster", "--k", "3"], workspace, server.base_url)
        assert code == 0, stderr
    yield workspace


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["html", "badjson", "nochoices", "hang", "refusal"])
def test_explain_falls_back_to_templates(mode: str, clustered: Path, tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    shutil.copytree(clustered, workspace)
    with fake_openai_server(mode, hang_s=20) as server:
        code, stdout, stderr = invoke(
            ["explain", "--user", "29", "--n", "5", "--json"], workspace, server.base_url
        )
    assert code == 0, stderr
    items = json.loads(stdout)["items"]
    assert len(items) == 5
    assert all(item["reason_fallback"] and item["reason"] for item in items)


@pytest.mark.slow
def test_cluster_and_chat_finish_with_fallbacks(clustered: Path, tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    shutil.copytree(clustered, workspace)
    answers = tmp_path / "answers.txt"
    answers.write_text("1\nForrest Gump, Pulp Fiction\n", encoding="utf-8")
    with fake_openai_server("mix", failure_rate=1.0, seed=3, retry_after_s=0.1) as server:
        code, _, stderr = invoke(["cluster", "--k", "3"], workspace, server.base_url)
        assert code == 0, stderr
        shown = runner.invoke(app, ["segments", "--json", "-w", str(workspace)], env=ENV)
        assert shown.exit_code == 0, shown.output
        segments = json.loads(shown.stdout)["segments"]
        assert segments and all(s["fallback"] for s in segments)
        chat = ["chat", "--answers", str(answers), "--max-questions", "2", "--n", "5", "--json"]
        code, stdout, stderr = invoke(chat, workspace, server.base_url)
        assert code == 0, stderr
        served = dict(server.served)
    result = json.loads(stdout)
    worded = [q for q in result["questions"] if q["options"]]  # the favourites one is fixed
    assert worded and all(q["fallback"] for q in worded)
    assert result["items"] and all(item["reason_fallback"] for item in result["items"])
    assert "ok" not in served and len(served) > 3
