"""Bad input through the CLI: one clear line, exit 2, and the workspace exactly as before."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pytest
from conftest import segrec_cmd, snapshot
from typer.testing import CliRunner

from segrec.cli import app

runner = CliRunner()
HEADER = "userId,movieId,rating,timestamp\n"
MOVIES = "movieId,title,genres\n1,Toy Story (1995),Animation|Children\n2,Heat (1995),Action\n"


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def movies(tmp_path: Path) -> Path:
    return write(tmp_path / "movies.csv", MOVIES)


@pytest.fixture
def populated(tmp_path: Path, movies: Path) -> Path:
    """A workspace that already holds data, to check a bad ingest leaves it byte-identical."""
    workspace = tmp_path / "ws"
    good = write(tmp_path / "good.csv", HEADER + "1,1,4.0,100\n1,2,2.0,200\n2,1,5.0,300\n")
    result = runner.invoke(app, ["ingest", str(good), "--items", str(movies), "-w", str(workspace)])
    assert result.exit_code == 0, result.output
    return workspace


CASES = {
    "missing file": (None, "not found"),
    "empty file": ("", "empty"),
    "header only": (HEADER, "no data rows"),
    "missing column": ("userId,rating,timestamp\n1,4.0,100\n", "--item-col"),
    "wrong delimiter": ("userId;movieId;rating;timestamp\n1;1;4.0;100\n", "--delimiter"),
    "non-numeric value": (HEADER + "1,1,four,100\n", "ratings.csv:2:"),
    "bad timestamp": (HEADER + "1,1,4.0,100\n1,2,4.0,yesterday\n", "ratings.csv:3:"),
    "unknown item": (HEADER + "1,1,4.0,100\n1,99,4.0,100\n", "99"),
    "duplicate rows": (HEADER + "1,1,4.0,100\n1,2,3.0,100\n1,1,4.0,100\n", "ratings.csv:4:"),
    "non-utf8": (HEADER.encode() + b"1,1,4.0,100\n1,2,\xff\xfe,100\n", "UTF-8"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(
    case: str, tmp_path: Path, movies: Path, populated: Path
) -> None:
    text, expected = CASES[case]
    log = tmp_path / "ratings.csv"
    if text is not None:
        write(log, text)
    before = snapshot(populated)
    fresh = tmp_path / "fresh"
    for workspace in (populated, fresh):
        result = runner.invoke(
            app, ["profile", str(log), "--items", str(movies), "-w", str(workspace)]
        )
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("segrec: error: ") and "ratings.csv" in lines[0]
        assert expected in lines[0], lines[0]
        assert "Traceback" not in result.output
    assert snapshot(populated) == before
    assert not fresh.exists()


def test_skip_bad_rows_skips_counts_and_says_so(tmp_path: Path, movies: Path) -> None:
    log = write(
        tmp_path / "ratings.csv",
        HEADER + "1,1,4.0,100\n1,2,bad,100\n1,99,3.0,5\n1,1,4.0,100\n2,2,1.0,7\n",
    )
    workspace = tmp_path / "ws"
    result = runner.invoke(
        app, ["ingest", str(log), "--items", str(movies), "-w", str(workspace), "--skip-bad-rows"]
    )
    assert result.exit_code == 0, result.output
    assert "skipped 2 bad rows and 1 duplicate rows" in result.stderr
    with sqlite3.connect(workspace / "segrec.db") as conn:
        assert conn.execute("SELECT count(*) FROM interactions").fetchone()[0] == 2


def dump(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return list(conn.iterdump())


def test_reingesting_the_same_data_changes_nothing(
    tmp_path: Path, populated: Path, movies: Path
) -> None:
    before = dump(populated / "segrec.db")
    good = tmp_path / "good.csv"
    result = runner.invoke(app, ["ingest", str(good), "--items", str(movies), "-w", str(populated)])
    assert result.exit_code == 0, result.output
    assert "no changes (already ingested)" in result.stderr
    assert dump(populated / "segrec.db") == before


def test_unknown_user_and_missing_workspace_are_clear(tmp_path: Path, populated: Path) -> None:
    result = runner.invoke(app, ["profile", "--show", "nobody", "-w", str(populated)])
    assert result.exit_code == 2 and "segrec users" in result.stderr
    result = runner.invoke(app, ["profile", "--users", "1,nobody", "-w", str(populated)])
    assert result.exit_code == 2 and "'nobody'" in result.stderr
    result = runner.invoke(app, ["profile", "-w", str(tmp_path / "none")])
    assert result.exit_code == 2 and "no segrec workspace" in result.stderr
    assert not (tmp_path / "none").exists()


def test_pii_attributes_are_refused(tmp_path: Path, movies: Path) -> None:
    log = write(tmp_path / "ratings.csv", HEADER + "1,1,4.0,100\n")
    attrs = write(tmp_path / "users.csv", "userId,age_band,email\n1,25-34,a@b.org\n")
    result = runner.invoke(
        app,
        [
            "ingest",
            str(log),
            "--items",
            str(movies),
            "--attributes",
            str(attrs),
            "-w",
            str(tmp_path / "ws"),
        ],
    )
    assert result.exit_code == 2 and "email" in result.stderr and "users.csv" in result.stderr
    assert not (tmp_path / "ws").exists()


def test_real_process_prints_no_traceback(tmp_path: Path, movies: Path) -> None:
    result = subprocess.run(
        [
            *segrec_cmd(),
            "profile",
            str(tmp_path / "missing.csv"),
            "--items",
            str(movies),
            "-w",
            str(tmp_path / "ws"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "missing.csv" in result.stderr
    assert result.stdout == ""
