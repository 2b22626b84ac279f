"""Shared fixtures. The real model and server are session-scoped: loaded once per run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "movielens"
MOVIELENS = ROOT.parent / "shared" / "data" / "ml-latest-small"


@pytest.fixture(scope="session")
def example_ratings() -> Path:
    return EXAMPLES / "ratings.csv"


@pytest.fixture(scope="session")
def example_movies() -> Path:
    return EXAMPLES / "movies.csv"


@pytest.fixture(scope="session")
def local_llm():  # type: ignore[no-untyped-def]
    """The real bundled SmolLM2-135M through llama-cpp-python."""
    from segrec.llm.llamacpp import LlamaCppLLM

    return LlamaCppLLM(n_threads=2)


@pytest.fixture(scope="session")
def llama_server() -> Iterator[str]:
    """A real ``python -m llama_cpp.server`` with the bundled model on a free loopback port."""
    from segrec.testing import llama_server as start

    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"segrec-llama-server-{os.getpid()}.log"
    with start(threads=2, log=log) as base_url:
        yield base_url


def snapshot(directory: Path) -> dict[str, bytes] | None:
    """Every file's bytes under ``directory`` (None if it does not exist)."""
    if not directory.exists():
        return None
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def segrec_cmd() -> list[str]:
    exe = shutil.which("segrec", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "segrec.cli"]


@dataclass(frozen=True)
class MainJob:
    """The README's main job through the real CLI, model and encoder, run once per session:
    ``profile --limit 3`` on the example data, then ``cluster --k 2`` (which profiles the
    members each segment shows). ``workspace`` is shared: copy it (:meth:`copy`) before
    writing to it."""

    workspace: Path
    profile: subprocess.CompletedProcess[str]
    cluster: subprocess.CompletedProcess[str]
    profiled_before_cluster: int
    profiled_after_cluster: int

    def copy(self, target: Path) -> Path:
        shutil.copytree(self.workspace, target)
        return target


PROFILE_LIMIT = 3


def _profile_count(workspace: Path) -> int:
    from segrec.store import Store

    with Store.open(workspace) as store:
        return store.count("profiles")


@pytest.fixture(scope="session")
def main_job(
    tmp_path_factory: pytest.TempPathFactory, example_ratings: Path, example_movies: Path
) -> MainJob:
    """One real profile → cluster run shared by the tests that need a workspace the bundled
    model profiled and named (the main-job test asserts on its output)."""
    ws = tmp_path_factory.mktemp("main-job") / "ws"
    common = ["--workspace", str(ws), "--threads", "2", "--domain", "movie", "--json"]
    profile = subprocess.run(
        [
            *segrec_cmd(),
            "profile",
            str(example_ratings),
            "--items",
            str(example_movies),
            "--limit",
            str(PROFILE_LIMIT),
            *common,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert profile.returncode == 0, profile.stderr
    before = _profile_count(ws)
    cluster = subprocess.run(
        [*segrec_cmd(), "cluster", "--k", "2", *common],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert cluster.returncode == 0, cluster.stderr
    return MainJob(ws, profile, cluster, before, _profile_count(ws))
