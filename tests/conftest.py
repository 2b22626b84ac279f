"""Shared fixtures. The real model and server are session-scoped: loaded once per run."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def llama_server() -> Iterator[str]:
    """A real ``python -m llama_cpp.server`` with the bundled model on a free loopback port."""
    from segrec.llm.llamacpp import bundled_model_path

    port = free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"segrec-llama-server-{port}.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(bundled_model_path()),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                "2048",
                "--n_threads",
                "2",
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(base_url + "/models", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("llama_cpp.server did not start in 120 s") from None
                time.sleep(0.5)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
