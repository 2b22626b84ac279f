"""A run killed with SIGKILL mid-way, then rerun, profiles every user exactly once."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from conftest import segrec_cmd

pytestmark = pytest.mark.slow


def profile_rows(db: Path) -> list[tuple[str, str, str]]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return conn.execute("SELECT user_id, cache_key, created_at FROM profiles").fetchall()
    except sqlite3.OperationalError:
        return []


LIMIT = 4  # the kill lands after 2 profiles, mid-way


def test_sigkill_then_resume(tmp_path: Path, example_ratings: Path, example_movies: Path) -> None:
    workspace = tmp_path / "ws"
    db = workspace / "segrec.db"
    args = [
        *segrec_cmd(),
        "profile",
        str(example_ratings),
        "--items",
        str(example_movies),
        "--workspace",
        str(workspace),
        "--limit",
        str(LIMIT),
        "--threads",
        "2",
        "--json",
    ]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while len(profile_rows(db)) < 2:
        assert process.poll() is None, process.stderr.read().decode()  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "no profile written in 300 s"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = {row[0]: row for row in profile_rows(db)}
    assert 2 <= len(before) < LIMIT, "the kill must land mid-run"

    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    after = profile_rows(db)
    assert len(after) == LIMIT and len({row[0] for row in after}) == LIMIT
    assert stats["cached"] == len(before)
    assert stats["profiled"] + stats["fallback"] == LIMIT - len(before)
    for row in after:  # the profiles written before the kill were not redone
        if row[0] in before:
            assert row == before[row[0]]
