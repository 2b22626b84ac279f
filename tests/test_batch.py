"""The Ray executor (segrec.batch) on a local ``ray.init(num_cpus=2)`` cluster.

One cluster serves the whole session (Ray takes seconds to start). The executor must give
the same profiles, cache keys and vectors as the in-process path, store each user exactly
once, resume after its driver is killed, and refuse bad input with one line.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import segrec_cmd, snapshot
from test_resume import profile_rows
from typer.testing import CliRunner

from segrec import batch, pipeline
from segrec.cli import app
from segrec.config import Settings
from segrec.embed import MemoryVectorCache, SentenceTransformerEncoder, embed_texts
from segrec.errors import TransientLLMError
from segrec.llm.counting import count_calls, counted
from segrec.store import Store
from segrec.testing import FakeLLM, schema_answer

cli = CliRunner()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[object]:
    ray = pytest.importorskip("ray")
    batch.connect(Settings(), num_cpus=2)
    yield ray
    ray.shutdown()


def ingested(root: Path, ratings: Path, movies: Path, **settings: object) -> Settings:
    chosen = Settings(workspace=root, domain="movie", **settings)  # type: ignore[arg-type]
    pipeline.ingest(chosen, ratings, movies)
    return chosen


def stored(settings: Settings) -> dict[str, tuple[str, dict, bool, str]]:
    with Store.open(settings.workspace) as store:
        return {
            p.user_id: (p.cache_key, p.profile, p.fallback, p.model_id) for p in store.profiles()
        }


# Built inside each actor (a partial of importable names travels by reference).
fake_backend = functools.partial(FakeLLM, default=schema_answer)


def test_llm_calls_made_by_ray_actors_count_for_the_command(
    ray_cluster: object, tmp_path: Path, example_ratings: Path, example_movies: Path
) -> None:
    """The actors' calls happen in other processes; the driver's count includes them."""
    settings = ingested(tmp_path / "ws", example_ratings, example_movies)
    users = pipeline.select_users(settings).user_ids[:5]
    # What make_llm builds in an actor: a backend whose calls are counted there (a lambda
    # travels by value).
    with (
        batch.profile_runner(settings, backend=lambda: counted(fake_backend())) as runner,
        Store.open(settings.workspace) as store,
        count_calls() as calls,
    ):
        stats = pipeline.profile_in(store, settings, users, runner=runner)
    assert stats.profiled == 5
    assert calls.calls == 5  # one schema-valid answer per user, no retries


def test_ray_runner_matches_in_process_with_fake_llm(
    ray_cluster: object, tmp_path: Path, example_ratings: Path, example_movies: Path
) -> None:
    local = ingested(tmp_path / "local", example_ratings, example_movies)
    distributed = ingested(tmp_path / "ray", example_ratings, example_movies)
    users = pipeline.select_users(local).user_ids[:9]
    expected = pipeline.run_profiles(local, users, llm=fake_backend())
    with (
        batch.profile_runner(distributed, backend=fake_backend) as runner,
        Store.open(distributed.workspace) as store,
    ):
        assert len(runner.actors) == 2 and runner.model_id == "fake-llm"
        seen: list[int] = []
        stats = pipeline.profile_in(
            store, distributed, users, runner=runner, on_progress=lambda s: seen.append(s.done)
        )
        assert stats.as_json() | {"seconds": 0} == expected.as_json() | {"seconds": 0}
        assert seen == list(range(10))  # every user reported once, as it arrived
        assert stored(distributed) == stored(local) and len(stored(local)) == 9
        again = pipeline.profile_in(store, distributed, users, runner=runner)
        assert again.cached == 9 and again.profiled == 0


def test_ray_runner_reports_llm_failures_per_user(
    ray_cluster: object, tmp_path: Path, example_ratings: Path, example_movies: Path
) -> None:
    settings = ingested(tmp_path / "ws", example_ratings, example_movies, retries=1)
    users = pipeline.select_users(settings).user_ids[:3]
    down = functools.partial(FakeLLM, default=TransientLLMError("HTTP 503: overloaded"))
    with (
        batch.profile_runner(settings, backend=down) as runner,
        Store.open(settings.workspace) as store,
    ):
        stats = pipeline.profile_in(store, settings, users, runner=runner)
        failures = store.failures()
    assert stats.failed == 3 and stats.profiled == 0
    assert set(stats.failures) == set(users) == set(failures)
    assert all("503" in reason for reason in stats.failures.values())


def test_a_dead_worker_fails_only_its_users_and_a_rerun_retries_them(
    ray_cluster: object, tmp_path: Path, example_ratings: Path, example_movies: Path
) -> None:
    import ray

    settings = ingested(tmp_path / "ws", example_ratings, example_movies)
    everyone = pipeline.select_users(settings).user_ids
    users, others = everyone[:12], everyone[12:15]
    with (
        batch.profile_runner(settings, backend=fake_backend) as runner,
        Store.open(settings.workspace) as store,
    ):
        doomed = runner.actors[0]

        def kill_once(stats: object) -> None:
            if getattr(stats, "done", 0) == 1:
                ray.kill(doomed)

        stats = pipeline.profile_in(store, settings, users, runner=runner, on_progress=kill_once)
        assert stats.done == 12 and stats.profiled == 12 - stats.failed
        assert stats.failed <= 2  # its batches in flight; the other actor took the rest
        assert all("Ray worker failed" in reason for reason in stats.failures.values())
        again = pipeline.profile_in(store, settings, users, runner=runner)
        assert again.cached == 12 - stats.failed and again.profiled == stats.failed
        ray.kill(runner.actors[1])  # none left: reported per user, no hang
        gone = pipeline.profile_in(store, settings, others, runner=runner)
        assert gone.failed == 3 and set(gone.failures) == set(others)


def test_a_backend_that_cannot_be_built_is_one_clear_error(
    ray_cluster: object, tmp_path: Path
) -> None:
    from segrec.errors import LLMError
    from segrec.llm.llamacpp import LlamaCppLLM

    missing = functools.partial(LlamaCppLLM, tmp_path / "missing.gguf")
    with (
        pytest.raises(LLMError, match=r"could not build their LLM backend: .*missing\.gguf"),
        batch.profile_runner(Settings(workspace=tmp_path), backend=missing),
    ):
        pass


@pytest.mark.slow
def test_ray_executor_matches_in_process_on_the_bundled_model(
    ray_cluster: object, tmp_path: Path, example_ratings: Path, example_movies: Path
) -> None:
    from segrec.llm.llamacpp import LlamaCppLLM

    common = {"threads": 1, "ray_workers": 2}
    local = ingested(tmp_path / "local", example_ratings, example_movies, **common)
    distributed = ingested(
        tmp_path / "ray", example_ratings, example_movies, executor="ray", **common
    )
    users = pipeline.select_users(local).user_ids[:2]  # one per actor
    pipeline.run_profiles(local, users, llm=LlamaCppLLM(n_threads=1))
    stats = pipeline.run_profiles(distributed, users)
    assert stats.profiled + stats.fallback == 2 and stats.failed == 0
    assert stored(distributed) == stored(local)
    assert all(model.startswith("llama.cpp:") for *_, model in stored(local).values())


@pytest.mark.slow
def test_ray_encoder_gives_the_in_process_vectors(
    ray_cluster: object, tmp_path: Path, example_ratings: Path, example_movies: Path
) -> None:
    settings = ingested(tmp_path / "ws", example_ratings, example_movies, executor="ray")
    with Store.open(settings.workspace) as store:
        texts = list(store.items_frame()["text"])[:300]
    encoder = batch.ray_encoder(settings)
    try:
        cache = MemoryVectorCache()
        on_ray = embed_texts(texts, encoder, cache=cache, batch_size=128)
    finally:
        encoder.close()
    local = SentenceTransformerEncoder()
    assert encoder.encoder_id == local.encoder_id and encoder.dim == local.dim
    in_process = embed_texts(texts, local)
    np.testing.assert_allclose(on_ray, in_process, atol=1e-5)
    # Same cache keys: the in-process path finds every vector the actors made.
    assert len(cache) == len(set(texts))
    assert local._model is not None
    cached_only = SentenceTransformerEncoder()
    np.testing.assert_array_equal(embed_texts(texts, cached_only, cache=cache), on_ray)
    assert cached_only._model is None


@pytest.mark.slow
def test_cluster_with_ray_embeddings_matches_in_process(
    ray_cluster: object, tmp_path: Path, example_ratings: Path, example_movies: Path
) -> None:
    found = {}
    for executor in ("local", "ray"):
        settings = ingested(tmp_path / executor, example_ratings, example_movies, executor=executor)
        users = pipeline.select_users(settings).user_ids
        pipeline.run_profiles(settings, users, llm=fake_backend())  # an llm given: in-process
        result = pipeline.run_clustering(settings, k=3, llm=fake_backend())
        with Store.open(settings.workspace) as store:
            assigned = store.assignments(result.run.id)
        found[executor] = (
            result.run.params["encoder_id"],
            {user: a.segment_id for user, a in assigned.items()},
        )
    assert found["ray"] == found["local"] and len(found["local"][1]) == 36


@pytest.mark.slow
def test_ray_profile_resumes_after_the_driver_is_killed(
    tmp_path: Path, example_ratings: Path, example_movies: Path
) -> None:
    workspace = tmp_path / "ws"
    db = workspace / "segrec.db"
    limit = 5  # the kill lands after 2 profiles, with 2 actors busy on 2 more
    args = [
        *segrec_cmd(),
        "profile",
        str(example_ratings),
        "--items",
        str(example_movies),
        "--workspace",
        str(workspace),
        "--executor",
        "ray",
        "--ray-workers",
        "2",
        "--threads",
        "1",
        "--limit",
        str(limit),
        "--json",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 300
    while len(profile_rows(db)) < 2:
        assert process.poll() is None, process.stderr.read().decode()  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "no profile written in 300 s"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = {row[0]: row for row in profile_rows(db)}
    assert 2 <= len(before) < limit, "the kill must land mid-run"

    result = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    after = profile_rows(db)
    assert len(after) == limit and len({row[0] for row in after}) == limit
    assert stats["cached"] == len(before)
    assert stats["profiled"] + stats["fallback"] == limit - len(before)
    for row in after:  # the profiles written before the kill were not redone
        if row[0] in before:
            assert row == before[row[0]]


# ------------------------------------------------------------------------------ bad input


@pytest.fixture
def populated(tmp_path: Path, example_ratings: Path, example_movies: Path) -> Path:
    return ingested(tmp_path / "ws", example_ratings, example_movies).workspace


def one_line_error(args: list[str], expected: str) -> str:
    result = cli.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("segrec: error: "), result.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


BAD = {
    "unknown executor": (["--executor", "spark"], "--executor", "'local' or 'ray'"),
    "unreachable cluster": (
        ["--executor", "ray", "--ray-address", "127.0.0.1:1"],
        "127.0.0.1:1 cannot be reached",
        "--head",
    ),
    "malformed address": (
        ["--executor", "ray", "--ray-address", "no-port"],
        "'no-port'",
        "HOST:PORT",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_executor_input_is_one_line_and_changes_nothing(
    case: str, tmp_path: Path, populated: Path, example_ratings: Path, example_movies: Path
) -> None:
    flags, *expected = BAD[case]
    before = snapshot(populated)
    fresh = tmp_path / "fresh"
    data = [str(example_ratings), "--items", str(example_movies)]
    for workspace in (populated, fresh):
        start = time.monotonic()
        line = one_line_error(["profile", *data, *flags, "-w", str(workspace)], expected[0])
        assert expected[1] in line
        assert time.monotonic() - start < 30  # bounded, not Ray's minutes of retries
    one_line_error(["cluster", "--k", "2", *flags, "-w", str(populated)], expected[0])
    assert snapshot(populated) == before
    assert not fresh.exists()


def test_more_workers_than_the_cluster_holds_is_refused_before_writing(
    ray_cluster: object,
    tmp_path: Path,
    populated: Path,
    example_ratings: Path,
    example_movies: Path,
) -> None:
    before = snapshot(populated)
    data = [str(example_ratings), "--items", str(example_movies)]
    flags = ["--executor", "ray", "--ray-workers", "2", "--threads", "2"]
    for workspace in (populated, tmp_path / "fresh"):
        line = one_line_error(["profile", *data, *flags, "-w", str(workspace)], "2 × 2 CPU(s)")
        assert "cluster's 2 CPUs" in line
    one_line_error(
        ["cluster", "--k", "2", "--executor", "ray", "--ray-workers", "3", "-w", str(populated)],
        "ray_workers 3",
    )
    assert snapshot(populated) == before
    assert not (tmp_path / "fresh").exists()


def test_ray_not_installed_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    populated: Path,
    example_ratings: Path,
    example_movies: Path,
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    before = snapshot(populated)
    data = [str(example_ratings), "--items", str(example_movies)]
    for workspace in (populated, tmp_path / "fresh"):
        line = one_line_error(
            ["profile", *data, "--executor", "ray", "-w", str(workspace)], "not installed"
        )
        assert "pip install 'segrec[ray]'" in line
    monkeypatch.setenv("SEGREC_EXECUTOR", "ray")  # the setting, not only the flag
    one_line_error(["cluster", "--k", "2", "-w", str(populated)], "segrec[ray]")
    assert snapshot(populated) == before
    assert not (tmp_path / "fresh").exists()
