"""`segrec serve`: a real uvicorn server on a free loopback port, started and stopped here.

The example data (36 users) with the real encoder; a counting fake LLM where the test is
about caching, timeouts or failures, the bundled model for a full chat (slow). The server
runs in a thread (so a test can hand it a fake LLM) except in the CLI test, which starts
`segrec serve` as a subprocess.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from conftest import segrec_cmd
from typer.testing import CliRunner

from segrec import pipeline
from segrec.cli import app as cli_app
from segrec.config import Settings
from segrec.errors import LLMError
from segrec.http import ServeOptions, create_app
from segrec.ranker import Ranker
from segrec.serving import Recommender
from segrec.store import Store
from segrec.testing import FakeLLM, schema_answer
from segrec.workspace import Workspace

runner = CliRunner()


# ------------------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str]


@dataclass
class Client:
    base: str
    key: str | None = None

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.key is not None:
            request.add_header("Authorization", f"Bearer {self.key}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                status, text, head = response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as exc:
            status, text, head = exc.code, exc.read(), dict(exc.headers)
        assert b"Traceback" not in text and b'File "' not in text  # never a stack trace
        is_json = head.get("content-type", "").startswith("application/json")
        return Reply(status, json.loads(text) if is_json and text else text, head)

    def get(self, path: str) -> Reply:
        return self.call("GET", path)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Reply:
        return self.call("POST", path, body, **kwargs)


@contextmanager
def serving(
    settings: Settings,
    *,
    llm: Any = None,
    options: ServeOptions | None = None,
    key: str | None = None,
) -> Iterator[Client]:
    """uvicorn on a free loopback port in a thread, over a workspace with ``llm``."""
    workspace = Workspace(settings, llm=llm)
    app = create_app(settings, options or ServeOptions(reload_interval_s=0), workspace=workspace)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=free_port(), log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield Client(f"http://127.0.0.1:{config.port}", key)
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        workspace.close()


def counting_llm(model_id: str = "fake-llm") -> FakeLLM:
    return FakeLLM(default=schema_answer, model_id=model_id)


def without_ids(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "request_id"}


@pytest.fixture(scope="module")
def ws(
    tmp_path_factory: pytest.TempPathFactory, example_ratings: Path, example_movies: Path
) -> Settings:
    """The example data, profiled (fake LLM) and clustered twice (run 2 active)."""
    settings = Settings(workspace=tmp_path_factory.mktemp("http") / "ws", domain="movie")
    pipeline.ingest(settings, example_ratings, example_movies)
    users = pipeline.select_users(settings).user_ids
    pipeline.run_profiles(settings, users, llm=FakeLLM(default=schema_answer))
    for k in (3, 4):
        pipeline.run_clustering(settings, k=k, llm=FakeLLM(default=schema_answer))
    return settings


@pytest.fixture(scope="module")
def users(ws: Settings) -> list[str]:
    return pipeline.select_users(ws).user_ids


@pytest.fixture(scope="module")
def client(ws: Settings) -> Iterator[Client]:
    with serving(ws, llm=counting_llm()) as c:
        yield c


# ------------------------------------------------------------------------------ endpoints


def test_health_docs_and_openapi(client: Client) -> None:
    assert client.get("/healthz").body == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status == 200 and ready.body["status"] == "ready"
    assert ready.body["model_version"].endswith(";run=2")
    docs = client.get("/docs")
    assert docs.status == 200 and b"swagger" in docs.body.lower()
    paths = client.get("/openapi.json").body["paths"]
    assert set(paths) >= {
        "/v1/users/{user_id}/recommendations",
        "/v1/users/{user_id}/explanation",
        "/v1/users/{user_id}/segment",
        "/v1/assign",
        "/v1/recommendations",
        "/v1/segments",
        "/v1/segments/{segment_id}",
        "/v1/chat",
        "/v1/chat/{session_id}/answers",
        "/v1/chat/{session_id}",
        "/v1/admin/reload",
        "/healthz",
        "/readyz",
    }


def test_recommendations_match_the_cli_and_filters_apply(
    client: Client, ws: Settings, users: list[str]
) -> None:
    user = users[0]
    reply = client.get(f"/v1/users/{user}/recommendations?n=5")
    assert reply.status == 200
    body = reply.body
    assert set(body) == {"request_id", "model_version", "user_id", "items"}
    assert body["user_id"] == user and "interactions=" in body["model_version"]
    assert len(body["items"]) == 5
    for item in body["items"]:
        assert set(item) == {"item_id", "title", "score", "signals"}
        assert abs(sum(item["signals"].values()) - item["score"]) < 1e-3
    cli = runner.invoke(
        cli_app, ["recommend", "--user", user, "--n", "5", "--json", "-w", str(ws.workspace)]
    )
    assert [i["item_id"] for i in json.loads(cli.stdout)["items"]] == [
        i["item_id"] for i in body["items"]
    ]
    first = body["items"][0]["item_id"]
    filtered = client.get(
        f"/v1/users/{user}/recommendations?n=5&category=comedy&exclude={first},{first}"
    ).body
    with Store.open(ws.workspace) as store:
        items = store.items_frame().set_index("item_id")
        seen = set(store.interactions_frame([user])["item_id"])
    for item in filtered["items"]:
        assert "Comedy" in items.loc[item["item_id"], "categories"]
        assert item["item_id"] != first and item["item_id"] not in seen


def test_explanation_is_the_explain_object_and_reasons_are_cached(
    ws: Settings, users: list[str]
) -> None:
    llm = counting_llm("counting-llm")
    with serving(ws, llm=llm) as c:
        first = c.get(f"/v1/users/{users[1]}/explanation?n=4")
        calls = len(llm.calls)
        again = c.get(f"/v1/users/{users[1]}/explanation?n=4")
    assert first.status == 200 and calls > 0
    assert set(first.body) == {"request_id", "model_version", "user", "profile", "segment", "items"}
    assert first.body["segment"]["run"] == 2 and first.body["segment"]["why"]
    assert len(first.body["items"]) == 4 and any(
        not i["reason_fallback"] for i in first.body["items"]
    )
    for item in first.body["items"]:
        assert set(item) == {"item_id", "title", "score", "signals", "reason", "reason_fallback"}
    assert len(llm.calls) == calls  # the repeat made no LLM call
    assert without_ids(again.body) == without_ids(first.body)


def test_segments_assign_and_anonymous_recommendations(client: Client, users: list[str]) -> None:
    segments = client.get("/v1/segments").body
    assert segments["run"]["id"] == 2 and len(segments["segments"]) == 4
    assert set(segments) == {"request_id", "model_version", "run", "segments", "metrics"}
    one = client.get(f"/v1/segments/{segments['segments'][0]['id']}").body
    assert one["run"] == 2 and {"name", "description", "top_items", "share"} <= set(one)
    missing = client.get("/v1/segments/99")
    assert missing.status == 404 and "not in run 2" in missing.body["error"]

    mine = client.get(f"/v1/users/{users[0]}/segment").body
    assert mine["user_id"] == users[0] and mine["segment"]["run"] == 2
    assert {"id", "name", "distance", "margin"} <= set(mine["segment"])

    top = client.get(f"/v1/users/{users[0]}/recommendations?n=3").body["items"]
    liked = [i["item_id"] for i in top]
    placed = client.post("/v1/assign", {"items": liked})
    assert placed.status == 200
    assert {"id", "name", "distance", "margin", "sure"} <= set(placed.body["segment"])
    cold = client.post("/v1/recommendations", {"items": liked, "n": 6})
    assert cold.status == 200 and len(cold.body["items"]) == 6
    assert not set(liked) & {i["item_id"] for i in cold.body["items"]}
    assert cold.body["segment"]["id"] == placed.body["segment"]["id"]


def test_a_segment_under_the_privacy_threshold_shows_no_member_facts(
    ws: Settings, tmp_path: Path
) -> None:
    """The API, `segments --json` and `segments show --json` hide the same facts."""
    import shutil
    import sqlite3

    copy = ws.model_copy(update={"workspace": tmp_path / "ws"})
    shutil.copytree(ws.workspace, copy.workspace)
    with closing(sqlite3.connect(copy.workspace / "segrec.db")) as db, db:
        db.execute("UPDATE segments SET described = 0 WHERE run_id = 2 AND segment_id = 0")
    with Store.open(copy.workspace) as store:
        stored = {s.segment_id: s for s in store.segments(2)}
    assert stored[0].facts["top_items"] and stored[0].facts["nearest"]  # stored, not shown
    hidden = {"top_items": [], "top_categories": [], "nearest": []}
    with serving(copy, llm=counting_llm()) as client:
        one = client.get("/v1/segments/0").body
        assert {key: one[key] for key in hidden} == hidden and one["described"] is False
        other = client.get("/v1/segments/1").body
        assert other["top_items"] == stored[1].facts["top_items"]  # described: shown
        listed = {s["id"]: s for s in client.get("/v1/segments").body["segments"]}
        assert listed[0]["top_items"] == listed[0]["top_categories"] == []
        assert listed[1]["top_items"] == stored[1].facts["top_items"]
    shown = CliRunner().invoke(
        cli_app, ["segments", "show", "0", "--json", "-w", str(copy.workspace)]
    )
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert {key: data[key] for key in hidden} == hidden


def test_fifty_concurrent_requests_answer_like_sequential_ones(
    client: Client, users: list[str]
) -> None:
    paths = [f"/v1/users/{users[i % len(users)]}/recommendations?n={5 + i % 4}" for i in range(50)]
    sequential = [without_ids(client.get(p).body) for p in paths]
    with ThreadPoolExecutor(max_workers=16) as pool:
        concurrent = list(pool.map(lambda p: client.get(p), paths))
    assert all(r.status == 200 for r in concurrent)
    assert [without_ids(r.body) for r in concurrent] == sequential


@pytest.mark.parametrize("slots", [1, 2])
def test_rank_slots_bound_the_rankings_in_flight_off_the_event_loop(
    ws: Settings, users: list[str], slots: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``rank_slots`` rankings run at once per process, the rest wait; the event loop stays
    free meanwhile (/healthz answers while every slot is busy)."""
    lock, in_flight, most = threading.Lock(), [0], [0]
    full = threading.Barrier(slots + 1, timeout=60)  # the slots, and this test
    release = threading.Event()
    original = Recommender.rank

    def counted(self: Recommender, *args: Any, **kwargs: Any) -> Any:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
            first_wave = in_flight[0] <= slots and not release.is_set()
        if first_wave:
            full.wait()  # passes only once `slots` rankings run at the same time
            assert release.wait(60)
        try:
            return original(self, *args, **kwargs)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(Recommender, "rank", counted)
    paths = [f"/v1/users/{users[i]}/recommendations?n=3" for i in range(slots + 3)]
    options = ServeOptions(reload_interval_s=0, rank_slots=slots)
    with (
        serving(ws, llm=counting_llm(), options=options) as c,
        ThreadPoolExecutor(max_workers=len(paths)) as pool,
    ):
        replies = [pool.submit(c.get, p) for p in paths]
        full.wait()  # every slot is busy now
        assert c.get("/healthz").body == {"status": "ok"}
        time.sleep(0.5)  # the queued requests had time to start, were they allowed to
        with lock:
            assert in_flight[0] == slots
        release.set()
        assert all(r.result().status == 200 for r in replies)
    assert most[0] == slots
    with pytest.raises(ValueError, match="rank_slots"):
        ServeOptions(rank_slots=-1)
    assert ServeOptions().rank_slots == 1  # one ranking at a time per process by default


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "says"),
    [
        ("GET", "/v1/users/nobody/recommendations", None, 404, "unknown user id 'nobody'"),
        ("GET", "/v1/users/nobody/explanation", None, 404, "unknown user id 'nobody'"),
        ("GET", "/v1/users/nobody/segment", None, 404, "unknown user id 'nobody'"),
        ("GET", "/v1/users/{user}/recommendations?n=0", None, 422, "n:"),
        ("GET", "/v1/users/{user}/recommendations?n=lots", None, 422, "n:"),
        ("GET", "/v1/users/{user}/explanation?n=5000", None, 422, "n:"),
        ("GET", "/v1/users/{user}/recommendations?category=Jazz", None, 422, "'Jazz'"),
        ("GET", "/v1/users/{user}/recommendations?exclude=nope", None, 422, "'nope'"),
        ("POST", "/v1/assign", {"items": []}, 422, "items:"),
        ("POST", "/v1/assign", {"items": ["nope"]}, 422, "unknown item id 'nope'"),
        ("POST", "/v1/assign", {"item": ["1"]}, 422, "item"),
        ("POST", "/v1/recommendations", {"items": ["1"], "n": 0}, 422, "n:"),
        ("POST", "/v1/chat", {"max_questions": 0}, 422, "max_questions:"),
        ("POST", "/v1/chat/nosuch/answers", {"answer": "1"}, 404, "no open chat session"),
        ("DELETE", "/v1/chat/nosuch", None, 404, "no open chat session"),
        ("GET", "/v1/nothing-here", None, 404, "Not Found"),
        ("PUT", "/v1/assign", {"items": ["1"]}, 405, "Method Not Allowed"),
    ],
)
def test_bad_input_is_a_clear_4xx(
    client: Client,
    users: list[str],
    method: str,
    path: str,
    body: Any,
    status: int,
    says: str,
) -> None:
    reply = client.call(method, path.replace("{user}", users[0]), body)
    assert reply.status == status, reply.body
    assert says in reply.body["error"] and reply.body["hint"]


def test_bad_json_and_oversized_bodies_are_refused(client: Client) -> None:
    bad = client.post("/v1/assign", raw=b'{"items": [1, ')
    assert bad.status == 400 and "not valid JSON" in bad.body["error"]
    huge = json.dumps({"items": ["1"] * 40_000}).encode()
    assert len(huge) > 64 * 1024
    too_big = client.post("/v1/assign", raw=huge)
    assert too_big.status == 413 and "larger than" in too_big.body["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"items": ['
        for _ in range(20):
            yield b'"1",' * 1000
        yield b'"1"]}'

    request = urllib.request.Request(client.base + "/v1/assign", data=chunks(), method="POST")
    request.add_header("Content-Type", "application/json")
    request.add_header("Transfer-Encoding", "chunked")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 413
    assert "larger than" in json.loads(caught.value.read())["error"]


def test_auth_on_and_off(ws: Settings, users: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGREC_TEST_KEY", "s3cret-key")
    path = f"/v1/users/{users[0]}/recommendations?n=2"
    with serving(ws, options=ServeOptions(api_key_env="SEGREC_TEST_KEY", reload_interval_s=0)) as c:
        assert c.get("/healthz").status == 200 and c.get("/readyz").status == 200
        none = c.get(path)
        assert none.status == 401 and none.headers.get("www-authenticate") == "Bearer"
        assert "Bearer" in none.body["hint"]
        wrong = Client(c.base, key="s3cret-kez").get(path)
        assert wrong.status == 401
        basic = c.call("GET", path, headers={"Authorization": "Basic czNjcmV0LWtleQ=="})
        assert basic.status == 401
        assert Client(c.base, key="s3cret-key").get(path).status == 200
    with serving(ws) as open_server:
        assert open_server.get(path).status == 200


# ------------------------------------------------------------------------------ faults


def test_a_hanging_or_failing_llm_gives_templates_never_a_5xx(
    ws: Settings, users: list[str]
) -> None:
    release = threading.Event()

    def hang(messages: Any, schema: Any) -> str:
        release.wait(30)
        return schema_answer(messages, schema)

    options = ServeOptions(reload_interval_s=0, llm_timeout_s=0.5)
    try:
        with serving(ws, llm=FakeLLM(default=hang, model_id="hanging"), options=options) as c:
            start = time.monotonic()
            reply = c.get(f"/v1/users/{users[2]}/explanation?n=3")
            assert reply.status == 200 and time.monotonic() - start < 20
            assert all(i["reason_fallback"] for i in reply.body["items"])
            chat = c.post("/v1/chat", {"max_questions": 3})
            assert chat.status == 200 and chat.body["question"]["text"]
    finally:
        release.set()
    failing = FakeLLM(default=LLMError("backend exploded"), model_id="failing")
    with serving(ws, llm=failing) as c:
        reply = c.get(f"/v1/users/{users[3]}/explanation?n=3")
        assert reply.status == 200 and all(i["reason_fallback"] for i in reply.body["items"])


# ------------------------------------------------------------------------------ chat


def _answer_until_done(c: Client, session: str, answers: list[str]) -> dict[str, Any]:
    for answer in answers:
        reply = c.post(f"/v1/chat/{session}/answers", {"answer": answer})
        assert reply.status == 200, reply.body
        if reply.body["done"]:
            return reply.body
    raise AssertionError("the chat did not finish")


def test_a_chat_survives_a_restart_and_ends_with_items(ws: Settings) -> None:
    with serving(ws, llm=counting_llm()) as c:
        start = c.post("/v1/chat", {"max_questions": 3, "n": 4})
        assert start.status == 200 and not start.body["done"]
        session, first = start.body["session_id"], start.body["question"]
        assert first["options"] and set(first) == {
            "text",
            "options",
            "recommended_from",
            "segments",
            "fallback",
            "open",
        }
        second = c.post(f"/v1/chat/{session}/answers", {"answer": "1"}).body
        assert not second["done"] and second["question"]["open"]  # favourites, own words
    with serving(ws, llm=counting_llm()) as c:  # a new process: the session is in the store
        done = _answer_until_done(c, session, ["skip", "2", "1", "1"])
        assert done["profile"]["summary"] and len(done["items"]) == 4
        assert done["segment"]["run"] == 2
        for item in done["items"]:
            assert {"item_id", "title", "score", "signals", "reason", "reason_fallback"} == set(
                item
            )
        again = c.post(f"/v1/chat/{session}/answers", {"answer": "1"})
        assert again.status == 404  # finished sessions are removed
        other = c.post("/v1/chat").body["session_id"]
        assert c.call("DELETE", f"/v1/chat/{other}").status == 204
        assert c.post(f"/v1/chat/{other}/answers", {"answer": "1"}).status == 404


@pytest.mark.slow
def test_a_full_chat_over_http_on_the_real_model(ws: Settings, local_llm: Any) -> None:
    with serving(
        ws, llm=local_llm, options=ServeOptions(reload_interval_s=0, llm_timeout_s=120)
    ) as c:
        start = c.post("/v1/chat", {"max_questions": 3, "n": 3}).body
        assert start["question"]["text"].endswith("?")
        done = _answer_until_done(c, start["session_id"], ["1", "Toy Story, Heat", "2", "1"])
    assert done["segment"] is not None and len(done["items"]) == 3
    for item in done["items"]:
        if not item["reason_fallback"]:
            assert item["reason"].startswith("Because you liked ")


# ------------------------------------------------------------------------------ reload


def test_reload_under_load_swaps_models_without_losing_a_request(
    ws: Settings, users: list[str]
) -> None:
    options = ServeOptions(reload_interval_s=0.2)
    with serving(ws, options=options) as c:
        before = c.get("/readyz").body["model_version"]
        stop = threading.Event()
        replies: list[Reply] = []

        def load() -> None:
            i = 0
            while not stop.is_set():
                replies.append(c.get(f"/v1/users/{users[i % len(users)]}/recommendations?n=3"))
                i += 1

        workers = [threading.Thread(target=load) for _ in range(4)]
        for worker in workers:
            worker.start()
        try:
            time.sleep(0.5)
            with Store.open(ws.workspace) as store:
                store.set_active_run(1)  # noticed by the poller
            deadline = time.monotonic() + 180
            while c.get("/readyz").body["model_version"] == before:
                assert time.monotonic() < deadline, "the server did not notice the new run"
                time.sleep(0.1)
            forced = c.post("/v1/admin/reload").body
            assert forced["model_version"].endswith(";run=1") and forced["previous"].endswith(
                ";run=1"
            )
            time.sleep(0.5)
        finally:
            stop.set()
            for worker in workers:
                worker.join()
            with Store.open(ws.workspace) as store:
                store.set_active_run(2)
    assert replies and all(r.status == 200 for r in replies)
    versions = [r.body["model_version"] for r in replies]
    assert versions[0] == before and any(v.endswith(";run=1") for v in versions)


# ------------------------------------------------------------------------------ CLI


def test_the_second_cli_call_loads_the_saved_models(
    tmp_path: Path,
    example_ratings: Path,
    example_movies: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings(workspace=tmp_path / "ws")
    pipeline.ingest(settings, example_ratings, example_movies)
    user = pipeline.select_users(settings).user_ids[0]
    fits = []

    class Counted(Ranker):  # the served ranker's fits (tuning fits its own, elsewhere)
        def fit(self, *args: Any, **kwargs: Any) -> Counted:
            fits.append(1)
            return super().fit(*args, **kwargs)

    monkeypatch.setattr("segrec.workspace.Ranker", Counted)
    args = ["recommend", "--user", user, "--n", "5", "--json", "-w", str(settings.workspace)]
    first = runner.invoke(cli_app, args)
    assert first.exit_code == 0 and len(fits) == 1
    second = runner.invoke(cli_app, args)
    assert second.exit_code == 0 and len(fits) == 1  # loaded, not refit
    assert json.loads(second.stdout) == json.loads(first.stdout)
    saved = [p for p in (settings.workspace / "models").iterdir()]
    assert len(saved) == 1 and (saved[0] / "manifest.json").is_file()
    # Another run: a refit, and both sets kept; new data: the older data's sets removed.
    users = pipeline.select_users(settings).user_ids
    pipeline.run_profiles(settings, users, llm=FakeLLM(default=schema_answer))
    pipeline.run_clustering(settings, k=3, llm=FakeLLM(default=schema_answer))
    with Workspace(settings) as workspace:
        assert workspace.recommender().fitted and len(fits) == 2
        assert not workspace.recommender().fitted and len(fits) == 2
    kept = sorted(p.name for p in (settings.workspace / "models").iterdir())
    assert len(kept) == 2 and saved[0].name in kept
    more = tmp_path / "more.csv"
    more.write_text(example_ratings.read_text() + f"{user},1,4.0,1500000000\n")
    pipeline.ingest(settings, more, example_movies)
    with Workspace(settings) as workspace:
        assert workspace.recommender().fitted and len(fits) == 3
    assert len(list((settings.workspace / "models").iterdir())) == 1


def test_segrec_serve_as_a_process(ws: Settings, users: list[str], tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "SEGREC_TEST_KEY": "k-123"}
    command = [
        *segrec_cmd(), "serve", "--port", str(port), "--api-key-env", "SEGREC_TEST_KEY",
        "--reload-interval", "0", "--no-access-log", "--rank-slots", "2", "-w", str(ws.workspace),
    ]  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    c = Client(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if c.get("/readyz").status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        path = f"/v1/users/{users[0]}/recommendations?n=3"
        assert c.get(path).status == 401
        assert Client(c.base, key="k-123").get(path).status == 200
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "127.0.0.1" in log.read_text()
    missing = runner.invoke(
        cli_app, ["serve", "--api-key-env", "SEGREC_UNSET_KEY", "-w", str(ws.workspace)]
    )
    assert missing.exit_code == 2 and "SEGREC_UNSET_KEY" in missing.stderr
    assert missing.stderr.count("\n") == 1
    nowhere = runner.invoke(cli_app, ["serve", "-w", str(tmp_path / "none")])
    assert nowhere.exit_code == 2 and "no segrec workspace here" in nowhere.stderr
