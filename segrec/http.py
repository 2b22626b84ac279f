"""`segrec serve`: an HTTP API (FastAPI) over one workspace and its fitted recommender.

The recommender is loaded once, in the app's lifespan, and swapped for a new one when the
data or the active run change (polled every few seconds) or on ``POST /v1/admin/reload``;
a request keeps the recommender it started with, so a swap never drops one. Chat sessions
live in the workspace, so they survive a restart and any worker can continue them.

Safe by default: loopback only unless told otherwise, an optional Bearer key compared in
constant time, a body size limit, clear 4xx answers (``{"error", "hint"}``), no stack trace
in any answer, and the LLM behind a bound on calls in flight with a deadline, so a slow or
broken LLM gives template reasons and questions, never a 5xx.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import Body, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from threadpoolctl import threadpool_limits

from segrec.config import Settings
from segrec.errors import InputError, SegrecError, WorkspaceError
from segrec.llm.bounded import BoundedLLM
from segrec.serving import MAX_N, Filters, Recommender, UnknownUserError, segment_json
from segrec.workspace import Workspace

log = logging.getLogger("segrec.http")

ENV_OPTIONS = "SEGREC_SERVE_OPTIONS"  # how `segrec serve --workers N` configures workers
MAX_ID = 256
MAX_ITEMS = 1000
MAX_ANSWER = 2000
DRAIN_BYTES = 4 * 1024 * 1024  # a refused body read and dropped, beyond that the socket closes
T = TypeVar("T")
ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


class ServeOptions(BaseModel):
    """How the server runs (beside the workspace `Settings`)."""

    model_config = ConfigDict(extra="forbid")

    api_key_env: str | None = None  # environment variable holding the Bearer key
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    reload_interval_s: float = Field(5.0, ge=0)  # 0: only POST /v1/admin/reload
    llm_slots: int = Field(1, ge=1, le=64)  # LLM calls in flight
    llm_timeout_s: float = Field(30.0, gt=0)  # per LLM call, then the template
    # Rankings computed at once per worker process, the rest wait in arrival order; 0: no
    # bound but the thread pool's. 1 gave the lowest p99 and the most requests/s at
    # concurrency 8 and 32 with one worker and with two (rankings are CPU work under the
    # GIL: parallel ones in a process only stretch each other; benchmarks/results/serve.md).
    rank_slots: int = Field(1, ge=0, le=64)


# ------------------------------------------------------------------------------ schemas


class Item(BaseModel):
    item_id: str
    title: str
    score: float
    signals: dict[str, float]


class Recommendations(BaseModel):
    request_id: str
    model_version: str
    user_id: str
    items: list[Item]


class ExplainedItem(Item):
    reason: str
    reason_fallback: bool


class Explanation(BaseModel):
    """`segrec explain --json`, plus request_id and model_version."""

    request_id: str
    model_version: str
    user: str
    profile: dict[str, Any]
    segment: dict[str, Any] | None
    items: list[ExplainedItem]


class UserSegment(BaseModel):
    request_id: str
    model_version: str
    user_id: str
    segment: dict[str, Any]


class ItemsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[Annotated[str, Field(min_length=1, max_length=MAX_ID)]] = Field(
        min_length=1, max_length=MAX_ITEMS, description="Item ids the visitor liked."
    )


class ColdStartIn(ItemsIn):
    n: int = Field(10, ge=1, le=MAX_N)


class Placement(BaseModel):
    request_id: str
    model_version: str
    segment: dict[str, Any] | None


class ColdStart(Placement):
    items: list[Item]


class Segments(BaseModel):
    """`segrec segments --json`, plus request_id and model_version."""

    request_id: str
    model_version: str
    run: dict[str, Any]
    segments: list[dict[str, Any]]
    metrics: dict[str, Any]


class ChatStartIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_questions: int = Field(5, ge=1, le=20)
    n: int = Field(10, ge=1, le=MAX_N)


class AnswerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    answer: str = Field(max_length=MAX_ANSWER)


class ChatQuestion(BaseModel):
    text: str
    options: list[str]
    recommended_from: int | None = None  # options from this number on: current recommendations
    segments: list[int]
    fallback: bool
    open: bool


class ChatTurn(BaseModel):
    """The next question, or (``done``) the profile, segment and items with reasons."""

    request_id: str
    model_version: str
    session_id: str
    done: bool
    question: ChatQuestion | None = None
    profile: dict[str, Any] | None = None
    segment: dict[str, Any] | None = None
    items: list[ExplainedItem] | None = None
    notes: list[str] = Field(default_factory=list)


class Reloaded(BaseModel):
    model_version: str
    previous: str
    reloaded: bool


# ------------------------------------------------------------------------------ service


class Service:
    """The state one server process holds: the workspace and the current recommender."""

    def __init__(self, workspace: Workspace, options: ServeOptions) -> None:
        self.workspace = workspace
        self.options = options
        self.llm = BoundedLLM(
            _LazyLLM(workspace), slots=options.llm_slots, timeout_s=options.llm_timeout_s
        )
        self.recommender: Recommender | None = None
        self.ranking: anyio.CapacityLimiter | None = None  # made on first use, in the loop
        self._reload = threading.Lock()
        self._sessions: dict[str, threading.Lock] = {}
        self._sessions_lock = threading.Lock()

    def current(self) -> Recommender:
        recommender = self.recommender
        if recommender is None:
            raise HTTPException(503, "the models are still loading — retry shortly")
        return recommender

    async def rank(self, work: Callable[[], T]) -> T:
        """Run ranking ``work`` in a worker thread, off the event loop: at most
        ``options.rank_slots`` at once (first come, first served), or (0) the thread pool's."""
        if self.ranking is None:
            slots = self.options.rank_slots
            self.ranking = (
                anyio.CapacityLimiter(slots)
                if slots
                else anyio.to_thread.current_default_thread_limiter()
            )
        return await anyio.to_thread.run_sync(work, limiter=self.ranking)

    def reload(self, *, force: bool = False) -> tuple[str, str, bool]:
        """Build the recommender for the data and run now, and swap it in (one assignment:
        requests in flight keep the old one). Without ``force`` only when they changed."""
        with self._reload:
            old = self.recommender
            previous = str(old.version) if old is not None else ""
            if not force and old is not None and self.workspace.version() == old.version:
                return previous, previous, False
            fresh = self.workspace.recommender()
            self.recommender = fresh
            if old is not None:
                log.info("segrec: reloaded %s -> %s", previous, fresh.version)
            return str(fresh.version), previous, True

    def session_lock(self, session_id: str) -> threading.Lock:
        with self._sessions_lock:
            return self._sessions.setdefault(session_id, threading.Lock())

    def forget_session(self, session_id: str) -> None:
        with self._sessions_lock:
            self._sessions.pop(session_id, None)


class _LazyLLM:
    """The workspace's LLM, built on first use (the server starts without loading it;
    recommendations never need it)."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace

    @property
    def model_id(self) -> str:
        return self.workspace.llm.model_id

    @property
    def concurrency(self) -> int:
        return int(getattr(self.workspace.llm, "concurrency", 1))

    def complete(self, messages: Any, *, params: Any, schema: Any = None) -> Any:
        return self.workspace.llm.complete(messages, params=params, schema=schema)


# ------------------------------------------------------------------------------ guard


class Guard:
    """Bearer key on ``/v1`` (constant-time comparison) and a request body size limit,
    checked before a route runs; answers are JSON like every other error."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body: int) -> None:
        self.app = app
        self.key = api_key.encode() if api_key is not None else None
        self.max_body = max_body

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"].startswith("/v1"):
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)):
                await _send_json(
                    send,
                    401,
                    _error(
                        "missing or wrong API key",
                        "send the header 'Authorization: Bearer <key>'",
                    ),
                    [(b"www-authenticate", b"Bearer")],
                )
                return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _drain(receive, DRAIN_BYTES)
            await _send_json(send, 413, _too_large(self.max_body))
            return
        received = 0

        async def limited() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:  # a chunked body without a length
                    if message.get("more_body"):
                        await _drain(receive, DRAIN_BYTES)
                    raise HTTPException(413, _too_large(self.max_body)["error"])
            return message

        await self.app(scope, limited, send)


async def _drain(receive: Any, limit: int) -> None:
    """Read and drop the rest of a refused body (up to ``limit`` bytes), so the client,
    still sending, reads the answer instead of a reset connection."""
    dropped = 0
    while dropped <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        if not message.get("more_body"):
            return


def _too_large(limit: int) -> dict[str, str]:
    return _error(f"request body larger than {limit} bytes", "send a smaller body")


def _error(error: str, hint: str) -> dict[str, str]:
    return {"error": error, "hint": hint}


async def _send_json(
    send: Any, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()
) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


# ------------------------------------------------------------------------------ app


def create_app(
    settings: Settings,
    options: ServeOptions | None = None,
    *,
    workspace: Workspace | None = None,
) -> FastAPI:
    """The API over ``settings.workspace`` (or an open ``workspace``: tests pass one with
    fake backends). With ``options.api_key_env`` set the key must be in that variable."""
    options = options or ServeOptions()
    api_key = None
    if options.api_key_env is not None:
        api_key = os.environ.get(options.api_key_env, "")
        if not api_key:
            raise InputError(
                f"--api-key-env {options.api_key_env}: the variable is unset or empty — "
                "export the key in it first"
            )
    ws = workspace if workspace is not None else Workspace(settings)
    service = Service(ws, options)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One BLAS thread per request: requests already run in parallel threads, and
        # OpenBLAS's own threads on top of them thrash (benchmarks/results/serve.md).
        blas = threadpool_limits(limits=1, user_api="blas")
        await run_in_threadpool(service.reload)
        watcher = asyncio.create_task(_watch(service)) if options.reload_interval_s else None
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            blas.restore_original_limits()
            if workspace is None:
                ws.close()

    app = FastAPI(
        title="segrec",
        summary="Explained recommendations, segments and cold-start chat over one workspace.",
        version="1",
        lifespan=lifespan,
    )
    app.state.service = service
    _handlers(app)
    _routes(app, service)
    app.add_middleware(Guard, api_key=api_key, max_body=options.max_body_bytes)
    return app


async def _watch(service: Service) -> None:
    """Poll the data version and active run; reload when they change."""
    while True:
        await asyncio.sleep(service.options.reload_interval_s)
        try:
            await run_in_threadpool(service.reload)
        except Exception:  # keep serving the old models; say why in the server log
            log.exception("segrec: reload failed, still serving the previous models")


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            return JSONResponse(
                _error("request body is not valid JSON", "send a JSON object"), status_code=400
            )
        field = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path"))
        where = field or "body"
        return JSONResponse(
            {
                **_error(f"{where}: {first['msg']}", "fix that field and retry"),
                "field": where,
                "detail": [
                    {"field": ".".join(map(str, e["loc"])), "message": e["msg"]} for e in errors
                ],
            },
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        hints = {
            404: "see /docs for the endpoints",
            405: "see /docs for the methods",
            413: "send a smaller body",
            503: "retry shortly",
        }
        return JSONResponse(
            _error(str(exc.detail), hints.get(exc.status_code, "see /docs")),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(UnknownUserError)
    async def unknown_user(request: Request, exc: UnknownUserError) -> JSONResponse:
        return JSONResponse(
            _error(str(exc).split(" — ")[0], "list users with `segrec users`"), status_code=404
        )

    @app.exception_handler(SegrecError)
    async def segrec_error(request: Request, exc: SegrecError) -> JSONResponse:
        message, _, hint = str(exc).partition(" — ")
        status = 409 if isinstance(exc, WorkspaceError) else 422
        return JSONResponse(_error(message, hint or "see /docs"), status_code=status)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        request_id = uuid.uuid4().hex
        log.error("segrec: request %s failed", request_id, exc_info=exc)
        return JSONResponse(
            {
                **_error("internal error", "retry; if it persists, see the server log"),
                "request_id": request_id,
            },
            status_code=500,
        )


UserId = Annotated[str, Path(min_length=1, max_length=MAX_ID)]
N = Annotated[int, Query(ge=1, le=MAX_N, description="How many items.")]


def _routes(app: FastAPI, service: Service) -> None:
    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    def readyz() -> JSONResponse:
        """The models are loaded (503 until then)."""
        recommender = service.recommender
        if recommender is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready", "model_version": str(recommender.version)})

    @app.get("/v1/users/{user_id}/recommendations", tags=["users"])
    async def recommendations(
        user_id: UserId,
        n: N = 10,
        category: Annotated[list[str] | None, Query(description="Only these categories.")] = None,
        exclude: Annotated[
            list[str] | None, Query(description="Item ids to leave out (repeat or comma-separate).")
        ] = None,
    ) -> Recommendations:
        """Top-n unseen items for a known user, with each signal's part (no LLM)."""
        recommender = service.current()
        filters = Filters(
            categories=list(category or []),
            exclude=[i.strip() for part in exclude or [] for i in part.split(",") if i.strip()],
        )
        return await service.rank(lambda: _recommendations(recommender, user_id, n, filters))

    @app.get("/v1/users/{user_id}/explanation", tags=["users"])
    def explanation(user_id: UserId, n: N = 5) -> Explanation:
        """Profile, segment and top-n items with a reason each (LLM reasons are cached in
        the workspace; a slow or failing LLM gives marked template reasons)."""
        recommender = service.current()
        data, _ = recommender.explain(user_id, n=n, writer=recommender.writer(service.llm))
        return Explanation(
            request_id=uuid.uuid4().hex, model_version=str(recommender.version), **data
        )

    @app.get("/v1/users/{user_id}/segment", tags=["users"])
    def user_segment(user_id: UserId) -> UserSegment:
        """The user's segment in the active run (assigned now if profiled after it)."""
        recommender = service.current()
        store = recommender.workspace.store
        if not store.has_user(user_id):
            raise UnknownUserError(f"unknown user id {user_id!r}")
        if recommender.run is None:
            raise WorkspaceError("no clustering run yet — run `segrec cluster --k 5` first")
        from segrec.profile import Profile

        record = store.profile(user_id)
        profile = Profile.model_validate(record.profile) if record else None
        segment = recommender.segment_of(user_id, profile)
        assert segment is not None
        return UserSegment(
            request_id=uuid.uuid4().hex,
            model_version=str(recommender.version),
            user_id=user_id,
            segment=segment,
        )

    @app.post("/v1/assign", tags=["new users"])
    def assign(body: ItemsIn) -> Placement:
        """The nearest segment for a set of liked items (distance, margin); nothing stored."""
        recommender = service.current()
        if recommender.run is None:
            raise WorkspaceError("no clustering run yet — run `segrec cluster --k 5` first")
        segment, _ = recommender.for_items(body.items, n=1)
        return Placement(
            request_id=uuid.uuid4().hex, model_version=str(recommender.version), segment=segment
        )

    @app.post("/v1/recommendations", tags=["new users"])
    async def cold_start(body: ColdStartIn) -> ColdStart:
        """An anonymous visitor: top-n items from the items they liked (the cold-start
        path of the chat), and their nearest segment; nothing stored."""
        recommender = service.current()
        segment, items = await service.rank(lambda: recommender.for_items(body.items, n=body.n))
        return ColdStart(
            request_id=uuid.uuid4().hex,
            model_version=str(recommender.version),
            segment=segment,
            items=[Item(**i) for i in items],
        )

    @app.get("/v1/segments", tags=["segments"])
    def segments() -> Segments:
        """The active run's segments (`segrec segments --json`)."""
        from segrec.pipeline import segments_report

        recommender = service.current()
        run = recommender.run
        if run is None:
            raise WorkspaceError("no clustering run yet — run `segrec cluster --k 5` first")
        report = segments_report(recommender.workspace.settings, run.id)
        return Segments(
            request_id=uuid.uuid4().hex, model_version=str(recommender.version), **report
        )

    @app.get("/v1/segments/{segment_id}", tags=["segments"])
    def segment(segment_id: int) -> dict[str, Any]:
        """One segment (`segrec segments show ID --json`)."""
        recommender = service.current()
        run = recommender.run
        if run is None:
            raise WorkspaceError("no clustering run yet — run `segrec cluster --k 5` first")
        found = next((s for s in recommender.segments if s.segment_id == segment_id), None)
        if found is None:
            raise HTTPException(404, f"segment {segment_id}: not in run {run.id}")
        return {
            "request_id": uuid.uuid4().hex,
            "model_version": str(recommender.version),
            **segment_json(run, found),
        }

    @app.post("/v1/chat", tags=["chat"])
    def chat_start(body: Annotated[ChatStartIn | None, Body()] = None) -> ChatTurn:
        """Start a chat for a new user: the first question (kept in the workspace)."""
        from segrec.chat import ChatSession

        recommender = service.current()
        settings = body or ChatStartIn()
        context = recommender.chat_context(service.llm)
        session = ChatSession(context, max_questions=settings.max_questions, n=settings.n)
        session_id = secrets.token_urlsafe(16)
        return _chat_turn(service, recommender, session_id, session)

    @app.post("/v1/chat/{session_id}/answers", tags=["chat"])
    def chat_answer(session_id: Annotated[str, Path(max_length=64)], body: AnswerIn) -> ChatTurn:
        """Answer the pending question: the next one, or the profile, segment and items."""
        from segrec.chat import ChatSession

        recommender = service.current()
        with service.session_lock(session_id):
            store = recommender.workspace.store
            state = store.chat_session(session_id)
            if state is None:
                raise HTTPException(404, f"no open chat session {session_id!r}")
            session = ChatSession.restore(recommender.chat_context(service.llm), state)
            if session.next_question() is None:
                raise HTTPException(409, "the chat has no pending question")
            session.answer(body.answer)
            return _chat_turn(service, recommender, session_id, session)

    @app.delete("/v1/chat/{session_id}", tags=["chat"], status_code=204)
    def chat_delete(session_id: Annotated[str, Path(max_length=64)]) -> Response:
        """End a chat without a result."""
        recommender = service.current()
        if not recommender.workspace.store.delete_chat_session(session_id):
            raise HTTPException(404, f"no open chat session {session_id!r}")
        service.forget_session(session_id)
        return Response(status_code=204)

    @app.post("/v1/admin/reload", tags=["ops"])
    def reload() -> Reloaded:
        """Rebuild the recommender for the data and active run now, and swap it in."""
        version, previous, reloaded = service.reload(force=True)
        return Reloaded(model_version=version, previous=previous, reloaded=reloaded)


def _recommendations(
    recommender: Recommender, user_id: str, n: int, filters: Filters
) -> Recommendations:
    """One known user's top-n with each signal's part (the body of the GET route)."""
    _, recs, _ = recommender.rank([user_id], n=n, filters=filters)
    served = recommender.served
    valid = recs.indices[0] >= 0
    columns, scores = recs.indices[0][valid], recs.scores[0][valid]
    parts = {name: part[0][valid] for name, part in recs.contributions.items()}
    items = [
        Item(
            item_id=str(served.item_ids[col]),
            title=str(served.titles[col]),
            score=round(float(scores[r]), 4),
            signals={name: round(float(part[r]), 4) for name, part in parts.items()},
        )
        for r, col in enumerate(columns)
    ]
    return Recommendations(
        request_id=uuid.uuid4().hex,
        model_version=str(recommender.version),
        user_id=user_id,
        items=items,
    )


def _chat_turn(
    service: Service, recommender: Recommender, session_id: str, session: Any
) -> ChatTurn:
    """Ask the next question (saving the session) or finish it (deleting it)."""
    store = recommender.workspace.store
    common = {
        "request_id": uuid.uuid4().hex,
        "model_version": str(recommender.version),
        "session_id": session_id,
    }
    question = session.next_question()
    if question is not None:
        store.save_chat_session(session_id, session.state())
        data = question.as_dict()
        return ChatTurn(**common, done=False, question=ChatQuestion(**data))
    result = session.finish()
    store.delete_chat_session(session_id)
    service.forget_session(session_id)
    return ChatTurn(
        **common,
        done=True,
        profile=result.profile.model_dump(),
        segment=result.segment,
        items=[ExplainedItem(**i) for i in result.items],
        notes=result.notes,
    )


def app_from_env() -> FastAPI:
    """The app for a uvicorn worker process (`segrec serve --workers N`)."""
    config = json.loads(os.environ[ENV_OPTIONS])
    return create_app(
        Settings.model_validate(config["settings"]),
        ServeOptions.model_validate(config["options"]),
    )


def worker_env(settings: Settings, options: ServeOptions) -> str:
    return json.dumps(
        {"settings": settings.model_dump(mode="json"), "options": options.model_dump()}
    )
