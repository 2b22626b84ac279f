"""A loopback OpenAI-compatible server that misbehaves on purpose: the fault battery.

It serves ``POST /v1/chat/completions`` and ``GET /v1/models`` on 127.0.0.1 (a free port)
and answers every chat request according to its ``mode``:

- ``ok``: a schema-valid answer (:func:`segrec.testing.schema_answer`) after ``latency_s``,
  many requests at once (one thread each): the latency mode used to measure concurrency;
- ``429``: HTTP 429 with ``Retry-After: retry_after_s``; ``500``: HTTP 500;
- ``hang``: says nothing for ``hang_s`` (longer than the client's timeout);
- ``html``: HTTP 200 with an HTML page; ``badjson``: HTTP 200, JSON cut off mid-way;
- ``nochoices``: ``"choices": []``; ``null``: ``message.content`` null; ``empty``: "";
- ``refusal``: ``message.refusal`` set, content null;
- ``oversized``: 50 KB of content whatever ``max_tokens`` said;
- ``mix``: a seeded random ``failure_rate`` of requests get one of the faults above (all
  but ``hang``), the rest ``ok``.

For tests and benchmarks (``with fake_openai_server("html") as server: server.base_url``),
or by hand: ``python -m segrec.fakeserver --mode mix --port 8000``. The mode can be changed
while it runs (``server.mode = "ok"``).
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from segrec.testing import schema_answer

FAULTS = ("429", "500", "hang", "html", "badjson", "nochoices", "null", "empty", "refusal")
FAULTS += ("oversized",)
MODES = ("ok", *FAULTS, "mix")
OVERSIZED_CHARS = 50_000


class FakeOpenAIServer(ThreadingHTTPServer):
    """The server; :func:`fake_openai_server` starts and stops it."""

    daemon_threads = True
    request_queue_size = 256  # many clients connecting at once must not be refused

    def __init__(
        self,
        mode: str = "ok",
        *,
        port: int = 0,
        latency_s: float = 0.0,
        retry_after_s: float = 1.0,
        hang_s: float = 30.0,
        failure_rate: float = 0.3,
        seed: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        super().__init__(("127.0.0.1", port), _Handler)
        self.mode = mode
        self.latency_s = latency_s
        self.retry_after_s = retry_after_s
        self.hang_s = hang_s
        self.failure_rate = failure_rate
        self.closing = threading.Event()
        self.requests = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.served: dict[str, int] = {}
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (timeouts, shutdown) is expected here: stay quiet."""

    def begin(self) -> str:
        """Count one chat request and pick what it gets."""
        with self._lock:
            self.requests += 1
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            mode = self.mode
            if mode == "mix":
                faults = [f for f in FAULTS if f != "hang"]
                failing = self._random.random() < self.failure_rate
                mode = self._random.choice(faults) if failing else "ok"
            self.served[mode] = self.served.get(mode, 0) + 1
            return mode

    def end(self) -> None:
        with self._lock:
            self.in_flight -= 1


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers
    server: FakeOpenAIServer

    def log_message(self, format: str, *args: Any) -> None:
        """No access log on stderr."""

    def do_GET(self) -> None:
        if self.path.rstrip("/") != "/v1/models":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        server = self.server
        mode = server.begin()
        try:
            self._answer(mode, json.loads(body))
        finally:
            server.end()

    def _answer(self, mode: str, request: dict[str, Any]) -> None:
        server = self.server
        if mode == "hang":
            server.closing.wait(server.hang_s)
            self.close_connection = True
            return
        if mode == "429":
            headers = {"Retry-After": f"{server.retry_after_s:g}"}
            self._send(429, {"error": {"message": "rate limited"}}, headers)
        elif mode == "500":
            self._send(500, {"error": {"message": "internal error"}})
        elif mode == "html":
            page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
            self._send_bytes(200, page, "text/html")
        elif mode == "badjson":
            self._send_bytes(200, b'{"id": "x", "choices": [{"message": ', "application/json")
        elif mode == "nochoices":
            self._send(200, _completion(request, choices=[]))
        elif mode in ("null", "empty", "refusal", "oversized"):
            message = {
                "null": {"role": "assistant", "content": None},
                "empty": {"role": "assistant", "content": ""},
                "refusal": {"role": "assistant", "content": None, "refusal": "I can't help."},
                "oversized": {"role": "assistant", "content": "x" * OVERSIZED_CHARS},
            }[mode]
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            self._send(200, _completion(request, choices=[choice]))
        else:
            if server.latency_s:
                server.closing.wait(server.latency_s)
            text = schema_answer(request["messages"], _schema(request))
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
            self._send(200, _completion(request, choices=[choice], text=text))

    def _send(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send_bytes(status, json.dumps(data).encode(), "application/json", headers)

    def _send_bytes(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


def _schema(request: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema a request asked for, in either ``response_format`` shape."""
    response_format = request.get("response_format") or {}
    if "schema" in response_format:
        return response_format["schema"]
    return (response_format.get("json_schema") or {}).get("schema")


def _completion(request: dict[str, Any], *, choices: list[Any], text: str = "") -> dict[str, Any]:
    prompt = sum(len(str(m.get("content", "")).split()) for m in request.get("messages", []))
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", "fake"),
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": len(text.split()),
            "total_tokens": prompt + len(text.split()),
        },
    }


@contextmanager
def fake_openai_server(mode: str = "ok", **options: Any) -> Iterator[FakeOpenAIServer]:
    """Start a :class:`FakeOpenAIServer` on a free loopback port; stop it on exit.

    Requests still hanging or waiting out their latency are released at once on exit.
    """
    server = FakeOpenAIServer(mode, **options)
    thread = threading.Thread(target=server.serve_forever, name="fake-openai", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.closing.set()
        server.shutdown()
        server.server_close()
        thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=MODES, default="ok")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per ok answer")
    parser.add_argument("--failure-rate", type=float, default=0.3, help="share failing in mix")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    server = FakeOpenAIServer(
        args.mode,
        port=args.port,
        latency_s=args.latency,
        failure_rate=args.failure_rate,
        seed=args.seed,
    )
    print(f"fake OpenAI-compatible server ({args.mode}) on {server.base_url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.closing.set()
        server.server_close()


if __name__ == "__main__":
    main()
