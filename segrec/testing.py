"""Deterministic fakes for fast unit tests: an LLM with queued answers, a hashing encoder.

They never stand in for the real model or encoder in the test that shows a feature works;
each stage also has a test on the bundled model and encoder.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segrec.llm.base import Completion, GenerationParams, Message

Response = str | Exception | Callable[[Sequence[Message], dict[str, Any] | None], str]


@dataclass
class FakeLLM:
    """Answers from a queue (strings, exceptions to raise, or callables); records every call.

    When the queue is empty, ``default`` answers (a callable gets the messages and schema).
    """

    responses: list[Response] = field(default_factory=list)
    default: Response | None = None
    model_id: str = "fake-llm"
    concurrency: int = 1
    calls: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def complete(
        self,
        messages: Sequence[Message],
        *,
        params: GenerationParams,
        schema: dict[str, Any] | None = None,
    ) -> Completion:
        with self._lock:
            self.calls.append({"messages": list(messages), "params": params, "schema": schema})
            response = self.responses.pop(0) if self.responses else self.default
        if response is None:
            raise AssertionError("FakeLLM has no response queued and no default")
        if isinstance(response, Exception):
            raise response
        text = response(messages, schema) if callable(response) else response
        prompt_tokens = sum(len(m["content"].split()) for m in messages)
        return Completion(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(text.split()),
            latency_s=0.0,
            finish_reason="stop",
        )


class FakeEncoder:
    """Hashing bag-of-words vectors, L2-normalised: texts sharing words are close."""

    def __init__(self, dim: int = 64, encoder_id: str = "fake-encoder") -> None:
        self.dim = dim
        self.encoder_id = encoder_id
        self.calls: list[list[str]] = []

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                digest = hashlib.sha256(word.encode()).digest()
                out[row, int.from_bytes(digest[:4], "little") % self.dim] += 1.0
            if not out[row].any():
                out[row, 0] = 1.0
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out


@contextmanager
def llama_server(*, threads: int = 2, log: Path | None = None) -> Iterator[str]:
    """A real ``python -m llama_cpp.server`` with the bundled model on a free loopback port.

    Yields its OpenAI-compatible base URL; the server is stopped on exit. For tests and
    benchmarks of the OpenAI backend.
    """
    from segrec.llm.llamacpp import bundled_model_path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(bundled_model_path()),
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
        "--n_threads", str(threads),
    ]  # fmt: skip
    with open(log or os.devnull, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                tail = log.read_text()[-2000:] if log else ""
                raise RuntimeError(f"llama_cpp.server exited: {tail}")
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


def _unescape(literal: str) -> str:
    return literal.replace("[.]", ".").replace("\\", "")


def _first_reason(pattern: str) -> str:
    """The first reason a reason grammar allows: its first liked title and that title's
    first clause (a fact grammar), or its first anchor and a few words (a free one)."""
    body = pattern.removeprefix("^Because you liked (")
    title, sep, rest = body.partition(", (")
    if sep and not title.count("|"):
        shared = re.match(r"another \(([^|)]*)(?:\|[^)]*)?\) ([a-z]+)", rest)
        if rest.startswith("another") and shared:
            clause = f"another {_unescape(shared.group(1))} {shared.group(2)}"
        else:
            clause = "and people who liked it also liked this"
        return f"Because you liked {_unescape(title)}, {clause}."
    anchor = re.match(r"((?:\\.|[^|)\\])*)", body)
    if anchor is None:
        raise ValueError("reason schema without anchors")
    return f"Because you liked {_unescape(anchor.group(1))}, this fits your taste."


def schema_answer(messages: Sequence[Message], schema: dict[str, Any] | None) -> str:
    """A valid answer to any schema segrec sends, for `FakeLLM(default=schema_answer)`.

    Profiles take the first two like options; segment labels a fixed name; reasons take the
    first liked title and clause their grammar offers.
    """
    import json

    if schema is None:
        raise ValueError("schema_answer answers structured requests only")
    props = schema["properties"]
    if "summary" in props:
        likes = props["likes"]["items"].get("enum", [])[:2]
        return json.dumps(
            {
                "likes": likes,
                "dislikes": [],
                "favourite_items": [],
                "themes": [],
                "summary": "This user mostly enjoys " + " and ".join(likes or ["films"]) + ".",
            }
        )
    if "reason" in props:
        return json.dumps({"reason": _first_reason(props["reason"]["pattern"])})
    return json.dumps({"name": "Fans", "description": "Members like films."})


# ------------------------------------------------------------------------------ browser

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)  # fmt: skip


def chromium_path() -> str | None:
    """Debian's ``chromium`` (``.ci/run`` installs it), or another Chromium on PATH."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


@dataclass
class PageVisit:
    """What a page did in a real browser: its DOM after scripts ran, a screenshot, the URL of
    every request it sent (the page's own, from the DevTools Network domain; the browser's
    background traffic is not the page's), and its script errors and console errors."""

    dom: str
    screenshot: bytes
    requests: list[str]
    errors: list[str]
    value: Any = None  # what the ``evaluate`` expression returned


def visit_page(
    url: str,
    *,
    ready: str = "document.readyState === 'complete'",
    evaluate: str = "null",
    width: int = 1400,
    height: int = 1800,
    timeout: float = 120.0,
) -> PageVisit:
    """Open ``url`` in headless Chromium driven over the DevTools protocol (on a pipe, so no
    port is opened), wait until the JavaScript expression ``ready`` is true, then read the
    DOM, evaluate ``evaluate`` (returned by value) and take a screenshot of the viewport."""
    import base64
    import json
    import queue
    import tempfile

    exe = chromium_path()
    if exe is None:
        raise FileNotFoundError("chromium is not installed — apt-get install chromium")
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()

    def wire_fds() -> None:  # Chromium reads commands on fd 3 and answers on fd 4
        os.dup2(to_chrome_r, 3)
        os.dup2(from_chrome_w, 4)

    with tempfile.TemporaryDirectory(prefix="segrec-chromium-") as profile:
        process = subprocess.Popen(
            [
                exe,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                "--remote-debugging-pipe",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            pass_fds=(3, 4),
            preexec_fn=wire_fds,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        inbox: queue.Queue[dict[str, Any]] = queue.Queue()

        def read() -> None:
            buffer = b""
            with os.fdopen(from_chrome_r, "rb", buffering=0) as pipe:
                while chunk := pipe.read(65536):
                    buffer += chunk
                    *messages, buffer = buffer.split(b"\0")
                    for message in messages:
                        inbox.put(json.loads(message))

        threading.Thread(target=read, daemon=True).start()
        writer = os.fdopen(to_chrome_w, "wb", buffering=0)
        events: list[dict[str, Any]] = []
        counter = iter(range(1, 1_000_000))
        deadline = time.monotonic() + timeout

        def call(method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
            ident = next(counter)
            message: dict[str, Any] = {"id": ident, "method": method, "params": params}
            if session:
                message["sessionId"] = session
            writer.write(json.dumps(message).encode() + b"\0")
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"chromium: no answer to {method} in {timeout} s")
                reply = inbox.get(timeout=left)
                if reply.get("id") == ident:
                    if "error" in reply:
                        raise RuntimeError(f"chromium: {method}: {reply['error']}")
                    return reply.get("result", {})
                events.append(reply)

        try:
            target = call("Target.createTarget", url="about:blank")["targetId"]
            session = call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Network", "Runtime", "Log", "Page"):
                call(f"{domain}.enable", session)
            call(
                "Emulation.setDeviceMetricsOverride",
                session,
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
            call("Page.navigate", session, url=url)
            while not call("Runtime.evaluate", session, expression=ready, returnByValue=True)[
                "result"
            ].get("value"):
                time.sleep(0.2)
            time.sleep(1.0)  # let the last frame paint
            dom = call(
                "Runtime.evaluate",
                session,
                expression="document.documentElement.outerHTML",
                returnByValue=True,
            )["result"]["value"]
            value = call("Runtime.evaluate", session, expression=evaluate, returnByValue=True)[
                "result"
            ].get("value")
            shot = base64.b64decode(call("Page.captureScreenshot", session, format="png")["data"])
            call("Browser.close")
        finally:
            writer.close()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    while not inbox.empty():
        events.append(inbox.get())
    requests, errors = [], []
    for event in events:
        params = event.get("params", {})
        if event.get("method") == "Network.requestWillBeSent":
            requests.append(params["request"]["url"])
        elif event.get("method") == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            errors.append(details.get("exception", {}).get("description") or details["text"])
        elif event.get("method") == "Log.entryAdded" and params["entry"]["level"] == "error":
            errors.append(params["entry"]["text"])
        elif event.get("method") == "Runtime.consoleAPICalled" and params["type"] == "error":
            errors.append(" ".join(str(a.get("value", "")) for a in params["args"]))
    return PageVisit(dom=dom, screenshot=shot, requests=requests, errors=errors, value=value)
