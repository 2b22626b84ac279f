"""The big-data path: chunked ingest, the field limit, clustering without profiles, sampled
runs, on-demand profiles, the export and LLM-call counting."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pandas as pd
import pytest
from conftest import MainJob, snapshot
from typer.testing import CliRunner

from segrec import pipeline
from segrec.cli import app
from segrec.config import Settings
from segrec.data import FIELD_LIMIT, load_dataset
from segrec.files import current_umask
from segrec.llm.counting import count_calls, counted
from segrec.store import Store
from segrec.synthetic import write_synthetic_log
from segrec.testing import FakeLLM, schema_answer

runner = CliRunner()
UNREACHABLE = {  # an OpenAI-compatible endpoint nobody listens on, tried once per call
    "SEGREC_LLM": "openai:unreachable",
    "SEGREC_BASE_URL": "http://127.0.0.1:9/v1",
    "SEGREC_RETRIES": "1",
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return write_synthetic_log(
        tmp_path_factory.mktemp("syn"), n_users=600, n_events=6000, n_items=400, n_segments=4
    )


def _messy_log(tmp_path: Path, synthetic) -> Path:  # type: ignore[no-untyped-def]
    """The synthetic log with bad rows, a duplicate, blank lines and CRLF line ends."""
    lines = synthetic.log.read_text().splitlines()

    def edit(row: int, field: int, value: str) -> None:
        cells = lines[row].split(",")
        cells[field] = value
        lines[row] = ",".join(cells)

    edit(5, 2, "")  # empty behaviour
    edit(40, 3, "yesterday")  # bad timestamp
    edit(77, 1, "nope")  # unknown item
    lines.insert(100, "")
    lines.insert(150, lines[149])  # duplicate
    lines[300] = lines[300] + ",extra"  # ragged
    path = tmp_path / "messy.csv"
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return path


def test_chunked_ingest_equals_whole_file_ingest_row_for_row(tmp_path: Path, synthetic) -> None:  # type: ignore[no-untyped-def]
    messy = _messy_log(tmp_path, synthetic)
    whole = load_dataset(messy, synthetic.items, skip_bad_rows=True, chunk_bytes=None)
    for size in (900, 50_000):
        chunked = load_dataset(messy, synthetic.items, skip_bad_rows=True, chunk_bytes=size)
        pd.testing.assert_frame_equal(chunked.interactions, whole.interactions)
        assert chunked.report == whole.report
    assert whole.report.skipped == 4 and whole.report.duplicates == 1
    # Without --skip-bad-rows the same first problem is reported, whatever the chunks.
    errors = set()
    for size in (None, 900):
        with pytest.raises(Exception) as caught:
            load_dataset(messy, synthetic.items, chunk_bytes=size)
        errors.add(str(caught.value))
    assert len(errors) == 1 and ":6: column 'behavior' is empty" in errors.pop()
    # Parquet in row batches equals Parquet at once, and the CSV.
    parquet = tmp_path / "log.parquet"
    pd.read_csv(synthetic.log, dtype=str).to_parquet(parquet)
    at_once = load_dataset(parquet, synthetic.items, chunk_bytes=None)
    batches = load_dataset(parquet, synthetic.items, chunk_rows=777)
    pd.testing.assert_frame_equal(batches.interactions, at_once.interactions)
    csv = load_dataset(synthetic.log, synthetic.items, chunk_bytes=4096)
    assert (csv.interactions["user_id"] == at_once.interactions["user_id"]).all()
    assert len(at_once.interactions) == synthetic.n_events


def test_oversized_field_is_one_line_and_skippable(tmp_path: Path, synthetic) -> None:  # type: ignore[no-untyped-def]
    lines = synthetic.log.read_text().splitlines()
    lines[3] = (
        lines[3]
        .replace(",view,", f",{'v' * (FIELD_LIMIT + 1)},")
        .replace(",click,", f",{'c' * (FIELD_LIMIT + 1)},")
    )
    log = tmp_path / "huge.csv"
    log.write_text("\n".join(lines) + "\n")
    ws = tmp_path / "ws"
    result = runner.invoke(
        app, ["ingest", str(log), "--items", str(synthetic.items), "-w", str(ws)]
    )
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert f"{log}:4: column 'behavior' holds 131,073 characters, over the limit of 131,072" in (
        result.stderr
    )
    assert "shorten the value" in result.stderr and "--skip-bad-rows" in result.stderr
    assert not ws.exists()
    result = runner.invoke(
        app, ["ingest", str(log), "--items", str(synthetic.items), "-w", str(ws), "--skip-bad-rows"]
    )
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())  # notes are wrapped to the terminal
    assert "skipped 1 bad rows" in said and "4: column 'behavior' holds 131,073" in said
    with Store.open(ws) as store:
        assert store.count("interactions") == synthetic.n_events - 1
    items = tmp_path / "items.csv"
    items.write_text(
        synthetic.items.read_text().replace("#0", "#0 " + "x" * 200_000, 1), encoding="utf-8"
    )
    result = runner.invoke(app, ["ingest", str(log), "--items", str(items), "-w", str(ws)])
    assert result.exit_code == 2 and f"{items}:2: column 'title' holds 200,0" in result.stderr
    # a header (the column names) too long for the csv module: the same kind of line
    header = tmp_path / "header.csv"
    header.write_text("user_id,item_id," + "h" * 200_000 + ",timestamp\n1,i1,view,1\n")
    result = runner.invoke(
        app, ["ingest", str(header), "--items", str(synthetic.items), "-w", str(tmp_path / "h")]
    )
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert f"{header}:1: a column name holds 200,000 characters, over the limit of 131,072" in (
        result.stderr
    )
    assert "Traceback" not in result.output and not (tmp_path / "h").exists()


def test_log_too_large_for_the_disk_is_one_line(
    tmp_path: Path, synthetic, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    ws = tmp_path / "ws"
    result = runner.invoke(
        app, ["ingest", str(synthetic.log), "--items", str(synthetic.items), "-w", str(ws)]
    )
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "GB free" in result.stderr and "--workspace on a larger disk" in result.stderr
    assert not ws.exists()


def test_llm_calls_are_counted_once_for_every_backend() -> None:
    fake = FakeLLM(default="x")
    llm = counted(fake)
    assert counted(llm) is llm and llm.model_id == fake.model_id
    with count_calls() as outer:
        llm.complete(
            [{"role": "user", "content": "a"}], params=pipeline.generation_params(Settings())
        )
        with count_calls() as inner:
            llm.complete(
                [{"role": "user", "content": "b"}], params=pipeline.generation_params(Settings())
            )
        fake.complete(
            [{"role": "user", "content": "c"}], params=pipeline.generation_params(Settings())
        )
    assert (outer.calls, inner.calls, len(fake.calls)) == (2, 1, 3)


@pytest.fixture(scope="module")
def clustered(tmp_path_factory: pytest.TempPathFactory, synthetic) -> Settings:  # type: ignore[no-untyped-def]
    """The synthetic users clustered from a sample, without a single profile beforehand."""
    settings = Settings(workspace=tmp_path_factory.mktemp("scale") / "ws", domain="product")
    pipeline.ingest(settings, synthetic.log, synthetic.items)
    result = runner.invoke(
        app,
        ["cluster", "--k", "4", "--sample", "500", "--seed", "3", "-w", str(settings.workspace)],
        catch_exceptions=False,
        env=UNREACHABLE,
    )
    assert result.exit_code == 0, result.output
    return settings


@pytest.mark.slow
def test_sampled_run_recovers_planted_segments_and_exports(
    clustered: Settings, synthetic, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from sklearn.metrics import adjusted_rand_score

    report = pipeline.segments_report(clustered)
    notes = " ".join(report["run"]["notes"])
    assert "seeded sample of 500 of 600 users (--sample, seed 3)" in notes
    assert "--algorithm auto chose kmeans" in notes
    assert report["metrics"]["users"] == 500
    # the LLM was unreachable: every label fell back, the run finished, nothing was profiled
    assert report["metrics"]["fallback_labels"] == 4
    with Store.open(clustered.workspace) as store:
        assert store.count("profiles") == 0
    out = {suffix: tmp_path / f"segments{suffix}" for suffix in (".parquet", ".csv")}
    for path in out.values():
        result = runner.invoke(
            app, ["segments", "export", "--out", str(path), "-w", str(clustered.workspace)]
        )
        assert result.exit_code == 0, result.output
        assert f"wrote 500 users of run {report['run']['id']}" in result.stderr
    parquet = pd.read_parquet(out[".parquet"])
    csv = pd.read_csv(out[".csv"], dtype={"user_id": str})
    assert list(parquet.columns) == ["user_id", "segment", "segment_name", "distance", "margin"]
    pd.testing.assert_frame_equal(parquet, csv, check_dtype=False)
    names = {s["id"]: s["name"] for s in report["segments"]}
    assert (parquet["segment_name"] == parquet["segment"].map(names)).all()
    assert (parquet["margin"] >= 0).all() and len(set(parquet["user_id"])) == 500
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial file left
    assert {p.stat().st_mode & 0o777 for p in out.values()} == {0o666 & ~current_umask()}
    planted = synthetic.planted[parquet["user_id"].astype(int).to_numpy()]
    assert adjusted_rand_score(planted, parquet["segment"]) >= 0.9
    # the LLM-call count of `segrec profile`: one user, one call (unreachable, 1 try)
    result = runner.invoke(
        app,
        ["profile", "--users", "0", "-w", str(clustered.workspace), "--json"],
        env=UNREACHABLE,
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["failed"], data["llm_calls"]) == (1, 1)
    # a user outside the sample gets a segment on demand, without a profile
    outside = sorted(set(map(str, range(600))) - set(parquet["user_id"]))[0]
    result = runner.invoke(
        app, ["assign", "--user", outside, "-w", str(clustered.workspace), "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["late"] is True and data["llm_calls"] == 0
    assert data["segment"] in names


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--out", "x.xlsx"], "unknown extension '.xlsx' — use .parquet or .csv"),
        (["--out", "x.csv", "--run", "99"], "--run 99: no such clustering run"),
        (["--out", "/nonexistent/dir/x.csv"], "does not exist — create it first"),
    ],
)
def test_bad_export_is_one_line(
    clustered: Settings, tmp_path: Path, args: list[str], expected: str
) -> None:
    before = snapshot(clustered.workspace)
    args = [str(tmp_path / a) if a.startswith("x.") else a for a in args]
    result = runner.invoke(app, ["segments", "export", *args, "-w", str(clustered.workspace)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert expected in result.stderr
    assert snapshot(clustered.workspace) == before and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_assign_on_a_profile_run_profiles_that_user_alone(
    tmp_path: Path, example_ratings: Path, example_movies: Path
) -> None:
    settings = Settings(workspace=tmp_path / "ws", domain="movie", represent="mix")
    pipeline.ingest(settings, example_ratings, example_movies)
    *others, last = pipeline.select_users(settings).user_ids
    pipeline.run_profiles(settings, others, llm=FakeLLM(default=schema_answer))
    pipeline.run_clustering(settings, k=3, users=others, llm=FakeLLM(default=schema_answer))
    llm = FakeLLM(default=schema_answer)
    found, made = pipeline.assign_users_to_run(settings, [last], llm=llm)
    assert made == 1 and found[0].late and found[0].user_id == last
    assert 1 <= len(llm.calls) <= settings.validation_attempts  # one user's profile
    with Store.open(settings.workspace) as store:
        assert store.profile(last) is not None and store.count("profiles") == len(others) + 1
    calls = len(llm.calls)
    (again,), made = pipeline.assign_users_to_run(settings, [last], llm=llm)
    assert made == 0 and again == found[0] and len(llm.calls) == calls


@pytest.mark.slow
def test_cluster_llm_calls_stay_within_k_m_on_the_real_model(
    main_job: MainJob, tmp_path: Path
) -> None:
    """The bundled model names 2 segments of a workspace where only 3 users were profiled
    (the session's `main_job`): cluster profiles only the users it shows, and `llm_calls`
    (also on the terminal) stays within the bound."""
    report = json.loads(main_job.cluster.stdout)
    described = sum(s["described"] for s in report["segments"])
    assert described <= report["llm_calls"] <= pipeline.llm_call_bound(described, 3)
    made = main_job.profiled_after_cluster - main_job.profiled_before_cluster
    assert 0 < made <= described * (pipeline.MEMBERS_SHOWN + pipeline.CONTRAST_SHOWN)
    ws = str(main_job.copy(tmp_path / "ws"))
    shown = runner.invoke(app, ["segments", "show", "0", "--threads", "2", "-w", ws])
    assert shown.exit_code == 0 and "LLM calls: " in shown.stderr


def test_catalogue_larger_than_one_arrow_block(tmp_path: Path) -> None:
    """A catalogue over 1 MB is parsed in several Arrow blocks (a chunked column)."""
    data = write_synthetic_log(tmp_path, n_users=50, n_events=500, n_items=40_000, n_segments=4)
    assert data.items.stat().st_size > 2 << 20
    dataset = load_dataset(data.log, data.items)
    assert len(dataset.items) == 40_000
    assert dataset.items["categories"].map(len).eq(1).all()
