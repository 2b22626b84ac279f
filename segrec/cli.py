"""The ``segrec`` command: a thin typer app. Each command parses, calls one library
function, and renders the result with rich. User mistakes are one line on stderr and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from segrec import gates
from segrec.config import Settings, load_settings
from segrec.errors import InputError, SegrecError

app = typer.Typer(
    name="segrec",
    help="Readable user segments and explained recommendations from behaviour data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
err = Console(stderr=True)
out = Console()

F = TypeVar("F", bound=Callable[..., Any])

WorkspaceOpt = Annotated[
    Path | None,
    typer.Option(
        "--workspace", "-w", help="Workspace directory [env SEGREC_WORKSPACE; default .segrec]."
    ),
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="A segrec.toml file [env SEGREC_CONFIG].")
]


def user_errors(fn: F) -> F:
    """Turn SegrecError (and a damaged workspace) into one line on stderr and exit 2;
    Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SegrecError as exc:
            err.print(f"segrec: error: {exc}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except sqlite3.DatabaseError as exc:  # damage met outside a `with Store` block
            from segrec.store import damage_error

            if (damage := damage_error(exc)) is None:
                raise
            err.print(f"segrec: error: {damage}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(damage.exit_code) from None
        except KeyboardInterrupt:
            err.print("segrec: interrupted — finished work is saved; rerun to resume")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _emit_json(data: Any) -> None:
    """Exactly one JSON object on stdout, uncoloured, whatever the terminal."""
    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")


@contextmanager
def _counting_llm_calls() -> Iterator[Any]:
    """Count the command's LLM calls (see segrec.llm.counting); report with _llm_calls."""
    from segrec.llm.counting import count_calls

    with count_calls() as count:
        yield count


def _llm_calls(count: Any, data: dict[str, Any] | None = None) -> None:
    """Add ``llm_calls`` to a JSON object about to be printed, else say it on stderr."""
    if data is not None:
        data["llm_calls"] = count.calls
    else:
        err.print(f"LLM calls: {count.calls}", markup=False)


def _settings(config: Path | None, **overrides: Any) -> Settings:
    return load_settings(overrides, config_path=config)


def _llm_settings(
    config: Path | None,
    workspace: Path | None,
    llm: str | None,
    model_path: Path | None,
    threads: int | None,
    base_url: str | None,
    timeout: float | None,
    domain: str | None,
    **extra: Any,
) -> Settings:
    """Settings for a command that calls the LLM (the shared backend flags)."""
    return _settings(
        config,
        workspace=workspace,
        llm=llm,
        model_path=model_path,
        threads=threads,
        base_url=base_url,
        timeout_s=timeout,
        domain=domain,
        **extra,
    )


def _parse_ids(text: str | None, flag: str) -> list[str] | None:
    if text is None:
        return None
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids:
        raise InputError(f"{flag}: no user ids given — pass a comma-separated list, e.g. 1,2,3")
    return list(dict.fromkeys(ids))


RatingsArg = Annotated[
    Path | None, typer.Argument(help="Behaviour log (CSV/Parquet). Omit to use ingested data.")
]
ItemsOpt = Annotated[Path | None, typer.Option("--items", help="Item catalogue (CSV/Parquet).")]
AttributesOpt = Annotated[
    Path | None, typer.Option("--attributes", help="Optional user attributes (PII refused).")
]
AttributesUserColOpt = Annotated[
    str | None, typer.Option(help="Attributes column with user ids (default: auto).")
]
UserColOpt = Annotated[str | None, typer.Option(help="Log column with user ids.")]
ItemColOpt = Annotated[str | None, typer.Option(help="Log column with item ids.")]
BehaviorColOpt = Annotated[str | None, typer.Option(help="Log column with behaviours.")]
ValueColOpt = Annotated[str | None, typer.Option(help="Log column with values (ratings…).")]
TimestampColOpt = Annotated[str | None, typer.Option(help="Log column with times.")]
ItemIdColOpt = Annotated[str | None, typer.Option(help="Catalogue column with item ids.")]
TitleColOpt = Annotated[str | None, typer.Option(help="Catalogue title column.")]
DescriptionColOpt = Annotated[str | None, typer.Option(help="Catalogue description column.")]
CategoryColOpt = Annotated[
    list[str] | None, typer.Option(help="Catalogue category/genre/tag column (repeatable).")
]
DelimiterOpt = Annotated[str, typer.Option(help="CSV delimiter.")]
SkipBadRowsOpt = Annotated[
    bool, typer.Option("--skip-bad-rows", help="Skip and count bad rows instead of failing.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object.")]
LlmOpt = Annotated[
    str | None, typer.Option("--llm", help="'local' or 'openai:<model>' [default local].")
]
ModelPathOpt = Annotated[
    Path | None,
    typer.Option(help="A GGUF for the local backend; gemma3-270m: the segrec[gemma] extra's."),
]
ThreadsOpt = Annotated[int | None, typer.Option(help="llama.cpp threads.")]
BaseUrlOpt = Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint.")]
ConcurrencyOpt = Annotated[int | None, typer.Option(help="OpenAI requests in flight.")]
TimeoutOpt = Annotated[float | None, typer.Option(help="Per-request timeout, seconds.")]
DomainOpt = Annotated[
    str | None, typer.Option(help="What the items are, for prompts (movie, product…).")
]
ExecutorOpt = Annotated[
    str | None,
    typer.Option(help="Where per-user LLM/encoder work runs: local or ray [default local]."),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(help="Ray cluster HOST:PORT to attach to [env RAY_ADDRESS; default: start one]."),
]
RayWorkersOpt = Annotated[
    int | None, typer.Option(min=1, help="Ray actors, each with its own backend [one per CPU].")
]


def _check_executor(settings: Settings, *, embed: bool = False) -> None:
    """With --executor ray: Ray installed and the cluster up, before anything is written."""
    if settings.executor == "ray":
        from segrec.batch import check_cluster

        check_cluster(settings, embed=embed)


def _ingest_files(
    settings: Settings,
    ratings: Path,
    items: Path | None,
    attributes: Path | None,
    columns: tuple[str | None, ...],
    categories: list[str] | None,
    delimiter: str,
    skip_bad_rows: bool,
    attributes_user_col: str | None,
) -> None:
    from segrec import pipeline
    from segrec.data import ItemColumns, LogColumns

    if items is None:
        raise InputError(f"{ratings}: --items ITEMS is required with a behaviour log")
    user, item, behavior, value, timestamp, item_id, title, description = columns
    result = pipeline.ingest(
        settings,
        ratings,
        items,
        attributes,
        log_columns=LogColumns(user, item, behavior, value, timestamp),
        item_columns=ItemColumns(
            item_id, title, description, tuple(categories) if categories else None
        ),
        delimiter=delimiter,
        skip_bad_rows=skip_bad_rows,
        attribute_user_column=attributes_user_col,
    )
    _report_ingest(result)


@app.command()
@user_errors
def ingest(
    ratings: Annotated[Path, typer.Argument(help="Behaviour log (CSV/Parquet).")],
    items: ItemsOpt = None,
    attributes: AttributesOpt = None,
    attributes_user_col: AttributesUserColOpt = None,
    user_col: UserColOpt = None,
    item_col: ItemColOpt = None,
    behavior_col: BehaviorColOpt = None,
    value_col: ValueColOpt = None,
    timestamp_col: TimestampColOpt = None,
    item_id_col: ItemIdColOpt = None,
    title_col: TitleColOpt = None,
    description_col: DescriptionColOpt = None,
    category_col: CategoryColOpt = None,
    delimiter: DelimiterOpt = ",",
    skip_bad_rows: SkipBadRowsOpt = False,
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Validate and load data into the workspace without profiling (profile does both).

    Example: segrec ingest ratings.csv --items movies.csv
    """
    columns = (user_col, item_col, behavior_col, value_col, timestamp_col)
    columns += (item_id_col, title_col, description_col)
    settings = _settings(config, workspace=workspace)
    _ingest_files(
        settings,
        ratings,
        items,
        attributes,
        columns,
        category_col,
        delimiter,
        skip_bad_rows,
        attributes_user_col,
    )


@app.command()
@user_errors
def profile(
    ratings: RatingsArg = None,
    items: ItemsOpt = None,
    attributes: AttributesOpt = None,
    attributes_user_col: AttributesUserColOpt = None,
    user_col: UserColOpt = None,
    item_col: ItemColOpt = None,
    behavior_col: BehaviorColOpt = None,
    value_col: ValueColOpt = None,
    timestamp_col: TimestampColOpt = None,
    item_id_col: ItemIdColOpt = None,
    title_col: TitleColOpt = None,
    description_col: DescriptionColOpt = None,
    category_col: CategoryColOpt = None,
    delimiter: DelimiterOpt = ",",
    skip_bad_rows: SkipBadRowsOpt = False,
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
    llm: LlmOpt = None,
    model_path: ModelPathOpt = None,
    threads: ThreadsOpt = None,
    base_url: BaseUrlOpt = None,
    concurrency: ConcurrencyOpt = None,
    timeout: TimeoutOpt = None,
    domain: DomainOpt = None,
    executor: ExecutorOpt = None,
    ray_address: RayAddressOpt = None,
    ray_workers: RayWorkersOpt = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Profile only the first N users.")
    ] = None,
    users: Annotated[str | None, typer.Option(help="Profile only these ids, e.g. 1,2,3.")] = None,
    show: Annotated[str | None, typer.Option("--show", help="Print one user's profile.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Ingest behaviour data (if given) and write one grounded LLM profile per user.

    Example: segrec profile ratings.csv --items movies.csv --domain movie --limit 20

    On Ray: segrec profile --executor ray --llm openai:MODEL --base-url http://vllm:8000/v1
    """
    from segrec import pipeline

    settings = _settings(
        config,
        workspace=workspace,
        llm=llm,
        model_path=model_path,
        threads=threads,
        base_url=base_url,
        concurrency=concurrency,
        timeout_s=timeout,
        domain=domain,
        executor=executor,
        ray_address=ray_address,
        ray_workers=ray_workers,
    )
    _check_executor(settings)
    if show is not None:
        _show_profile(pipeline.show_profile(settings, show), as_json)
        return
    if ratings is not None:
        columns = (user_col, item_col, behavior_col, value_col, timestamp_col)
        columns += (item_id_col, title_col, description_col)
        _ingest_files(
            settings,
            ratings,
            items,
            attributes,
            columns,
            category_col,
            delimiter,
            skip_bad_rows,
            attributes_user_col,
        )
    elif items is not None:
        raise InputError(f"{items}: --items given without a behaviour log — pass RATINGS too")
    selection = pipeline.select_users(settings, users=_parse_ids(users, "--users"), limit=limit)
    with _counting_llm_calls() as calls:
        with _progress("profiling", len(selection.user_ids)) as update:
            stats = pipeline.run_profiles(settings, selection.user_ids, on_progress=update)
        _, assigned = pipeline.assign_users_to_run(settings)
    if as_json:
        data = stats.as_json()
        _llm_calls(calls, data)
        _emit_json(data)
    else:
        _report_profiles(stats)
        _llm_calls(calls)
    for note in selection.notes:
        err.print(f"note: {note}", markup=False)
    if assigned:
        err.print(f"note: {assigned} user(s) assigned to the active segments", markup=False)


def _task_bars() -> Progress:
    """Progress bars on stderr (only on a terminal), one per task, labelled by description."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=not err.is_terminal,
    )


@contextmanager
def _progress(label: str, total: int) -> Iterator[Callable[[Any], None]]:
    """A rich progress bar on stderr (only on a terminal); yields an update(stats) callback."""
    progress = Progress(
        SpinnerColumn(),
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("fallback {task.fields[fallback]} · failed {task.fields[failed]}"),
        console=err,
        disable=not err.is_terminal,
    )
    task = progress.add_task(label, total=total, fallback=0, failed=0, rate="")

    def update(stats: Any) -> None:
        fresh = stats.done - stats.cached
        rate = f"{fresh / stats.seconds:.2f} users/s" if stats.seconds > 0 and fresh else ""
        progress.update(
            task, completed=stats.done, fallback=stats.fallback, failed=stats.failed, rate=rate
        )

    with progress:
        yield update


def _report_ingest(result: Any) -> None:
    report, stats = result.report, result.stats
    for note in report.notes:
        err.print(f"note: {note}", markup=False)
    if report.skipped or report.duplicates:
        err.print(
            f"skipped {report.skipped} bad rows and {report.duplicates} duplicate rows "
            "(--skip-bad-rows); first problems:",
            markup=False,
        )
        for problem in report.problems[:5]:
            err.print(f"  {problem}", markup=False)
    change = (
        f"{stats.interactions_added} new interactions, {stats.items_added} new items, "
        f"{stats.users_added} new users"
        if stats.changed
        else "no changes (already ingested)"
    )
    err.print(f"ingested {report.loaded} interactions: {change}", markup=False)


def _report_profiles(stats: Any) -> None:
    table = Table(title="segrec profile", show_header=False)
    for key, value in stats.as_json().items():
        if key != "text":
            table.add_row(key, str(value))
    out.print(table)
    _print_text_lines(stats.text)
    if stats.fallback:
        out.print(
            f"{stats.fallback} profile(s) are deterministic fallbacks built from the history "
            "(the LLM output failed validation); see `segrec profile --show ID`."
        )
    if stats.removed_claims:
        out.print(f"{stats.removed_claims} ungrounded claim(s) were removed from LLM output.")
    if stats.failed:
        from segrec.store import natural_key

        ids = ", ".join(sorted(stats.failures, key=natural_key)[:10])
        first = next(iter(stats.failures.values()))
        out.print(
            f"{stats.failed} user(s) failed (LLM errors after retries): {ids} — rerun to retry."
        )
        out.print(f"first error: {first}", markup=False, highlight=False)


def _show_profile(record: Any, as_json: bool) -> None:
    data = {
        "user": record.user_id,
        "profile": record.profile,
        "fallback": record.fallback,
        "fallback_reason": record.fallback_reason,
        "removed_claims": record.removed,
        "model_id": record.model_id,
        "prompt_version": record.prompt_version,
        "params": record.params,
        "attempts": record.attempts,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "latency_s": record.latency_s,
        "created_at": record.created_at,
        "raw_output": record.raw_output,
    }
    if as_json:
        _emit_json(data)
        return
    p = record.profile
    lines = [
        p["summary"],
        "",
        f"likes: {', '.join(p['likes']) or '—'}",
        f"dislikes: {', '.join(p['dislikes']) or '—'}",
        f"favourites: {', '.join(p['favourite_items']) or '—'}",
        f"themes: {', '.join(p['themes']) or '—'}",
        "",
        f"model {record.model_id} · prompt {record.prompt_version} · {record.attempts} "
        f"attempt(s) · {record.latency_s:.1f}s",
    ]
    if record.fallback:
        lines.append(f"FALLBACK (deterministic): {record.fallback_reason}")
    if record.removed:
        lines.append("removed as ungrounded: " + "; ".join(record.removed))
    out.print(Panel("\n".join(lines), title=f"user {record.user_id}"), markup=False)


@app.command()
@user_errors
def cluster(
    k: Annotated[str, typer.Option("--k", help="Number of segments, or 'auto'.")] = "auto",
    algorithm: Annotated[
        str,
        typer.Option(
            help="auto (minibatch above 50,000 users, else kmeans), kmeans, minibatch, "
            "hdbscan or agglomerative."
        ),
    ] = "auto",
    users: Annotated[
        str | None, typer.Option(help="Cluster only these ids, e.g. 1,2,3 [default: all].")
    ] = None,
    sample: Annotated[
        int | None, typer.Option(min=1, help="Cluster a seeded sample of N users (--seed).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for every clusterer [default 0].")] = None,
    pca: Annotated[int | None, typer.Option(min=2, help="PCA components first.")] = None,
    represent: Annotated[
        str | None,
        typer.Option(help="What is clustered: profile, items, mix or collab [items]."),
    ] = None,
    encoder: Annotated[
        Path | None, typer.Option(help="A local sentence-transformers model folder.")
    ] = None,
    min_segment_size: Annotated[
        int | None, typer.Option(min=1, help="Privacy threshold [default 10].")
    ] = None,
    small: Annotated[
        str, typer.Option(help="Segments under the threshold: merge or unnamed.")
    ] = "merge",
    llm: LlmOpt = None,
    model_path: ModelPathOpt = None,
    threads: ThreadsOpt = None,
    base_url: BaseUrlOpt = None,
    timeout: TimeoutOpt = None,
    domain: DomainOpt = None,
    executor: ExecutorOpt = None,
    ray_address: RayAddressOpt = None,
    ray_workers: RayWorkersOpt = None,
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cluster every ingested user into segments and name them (profiles only the few
    members each segment shows the LLM).

    Example: segrec cluster --k 5    (or --k auto; --sample 100000 --seed 1 for a sample)
    """
    from segrec import pipeline

    if k == "auto":
        k_value = None
    elif k.isdigit():
        k_value = int(k)
    else:
        raise InputError(f"--k {k!r}: pass a number of segments (e.g. 5) or 'auto'")
    settings = _llm_settings(
        config,
        workspace,
        llm,
        model_path,
        threads,
        base_url,
        timeout,
        domain,
        seed=seed,
        represent=represent,
        encoder=encoder,
        min_segment_size=min_segment_size,
        executor=executor,
        ray_address=ray_address,
        ray_workers=ray_workers,
    )
    _check_executor(settings, embed=True)
    with _counting_llm_calls() as calls, err.status("clustering", spinner="dots") as status:
        result = pipeline.run_clustering(
            settings,
            k=k_value,
            algorithm=algorithm,
            pca=pca,
            small=small,
            users=_parse_ids(users, "--users"),
            sample=sample,
            on_stage=lambda stage: status.update(stage),
        )
    report = pipeline.segments_report(settings, result.run.id)
    text = gates.tally_segments(result.segments)
    gates.record_counts(settings.workspace, "cluster", text)
    _print_text_lines(text)
    if as_json:
        _llm_calls(calls, report)
        _emit_json(report)
    else:
        _print_segments(report)
        _llm_calls(calls)


def _print_segments(report: dict[str, Any]) -> None:
    run, metrics = report["run"], report["metrics"]
    if metrics.get("curve"):
        curve = Table(title="k scan")
        for column in ("k", "silhouette", "stability"):
            curve.add_column(column)
        for row in metrics["curve"]:
            curve.add_row(str(row["k"]), f"{row['silhouette']:.3f}", f"{row['stability']:.3f}")
        out.print(curve)
    table = Table(
        title=f"run {run['id']}: {metrics['k']} segments of {metrics['users']} users",
        caption=f"{run['params']['represent']} vectors, {run['params']['algorithm']} · "
        f"silhouette {_fmt(metrics['silhouette'])} · stability {_fmt(metrics['stability'])}",
    )
    for column in ("id", "name", "size", "share", "top categories", "silh.", "stab."):
        table.add_column(column)
    for seg in report["segments"]:
        name = seg["name"] + (" (fallback)" if seg["fallback"] else "")
        cats = ", ".join(c["category"] for c in seg["top_categories"][:3])
        table.add_row(
            str(seg["id"]),
            name,
            str(seg["size"]),
            f"{seg['share']:.0%}",
            cats,
            _fmt(seg["silhouette"]),
            _fmt(seg["stability"]),
        )
    out.print(table)
    for note in run["notes"]:
        err.print(f"note: {note}", markup=False)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _segment_strategy(settings: Settings, run_id: int, segment_id: int) -> dict[str, Any]:
    """The ranker's strategy for a segment, from the spec tuned for this data and run."""
    from segrec.ranker import RankerSpec, segment_strategy
    from segrec.store import Store

    with Store.open(settings.workspace) as store:
        stored = store.ranker_spec(store.data_version(), run_id)
    return segment_strategy(RankerSpec.from_dict(stored) if stored else None, segment_id)


def _strategy_lines(strategy: dict[str, Any]) -> list[str]:
    if not strategy["tuned"]:
        return ["ranker strategy: not tuned for this run yet (`segrec recommend` tunes it)"]
    lines = []
    for group in ("long", "short"):
        entry = strategy[group]
        gain = f", validation NDCG@10 gain {entry['gain']:+.4f}" if "gain" in entry else ""
        weights = " ".join(f"{k} {v:g}" for k, v in entry["weights"].items())
        lines.append(f"ranker, {group} histories: {entry['strategy']}{gain} · {weights}")
    return lines


segments_app = typer.Typer(help="The segments of the active clustering run.", no_args_is_help=False)
app.add_typer(segments_app, name="segments")


@segments_app.callback(invoke_without_command=True)
@user_errors
def segments(
    ctx: typer.Context,
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    tree: Annotated[
        bool, typer.Option("--tree", help="Print the hierarchy (see `segrec hierarchy`).")
    ] = False,
) -> None:
    """List the segments: name, size, top categories, quality.

    Example: segrec segments --json    (or --tree for the parents above the segments)
    """
    if ctx.invoked_subcommand is not None:
        return
    from segrec import pipeline

    report = pipeline.segments_report(_settings(config, workspace=workspace))
    if as_json:
        _emit_json(report)
    elif tree:
        _print_tree(report)
    else:
        _print_segments(report)


@segments_app.command("show")
@user_errors
def segments_show(
    segment_id: Annotated[int, typer.Argument(help="Segment id.")],
    llm: LlmOpt = None,
    model_path: ModelPathOpt = None,
    threads: ThreadsOpt = None,
    base_url: BaseUrlOpt = None,
    timeout: TimeoutOpt = None,
    domain: DomainOpt = None,
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Everything about one segment (members shown without a profile are profiled now).

    Example: segrec segments show 0
    """
    from segrec import pipeline
    from segrec.serving import segment_json

    settings = _llm_settings(config, workspace, llm, model_path, threads, base_url, timeout, domain)
    with _counting_llm_calls() as calls, err.status("loading the segment", spinner="dots"):
        run, seg, notes = pipeline.show_segment(settings, segment_id)
    data = segment_json(run, seg)
    data["strategy"] = _segment_strategy(settings, run.id, seg.segment_id)
    for note in notes:
        err.print(f"note: {note}", markup=False)
    if as_json:
        _llm_calls(calls, data)
        _emit_json(data)
        return
    _llm_calls(calls)
    lines = [seg.description, ""]
    lines.append(
        f"size {seg.size} ({seg.facts['share']:.0%}) · silhouette "
        f"{_fmt(seg.facts['silhouette'])} · stability {_fmt(seg.facts['stability'])}"
        f" · variance {_fmt(seg.facts['variance'])}"
    )
    lines.append(
        "top categories: "
        + ", ".join(f"{c['category']} ×{c['lift']:.2f}" for c in seg.facts["top_categories"])
        or "—"
    )
    lines.append(
        "top items: " + ", ".join(f"{i['title']} ×{i['lift']:.2f}" for i in seg.facts["top_items"])
        or "—"
    )
    lines += _strategy_lines(data["strategy"])
    lines.append("members nearest the centroid:")
    lines += [f"  {m['user_id']}: {m['summary']}" for m in seg.facts["nearest"]]
    if seg.fallback:
        lines.append(f"label is a fallback: {seg.facts.get('fallback_reason')}")
    out.print(Panel("\n".join(lines), title=f"segment {seg.segment_id}: {seg.name}"), markup=False)


@segments_app.command("export")
@user_errors
def segments_export(
    out_file: Annotated[
        Path, typer.Option("--out", help="Output file: .parquet (or .pq) or .csv.")
    ],
    run: Annotated[
        int | None, typer.Option("--run", help="Clustering run [default: the active one].")
    ] = None,
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Write every user's segment (user_id, segment, segment_name, distance, margin).

    Example: segrec segments export --out segments.parquet --run 2
    """
    from segrec import pipeline

    settings = _settings(config, workspace=workspace)
    with err.status("exporting", spinner="dots"):
        exported, rows = pipeline.export_assignments(settings, out_file, run_id=run)
    err.print(f"wrote {rows} users of run {exported.id} to {out_file}", markup=False)


def _print_tree(report: dict[str, Any]) -> None:
    from rich.tree import Tree

    segments = {s["id"]: s for s in report["segments"]}
    parents = {p["id"]: p for p in report["parents"]}

    def label(node: dict[str, Any], kind: str) -> str:
        mark = " (fallback)" if node["fallback"] else ""
        return f"{kind} {node['id']}: {node['name']}{mark} · {node['size']} users"

    root = Tree(f"run {report['run']['id']}: {len(segments)} segments")
    if not parents:
        for seg in segments.values():
            root.add(label(seg, "segment"))
        out.print(root, markup=False)
        err.print("note: no hierarchy for this run — build one with `segrec hierarchy`")
        return

    def add(branch: Tree, parent: dict[str, Any]) -> None:
        node = branch.add(label(parent, f"level {parent['level']} parent"))
        for child in parent["children"]:
            if parent["level"] == 1:
                node.add(label(segments[child], "segment"))
            else:
                add(node, parents[child])

    top = max(p["level"] for p in parents.values())
    for parent in parents.values():
        if parent["level"] == top:
            add(root, parent)
    out.print(root, markup=False)
    for note in report["hierarchy"]["notes"]:
        err.print(f"note: {note}", markup=False)


@app.command()
@user_errors
def hierarchy(
    run: Annotated[int | None, typer.Option("--run", help="Run id [default: active].")] = None,
    levels: Annotated[int, typer.Option("--levels", help="Levels with the segments: 2 or 3.")] = 2,
    llm: LlmOpt = None,
    model_path: ModelPathOpt = None,
    threads: ThreadsOpt = None,
    base_url: BaseUrlOpt = None,
    timeout: TimeoutOpt = None,
    domain: DomainOpt = None,
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Group a run's segments into named parents (and grandparents with --levels 3).

    Example: segrec hierarchy --levels 3 && segrec segments --tree
    """
    from segrec import pipeline
    from segrec.hierarchy import make_hierarchy

    settings = _llm_settings(config, workspace, llm, model_path, threads, base_url, timeout, domain)
    with (
        _counting_llm_calls() as calls,
        err.status("building the hierarchy", spinner="dots") as status,
    ):
        record = make_hierarchy(
            settings, run_id=run, levels=levels, on_stage=lambda stage: status.update(stage)
        )
    text = gates.tally_segments(record.parents, kind="parent")
    gates.record_counts(settings.workspace, "hierarchy", text)
    _print_text_lines(text)
    report = pipeline.segments_report(settings, record.run_id)
    if as_json:
        _llm_calls(calls, report)
        _emit_json(report)
    else:
        _print_tree(report)
        _llm_calls(calls)


@app.command()
@user_errors
def report(
    out_path: Annotated[Path, typer.Option("--out", help="The HTML file to write.")] = Path(
        "report.html"
    ),
    run: Annotated[int | None, typer.Option("--run", help="Run id [default: active].")] = None,
    compare: Annotated[
        int | None, typer.Option("--compare", help="Show how segments changed since this run.")
    ] = None,
    epsilon: Annotated[
        float | None,
        typer.Option("--epsilon", help="Publish counts with differential privacy (ε)."),
    ] = None,
    min_segment_size: Annotated[
        int | None, typer.Option(help="Privacy threshold [default: the run's].")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Map sample and projection seed.")] = None,
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write one offline HTML page of a run: map, hierarchy, segment cards, run, changes.

    Example: segrec report --compare 1 --out report.html    (then open it in a browser)
    """
    from segrec.report import write_report

    settings = _settings(config, workspace=workspace, seed=seed)
    with err.status("building the report", spinner="dots") as status:
        result = write_report(
            settings,
            out=out_path,
            run_id=run,
            compare=compare,
            epsilon=epsilon,
            min_segment_size=min_segment_size,
            on_stage=lambda stage: status.update(stage),
        )
    if as_json:
        _emit_json({**result.__dict__, "path": str(result.path)})
        return
    what = f"{result.segments} segments, {result.users:,} users"
    if result.projection:
        what += f", map of {result.map_points:,} users ({result.projection})"
    if result.epsilon is not None:
        what += f", ε = {result.epsilon:g} (release {result.release})"
    out.print(f"wrote {result.path} ({result.bytes / 1e6:.1f} MB): {what}", markup=False)
    for note in result.notes:
        err.print(f"note: {note}", markup=False)


@app.command()
@user_errors
def runs(
    activate: Annotated[
        int | None, typer.Option("--activate", help="Make this run the active one.")
    ] = None,
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List clustering runs (the newest is active unless another is chosen).

    Example: segrec runs --activate 2
    """
    from segrec import pipeline

    rows = pipeline.list_runs(_settings(config, workspace=workspace), activate=activate)
    if as_json:
        _emit_json({"runs": rows})
        return
    table = Table(title="clustering runs")
    for column in ("run", "active", "created", "k", "algorithm", "represent", "silhouette"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row["id"]),
            "*" if row["active"] else "",
            row["created_at"],
            str(row["params"]["k"]),
            row["params"]["algorithm"],
            row["params"]["represent"],
            _fmt(row["metrics"]["silhouette"]),
        )
    out.print(table)


@app.command()
@user_errors
def assign(
    user: Annotated[str, typer.Option("--user", help="User id.")],
    llm: LlmOpt = None,
    model_path: ModelPathOpt = None,
    threads: ThreadsOpt = None,
    base_url: BaseUrlOpt = None,
    timeout: TimeoutOpt = None,
    domain: DomainOpt = None,
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Place a user in the active run's nearest segment (users the run does not hold yet;
    on profile or mix vectors a user without a profile is profiled first).

    Example: segrec assign --user 42
    """
    from segrec import pipeline
    from segrec.workspace import Workspace

    settings = _llm_settings(config, workspace, llm, model_path, threads, base_url, timeout, domain)
    with _counting_llm_calls() as calls, Workspace(settings) as ws:
        found = ws.assign([user])
    if not found:
        raise InputError("no clustering run yet — run `segrec cluster --k 5` first")
    a = found[0]
    _, seg = pipeline.segment_detail(settings, a.segment_id)
    data = {
        "user": a.user_id,
        "segment": a.segment_id,
        "name": seg.name,
        "distance": round(a.distance, 4),
        "margin": round(a.margin, 4),
        "late": a.late,
    }
    if as_json:
        _llm_calls(calls, data)
        _emit_json(data)
    else:
        _llm_calls(calls)
        out.print(
            f'user {a.user_id} → segment {a.segment_id} "{seg.name}" (distance '
            f"{a.distance:.3f}, margin over the next {a.margin:.3f})",
            markup=False,
        )


@app.command()
@user_errors
def users(
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the users in the workspace and whether each has a profile.

    Example: segrec users --json
    """
    from segrec import pipeline

    rows = pipeline.list_users(_settings(config, workspace=workspace))
    if as_json:
        _emit_json({"users": rows})
        return
    table = Table(title=f"{len(rows)} users")
    for column in ("user", "interactions", "profile"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["user"], str(row["interactions"]), row["profile"])
    out.print(table)


NOpt = Annotated[int, typer.Option("--n", help="How many items per user (1–1000).")]
CategoryFilterOpt = Annotated[
    list[str] | None,
    typer.Option("--category", help="Only items with this category (repeatable)."),
]
ExcludeOpt = Annotated[
    str | None, typer.Option("--exclude", help="Item ids never to recommend, comma-separated.")
]
ExcludeFileOpt = Annotated[
    Path | None,
    typer.Option("--exclude-file", help="File with item ids to leave out, one per line."),
]


def _filters(categories: list[str] | None, exclude: str | None, exclude_file: Path | None) -> Any:
    from segrec.serving import Filters

    ids = [part.strip() for part in (exclude or "").split(",") if part.strip()]
    if exclude_file is not None:
        try:
            text = exclude_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"--exclude-file {exclude_file}: cannot read it ({exc})") from None
        ids += [line.strip() for line in text.splitlines() if line.strip()]
    return Filters(categories=list(categories or []), exclude=list(dict.fromkeys(ids)))


@app.command()
@user_errors
def recommend(
    user: Annotated[str | None, typer.Option("--user", help="One user id.")] = None,
    all_users: Annotated[
        bool, typer.Option("--all", help="Every user with interactions (needs --out).")
    ] = False,
    n: NOpt = 10,
    out_path: Annotated[
        Path | None, typer.Option("--out", help="Write recs.parquet, .csv or .json.")
    ] = None,
    category: CategoryFilterOpt = None,
    exclude: ExcludeOpt = None,
    exclude_file: ExcludeFileOpt = None,
    represent: Annotated[
        str | None, typer.Option(help="User vector for the content signal: items, profile, mix.")
    ] = None,
    encoder: Annotated[
        Path | None, typer.Option(help="A local sentence-transformers model folder.")
    ] = None,
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Top-N unseen items from the blended ranker (no LLM involved).

    Example: segrec recommend --user 1 --n 10    ·    segrec recommend --all --out recs.parquet
    """
    from segrec import serving

    if (user is None) == (not all_users):
        raise InputError("pass either --user ID or --all")
    if all_users and out_path is None:
        raise InputError(
            "--all writes one row per recommendation: add --out recs.parquet|.csv|.json"
        )
    serving.check_n(n)
    if out_path is not None:
        serving.check_out(out_path)
    settings = _settings(config, workspace=workspace, represent=represent, encoder=encoder)
    filters = _filters(category, exclude, exclude_file)
    progress = _task_bars()
    with progress:
        task = progress.add_task("loading the ranker", total=None)
        result = serving.recommend(
            settings,
            [user] if user is not None else None,
            n=n,
            filters=filters,
            on_stage=lambda stage: progress.update(task, description=stage),
            on_progress=lambda done, total: progress.update(
                task, description="recommending", completed=done, total=total
            ),
        )
    table = result.table
    if out_path is not None:
        serving.write_table(table, out_path)
        users = table["user_id"].nunique()
        err.print(
            f"wrote {len(table)} recommendations for {users} users to {out_path}", markup=False
        )
    if as_json and user is not None:
        _emit_json({"user": user, "items": table.drop(columns=["user_id"]).to_dict("records")})
    elif user is not None and out_path is None:
        grid = Table(title=f"top {n} for user {user}")
        signals = [
            c for c in table.columns if c not in ("user_id", "rank", "item_id", "title", "score")
        ]
        for column in ("#", "item", "title", "score", *signals):
            grid.add_column(column)
        for row in table.itertuples(index=False):
            grid.add_row(
                str(row.rank),
                str(row.item_id),
                str(row.title),
                f"{row.score:.2f}",
                *(f"{getattr(row, s):+.2f}" for s in signals),
            )
        out.print(grid)
    for note in result.notes:
        err.print(f"note: {note}", markup=False)


@app.command()
@user_errors
def explain(
    user: Annotated[str, typer.Option("--user", help="User id.")],
    n: NOpt = 10,
    category: CategoryFilterOpt = None,
    exclude: ExcludeOpt = None,
    exclude_file: ExcludeFileOpt = None,
    llm: LlmOpt = None,
    model_path: ModelPathOpt = None,
    threads: ThreadsOpt = None,
    base_url: BaseUrlOpt = None,
    timeout: TimeoutOpt = None,
    domain: DomainOpt = None,
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A user's profile, segment and top-N items, each with a reason from their history.

    Example: segrec explain --user 1 --n 5 --json
    """
    from segrec import serving

    serving.check_n(n)
    settings = _llm_settings(config, workspace, llm, model_path, threads, base_url, timeout, domain)
    filters = _filters(category, exclude, exclude_file)
    with _counting_llm_calls() as calls, err.status("explaining", spinner="dots") as status:
        data, notes = serving.explain(
            settings, user, n=n, filters=filters, on_stage=lambda stage: status.update(stage)
        )
    text = gates.tally_items(data["items"])
    gates.record_counts(settings.workspace, "explain", text)
    data["text"] = text.as_json()
    _print_text_lines(text)
    if as_json:
        _llm_calls(calls, data)
        _emit_json(data)
    else:
        _print_explain(data)
        _llm_calls(calls)
    for note in notes:
        err.print(f"note: {note}", markup=False)


def _print_explain(data: dict[str, Any]) -> None:
    profile = data["profile"]
    lines = [profile["summary"]]
    if profile.get("likes"):
        lines.append("likes: " + ", ".join(profile["likes"]))
    if profile.get("dislikes"):
        lines.append("dislikes: " + ", ".join(profile["dislikes"]))
    if profile.get("fallback"):
        lines.append("(deterministic fallback profile)")
    out.print(Panel("\n".join(lines), title=f"user {data['user']}"), markup=False)
    segment = data["segment"]
    if segment is None:
        out.print("segment: none yet — no clustering run (run `segrec cluster`)", markup=False)
    else:
        name = segment["name"] + (" (fallback label)" if segment["label_fallback"] else "")
        out.print(f"segment {segment['id']}: {name} — {segment['why']}", markup=False)
    grid = Table(title=f"top {len(data['items'])}", show_lines=True)
    for column in ("#", "title", "score", "signals", "why"):
        grid.add_column(column)
    for rank, item in enumerate(data["items"], start=1):
        signals = " ".join(
            f"{k} {v:+.2f}" for k, v in sorted(item["signals"].items(), key=lambda kv: -kv[1])
        )
        why = item["reason"] + (" [template]" if item["reason_fallback"] else "")
        grid.add_row(str(rank), item["title"], f"{item['score']:.2f}", signals, why)
    out.print(grid)


@app.command("eval")
@user_errors
def eval_(
    ratings: Annotated[Path, typer.Argument(help="Behaviour log (CSV/Parquet).")],
    items: Annotated[Path, typer.Option("--items", help="Item catalogue (CSV/Parquet).")],
    users: Annotated[
        int | None, typer.Option("--users", help="Evaluate a seeded random sample of N users.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the sample, folds and clustering.")] = 0,
    tracks: Annotated[
        str, typer.Option(help="Comma-separated: warm, cold, segments, grounding, chat, text.")
    ] = "warm,cold,segments,grounding",
    show_samples: Annotated[
        int, typer.Option("--show-samples", help="Text track: print N kept and N replaced texts.")
    ] = 0,
    k: Annotated[int, typer.Option("--k", help="Segments for the segment signal/track.")] = 5,
    no_llm: Annotated[
        bool, typer.Option("--no-llm", help="Leave out the methods that need LLM profiles.")
    ] = False,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the results to this JSON file.")
    ] = None,
    user_col: UserColOpt = None,
    item_col: ItemColOpt = None,
    behavior_col: BehaviorColOpt = None,
    value_col: ValueColOpt = None,
    timestamp_col: TimestampColOpt = None,
    item_id_col: ItemIdColOpt = None,
    title_col: TitleColOpt = None,
    description_col: DescriptionColOpt = None,
    category_col: CategoryColOpt = None,
    llm: LlmOpt = None,
    model_path: ModelPathOpt = None,
    threads: ThreadsOpt = None,
    base_url: BaseUrlOpt = None,
    concurrency: ConcurrencyOpt = None,
    timeout: TimeoutOpt = None,
    domain: DomainOpt = None,
    workspace: Annotated[
        Path | None,
        typer.Option("--workspace", "-w", help="Evaluation workspace [default .segrec-eval]."),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """The offline evaluation protocol: baselines and segrec's rankers on the same users.

    Example: segrec eval ratings.csv --items movies.csv --users 100 --json eval.json

    Text quality: segrec eval ratings.csv --items movies.csv --tracks text --users 25
    --show-samples 5
    """
    from segrec import quality
    from segrec.data import ItemColumns, LogColumns

    chosen = quality.parse_tracks(tracks)
    if json_out is not None and json_out.suffix.lower() != ".json":
        raise InputError(f"--json {json_out}: give a file name ending in .json")
    settings = _llm_settings(
        config,
        workspace or Path(".segrec-eval"),
        llm,
        model_path,
        threads,
        base_url,
        timeout,
        domain,
        concurrency=concurrency,
    )
    log_columns = LogColumns(user_col, item_col, behavior_col, value_col, timestamp_col)
    item_columns = ItemColumns(
        item_id_col, title_col, description_col, tuple(category_col) if category_col else None
    )
    progress = _task_bars()
    bars: dict[str, Any] = {}

    def track_progress(track: str, done: int, total: int) -> None:
        if track not in bars:
            bars[track] = progress.add_task(f"{track} track: users scored", total=total)
        progress.update(bars[track], completed=done)

    with progress:
        status = progress.add_task("evaluating", total=None)
        result = quality.run_eval(
            settings,
            ratings,
            items,
            users=users,
            seed=seed,
            tracks=chosen,
            k=k,
            use_llm=not no_llm,
            log_columns=log_columns,
            item_columns=item_columns,
            on_stage=lambda stage: progress.update(status, description=stage),
            on_profiles=lambda stats: progress.update(
                status,
                description=f"profiling with the LLM: {stats.done}/{stats.users} "
                f"(cached {stats.cached})",
            ),
            show_samples=show_samples,
            on_progress=track_progress,
        )
    if json_out is not None:
        tmp = json_out.with_name(f".{json_out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(json_out)
    _print_eval(result)


def _print_eval(result: dict[str, Any]) -> None:
    who = f"{result['users']} users" + (
        f" (random sample, seed {result['seed']})" if result["sampled"] else " (all)"
    )
    text = result["tracks"].get("text")
    if text:
        _print_text_track(text)
    for track in ("warm", "cold", "chat"):
        rows = result["tracks"].get(track)
        if not rows:
            continue
        table = Table(title=f"{track} track · {who}")
        for column in ("method", "NDCG@10", "Recall@20"):
            table.add_column(column)
        for name, m in rows.items():
            table.add_row(name, f"{m['ndcg@10']:.4f}", f"{m['recall@20']:.4f}")
        out.print(table)
    segments = result["tracks"].get("segments")
    if segments:
        table = Table(title=f"segments track · {who}")
        for column in ("represent", "lift", "stability (ARI)", "silhouette", "sizes"):
            table.add_column(column)
        for name, m in segments.items():
            table.add_row(
                name,
                _fmt(m["lift"]),
                _fmt(m["stability_ari"]),
                _fmt(m["silhouette"]),
                str(m["sizes"]),
            )
        out.print(table)
    validation = result.get("ranker", {}).get("validation", {})
    for group in ("long", "short"):
        strategies = validation.get(f"segments_{group}")
        if not strategies:
            continue
        table = Table(title=f"per-segment strategies, {group} histories (validation)")
        for column in ("segment", "users", "strategy", "global NDCG@10", "own", "gain"):
            table.add_column(column)
        for label, entry in strategies.items():
            table.add_row(
                label,
                str(entry["users"]),
                entry["strategy"],
                *(
                    f"{entry[key]:.4f}" if key in entry else "—"
                    for key in ("global_ndcg@10", "segment_ndcg@10", "gain")
                ),
            )
        out.print(table)
    grounding = result["tracks"].get("grounding")
    if grounding:
        out.print(
            f"grounding · {grounding['profiles']} LLM profiles: raw output named something "
            f"absent from the history in {grounding['hallucination_rate_raw']:.0%} "
            f"({grounding['claims_removed_per_profile']:.2f} claims removed per profile); "
            f"stored profiles {grounding['hallucination_rate_stored']:.0%}; fallback "
            f"{grounding['fallback_rate']:.0%}",
            markup=False,
        )
    for note in result["notes"]:
        err.print(f"note: {note}", markup=False)
    err.print(f"evaluated in {result['wall_s']:.0f} s", markup=False)


MaxQuestionsOpt = Annotated[
    int, typer.Option("--max-questions", help="Most questions to ask (stops early when sure).")
]
AnswersOpt = Annotated[
    str | None,
    typer.Option("--answers", help="Scripted answers, one per line (a file, or - for stdin)."),
]
SaveAsOpt = Annotated[
    str | None, typer.Option("--save-as", help="Store the new user under this (new) id.")
]


def _scripted(source: str) -> Iterator[bytes]:
    """Answers from a file or stdin, as bytes: the chat decodes them (bad UTF-8 replaced)."""
    if source == "-":
        raw = sys.stdin.buffer.read()
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"--answers {source}: file not found — give a file or - for stdin")
        raw = path.read_bytes()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return (line.removesuffix(b"\r") for line in lines)


@app.command()
@user_errors
def chat(
    max_questions: MaxQuestionsOpt = 5,
    n: NOpt = 10,
    answers: AnswersOpt = None,
    save_as: SaveAsOpt = None,
    llm: LlmOpt = None,
    model_path: ModelPathOpt = None,
    threads: ThreadsOpt = None,
    base_url: BaseUrlOpt = None,
    timeout: TimeoutOpt = None,
    domain: DomainOpt = None,
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask a new user a few questions, place them in a segment and recommend, with reasons.

    Answer with numbers ("1,3"), names from the catalogue, or nothing; quit leaves.
    Example: segrec chat --max-questions 3 --save-as newbie
    """
    from segrec import chat as chats
    from segrec import serving
    from segrec.workspace import Workspace

    serving.check_n(n)
    settings = _llm_settings(config, workspace, llm, model_path, threads, base_url, timeout, domain)
    with Workspace(settings) as ws:
        if save_as is not None:
            chats.check_new_user(ws.store, save_as)
        script = _scripted(answers) if answers is not None else None
        with err.status("loading the ranker and segments", spinner="dots") as status:
            context = ws.recommender(on_stage=status.update).chat_context(ws.llm)
        result, session = _run_chat(context, script, as_json, max_questions, n, settings.workspace)
        if save_as is not None and not result.quit:
            session.save_as(ws.store, save_as)
    if result.quit:
        err.print("left the chat without saving", markup=False)
        return
    if save_as is not None:
        err.print(f"saved as user {save_as} — see `segrec explain --user {save_as}`", markup=False)
    for note in result.notes:
        err.print(f"note: {note}", markup=False)


def _run_chat(
    context: Any,
    script: Iterator[bytes] | None,
    as_json: bool,
    max_questions: int,
    n: int,
    workspace: Path,
) -> tuple[Any, Any]:
    """Talk on the terminal (or read a script), then print the result."""
    from segrec import chat as chats

    session = chats.ChatSession(context, max_questions=max_questions, n=n)
    talk = err if as_json else out
    if not context.segments:
        talk.print("note: no segment exists yet (run `segrec cluster`)", markup=False)

    def ask(question: Any) -> bytes | None:
        if not quiet:
            talk.print(f"\n{question.render()}", markup=False, highlight=False)
        if script is not None:
            return next(script, None)
        talk.print("answer> ", end="", markup=False)
        line = sys.stdin.buffer.readline()
        return line.rstrip(b"\r\n") if line else None

    def on_turn(turn: Any) -> None:
        if turn.quit or quiet:
            return
        if not turn.answer.learned:
            talk.print("(nothing recognised — numbers or catalogue names work best)")
        placement = turn.placement
        if placement is None:
            if context.segments:
                talk.print("best segment: none yet", markup=False)
            return
        how = "sure" if placement.sure else f"not sure yet (sure at {context.sure_margin:.3f})"
        talk.print(
            f"best segment: {placement.name} — margin {placement.margin:.3f}, {how}",
            markup=False,
            highlight=False,
        )

    quiet = script is not None and as_json
    with (
        _counting_llm_calls() as calls,
        err.status("asking and writing reasons", spinner="dots") if quiet else nullcontext(),
    ):
        result = chats.run_chat(session, ask, on_turn=on_turn)
    text = gates.tally_chat(result.questions, result.items)
    gates.record_counts(workspace, "chat", text)
    _print_text_lines(text)
    if as_json:
        data = result.as_json()
        _llm_calls(calls, data)
        _emit_json(data)
    else:
        _llm_calls(calls)
        if not result.quit:
            _print_chat(result.as_json())
    return result, session


def _print_chat(data: dict[str, Any]) -> None:
    profile = data["profile"]
    lines = [profile["summary"]]
    if profile.get("likes"):
        lines.append("likes: " + ", ".join(profile["likes"]))
    out.print(Panel("\n".join(lines), title="your profile"), markup=False)
    segment = data["segment"]
    if segment is None:
        out.print("segment: none yet", markup=False)
    else:
        sure = "sure" if segment["sure"] else "not sure"
        out.print(
            f"segment {segment['id']}: {segment['name']} (margin {segment['margin']:.3f}, {sure})",
            markup=False,
        )
    grid = Table(title=f"top {len(data['items'])}", show_lines=True)
    for column in ("#", "title", "score", "why"):
        grid.add_column(column)
    for rank, item in enumerate(data["items"], start=1):
        why = item["reason"] + (" [template]" if item["reason_fallback"] else "")
        grid.add_row(str(rank), item["title"], f"{item['score']:.2f}", why)
    out.print(grid)


@app.command()
@user_errors
def serve(
    host: Annotated[
        str, typer.Option(help="Address to listen on (loopback unless you mean otherwise).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8000,
    api_key_env: Annotated[
        str | None,
        typer.Option(help="Require 'Authorization: Bearer <key>' on /v1, key in this variable."),
    ] = None,
    workers: Annotated[int, typer.Option(help="Worker processes.", min=1, max=64)] = 1,
    reload_interval: Annotated[
        float, typer.Option(help="Seconds between checks for new data or runs (0: never).")
    ] = 5.0,
    llm_slots: Annotated[int, typer.Option(help="LLM calls in flight at once.", min=1)] = 1,
    rank_slots: Annotated[
        int,
        typer.Option(
            help="Rankings computed at once per worker process, the rest queue in order "
            "(0: no bound but the thread pool's; 1 gave the lowest p99 under load).",
            min=0,
            max=64,
        ),
    ] = 1,
    llm_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for one LLM call, then a template.")
    ] = 30.0,
    max_body: Annotated[int, typer.Option(help="Largest request body in bytes.")] = 65536,
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = True,
    llm: LlmOpt = None,
    model_path: ModelPathOpt = None,
    threads: ThreadsOpt = None,
    base_url: BaseUrlOpt = None,
    timeout: TimeoutOpt = None,
    domain: DomainOpt = None,
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Serve recommendations, explanations, segments and chat over HTTP (see /docs).

    Example: segrec serve --port 8000 --api-key-env SEGREC_API_KEY
    """
    import os

    try:
        import uvicorn

        from segrec.http import ENV_OPTIONS, ServeOptions, create_app, worker_env
    except ImportError as exc:
        raise InputError(f"segrec serve needs {exc.name}: pip install 'segrec[serve]'") from None
    from segrec.workspace import Workspace

    settings = _llm_settings(config, workspace, llm, model_path, threads, base_url, timeout, domain)
    try:
        options = ServeOptions(
            api_key_env=api_key_env,
            max_body_bytes=max_body,
            reload_interval_s=reload_interval,
            llm_slots=llm_slots,
            llm_timeout_s=llm_timeout,
            rank_slots=rank_slots,
        )
    except ValueError as exc:
        raise InputError(f"serve: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}") from None
    if api_key_env is not None and not os.environ.get(api_key_env):
        raise InputError(
            f"--api-key-env {api_key_env}: the variable is unset or empty — export the key first"
        )
    # Fit (or load) once here: workers then load the saved models instead of each fitting.
    with err.status("loading the recommender", spinner="dots") as status, Workspace(settings) as ws:
        version = ws.recommender(on_stage=status.update).version
    if host not in ("127.0.0.1", "::1", "localhost") and api_key_env is None:
        err.print(
            f"warning: listening on {host} without --api-key-env: anyone who can reach it "
            "can call it",
            markup=False,
        )
    err.print(
        f"serving {settings.workspace} ({version}) on http://{host}:{port} — docs at /docs",
        markup=False,
    )
    if workers == 1:
        uvicorn.run(create_app(settings, options), host=host, port=port, access_log=access_log)
    else:
        os.environ[ENV_OPTIONS] = worker_env(settings, options)
        uvicorn.run(
            "segrec.http:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            access_log=access_log,
        )


def main() -> None:
    app(prog_name="segrec")


def _print_text_track(text: dict[str, Any]) -> None:
    """The text track: per kind of text, kept / replaced and why, seconds; then samples."""
    table = Table(
        title=f"text track · {text['users']} users (seed {text['seed']}) · {text['model']}"
    )
    columns = ("kind", "texts", "kept", "replaced", "why replaced", "shown pass", "ungrounded")
    for column in (*columns, "s/text"):
        table.add_column(column)
    for kind, m in text["kinds"].items():
        table.add_row(
            kind,
            str(m["texts"]),
            f"{m['kept_share']:.0%}",
            f"{m['replaced_share']:.0%}",
            ", ".join(f"{k} {n}" for k, n in m["reasons"].items()) or "-",
            f"{m['displayed_pass_share']:.0%}",
            _fmt(m["ungrounded_rate"]),
            f"{m['seconds_per_text']:.2f}",
        )
    out.print(table)
    out.print(
        f"{text['texts_shown']} texts shown: {text['kept_share']:.0%} the LLM's, "
        f"{text['displayed_pass_share']:.0%} pass the gates checked again"
    )
    for kind, m in text["kinds"].items():
        for outcome, texts in m.get("samples", {}).items():
            for sample in texts:
                out.print(f"[{kind} · {outcome}] {escape(sample)}")


def _print_text_lines(tally: Any) -> None:
    """What the quality gates kept and replaced, one line per kind, on stderr."""
    for line in tally.lines():
        err.print(f"texts: {line}", markup=False, highlight=False)


@app.command()
def texts(
    workspace: WorkspaceOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Texts each command kept (the LLM's, past the quality gates) or replaced, and why.

    Example: segrec texts --json
    """
    settings = _settings(config, workspace=workspace)
    data = gates.stored_counts(settings.workspace)
    if as_json:
        _emit_json(data)
        return
    table = Table(title="texts shown: written by the LLM and kept, or templates")
    for column in ("command", "kind", "texts", "kept", "replaced", "why replaced"):
        table.add_column(column)
    for command, kinds in [*data["commands"].items(), ("all", data["total"])]:
        for kind, m in kinds.items():
            why = ", ".join(f"{k} {n}" for k, n in m["reasons"].items()) or "-"
            table.add_row(command, kind, str(m["texts"]), str(m["kept"]), str(m["replaced"]), why)
    out.print(table)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
