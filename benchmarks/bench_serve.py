"""`segrec serve` under bounded loopback load, beside the in-process recommender.

On ml-latest-small (610 users × 9,742 items), in one run:

1. The CLI: the first `segrec recommend --user ID` (fits and saves the models, if the
   workspace has none yet) and the second and later calls (load the saved models), as
   wall time of the whole process, repeated.
2. The server: `segrec serve` started as a subprocess; time from spawn to /readyz, and its
   RSS after start and after the load.
3. Load: a fixed number of GET /v1/users/{id}/recommendations?n=10 at concurrency 1, 8 and
   32 (one keep-alive connection per client process; stops by itself): requests/s, p50/p99.
4. In-process: `Recommender.recommend` on the same users in this process (one BLAS thread,
   as in the server): p50/p99, and the ratio of HTTP p50 (concurrency 1) to it.

Run: python benchmarks/bench_serve.py [--workspace DIR] [--requests 400] [--workers 1,2]
     [--rank-slots 1] (`segrec serve --rank-slots` values; every pair with --workers)
     (each worker count is a separate server: uvicorn worker processes share the
     memory-mapped models through the page cache)
     (writes benchmarks/results/serve.md; DIR is ingested from ml-latest-small if missing)
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "ml-latest-small"

from segrec import pipeline  # noqa: E402
from segrec.config import Settings  # noqa: E402
from segrec.workspace import Workspace  # noqa: E402

N = 10
CONCURRENCY = (1, 8, 32)
CLI_REPEATS = 7


def segrec_exe() -> list[str]:
    exe = shutil.which("segrec", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "segrec.cli"]


def timed_cli(args: list[str]) -> tuple[float, float]:
    """Wall seconds of one `segrec` process, and its CPU seconds (user + system): on a
    shared, loaded machine the CPU time is what the call would take on an idle core."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([*segrec_exe(), *args], check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mb(pid: int) -> tuple[float, float]:
    """Current and peak resident memory of a process and its children (uvicorn's worker
    processes), MB. Shared pages (the memory-mapped models) count once per process."""
    current = peak = 0.0
    for each in [pid, *children(pid)]:
        fields = {}
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        current += int(fields["VmRSS"].split()[0]) / 1024
        peak += int(fields["VmHWM"].split()[0]) / 1024
    return current, peak


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *children(int(child))]
    return found


def percentiles(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values) * 1000
    return float(np.percentile(array, 50)), float(np.percentile(array, 99))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children (the uvicorn workers)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for each in [pid, *children(pid)]:
        fields = Path(f"/proc/{each}/stat").read_text().rpartition(")")[2].split()
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def client(port: int, users: list[str], index: int, count: int) -> tuple[list[float], int, float]:
    """One client: ``count`` GETs, one at a time, on one keep-alive connection; latencies,
    how many failed and the client's own CPU seconds (it shares the cores with the server)."""
    cpu = time.process_time()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    latencies, bad = [], 0
    for j in range(count):
        user = users[(index * 7919 + j) % len(users)]
        start = time.perf_counter()
        connection.request("GET", f"/v1/users/{user}/recommendations?n={N}")
        response = connection.getresponse()
        body = response.read()
        latencies.append(time.perf_counter() - start)
        bad += response.status != 200 or not json.loads(body)["items"]
    connection.close()
    return latencies, bad, time.process_time() - cpu


def load(
    port: int, users: list[str], requests: int, concurrency: int, server: int
) -> dict[str, float]:
    """``requests`` GETs spread over ``concurrency`` client processes (processes, not
    threads: one Python process's clients would queue on its own GIL and add that wait to
    the latencies measured)."""
    counts = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
    with ProcessPoolExecutor(max_workers=concurrency, mp_context=mp.get_context("fork")) as pool:
        list(pool.map(time.sleep, [0.0] * concurrency))  # start the processes before timing
        server_cpu = cpu_seconds(server)
        start = time.perf_counter()
        futures = [pool.submit(client, port, users, i, c) for i, c in enumerate(counts)]
        results = [f.result() for f in futures]
        wall = time.perf_counter() - start
        server_cpu = cpu_seconds(server) - server_cpu
    latencies = [t for mine, _, _ in results for t in mine]
    p50, p99 = percentiles(latencies)
    failures = sum(bad for _, bad, _ in results)
    return {
        "rps": len(latencies) / wall,
        "p50": p50,
        "p99": p99,
        "failures": failures,
        "server_cpu_ms": 1000 * server_cpu / len(latencies),
        "client_cpu_ms": 1000 * sum(cpu for _, _, cpu in results) / len(latencies),
    }


def serve_under_load(
    ws: list[str], users: list[str], requests: int, workers: int, slots: int
) -> dict:
    """Start `segrec serve --workers N`, wait for /readyz, warm up, load it at each
    concurrency, stop it: start-up time, RSS and the load results."""
    port = free_port()
    spawn = time.perf_counter()
    server = subprocess.Popen(
        [*segrec_exe(), "serve", "--port", str(port), "--no-access-log", "--reload-interval", "0",
         "--workers", str(workers), "--rank-slots", str(slots), *ws],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/readyz")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.05)
            if server.poll() is not None:
                raise SystemExit("segrec serve exited")
        startup = time.perf_counter() - spawn
        rss_start, _ = rss_mb(server.pid)
        # warm-up: page in the models, every worker
        load(port, users, 50 * workers, 4 * workers, server.pid)
        results = {c: load(port, users, requests, c, server.pid) for c in CONCURRENCY}
        rss_end, rss_peak = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {
        "startup": startup,
        "rss_start": rss_start,
        "rss_end": rss_end,
        "rss_peak": rss_peak,
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/segrec-bench-serve"))
    parser.add_argument("--requests", type=int, default=400, help="per concurrency level")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve.md")
    parser.add_argument(
        "--data", type=Path, default=DATA, help="the ml-latest-small folder (ingested if needed)"
    )
    parser.add_argument(
        "--workers", default="1,2", help="comma-separated `segrec serve --workers` values"
    )
    parser.add_argument(
        "--rank-slots",
        default="1",
        help="comma-separated `segrec serve --rank-slots` values (0: unbounded)",
    )
    args = parser.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    args.rank_slots = [int(s) for s in args.rank_slots.split(",")]
    settings = Settings(workspace=args.workspace, domain="movie")
    if not (args.workspace / "segrec.db").exists():
        pipeline.ingest(settings, args.data / "ratings.csv", args.data / "movies.csv")
    users = pipeline.select_users(settings).user_ids
    ws = ["-w", str(args.workspace)]

    fitted = (args.workspace / "models").is_dir() and any((args.workspace / "models").iterdir())
    first = timed_cli(["recommend", "--user", users[0], "--n", str(N), "--json", *ws])
    second = [
        timed_cli(["recommend", "--user", users[1 + i], "--n", str(N), "--json", *ws])
        for i in range(CLI_REPEATS)
    ]
    walls, cpus = [w for w, _ in second], [c for _, c in second]
    print(
        f"CLI first {first[0]:.1f} s, later median {statistics.median(walls):.2f} s wall, "
        f"{statistics.median(cpus):.2f} s CPU",
        flush=True,
    )

    servers = {
        (w, s): serve_under_load(ws, users, args.requests, w, s)
        for s in args.rank_slots
        for w in args.workers
    }
    for (w, s), run in servers.items():
        for c, r in run["results"].items():
            print(
                f"workers={w} rank-slots={s} c={c}: {r['rps']:.0f} req/s, p50 {r['p50']:.1f} ms, "
                f"p99 {r['p99']:.1f} ms; CPU per request: server {r['server_cpu_ms']:.2f} ms, "
                f"clients {r['client_cpu_ms']:.2f} ms"
            )

    # The server runs with one BLAS thread per request (see segrec.http); so does this.
    with Workspace(settings) as workspace, threadpool_limits(limits=1, user_api="blas"):
        recommender = workspace.recommender()
        for user in users[:50]:  # warm-up, as for HTTP
            recommender.recommend([user], n=N)
        timings = []
        for j in range(args.requests):
            user = users[(j * 7919) % len(users)]
            start = time.perf_counter()
            recommender.recommend([user], n=N)
            timings.append(time.perf_counter() - start)
    in_p50, in_p99 = percentiles(timings)
    ratio = servers[args.workers[0], args.rank_slots[0]]["results"][1]["p50"] / in_p50
    print(f"in-process p50 {in_p50:.1f} ms p99 {in_p99:.1f} ms; HTTP/in-process p50 {ratio:.2f}")
    write(args, users, fitted, first, second, servers, (in_p50, in_p99), ratio)


def write(
    args: argparse.Namespace,
    users: list[str],
    fitted: bool,
    first: tuple[float, float],
    second: list[tuple[float, float]],
    servers: dict[tuple[int, int], dict],
    in_process: tuple[float, float],
    ratio: float,
) -> None:
    load_avg = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    walls, cpus = [w for w, _ in second], [c for _, c in second]
    lines = [
        "# `segrec serve` under load (benchmarks/bench_serve.py)",
        "",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.platform()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; load average at the end {load_avg}",
        f"- command: `python benchmarks/bench_serve.py --requests {args.requests} --workers "
        f"{','.join(map(str, args.workers))} --rank-slots {','.join(map(str, args.rank_slots))}`",
        f"- data: ml-latest-small, {len(users)} users × 9,742 items; n={N}",
        "",
        "## CLI: `segrec recommend --user ID --n 10 --json` (whole process, wall)",
        "",
        "| call | wall s | CPU s (user + sys) |",
        "|---|---|---|",
        f"| first ({'models already saved' if fitted else 'tunes, embeds, fits, saves'}) "
        f"| {first[0]:.2f} | {first[1]:.2f} |",
        f"| later calls (load the saved models), median of {len(second)} "
        f"| **{statistics.median(walls):.2f}** (min {min(walls):.2f}, max {max(walls):.2f}) "
        f"| **{statistics.median(cpus):.2f}** |",
        "",
        "## Server",
        "",
        "| workers | rank slots | start to ready s (spawn → `/readyz` 200, models saved) "
        "| RSS after start MB | RSS after the load MB (peak) |",
        "|---|---|---|---|---|",
    ]
    for (w, s), run in servers.items():
        lines.append(
            f"| {w} | {s} | {run['startup']:.2f} | {run['rss_start']:.0f} | {run['rss_end']:.0f} "
            f"({run['rss_peak']:.0f}) |"
        )
    lines += [
        "",
        f"`GET /v1/users/{{id}}/recommendations?n={N}`, {args.requests} requests per level, one "
        "keep-alive connection per client process, clients and server on the same cores:",
        "",
        "| workers | rank slots | concurrency | requests/s | p50 ms | p99 ms | failed "
        "| server CPU ms/request | client CPU ms/request |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (w, s), run in servers.items():
        for c, r in run["results"].items():
            lines.append(
                f"| {w} | {s} | {c} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} "
                f"| {int(r['failures'])} | {r['server_cpu_ms']:.2f} | {r['client_cpu_ms']:.2f} |"
            )
    lines += [
        f"| — | — | in-process `Recommender.recommend` (same users) | — | {in_process[0]:.1f} "
        f"| {in_process[1]:.1f} | — | — | — |",
        "",
        f"**HTTP p50 (concurrency 1, {args.workers[0]} worker, {args.rank_slots[0]} rank slot) "
        f"/ in-process p50: {ratio:.2f}**",
        "",
        "CPU s is user + system time of the `segrec` process: what the call costs on an idle "
        "core. On a shared machine (see the load average above) wall times and p99 are "
        "inflated by other work; the HTTP/in-process ratio is paired within the run.",
        "",
    ]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
