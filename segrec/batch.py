"""Per-user LLM and encoder work on Ray: actors that each hold their own backend.

The driver (this process) owns the workspace. It builds the profile requests, ships them in
small batches to actors, and hands each user's result back to
:func:`segrec.profile.profile_users`, which stores it at once (one transaction per user,
exactly once); workers never open the store. A killed driver loses only the batches in
flight, and a rerun skips finished users through the normal cache. Workers run the same
stage code as the in-process path (:meth:`segrec.profile.ProfileJob.run`, the encoder's
``encode_batch``) with a backend built once per actor, so results and cache keys are the
same.

Ray is an optional extra (``pip install 'segrec[ray]'``), imported here only, lazily.
``ray_address`` (or ``$RAY_ADDRESS``) attaches to an existing cluster; otherwise a local one
starts, quietly and without a dashboard, and lives until the process exits.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from segrec.config import Settings
from segrec.embed import SentenceTransformerEncoder
from segrec.errors import InputError, LLMError, SegrecError
from segrec.llm import make_llm
from segrec.llm.base import LLM
from segrec.llm.counting import calls_so_far, record_calls
from segrec.profile import Outcome, ProfileJob, ProfileRecord, ProfileRequest

INSTALL_HINT = "pip install 'segrec[ray]'"
# An address that accepts no TCP connection in this time is reported, not waited on (Ray's
# own client retries for minutes).
PROBE_TIMEOUT_S = 5.0
# Batches queued per actor: one running, one waiting, so an actor never idles on the driver.
IN_FLIGHT_PER_ACTOR = 2
# Building a backend (loading a model) takes seconds; an actor not up by then is stuck.
START_TIMEOUT_S = 300.0


def import_ray() -> ModuleType:
    """The ``ray`` module, or one line saying what to install."""
    try:
        import ray
    except ImportError:
        raise SegrecError(
            f"the ray executor needs Ray, which is not installed — {INSTALL_HINT}"
        ) from None
    return ray


def cluster_address(settings: Settings) -> str | None:
    """The cluster to attach to: the setting, else ``$RAY_ADDRESS``; None starts a local one."""
    return settings.ray_address or os.environ.get("RAY_ADDRESS") or None


def check_cluster(settings: Settings, *, embed: bool = False) -> None:
    """Fail fast, before anything is written: Ray installed, the cluster reachable (started,
    when local) and large enough for the workers asked for (LLM ones, or ``embed`` ones)."""
    ray = connect(settings)
    _workers(ray, settings, 1 if embed else _llm_backend(settings)[1])


def _probe(address: str) -> None:
    """Open (and close) a TCP connection to the cluster's address, within a bounded time."""
    if address in ("auto", "local"):  # Ray looks these up itself, quickly
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InputError(f"Ray address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InputError(
            f"Ray cluster at {address} cannot be reached ({reason}) — start it (`ray start "
            "--head`), correct the address, or leave it unset to start a local cluster"
        ) from None


def connect(settings: Settings, *, num_cpus: int | None = None) -> ModuleType:
    """Attach to the configured cluster or start a local one (once per process)."""
    ray = import_ray()
    address = cluster_address(settings)
    if address is not None:
        _probe(address)
    if ray.is_initialized():
        return ray
    # No usage reporting from an offline tool (Ray reads this when it starts).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    if address is not None:
        ray.init(address=address, **quiet)
    else:
        ray.init(
            address="local",  # a new cluster, never one some other process left running
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            **quiet,
        )
    return ray


def _gist(exc: BaseException) -> str:
    """One line of a Ray error: its last line names the cause (a traceback comes first)."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def _workers(ray: ModuleType, settings: Settings, cpus_per_worker: int) -> int:
    """How many actors: as asked, or as many as the cluster's CPUs hold. More than it holds
    would wait for CPUs forever, so that is refused."""
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if settings.ray_workers is None:
        return max(1, cpus // cpus_per_worker)
    if settings.ray_workers * cpus_per_worker > cpus:
        raise InputError(
            f"ray_workers {settings.ray_workers} × {cpus_per_worker} CPU(s) each is more than "
            f"the Ray cluster's {cpus} CPUs — ask for fewer workers (or threads per worker)"
        )
    return settings.ray_workers


def _start_actors(
    ray: ModuleType,
    actor: Any,
    arg: Any,
    workers: int,
    broken: Callable[[str], SegrecError],
    mixed: Callable[[list[tuple[str, int]]], SegrecError],
) -> tuple[list[Any], tuple[str, int]]:
    """``workers`` actors of the remote class ``actor`` built with ``arg``, and what they
    hold (each one's ``describe()``), once all are up and hold the same thing. On failure
    the actors are ended and ``broken(why)`` or ``mixed(described)`` is raised."""
    actors = [actor.remote(arg) for _ in range(workers)]
    try:
        described = _started(ray, actors)
        if len(described) != 1:
            raise mixed(sorted(described))
    except SegrecError:
        _end(ray, actors)
        raise
    except ray.exceptions.RayError as exc:
        _end(ray, actors)
        raise broken(_gist(exc)) from None
    return actors, described.pop()


def _end(ray: ModuleType, actors: list[Any]) -> None:
    for actor in actors:
        ray.kill(actor)


def _started(ray: ModuleType, actors: list[Any]) -> set[tuple[str, int]]:
    """Each actor's (backend id, size), once its backend is built; bounded in time, since
    an actor that finds no free CPU would never start."""
    try:
        return set(ray.get([a.describe.remote() for a in actors], timeout=START_TIMEOUT_S))
    except ray.exceptions.GetTimeoutError:
        raise SegrecError(
            f"Ray workers did not start within {START_TIMEOUT_S:.0f} s — the cluster may have "
            "no free CPUs; ask for fewer workers"
        ) from None


# ---------------------------------------------------------------------------------- profiles


class _ProfileWorker:
    """A Ray actor: one backend, built once, profiling batches of requests."""

    def __init__(self, backend: Callable[[], LLM]) -> None:
        self.llm = backend()

    def describe(self) -> tuple[str, int]:
        return self.llm.model_id, max(1, int(getattr(self.llm, "concurrency", 1)))

    def profile(
        self, requests: Sequence[ProfileRequest], job: ProfileJob
    ) -> tuple[list[ProfileRecord | LLMError], int]:
        """The batch's results and the LLM calls they took (counted in this actor's
        process; an actor runs one batch at a time, so the difference is this batch's)."""
        before = calls_so_far()

        def one(request: ProfileRequest) -> ProfileRecord | LLMError:
            try:
                return job.run(request, self.llm)
            except LLMError as exc:  # reported for this user by the driver; a rerun retries
                return exc

        concurrency = self.describe()[1]
        if concurrency == 1:
            results = [one(request) for request in requests]
        else:
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                results = list(pool.map(one, requests))
        return results, calls_so_far() - before


def _outcome(result: ProfileRecord | LLMError) -> ProfileRecord:
    if isinstance(result, LLMError):
        raise result
    return result


class RayProfileRunner:
    """A :class:`segrec.profile.ProfileRunner` over Ray actors that each hold a backend.

    Batches hold as many users as the backend keeps in flight (1 for llama.cpp, the
    concurrency for an OpenAI-compatible server), so results come back as soon as a call
    finishes and little is lost if the driver dies.
    """

    def __init__(
        self, ray: ModuleType, backend: Callable[[], LLM], *, workers: int, cpus_per_worker: int
    ) -> None:
        self._ray = ray
        self._actors, (self.model_id, self.batch_size) = _start_actors(
            ray,
            ray.remote(num_cpus=cpus_per_worker)(_ProfileWorker),
            backend,
            workers,
            lambda why: LLMError(f"Ray workers could not build their LLM backend: {why}"),
            lambda found: LLMError(
                f"Ray workers hold different models {found} — give every node the same model "
                "and settings"
            ),
        )

    @property
    def actors(self) -> list[Any]:
        """The actor handles (e.g. to watch or end one)."""
        return list(self._actors)

    def run(
        self, requests: Sequence[ProfileRequest], job: ProfileJob
    ) -> Iterator[tuple[ProfileRequest, Outcome]]:
        ray = self._ray
        job_ref = ray.put(job)  # shipped once, not with every batch
        size = self.batch_size
        batches = deque(requests[i : i + size] for i in range(0, len(requests), size))
        slots = [a for a in self._actors for _ in range(IN_FLIGHT_PER_ACTOR)]
        pending: dict[Any, tuple[Any, Sequence[ProfileRequest]]] = {}
        lost = ""
        try:
            while batches or pending:
                while batches and slots:
                    actor, batch = slots.pop(), batches.popleft()
                    pending[actor.profile.remote(batch, job_ref)] = (actor, batch)
                if not pending:  # every actor died: the rest fail too, and a rerun retries
                    error = LLMError(f"no Ray worker left ({lost})")
                    for request in (r for batch in batches for r in batch):
                        yield request, functools.partial(_outcome, error)
                    return
                [ref], _ = ray.wait(list(pending), num_returns=1)
                actor, batch = pending.pop(ref)
                try:
                    results, calls = ray.get(ref)
                    record_calls(calls)  # the command's LLM-call count includes the actors'
                except ray.exceptions.RayError as exc:  # the actor died: its users failed
                    lost = f"Ray worker failed: {_gist(exc)}"
                    results = [LLMError(lost)] * len(batch)
                    slots = [a for a in slots if a is not actor]
                else:
                    slots.append(actor)
                for request, result in zip(batch, results, strict=True):
                    yield request, functools.partial(_outcome, result)
        finally:
            for ref in pending:
                ray.cancel(ref)

    def close(self) -> None:
        """End the actors (the cluster stays up for the next run in this process)."""
        _end(self._ray, self._actors)
        self._actors = []


def _llm_backend(settings: Settings) -> tuple[Callable[[], LLM], int]:
    """The backend each actor builds, and the CPUs it takes: a llama.cpp actor uses
    ``threads`` (default 1: parallelism comes from actors), a client of a server one."""
    if settings.llm == "local":
        threads = settings.threads or 1
        actor_settings = settings.model_copy(update={"threads": threads})
        return functools.partial(make_llm, actor_settings), threads
    return functools.partial(make_llm, settings), 1


@contextmanager
def profile_runner(
    settings: Settings, *, backend: Callable[[], LLM] | None = None, cpus_per_worker: int = 1
) -> Iterator[RayProfileRunner]:
    """Actors for ``settings``' backend (or ``backend``, built in each actor), ended on exit."""
    ray = connect(settings)
    if backend is None:
        backend, cpus_per_worker = _llm_backend(settings)
    runner = RayProfileRunner(
        ray,
        backend,
        workers=_workers(ray, settings, cpus_per_worker),
        cpus_per_worker=cpus_per_worker,
    )
    try:
        yield runner
    finally:
        runner.close()


# -------------------------------------------------------------------------------- embeddings


class _EncodeWorker:
    """A Ray actor holding one sentence encoder, loaded once."""

    def __init__(self, path: Path | None) -> None:
        self.encoder = SentenceTransformerEncoder(path)

    def describe(self) -> tuple[str, int]:
        return self.encoder.encoder_id, self.encoder.dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode_batch(texts)


class RayEncoder:
    """An :class:`segrec.embed.Encoder` that splits each batch across Ray actors.

    Its ``encoder_id`` is the in-process encoder's, so :func:`segrec.embed.embed_texts`
    caches and finds the same vectors either way; deduplication, caching and progress stay
    there.
    """

    def __init__(self, ray: ModuleType, path: Path | None, *, workers: int) -> None:
        self._ray = ray
        self._actors, (self.encoder_id, self.dim) = _start_actors(
            ray,
            ray.remote(num_cpus=1)(_EncodeWorker),
            path,
            workers,
            lambda why: InputError(f"Ray workers could not load the encoder: {why}"),
            lambda found: InputError(f"Ray workers hold different encoders {found}"),
        )

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        share = -(-len(texts) // len(self._actors)) or 1
        refs = [
            actor.encode.remote(texts[i : i + share])
            for actor, i in zip(self._actors, range(0, len(texts), share), strict=False)
        ]
        parts = self._ray.get(refs)
        return np.concatenate(parts) if parts else np.empty((0, self.dim), dtype=np.float32)

    def close(self) -> None:
        _end(self._ray, self._actors)
        self._actors = []


def ray_encoder(settings: Settings) -> RayEncoder:
    """Encoder actors for ``settings.encoder``; they end with the process or :meth:`close`."""
    ray = connect(settings)
    return RayEncoder(ray, settings.encoder, workers=_workers(ray, settings, 1))
