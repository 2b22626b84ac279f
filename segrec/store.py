"""The workspace: one SQLite database (WAL) that every stage reads from and writes to.

This is the only module that speaks SQL. Each write is one transaction, so a crash or
SIGKILL loses at most the work in flight, and the next run resumes from what is here.

A damaged database (truncated, overwritten, not SQLite at all) is refused when it is
opened, before anything is written (see :meth:`Store.open`), and damage SQLite finds later
becomes the same one-line :class:`WorkspaceError` (:func:`damage_error`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from segrec.errors import WorkspaceError

if TYPE_CHECKING:
    from segrec.data import Dataset

DB_NAME = "segrec.db"
# PRAGMA quick_check reads every page (about 0.5 s per GB on the 2-core dev machine, warm
# cache); above this size it is skipped at open and damage is caught when SQLite meets it.
QUICK_CHECK_MAX_BYTES = 1024**3
_DAMAGE_CODES = ("SQLITE_CORRUPT", "SQLITE_NOTADB")

# Ordered migrations: index + 1 is the schema version stored in PRAGMA user_version.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE items (
        item_id TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        description TEXT NOT NULL,
        categories TEXT NOT NULL,          -- JSON list
        text TEXT NOT NULL
    );
    CREATE TABLE users (
        user_id TEXT PRIMARY KEY,
        attributes TEXT,                   -- JSON object, PII already refused at ingest
        source TEXT NOT NULL DEFAULT 'ingest'
    );
    CREATE TABLE interactions (
        user_id TEXT NOT NULL REFERENCES users(user_id),
        item_id TEXT NOT NULL REFERENCES items(item_id),
        behavior TEXT NOT NULL,
        value REAL,
        timestamp INTEGER,
        ts_key INTEGER NOT NULL,           -- timestamp, or -1 when absent: part of the key
        seq INTEGER NOT NULL,              -- line in the source file: order when no timestamp
        PRIMARY KEY (user_id, item_id, behavior, ts_key)
    ) WITHOUT ROWID;
    CREATE TABLE ingests (
        id INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        source TEXT NOT NULL,              -- JSON: files and column mapping
        report TEXT NOT NULL               -- JSON: counts
    );
    CREATE TABLE profiles (
        user_id TEXT PRIMARY KEY REFERENCES users(user_id),
        cache_key TEXT NOT NULL,
        profile TEXT NOT NULL,             -- JSON of the validated, grounded profile
        raw_output TEXT,                   -- the LLM's last raw answer (NULL: no LLM call)
        model_id TEXT NOT NULL,
        prompt_version TEXT NOT NULL,
        params TEXT NOT NULL,              -- JSON generation parameters
        fallback INTEGER NOT NULL,         -- 1: deterministic profile from the history
        fallback_reason TEXT,
        removed_claims INTEGER NOT NULL,
        removed TEXT NOT NULL,             -- JSON list of the ungrounded claims removed
        attempts INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        latency_s REAL NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE profile_failures (
        user_id TEXT PRIMARY KEY,
        cache_key TEXT NOT NULL,
        error TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE embeddings (
        key TEXT NOT NULL,                 -- sha256 of the embedded text
        encoder_id TEXT NOT NULL,
        vector BLOB NOT NULL,              -- float32, L2-normalised
        PRIMARY KEY (key, encoder_id)
    ) WITHOUT ROWID;
    """,
    """
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        created_at TEXT NOT NULL,
        params TEXT NOT NULL,              -- JSON: k, algorithm, seed, represent, encoder …
        metrics TEXT NOT NULL,             -- JSON: silhouette, stability, k curve …
        notes TEXT NOT NULL                -- JSON list: what was assumed or changed
    );
    CREATE TABLE segments (
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        segment_id INTEGER NOT NULL,
        name TEXT NOT NULL,
        description TEXT NOT NULL,
        fallback INTEGER NOT NULL,         -- 1: label from distinctive terms, not the LLM
        described INTEGER NOT NULL,        -- 0: under the privacy threshold, not described
        size INTEGER NOT NULL,
        centroid BLOB NOT NULL,            -- float32, in the clustered vector space
        facts TEXT NOT NULL,               -- JSON: share, top items/categories, quality …
        PRIMARY KEY (run_id, segment_id)
    );
    CREATE TABLE assignments (
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        user_id TEXT NOT NULL,
        segment_id INTEGER NOT NULL,
        distance REAL NOT NULL,
        margin REAL NOT NULL,              -- 2nd-nearest minus nearest centroid distance
        late INTEGER NOT NULL DEFAULT 0,   -- 1: assigned after the run (nearest centroid)
        PRIMARY KEY (run_id, user_id)
    ) WITHOUT ROWID;
    """,
    """
    CREATE TABLE rankers (
        data_version TEXT NOT NULL,        -- interactions/items/ingest counts it was tuned on
        run_id INTEGER NOT NULL,           -- clustering run whose segments it used (0: none)
        spec TEXT NOT NULL,                -- JSON: weights per history group, λ, validation
        created_at TEXT NOT NULL,
        PRIMARY KEY (data_version, run_id)
    );
    CREATE TABLE chats (
        user_id TEXT PRIMARY KEY REFERENCES users(user_id),
        questions TEXT NOT NULL,           -- JSON list
        answers TEXT NOT NULL,             -- JSON list
        created_at TEXT NOT NULL
    );
    """,
    """
    CREATE TABLE hierarchies (
        run_id INTEGER PRIMARY KEY REFERENCES runs(id) ON DELETE CASCADE,
        created_at TEXT NOT NULL,
        params TEXT NOT NULL,              -- JSON: levels, counts per level, seed, model
        notes TEXT NOT NULL                -- JSON list: levels dropped, fallbacks …
    );
    CREATE TABLE parents (
        run_id INTEGER NOT NULL REFERENCES hierarchies(run_id) ON DELETE CASCADE,
        parent_id INTEGER NOT NULL,        -- unique in the run across levels
        level INTEGER NOT NULL,            -- 1: parents of segments, 2: their parents
        name TEXT NOT NULL,
        description TEXT NOT NULL,
        fallback INTEGER NOT NULL,
        described INTEGER NOT NULL,        -- 0: under the privacy threshold
        size INTEGER NOT NULL,
        children TEXT NOT NULL,            -- JSON list: segment ids (level 1) or parent ids
        parent INTEGER,                    -- the parent one level up, NULL at the top
        facts TEXT NOT NULL,               -- JSON: share, top categories, fallback reason
        PRIMARY KEY (run_id, parent_id)
    );
    CREATE TABLE releases (
        id INTEGER PRIMARY KEY,
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        created_at TEXT NOT NULL,
        epsilon REAL NOT NULL,             -- the privacy budget this release spent
        details TEXT NOT NULL              -- JSON: mechanism, noise scales, what was noised
    );
    """,
    """
    CREATE TABLE reasons (
        key TEXT PRIMARY KEY,              -- sha256 of model, prompt, parameters, messages
        reason TEXT NOT NULL,              -- JSON of the validated reason
        created_at TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE chat_sessions (
        session_id TEXT PRIMARY KEY,
        state TEXT NOT NULL,               -- JSON: settings, questions asked, answers given
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    """,
    """
    CREATE TABLE text_counts (
        recorded_at TEXT NOT NULL,
        command TEXT NOT NULL,             -- profile, cluster, explain, chat
        kind TEXT NOT NULL,                -- summary, segment, reason, question
        outcome TEXT NOT NULL,             -- kept (the LLM's, passed every gate) or replaced
        reason TEXT NOT NULL,              -- why replaced (gate/code, llm-error …), '' if kept
        n INTEGER NOT NULL
    );
    """,
    """
    CREATE TABLE run_spaces (
        run_id INTEGER PRIMARY KEY REFERENCES runs(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,                -- the run's represent (collab)
        item_ids TEXT NOT NULL,            -- JSON list: the rows of vectors
        dim INTEGER NOT NULL,
        vectors BLOB NOT NULL,             -- float32 items × dim: the fitted item vectors
        counts BLOB NOT NULL               -- int64 per item: users who had it at fit time
    );
    """,
]


@dataclass(frozen=True)
class IngestStats:
    items_added: int
    items_updated: int
    users_added: int
    interactions_added: int
    interactions_updated: int

    @property
    def changed(self) -> bool:
        return any(
            (
                self.items_added,
                self.items_updated,
                self.users_added,
                self.interactions_added,
                self.interactions_updated,
            )
        )


@dataclass(frozen=True)
class ProfileRecord:
    """One stored profile, as the profile stage hands it over and as it is read back."""

    user_id: str
    cache_key: str
    profile: dict[str, Any]
    raw_output: str | None
    model_id: str
    prompt_version: str
    params: dict[str, Any]
    fallback: bool
    fallback_reason: str | None
    removed: list[str]
    attempts: int
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    created_at: str = ""


@dataclass(frozen=True)
class RunSpace:
    """What a run's representation fitted (``--represent collab``: one vector per item)."""

    kind: str
    item_ids: list[str]
    vectors: np.ndarray
    counts: np.ndarray


_last_opened: Path | None = None


def is_damage(exc: BaseException) -> bool:
    """Whether a sqlite3 error says the file is damaged (not locked, not full, not missing)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc).lower()
    return name.startswith(_DAMAGE_CODES) or any(
        words in text for words in ("malformed", "not a database", "quick_check")
    )


def damaged(db_path: Path, detail: str) -> WorkspaceError:
    """The one line for a damaged workspace: which file, that it is damaged, how to recover."""
    return WorkspaceError(
        f"{db_path}: the workspace database is damaged ({' '.join(detail.split())[:200]}) — "
        f"restore a copy of {db_path.name} (and delete {db_path.name}-wal and "
        f"{db_path.name}-shm beside it), or move the workspace aside and re-create it from the "
        "source files with `segrec profile RATINGS --items ITEMS`"
    )


def damage_error(exc: BaseException) -> WorkspaceError | None:
    """:func:`damaged` for SQLite damage met outside a ``with Store`` block, naming the
    database opened last; None when ``exc`` is not damage."""
    if not isinstance(exc, sqlite3.DatabaseError) or not is_damage(exc):
        return None
    return damaged(_last_opened or Path(DB_NAME), str(exc))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Store:
    """A workspace database. Open with :meth:`open`; use as a context manager to close."""

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self.path = path
        self._db = connection

    @classmethod
    def open(cls, workspace: Path, *, create: bool = False) -> Store:
        """Open (and migrate) the workspace; ``create`` makes it if missing.

        Every open of a database up to QUICK_CHECK_MAX_BYTES runs SQLite's ``quick_check``
        first (milliseconds for a typical workspace): reads and writes alike, since a
        command that only reads today (``recommend``) may write tomorrow (tuned weights),
        and a damaged database refused here is one nothing writes into. Larger databases
        skip it; SQLite still refuses to read or write a damaged page, and that error
        becomes the same one line.
        """
        db_path = workspace / DB_NAME
        if not db_path.exists():
            if not create:
                raise WorkspaceError(
                    f"{workspace}: no segrec workspace here — run `segrec profile RATINGS "
                    "--items ITEMS` first, or pass --workspace DIR"
                )
            if workspace.exists() and not workspace.is_dir():
                raise WorkspaceError(f"{workspace}: exists and is not a directory")
            workspace.mkdir(parents=True, exist_ok=True)
        connection: sqlite3.Connection | None = None
        try:
            connection = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA foreign_keys=ON")
            connection.execute("PRAGMA busy_timeout=10000")
            if db_path.stat().st_size <= QUICK_CHECK_MAX_BYTES:
                problems = [row[0] for row in connection.execute("PRAGMA quick_check(1)")]
                if problems != ["ok"]:
                    raise sqlite3.DatabaseError("quick_check: " + "; ".join(problems))
        except sqlite3.DatabaseError as exc:
            if connection is not None:
                connection.close()
            if is_damage(exc):
                raise damaged(db_path, str(exc)) from None
            raise WorkspaceError(f"{db_path}: not a readable segrec database ({exc})") from None
        global _last_opened
        _last_opened = db_path
        store = cls(db_path, connection)
        store._migrate()
        return store

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.close()
        if isinstance(exc, sqlite3.DatabaseError) and is_damage(exc):
            raise damaged(self.path, str(exc)) from None

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        current = self.schema_version
        if current > len(MIGRATIONS):
            raise WorkspaceError(
                f"{self.path}: written by a newer segrec (schema {current}) — upgrade segrec"
            )
        for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
            with self.transaction():
                for statement in script.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={version}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT, rolled back on any exception."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ---------------------------------------------------------------- ingest

    def ingest(self, dataset: Dataset, *, source: Mapping[str, Any]) -> IngestStats:
        """Upsert items, users and interactions in one transaction; unchanged rows stay put."""
        items = dataset.items
        inter = dataset.interactions
        with self.transaction() as db:
            before_items = self._count("items")
            before_users = self._count("users")
            before_inter = self._count("interactions")
            changes0 = db.total_changes
            db.executemany(
                """INSERT INTO items (item_id, title, description, categories, text)
                   VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT(item_id) DO UPDATE SET title=excluded.title,
                     description=excluded.description, categories=excluded.categories,
                     text=excluded.text
                   WHERE title IS NOT excluded.title OR description IS NOT excluded.description
                     OR categories IS NOT excluded.categories OR text IS NOT excluded.text""",
                zip(
                    items["item_id"],
                    items["title"],
                    items["description"],
                    (json.dumps(list(c), ensure_ascii=False) for c in items["categories"]),
                    items["text"],
                    strict=True,
                ),
            )
            item_changes = db.total_changes - changes0
            attributes: dict[str, str] = {}
            if dataset.attributes is not None:
                frame = dataset.attributes.set_index("user_id")
                for user_id, row in frame.iterrows():
                    attributes[str(user_id)] = json.dumps(row.to_dict(), ensure_ascii=False)
            user_ids = sorted(set(inter["user_id"]) | set(attributes))
            db.executemany(
                """INSERT INTO users (user_id, attributes) VALUES (?, ?)
                   ON CONFLICT(user_id) DO UPDATE SET attributes=excluded.attributes
                   WHERE excluded.attributes IS NOT NULL
                     AND attributes IS NOT excluded.attributes""",
                ((u, attributes.get(u)) for u in user_ids),
            )
            timestamps = inter["timestamp"]
            values = inter["value"]
            changes1 = db.total_changes
            db.executemany(
                """INSERT INTO interactions
                     (user_id, item_id, behavior, value, timestamp, ts_key, seq)
                   VALUES (?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(user_id, item_id, behavior, ts_key) DO UPDATE
                     SET value=excluded.value, seq=excluded.seq
                   WHERE value IS NOT excluded.value OR seq IS NOT excluded.seq""",
                zip(
                    inter["user_id"],
                    inter["item_id"],
                    inter["behavior"],
                    (None if pd.isna(v) else float(v) for v in values),
                    (None if pd.isna(t) else int(t) for t in timestamps),
                    (-1 if pd.isna(t) else int(t) for t in timestamps),
                    (int(s) for s in inter["line"]),
                    strict=True,
                ),
            )
            inter_changes = db.total_changes - changes1
            items_added = self._count("items") - before_items
            inter_added = self._count("interactions") - before_inter
            stats = IngestStats(
                items_added=items_added,
                items_updated=item_changes - items_added,
                users_added=self._count("users") - before_users,
                interactions_added=inter_added,
                interactions_updated=inter_changes - inter_added,
            )
            if stats.changed:
                report = dataset.report
                db.execute(
                    "INSERT INTO ingests (at, source, report) VALUES (?, ?, ?)",
                    (
                        _now(),
                        json.dumps(dict(source), default=str),
                        json.dumps(
                            {
                                "log_rows": report.log_rows,
                                "loaded": report.loaded,
                                "skipped": report.skipped,
                                "duplicates": report.duplicates,
                                **stats.__dict__,
                            }
                        ),
                    ),
                )
        return stats

    def _count(self, table: str) -> int:
        return int(self._db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    # ---------------------------------------------------------------- reads

    def user_ids(self, *, source: str | None = None) -> list[str]:
        """Users with at least one interaction, in natural order (numeric ids numerically);
        ``source`` keeps those from one origin ('ingest' or 'chat')."""
        query = "SELECT DISTINCT user_id FROM interactions"
        args: tuple[str, ...] = ()
        if source is not None:
            query += " WHERE user_id IN (SELECT user_id FROM users WHERE source = ?)"
            args = (source,)
        rows = self._db.execute(query, args).fetchall()
        return sorted((r[0] for r in rows), key=natural_key)

    def count(self, table: str) -> int:
        if table not in {"items", "users", "interactions", "profiles", "profile_failures"}:
            raise ValueError(table)
        return self._count(table)

    def items_frame(self) -> pd.DataFrame:
        frame = pd.read_sql_query(
            "SELECT item_id, title, description, categories, text FROM items", self._db
        )
        frame["categories"] = [json.loads(c) for c in frame["categories"]]
        return frame

    def interactions_frame(self, user_ids: Sequence[str] | None = None) -> pd.DataFrame:
        """Interactions (optionally of some users), oldest first within each user."""
        query = "SELECT user_id, item_id, behavior, value, timestamp, seq FROM interactions"
        only = self._only(user_ids)
        query += (f" WHERE {only}" if only else "") + " ORDER BY user_id, ts_key, seq"
        frame = pd.read_sql_query(query, self._db)
        frame["timestamp"] = frame["timestamp"].astype("Int64")
        return frame

    def _only(self, user_ids: Sequence[str] | None) -> str:
        """A condition keeping ``user_ids`` (through a temp table; "" keeps everyone)."""
        if user_ids is None:
            return ""
        self._db.execute("CREATE TEMP TABLE IF NOT EXISTS wanted (user_id TEXT PRIMARY KEY)")
        self._db.execute("DELETE FROM wanted")
        self._db.executemany("INSERT OR IGNORE INTO wanted VALUES (?)", ((u,) for u in user_ids))
        return "user_id IN (SELECT user_id FROM wanted)"

    def item_ids(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT item_id FROM items ORDER BY item_id")]

    def interaction_pairs(
        self,
        user_ids: Sequence[str],
        item_ids: Sequence[str],
        *,
        everyone: bool = False,
        batch: int = 1_000_000,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(row in ``user_ids``, column in ``item_ids``) of every interaction of those users,
        oldest first within each user: read in batches of ``batch`` rows and kept as two int
        arrays, never as a frame of the whole table. ``everyone`` says ``user_ids`` holds every
        user with interactions (no filter needed)."""
        users, items = pd.Index(user_ids), pd.Index(item_ids)
        query = "SELECT user_id, item_id FROM interactions"
        only = "" if everyone else self._only(user_ids)
        query += (f" WHERE {only}" if only else "") + " ORDER BY user_id, ts_key, seq"
        cursor = self._db.execute(query)
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        while chunk := cursor.fetchmany(batch):
            pairs = np.array(chunk, dtype=object).reshape(-1, 2)
            r, c = users.get_indexer(pairs[:, 0]), items.get_indexer(pairs[:, 1])
            known = (r >= 0) & (c >= 0)
            rows.append(r[known].astype(np.int32))
            cols.append(c[known].astype(np.int32))
        if not rows:
            return np.empty(0, dtype=np.int32), np.empty(0, dtype=np.int32)
        return np.concatenate(rows), np.concatenate(cols)

    def value_ranges(self) -> list[tuple[str, float, float]]:
        """(behaviour, min value, max value) over the interactions that have a value."""
        rows = self._db.execute(
            """SELECT behavior, min(value), max(value) FROM interactions
               WHERE value IS NOT NULL GROUP BY behavior"""
        ).fetchall()
        return [(str(b), float(lo), float(hi)) for b, lo, hi in rows]

    def interaction_counts(self) -> dict[str, int]:
        """Interactions per user, users in natural order."""
        rows = self._db.execute(
            "SELECT user_id, count(*) FROM interactions GROUP BY user_id"
        ).fetchall()
        return {u: n for u, n in sorted(rows, key=lambda r: natural_key(r[0]))}

    def has_user(self, user_id: str) -> bool:
        row = self._db.execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,)).fetchone()
        return row is not None

    # ---------------------------------------------------------------- profiles

    def profile_keys(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT user_id, cache_key FROM profiles").fetchall())

    def save_profile(self, record: ProfileRecord) -> None:
        """Store one profile (replacing an older one) and clear any earlier failure."""
        with self.transaction():
            self._insert_profile(record)

    def _insert_profile(self, record: ProfileRecord) -> None:
        db = self._db
        db.execute(
            """INSERT OR REPLACE INTO profiles (user_id, cache_key, profile, raw_output,
                 model_id, prompt_version, params, fallback, fallback_reason,
                 removed_claims, removed, attempts, prompt_tokens, completion_tokens,
                 latency_s, created_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                record.user_id,
                record.cache_key,
                json.dumps(record.profile, ensure_ascii=False),
                record.raw_output,
                record.model_id,
                record.prompt_version,
                json.dumps(record.params, sort_keys=True),
                int(record.fallback),
                record.fallback_reason,
                len(record.removed),
                json.dumps(record.removed, ensure_ascii=False),
                record.attempts,
                record.prompt_tokens,
                record.completion_tokens,
                record.latency_s,
                record.created_at or _now(),
            ),
        )
        db.execute("DELETE FROM profile_failures WHERE user_id = ?", (record.user_id,))

    def save_failure(self, user_id: str, cache_key: str, error: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO profile_failures VALUES (?, ?, ?, ?)",
                (user_id, cache_key, error, _now()),
            )

    # ---------------------------------------------------------------- chats

    def add_text_counts(self, command: str, rows: Sequence[tuple[str, str, str, int]]) -> None:
        """Record how many texts of each kind a command kept or replaced, and why."""
        now = _now()
        with self.transaction() as con:
            con.executemany(
                "INSERT INTO text_counts VALUES (?, ?, ?, ?, ?, ?)",
                [(now, command, kind, outcome, why, n) for kind, outcome, why, n in rows],
            )

    def text_counts(self) -> dict[str, list[tuple[str, str, str, int]]]:
        """Every recorded count, summed per command: {command: [(kind, outcome, reason, n)]}."""
        rows = self._db.execute(
            "SELECT command, kind, outcome, reason, SUM(n) FROM text_counts "
            "GROUP BY command, kind, outcome, reason ORDER BY command, kind, outcome, reason"
        ).fetchall()
        out: dict[str, list[tuple[str, str, str, int]]] = {}
        for command, kind, outcome, why, n in rows:
            out.setdefault(command, []).append((kind, outcome, why, int(n)))
        return out

    def save_chat_user(
        self,
        user_id: str,
        *,
        items: Sequence[str],
        behavior: str,
        profile: ProfileRecord,
        questions: Sequence[Any],
        answers: Sequence[str],
        run_id: int | None,
        assignment: Assignment | None,
    ) -> None:
        """A user made by `segrec chat`, in one transaction: the user (source 'chat'), the
        items they liked as interactions, their profile, the chat, their assignment."""
        with self.transaction() as db:
            if self.has_user(user_id):
                raise WorkspaceError(f"user {user_id!r} already exists — choose another id")
            db.execute("INSERT INTO users (user_id, source) VALUES (?, 'chat')", (user_id,))
            db.executemany(
                """INSERT INTO interactions
                     (user_id, item_id, behavior, value, timestamp, ts_key, seq)
                   VALUES (?, ?, ?, NULL, NULL, -1, ?)""",
                ((user_id, item, behavior, seq) for seq, item in enumerate(items, start=1)),
            )
            db.execute(
                "INSERT INTO chats VALUES (?, ?, ?, ?)",
                (
                    user_id,
                    json.dumps(list(questions), ensure_ascii=False),
                    json.dumps(list(answers), ensure_ascii=False),
                    _now(),
                ),
            )
            self._insert_profile(profile)
            if run_id is not None and assignment is not None:
                self._insert_assignments(run_id, [assignment])

    def chat(self, user_id: str) -> dict[str, Any] | None:
        row = self._db.execute(
            "SELECT questions, answers, created_at FROM chats WHERE user_id = ?", (user_id,)
        ).fetchone()
        if row is None:
            return None
        return {"questions": json.loads(row[0]), "answers": json.loads(row[1]), "at": row[2]}

    def failures(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT user_id, error FROM profile_failures").fetchall())

    def profile(self, user_id: str) -> ProfileRecord | None:
        row = self._db.execute(
            """SELECT user_id, cache_key, profile, raw_output, model_id, prompt_version, params,
                      fallback, fallback_reason, removed, attempts, prompt_tokens,
                      completion_tokens, latency_s, created_at
               FROM profiles WHERE user_id = ?""",
            (user_id,),
        ).fetchone()
        return None if row is None else _profile_record(row)

    def profiles(self) -> list[ProfileRecord]:
        rows = self._db.execute(
            """SELECT user_id, cache_key, profile, raw_output, model_id, prompt_version, params,
                      fallback, fallback_reason, removed, attempts, prompt_tokens,
                      completion_tokens, latency_s, created_at FROM profiles"""
        ).fetchall()
        return sorted((_profile_record(r) for r in rows), key=lambda p: natural_key(p.user_id))

    # ---------------------------------------------------------------- runs

    def save_run(
        self,
        *,
        params: Mapping[str, Any],
        metrics: Mapping[str, Any],
        notes: Sequence[str],
        segments: Sequence[SegmentRecord],
        assignments: Sequence[Assignment],
        space: RunSpace | None = None,
    ) -> int:
        """Store a clustering run with its segments and assignments (and the fitted parts of
        its user space, when the representation has any); it becomes active."""
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO runs (created_at, params, metrics, notes) VALUES (?, ?, ?, ?)",
                (
                    _now(),
                    json.dumps(dict(params), sort_keys=True),
                    json.dumps(dict(metrics)),
                    json.dumps(list(notes)),
                ),
            )
            run_id = int(cursor.lastrowid or 0)
            db.executemany(
                "INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    (
                        run_id,
                        s.segment_id,
                        s.name,
                        s.description,
                        int(s.fallback),
                        int(s.described),
                        s.size,
                        np.asarray(s.centroid, dtype=np.float32).tobytes(),
                        json.dumps(s.facts, ensure_ascii=False),
                    )
                    for s in segments
                ),
            )
            self._insert_assignments(run_id, assignments)
            if space is not None:
                vectors = np.ascontiguousarray(space.vectors, dtype=np.float32)
                db.execute(
                    "INSERT INTO run_spaces VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        run_id,
                        space.kind,
                        json.dumps([str(i) for i in space.item_ids]),
                        int(vectors.shape[1]),
                        vectors.tobytes(),
                        np.asarray(space.counts, dtype=np.int64).tobytes(),
                    ),
                )
            db.execute("INSERT OR REPLACE INTO meta VALUES ('active_run', ?)", (str(run_id),))
        return run_id

    def run_space(self, run_id: int) -> RunSpace | None:
        """The fitted parts of a run's user space (None: the representation has none)."""
        row = self._db.execute(
            "SELECT kind, item_ids, dim, vectors, counts FROM run_spaces WHERE run_id = ?",
            (run_id,),
        ).fetchone()
        if row is None:
            return None
        vectors = np.frombuffer(row[3], dtype=np.float32).reshape(-1, int(row[2])).copy()
        counts = np.frombuffer(row[4], dtype=np.int64).copy()
        return RunSpace(row[0], json.loads(row[1]), vectors, counts)

    def _insert_assignments(self, run_id: int, assignments: Sequence[Assignment]) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO assignments VALUES (?, ?, ?, ?, ?, ?)",
            (
                (run_id, a.user_id, a.segment_id, a.distance, a.margin, int(a.late))
                for a in assignments
            ),
        )

    def add_assignments(self, run_id: int, assignments: Sequence[Assignment]) -> None:
        with self.transaction():
            self._insert_assignments(run_id, assignments)

    def active_run(self) -> RunRecord | None:
        run_id = self.active_run_id()
        return None if run_id is None else self.run(run_id)

    def set_active_run(self, run_id: int) -> None:
        if self.run(run_id) is None:
            raise WorkspaceError(f"no clustering run {run_id} — list runs with `segrec runs`")
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('active_run', ?)", (str(run_id),))

    def run(self, run_id: int) -> RunRecord | None:
        row = self._db.execute(
            "SELECT id, created_at, params, metrics, notes FROM runs WHERE id = ?", (run_id,)
        ).fetchone()
        if row is None:
            return None
        return RunRecord(row[0], row[1], json.loads(row[2]), json.loads(row[3]), json.loads(row[4]))

    def runs(self) -> list[RunRecord]:
        ids = [r[0] for r in self._db.execute("SELECT id FROM runs ORDER BY id").fetchall()]
        return [run for i in ids if (run := self.run(i)) is not None]

    def segments(self, run_id: int) -> list[SegmentRecord]:
        rows = self._db.execute(
            """SELECT segment_id, name, description, fallback, described, size, centroid, facts
               FROM segments WHERE run_id = ? ORDER BY segment_id""",
            (run_id,),
        ).fetchall()
        return [
            SegmentRecord(
                segment_id=r[0],
                name=r[1],
                description=r[2],
                fallback=bool(r[3]),
                described=bool(r[4]),
                size=r[5],
                centroid=np.frombuffer(r[6], dtype=np.float32).copy(),
                facts=json.loads(r[7]),
            )
            for r in rows
        ]

    def assignment_batches(self, run_id: int, *, batch: int = 500_000) -> Iterator[pd.DataFrame]:
        """Every assignment of a run with its segment's name, in batches (for exports):
        user_id, segment, segment_name, distance, margin; users in id order."""
        query = """SELECT a.user_id, a.segment_id AS segment, s.name AS segment_name,
                          a.distance, a.margin
                   FROM assignments a JOIN segments s
                     ON s.run_id = a.run_id AND s.segment_id = a.segment_id
                   WHERE a.run_id = ? ORDER BY a.user_id"""
        yield from pd.read_sql_query(query, self._db, params=(run_id,), chunksize=batch)

    def assignments(
        self, run_id: int, user_ids: Sequence[str] | None = None
    ) -> dict[str, Assignment]:
        """A run's assignments (of ``user_ids`` only, when given)."""
        only = self._only(user_ids)
        rows = self._db.execute(
            "SELECT user_id, segment_id, distance, margin, late FROM assignments WHERE run_id = ?"
            + (f" AND {only}" if only else ""),
            (run_id,),
        ).fetchall()
        return {r[0]: Assignment(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows}

    # ---------------------------------------------------------------- rankers

    def data_version(self) -> str:
        """Changes whenever ingested interactions or items change (the ranker is tuned per
        version). Users saved by `segrec chat` do not count: a few elicited likes should not
        cost a retune; the models are refit on every call and include them anyway."""
        interactions = int(
            self._db.execute(
                """SELECT count(*) FROM interactions WHERE user_id IN
                     (SELECT user_id FROM users WHERE source = 'ingest')"""
            ).fetchone()[0]
        )
        items = self._count("items")
        row = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM ingests").fetchone()
        return f"interactions={interactions};items={items};ingest={row[0]}"

    def ranker_spec(self, data_version: str, run_id: int | None) -> dict[str, Any] | None:
        row = self._db.execute(
            "SELECT spec FROM rankers WHERE data_version = ? AND run_id = ?",
            (data_version, run_id or 0),
        ).fetchone()
        return None if row is None else json.loads(row[0])

    def save_ranker_spec(
        self, data_version: str, run_id: int | None, spec: Mapping[str, Any]
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO rankers VALUES (?, ?, ?, ?)",
                (data_version, run_id or 0, json.dumps(dict(spec)), _now()),
            )

    def active_run_id(self) -> int | None:
        """The active run's id alone (one indexed read: cheap enough to poll)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'active_run'").fetchone()
        return None if row is None else int(row[0])

    def population(self) -> str:
        """Every user and interaction, chat-made ones included: the fitted models see them
        all, so a user saved by `segrec chat` changes this (and not `data_version`)."""
        users = self._count("users")
        interactions = self._count("interactions")
        return f"users={users};interactions={interactions}"

    # ---------------------------------------------------------------- reasons

    def cached_reason(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT reason FROM reasons WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def cache_reason(self, key: str, reason: Mapping[str, Any]) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO reasons VALUES (?, ?, ?)",
                (key, json.dumps(dict(reason), ensure_ascii=False), _now()),
            )

    # ---------------------------------------------------------------- chat sessions

    def save_chat_session(self, session_id: str, state: Mapping[str, Any]) -> None:
        now = _now()
        with self.transaction() as db:
            db.execute(
                """INSERT INTO chat_sessions VALUES (?, ?, ?, ?)
                   ON CONFLICT(session_id) DO UPDATE SET state=excluded.state,
                     updated_at=excluded.updated_at""",
                (session_id, json.dumps(dict(state), ensure_ascii=False), now, now),
            )

    def chat_session(self, session_id: str) -> dict[str, Any] | None:
        row = self._db.execute(
            "SELECT state FROM chat_sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
        return None if row is None else json.loads(row[0])

    def delete_chat_session(self, session_id: str) -> bool:
        with self.transaction() as db:
            cursor = db.execute("DELETE FROM chat_sessions WHERE session_id = ?", (session_id,))
        return cursor.rowcount > 0

    # ---------------------------------------------------------------- embeddings

    def get(self, keys: Sequence[str], encoder_id: str) -> dict[str, np.ndarray]:
        """Cached vectors by text key (implements segrec.embed.VectorCache)."""
        found: dict[str, np.ndarray] = {}
        for chunk in _chunks(list(keys), 500):
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT key, vector FROM embeddings WHERE encoder_id = ? AND key IN ({marks})",
                (encoder_id, *chunk),
            )
            for key, blob in rows:
                found[key] = np.frombuffer(blob, dtype=np.float32).copy()
        return found

    def put(self, vectors: Mapping[str, np.ndarray], encoder_id: str) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?)",
                (
                    (key, encoder_id, np.asarray(v, dtype=np.float32).tobytes())
                    for key, v in vectors.items()
                ),
            )

    # ---------------------------------------------------------------- hierarchy, releases

    def save_hierarchy(
        self,
        run_id: int,
        *,
        params: Mapping[str, Any],
        notes: Sequence[str],
        parents: Sequence[ParentRecord],
    ) -> None:
        """Store a run's segment hierarchy, replacing the one it had (one transaction)."""
        with self.transaction() as db:
            db.execute("DELETE FROM hierarchies WHERE run_id = ?", (run_id,))
            db.execute(
                "INSERT INTO hierarchies VALUES (?, ?, ?, ?)",
                (run_id, _now(), json.dumps(dict(params)), json.dumps(list(notes))),
            )
            db.executemany(
                "INSERT INTO parents VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    (
                        run_id,
                        p.parent_id,
                        p.level,
                        p.name,
                        p.description,
                        int(p.fallback),
                        int(p.described),
                        p.size,
                        json.dumps(list(p.children)),
                        p.parent,
                        json.dumps(p.facts, ensure_ascii=False),
                    )
                    for p in parents
                ),
            )

    def hierarchy(self, run_id: int) -> HierarchyRecord | None:
        row = self._db.execute(
            "SELECT created_at, params, notes FROM hierarchies WHERE run_id = ?", (run_id,)
        ).fetchone()
        if row is None:
            return None
        rows = self._db.execute(
            """SELECT parent_id, level, name, description, fallback, described, size, children,
                      parent, facts
               FROM parents WHERE run_id = ? ORDER BY level, parent_id""",
            (run_id,),
        ).fetchall()
        parents = [
            ParentRecord(
                parent_id=r[0],
                level=r[1],
                name=r[2],
                description=r[3],
                fallback=bool(r[4]),
                described=bool(r[5]),
                size=r[6],
                children=json.loads(r[7]),
                parent=r[8],
                facts=json.loads(r[9]),
            )
            for r in rows
        ]
        return HierarchyRecord(run_id, row[0], json.loads(row[1]), json.loads(row[2]), parents)

    def save_release(self, run_id: int, epsilon: float, details: Mapping[str, Any]) -> int:
        """Record one differentially private publication of a run (ε adds up per run)."""
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO releases (run_id, created_at, epsilon, details) VALUES (?, ?, ?, ?)",
                (run_id, _now(), float(epsilon), json.dumps(dict(details))),
            )
        return int(cursor.lastrowid or 0)

    def releases(self, run_id: int) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT id, created_at, epsilon, details FROM releases WHERE run_id = ? ORDER BY id",
            (run_id,),
        ).fetchall()
        return [{"id": r[0], "created_at": r[1], "epsilon": r[2], **json.loads(r[3])} for r in rows]


@dataclass(frozen=True)
class SegmentRecord:
    segment_id: int
    name: str
    description: str
    fallback: bool
    described: bool
    size: int
    centroid: np.ndarray
    facts: dict[str, Any]

    @property
    def published_facts(self) -> dict[str, Any]:
        """The stored facts, without members, items or categories when the segment is under
        the privacy threshold (not described): the CLI, the API and the report show these."""
        hidden = {"nearest": [], "top_items": [], "top_categories": []}
        return self.facts if self.described else {**self.facts, **hidden}


@dataclass(frozen=True)
class Assignment:
    user_id: str
    segment_id: int
    distance: float
    margin: float
    late: bool = False


@dataclass(frozen=True)
class RunRecord:
    id: int
    created_at: str
    params: dict[str, Any]
    metrics: dict[str, Any]
    notes: list[str]


@dataclass(frozen=True)
class ParentRecord:
    """A parent segment: a group of segments (level 1) or of level-1 parents (level 2)."""

    parent_id: int
    level: int
    name: str
    description: str
    fallback: bool
    described: bool
    size: int
    children: list[int]
    parent: int | None
    facts: dict[str, Any]


@dataclass(frozen=True)
class HierarchyRecord:
    run_id: int
    created_at: str
    params: dict[str, Any]
    notes: list[str]
    parents: list[ParentRecord]

    def segment_parents(self) -> dict[int, int]:
        """Segment id → the id of its level-1 parent."""
        return {c: p.parent_id for p in self.parents if p.level == 1 for c in p.children}


def _profile_record(row: Sequence[Any]) -> ProfileRecord:
    return ProfileRecord(
        user_id=row[0],
        cache_key=row[1],
        profile=json.loads(row[2]),
        raw_output=row[3],
        model_id=row[4],
        prompt_version=row[5],
        params=json.loads(row[6]),
        fallback=bool(row[7]),
        fallback_reason=row[8],
        removed=json.loads(row[9]),
        attempts=row[10],
        prompt_tokens=row[11],
        completion_tokens=row[12],
        latency_s=row[13],
        created_at=row[14],
    )


def _chunks(values: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def natural_key(value: str) -> tuple[int, int | str]:
    """Sort numeric ids numerically and before the rest ("2" < "10" < "a")."""
    return (0, int(value)) if value.isdigit() else (1, value)
