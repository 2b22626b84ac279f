"""Ray executor benchmark: profiles per second with 1 and 2 Ray workers vs in-process.

Measures, in one run, on the same seeded ml-latest-small users with the real bundled model
(SmolLM2-135M through llama.cpp), each on a fresh workspace (no cache):
- in-process (`--executor local`) with 1 and with 2 llama.cpp threads;
- `--executor ray` on a local `ray.init(num_cpus=2)` cluster with 1 and 2 actors of 1 thread;
- Ray start-up and actor start-up (backend load), reported apart from throughput;
- the driver's own ceiling: users/s it can store when the backend answers at once (every
  actor holds the FakeLLM, batches of 32): what bounds a cluster however fast its LLM fleet.
Per-call figures (tokens, calls per user, latency) feed the 10M-user estimate in
results/ray.md.

Usage: python benchmarks/bench_ray.py [--users 8] [--seed 0]
Writes benchmarks/results/ray.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ml-latest-small"
sys.path.insert(0, str(ROOT))

from segrec import batch, pipeline  # noqa: E402
from segrec.config import Settings  # noqa: E402
from segrec.llm.llamacpp import LlamaCppLLM  # noqa: E402
from segrec.profile import ProfileStats  # noqa: E402
from segrec.store import Store  # noqa: E402
from segrec.testing import FakeLLM, schema_answer  # noqa: E402


def fresh(root: Path, name: str, **settings: Any) -> Settings:
    chosen = Settings(workspace=root / name, domain="movie", **settings)
    pipeline.ingest(chosen, DATA / "ratings.csv", DATA / "movies.csv")
    return chosen


def per_call(settings: Settings, users: list[str]) -> dict[str, float]:
    with Store.open(settings.workspace) as store:
        records = [r for r in (store.profile(u) for u in users) if r is not None]
    n = len(records)
    return {
        "calls_per_user": sum(r.attempts for r in records) / n,
        "latency_s": sum(r.latency_s for r in records) / sum(r.attempts for r in records),
        "prompt_tokens": sum(r.prompt_tokens for r in records) / n,
        "completion_tokens": sum(r.completion_tokens for r in records) / n,
        "fallback": sum(r.fallback for r in records) / n,
    }


def _cpu(_actor: Any) -> float:
    return time.process_time()


def actor_cpu(runner: batch.RayProfileRunner) -> float:
    """CPU seconds the actors' processes have used (contention-free cost of the work)."""
    import ray

    return sum(ray.get([a.__ray_call__.remote(_cpu) for a in runner.actors]))


def timed(run: Any) -> tuple[float, ProfileStats]:
    start = time.perf_counter()
    stats = run()
    return time.perf_counter() - start, stats


NICENESS = "RAY_worker_niceness"  # Ray's own (lower-case) name for the workers' nice value


def main() -> None:
    # Ray starts its workers at nice 15; the in-process rows run at this process's priority,
    # so on a machine with other work the comparison would favour them.
    os.environ.setdefault(NICENESS, "0")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--inprocess-threads",
        default="1,2",
        help="llama.cpp thread counts for the in-process rows (2 threads crawl on a loaded box)",
    )
    args = parser.parse_args()
    rows: list[tuple[str, float, ProfileStats]] = []
    cpu: dict[str, float] = {}
    load_start = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        probe = fresh(root, "probe")
        with Store.open(probe.workspace) as store:
            everyone = store.user_ids()
        users = sorted(random.Random(args.seed).sample(everyone, args.users), key=int)

        start = time.perf_counter()
        batch.connect(Settings(), num_cpus=2)
        ray_start = time.perf_counter() - start
        actor_start: dict[int, float] = {}
        for workers in (1, 2):
            settings = fresh(root, f"ray{workers}", executor="ray", threads=1, ray_workers=workers)
            start = time.perf_counter()
            with batch.profile_runner(settings) as runner, Store.open(settings.workspace) as store:
                actor_start[workers] = time.perf_counter() - start
                before = actor_cpu(runner)
                seconds, stats = timed(
                    lambda r=runner, st=store, s=settings: pipeline.profile_in(
                        st, s, users, runner=r
                    )
                )
                label = f"Ray, {workers} worker(s) × 1 thread"
                cpu[label] = actor_cpu(runner) - before
            rows.append((label, seconds, stats))

        for threads in (int(t) for t in args.inprocess_threads.split(",")):
            settings = fresh(root, f"local{threads}")
            llm = LlamaCppLLM(n_threads=threads)
            before = time.process_time()
            seconds, stats = timed(lambda s=settings, b=llm: pipeline.run_profiles(s, users, llm=b))
            label = f"in-process, {threads} llama.cpp thread(s)"
            cpu[label] = time.process_time() - before
            rows.append((label, seconds, stats))
        figures = per_call(settings, users)

        # The driver's ceiling: an instant backend, so only Ray round trips, grounding and
        # one SQLite commit per user are left; every user of the dataset.
        settings = fresh(root, "ceiling", ray_workers=2)
        instant = functools.partial(FakeLLM, default=schema_answer, concurrency=32)
        with (
            batch.profile_runner(settings, backend=instant) as runner,
            Store.open(settings.workspace) as store,
        ):
            ceiling_s, ceiling = timed(
                lambda: pipeline.profile_in(store, settings, everyone, runner=runner)
            )

    base = {label: seconds for label, seconds, _ in rows}
    one_worker = base["Ray, 1 worker(s) × 1 thread"]
    two_workers = base["Ray, 2 worker(s) × 1 thread"]
    lines = [
        "# Ray executor benchmark",
        "",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {platform.platform()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; 1-minute load average {load_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (other jobs on the machine run at lower "
        "priority when the load is above 2); Ray workers at nice "
        f"{os.environ[NICENESS]}, like this process",
        f"- data: ml-latest-small, {args.users} users sampled with seed {args.seed}; bundled "
        "SmolLM2-135M-Instruct Q4_1 (llama.cpp); each row on a fresh workspace (no cache)",
        f"- command: `python benchmarks/bench_ray.py {' '.join(sys.argv[1:])}`",
        f"- Ray start-up (local `ray.init(num_cpus=2)`): {ray_start:.1f} s; actors with their "
        f"model loaded: {actor_start[1]:.1f} s (1), {actor_start[2]:.1f} s (2); "
        "not counted below",
        "",
        "| executor | wall time | profiles/s | vs Ray 1 worker | CPU s per profile | "
        "fallback | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, seconds, stats in rows:
        lines.append(
            f"| {label} | {seconds:.1f} s | {stats.users / seconds:.3f} | "
            f"{one_worker / seconds:.2f}× | {cpu[label] / stats.users:.1f} | {stats.fallback} | "
            f"{stats.failed} |"
        )
    lines += [
        "",
        f"**Ray 2 workers / 1 worker (wall): {one_worker / two_workers:.2f}×**;"
        f" Ray 2 workers / in-process {rows[-1][0].split(', ')[1]}: "
        f"{rows[-1][1] / two_workers:.2f}×. CPU seconds per profile "
        "(actor processes, or this process in-process) do not depend on what else the machine "
        "runs: Ray 1 thread / in-process 1 thread = "
        f"{cpu['Ray, 1 worker(s) × 1 thread'] / cpu[rows[2][0]]:.2f}.",
        "",
        f"Per call ({rows[-1][0]}): "
        f"{figures['calls_per_user']:.2f} calls per user, {figures['latency_s']:.2f} s per call, "
        f"{figures['prompt_tokens']:.0f} prompt and {figures['completion_tokens']:.0f} "
        f"completion tokens per user, fallback {figures['fallback']:.0%}.",
        "",
        f"Driver ceiling (instant backend, 2 actors, batches of 32): {ceiling.users} users "
        f"stored in {ceiling_s:.1f} s = **{ceiling.users / ceiling_s:.0f} users/s** "
        "(Ray round trips, grounding, one SQLite commit per user).",
    ]
    text = "\n".join(lines) + "\n"
    out = ROOT / "benchmarks" / "results" / "ray.md"
    marker = "\n## Estimate"  # the written estimate below the table is kept across reruns
    kept = out.read_text().split(marker, 1) if out.exists() else []
    out.write_text(text + (marker + kept[1] if len(kept) == 2 else ""))
    print(text)


if __name__ == "__main__":
    main()
