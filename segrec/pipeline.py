"""The library API behind the CLI: settings in, results out, no printing.

Each function opens the workspace, calls one stage, and closes it again, so an HTTP API or
a notebook can call the same functions the CLI does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segrec.config import Settings
from segrec.data import IngestReport, ItemColumns, LogColumns, load_dataset
from segrec.errors import InputError, WorkspaceError
from segrec.llm import make_llm
from segrec.llm.base import LLM, GenerationParams, RetryPolicy
from segrec.profile import ProfileStats, profile_users
from segrec.store import IngestStats, ProfileRecord, Store
from segrec.templates import load_prompt


@dataclass(frozen=True)
class IngestResult:
    report: IngestReport
    stats: IngestStats


def ingest(
    settings: Settings,
    log: Path,
    items: Path,
    attributes: Path | None = None,
    *,
    log_columns: LogColumns = LogColumns(),
    item_columns: ItemColumns = ItemColumns(),
    delimiter: str = ",",
    skip_bad_rows: bool = False,
) -> IngestResult:
    """Validate the files completely, then load them in one transaction.

    Validation happens before the workspace is opened, so a bad file leaves it untouched
    (not even created).
    """
    dataset = load_dataset(
        log,
        items,
        attributes,
        log_columns=log_columns,
        item_columns=item_columns,
        delimiter=delimiter,
        skip_bad_rows=skip_bad_rows,
    )
    source = {
        "log": str(log),
        "items": str(items),
        "attributes": str(attributes) if attributes else None,
        "log_columns": log_columns.__dict__,
        "item_columns": item_columns.__dict__,
    }
    with Store.open(settings.workspace, create=True) as store:
        stats = store.ingest(dataset, source=source)
    return IngestResult(report=dataset.report, stats=stats)


@dataclass(frozen=True)
class Selection:
    user_ids: list[str]
    total: int
    notes: list[str] = field(default_factory=list)


def select_users(
    settings: Settings, *, users: Sequence[str] | None = None, limit: int | None = None
) -> Selection:
    """The users a run covers: all, the named ones, or the first ``limit`` (said in notes)."""
    with Store.open(settings.workspace) as store:
        known = store.user_ids()
    if not known:
        raise WorkspaceError(
            f"{settings.workspace}: no users ingested yet — run `segrec profile RATINGS --items "
            "ITEMS`"
        )
    notes = []
    chosen = known
    if users is not None:
        known_set = set(known)
        missing = [u for u in users if u not in known_set]
        if missing:
            raise InputError(
                f"--users: unknown user id {missing[0]!r} — list users with `segrec users`"
            )
        chosen = list(users)
    if limit is not None and limit < len(chosen):
        chosen = chosen[:limit]
        notes.append(f"limited to the first {limit} of {len(known)} users (--limit)")
    elif users is not None:
        notes.append(f"{len(chosen)} of {len(known)} users selected (--users)")
    return Selection(user_ids=chosen, total=len(known), notes=notes)


def generation_params(settings: Settings) -> GenerationParams:
    return GenerationParams(
        temperature=settings.temperature,
        max_tokens=settings.max_tokens,
        repeat_penalty=settings.repeat_penalty,
        seed=settings.seed,
    )


def run_profiles(
    settings: Settings,
    user_ids: Sequence[str],
    *,
    llm: LLM | None = None,
    on_progress: Callable[[ProfileStats], None] | None = None,
) -> ProfileStats:
    """Profile users with the configured backend (or ``llm``), resuming from the cache."""
    backend = llm if llm is not None else make_llm(settings)
    with Store.open(settings.workspace) as store:
        return profile_users(
            store,
            user_ids,
            llm=backend,
            prompt=load_prompt("profile"),
            params=generation_params(settings),
            domain=settings.domain,
            max_items=settings.max_history_items,
            max_tokens=settings.max_history_tokens,
            attempts=settings.validation_attempts,
            retry=RetryPolicy(attempts=settings.retries),
            on_progress=on_progress,
        )


def show_profile(settings: Settings, user_id: str) -> ProfileRecord:
    with Store.open(settings.workspace) as store:
        record = store.profile(user_id)
        exists = record is not None or store.has_user(user_id)
    if record is None:
        if exists:
            raise WorkspaceError(
                f"user {user_id!r} has no profile yet — run `segrec profile --users {user_id}`"
            )
        raise InputError(f"unknown user id {user_id!r} — list users with `segrec users`")
    return record


def list_users(settings: Settings) -> list[dict[str, Any]]:
    with Store.open(settings.workspace) as store:
        counts = store.interaction_counts()
        profiles = {p.user_id: p for p in store.profiles()}
        failures = store.failures()
    rows = []
    for user_id, n in counts.items():
        record = profiles.get(user_id)
        status = (
            "failed"
            if user_id in failures
            else "none"
            if record is None
            else "fallback"
            if record.fallback
            else "llm"
        )
        rows.append({"user": user_id, "interactions": n, "profile": status})
    return rows
