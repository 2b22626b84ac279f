"""The OpenAI-compatible backend against a real llama_cpp.server on loopback."""

from __future__ import annotations

import http.server
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from segrec import pipeline
from segrec.config import Settings
from segrec.errors import TransientLLMError
from segrec.llm.base import GenerationParams, RetryPolicy, complete_with_retry
from segrec.llm.openai import OpenAILLM, resolve_structured_mode
from segrec.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.server]


@pytest.fixture
def workspace(tmp_path: Path, example_ratings: Path, example_movies: Path) -> Settings:
    settings = Settings(workspace=tmp_path / "ws", domain="movie")
    pipeline.ingest(settings, example_ratings, example_movies)
    return settings


def test_profiles_through_the_server_are_valid(llama_server: str, workspace: Settings) -> None:
    llm = OpenAILLM("smollm2", base_url=llama_server, concurrency=2, timeout_s=120)
    assert llm.structured_mode == "json_object"
    users = pipeline.select_users(workspace, limit=3).user_ids
    stats = pipeline.run_profiles(workspace, users, llm=llm)
    assert stats.failed == 0 and stats.profiled + stats.fallback == 3
    assert stats.prompt_tokens > 0
    with Store.open(workspace.workspace) as store:
        records = [store.profile(u) for u in users]
    assert all(r is not None and r.model_id.startswith("openai:smollm2@127.0.0.1") for r in records)
    assert stats.profiled >= 1  # the server enforces the per-user schema


def test_timeouts_are_retried_then_reported_per_user(
    llama_server: str, workspace: Settings
) -> None:
    users = pipeline.select_users(workspace, limit=2).user_ids
    impatient = OpenAILLM("smollm2", base_url=llama_server, concurrency=1, timeout_s=0.001)
    stats = pipeline.run_profiles(workspace, users, llm=impatient)
    assert stats.failed == 2 and stats.profiled == 0 and stats.fallback == 0
    assert "APITimeoutError" in next(iter(stats.failures.values()))
    with Store.open(workspace.workspace) as store:
        assert set(store.failures()) == set(users) and store.count("profiles") == 0
    patient = OpenAILLM("smollm2", base_url=llama_server, concurrency=1, timeout_s=120)
    again = pipeline.run_profiles(workspace, users, llm=patient)
    assert again.failed == 0 and again.profiled + again.fallback == 2
    with Store.open(workspace.workspace) as store:
        assert store.failures() == {}


class FlakyProxy:
    """A loopback proxy that answers HTTP 503 to the first ``failures`` requests."""

    def __init__(self, upstream: str, failures: int) -> None:
        self.upstream, self.failures, self.requests = upstream, failures, 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                proxy.requests += 1
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if proxy.requests <= proxy.failures:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "overloaded"}}')
                    return
                request = urllib.request.Request(
                    proxy.upstream + self.path.removeprefix("/v1"),
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=120) as response:
                    payload = response.read()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FlakyProxy:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky(llama_server: str) -> Iterator[FlakyProxy]:
    with FlakyProxy(llama_server, failures=2) as proxy:
        yield proxy


def test_5xx_is_retried_with_backoff(flaky: FlakyProxy) -> None:
    llm = OpenAILLM("smollm2", base_url=flaky.url, timeout_s=120)
    sleeps: list[float] = []
    messages = [{"role": "user", "content": "Say hello."}]
    done = complete_with_retry(
        llm,
        messages,
        params=GenerationParams(max_tokens=8),
        policy=RetryPolicy(attempts=3, backoff_s=0.05),
        sleep=sleeps.append,
    )
    assert flaky.requests == 3 and len(sleeps) == 2 and done.completion_tokens > 0
    flaky.requests, flaky.failures = 0, 5
    with pytest.raises(TransientLLMError, match="HTTP 503"):
        complete_with_retry(
            llm,
            messages,
            params=GenerationParams(max_tokens=8),
            policy=RetryPolicy(attempts=2, backoff_s=0.01),
        )
    assert flaky.requests == 2


def test_structured_mode_resolution() -> None:
    assert resolve_structured_mode("auto", None) == "json_schema"
    assert resolve_structured_mode("auto", "https://api.openai.com/v1") == "json_schema"
    assert resolve_structured_mode("auto", "http://127.0.0.1:8000/v1") == "json_object"
    assert resolve_structured_mode("none", None) == "none"
