"""From a raw CSV log to named segments at 100k and 1M users, on one machine.

Rerun with::

    python benchmarks/bench_scale.py --sizes 100000:2000000:20000 --k 8
    python benchmarks/bench_scale.py --sizes 1000000:20000000:20000 --k 8

Each size is ``users:events:items``. The data come from ``segrec.synthetic`` (seeded Zipf
logs with ``--k`` planted segments; see its docstring). Every step runs as its own
``segrec`` command in a subprocess, whose wall time and peak resident set size
(``os.wait4``'s ``ru_maxrss``, the child alone) are reported:

1. ``ingest`` of the raw CSV (chunked validation, the default), and the same ingest with the
   whole file validated at once (the previous path, ``chunk_bytes=None``) into another
   workspace: the side-by-side baseline for memory.
2. ``segrec cluster --k K --json``: read the histories from SQL, embed the touched items with
   the real encoder (all-MiniLM-L6-v2), build user vectors from the sparse user × item
   matrix, cluster (``--algorithm auto``), sampled stability and silhouette, profile only
   the users shown to the LLM and name the segments. Its ``llm_calls`` is checked against
   the bound k·m (``segrec.pipeline.llm_call_bound``).
3. ``segrec segments export`` and the adjusted Rand index of the segments against the
   planted ones.

``--llm`` / ``--base-url`` pass through to ``segrec cluster`` (default: the bundled local
model). Results go to stdout (markdown) and are appended to ``benchmarks/results/scale.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "scale.md"
TARGET_SECONDS = 15 * 60
TARGET_PEAK_GB = 8.0
TARGET_ARI = 0.9


def run(command: list[str], *, stdout: Any = subprocess.DEVNULL) -> tuple[float, float, int]:
    """Run a command; its wall seconds, its own peak RSS in GB, and its exit status."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, text=True)
    assert child.stderr is not None
    errors = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        print(errors[-2000:], file=sys.stderr)
    return seconds, usage.ru_maxrss / 1e6, child.returncode


def segrec(*args: str) -> list[str]:
    return [sys.executable, "-m", "segrec.cli", *args]


def bench_size(
    users: int,
    events: int,
    items: int,
    k: int,
    workdir: Path,
    llm_args: list[str],
    baseline: bool = True,
) -> dict[str, Any]:
    import numpy as np
    import pandas as pd
    from sklearn.metrics import adjusted_rand_score

    from segrec.pipeline import llm_call_bound
    from segrec.synthetic import write_synthetic_log

    start = time.perf_counter()
    data = write_synthetic_log(
        workdir / "data", n_users=users, n_events=events, n_items=items, n_segments=k, seed=0
    )
    row: dict[str, Any] = {
        "users": users,
        "events": data.n_events,
        "items": items,
        "k": k,
        "csv_mb": round(data.log.stat().st_size / 1e6, 1),
        "generate_s": round(time.perf_counter() - start, 1),
    }
    ws = workdir / "ws"
    seconds, peak, rc = run(
        segrec("ingest", str(data.log), "--items", str(data.items), "-w", str(ws))
    )
    row |= {"ingest_s": round(seconds, 1), "ingest_peak_gb": round(peak, 2), "ingest_rc": rc}
    row["db_mb"] = round(sum(p.stat().st_size for p in ws.iterdir()) / 1e6, 1) if rc == 0 else None
    if baseline:
        whole = (
            "from pathlib import Path; from segrec import pipeline; from segrec.config import "
            f"Settings; pipeline.ingest(Settings(workspace=Path({str(workdir / 'ws-whole')!r})),"
            f" Path({str(data.log)!r}), Path({str(data.items)!r}), chunk_bytes=None)"
        )
        seconds, peak, rc = run([sys.executable, "-c", whole])
        row |= {"whole_ingest_s": round(seconds, 1), "whole_ingest_peak_gb": round(peak, 2)}
        shutil.rmtree(workdir / "ws-whole", ignore_errors=True)
    if row["ingest_rc"] != 0:
        return row
    out = workdir / "cluster.json"
    with out.open("w") as handle:
        seconds, peak, rc = run(
            segrec("cluster", "--k", str(k), "-w", str(ws), "--json", *llm_args), stdout=handle
        )
    row |= {"cluster_s": round(seconds, 1), "cluster_peak_gb": round(peak, 2), "cluster_rc": rc}
    if rc != 0:
        return row
    report = json.loads(out.read_text())
    described = sum(s["described"] for s in report["segments"])
    row |= {
        "llm_calls": report["llm_calls"],
        "llm_bound": llm_call_bound(described, 3),
        "fallback_labels": report["metrics"]["fallback_labels"],
        "algorithm": report["run"]["params"]["algorithm"],
        "notes": report["run"]["notes"],
        "names": [s["name"] for s in report["segments"]],
    }
    export = workdir / "segments.parquet"
    seconds, _, rc = run(segrec("segments", "export", "--out", str(export), "-w", str(ws)))
    row["export_s"] = round(seconds, 1)
    frame = pd.read_parquet(export)
    planted = np.asarray(data.planted)[frame["user_id"].astype(int).to_numpy()]
    row["ari"] = round(float(adjusted_rand_score(planted, frame["segment"])), 4)
    row["total_s"] = round(row["ingest_s"] + row["cluster_s"], 1)
    return row


def markdown(rows: list[dict[str, Any]], command: str, note: str) -> str:
    lines = [
        f"## {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; load average at start {os.getloadavg()[0]:.1f}. "
        f"Command: `{command}`.",
    ]
    if note:
        lines += ["", note]
    lines += [
        "",
        "| users | events | items | k | CSV MB | ingest s | ingest peak GB | whole-file ingest "
        "peak GB | DB MB | cluster s | cluster peak GB | raw CSV → segments s | LLM calls (bound "
        "k·m) | ARI | algorithm |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['users']:,} | {r['events']:,} | {r['items']:,} | {r['k']} | {r['csv_mb']} | "
            f"{r['ingest_s']} | {r['ingest_peak_gb']} | {r.get('whole_ingest_peak_gb')} | "
            f"{r.get('db_mb')} | {r.get('cluster_s')} | {r.get('cluster_peak_gb')} | "
            f"{r.get('total_s')} | {r.get('llm_calls')} ({r.get('llm_bound')}) | "
            f"{r.get('ari')} | {r.get('algorithm')} |"
        )
    for r in rows:
        lines += ["", f"{r['users']:,} users — run notes:"]
        lines += [f"- {n}" for n in r.get("notes", [])]
        if r.get("cluster_rc"):
            lines.append(f"- `segrec cluster` exited with status {r['cluster_rc']}")
        lines.append(f"- segment names: {', '.join(r.get('names', []))}")
        lines.append(
            f"- fallback labels: {r.get('fallback_labels')}; whole-file ingest took "
            f"{r.get('whole_ingest_s')} s; data generation {r['generate_s']} s (not counted)"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000:2000000:20000", help="users:events:items,…")
    parser.add_argument("--k", type=int, default=8, help="planted segments = --k")
    parser.add_argument("--llm", default=None, help="passed to segrec cluster")
    parser.add_argument("--base-url", default=None, help="passed to segrec cluster")
    parser.add_argument("--note", default="", help="a line recorded with the results")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the whole-file ingest (memory-hungry)"
    )
    args = parser.parse_args()
    llm_args = (["--llm", args.llm] if args.llm else []) + (
        ["--base-url", args.base_url] if args.base_url else []
    )
    rows = []
    for size in args.sizes.split(","):
        users, events, items = (int(x) for x in size.split(":"))
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="segrec-scale-"))
        try:
            row = bench_size(
                users,
                events,
                items,
                args.k,
                workdir / str(users),
                llm_args,
                baseline=not args.no_baseline,
            )
        finally:
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
        print(json.dumps(row), flush=True)
        rows.append(row)
    text = markdown(rows, " ".join(["python", *sys.argv]), args.note)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as handle:
        handle.write(text + "\n")


if __name__ == "__main__":
    main()
