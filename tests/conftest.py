"""Shared fixtures. The real model and server are session-scoped: loaded once per run."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
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
