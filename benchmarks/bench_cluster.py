"""Clustering speed and memory at scale, and the cost of segrec's embedding layer.

Rerun with::

    python benchmarks/bench_cluster.py --sizes 10000,100000,1000000 --k 8

Part 1 times ``segrec.cluster.cluster_vectors`` (k-means and mini-batch k-means, silhouette
included) on synthetic 384-d float32 vectors: seeded gaussian blobs around ``k`` random
unit centres, normalised onto the unit sphere, with noise as large as the centres so the
blobs overlap as real embeddings do. Every case runs in its own subprocess, which reports
its own peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, read at the
end of the case): that peak includes the interpreter, numpy/scikit-learn and the input
matrix itself, i.e. what a machine must have to run the case.

Part 2 (``--embed``, on by default) compares ``segrec.embed.embed_texts`` without a cache
against calling ``SentenceTransformer.encode`` directly on the same model object, on the
first 2,000 MovieLens item texts ("Title. Genres: a, b"), median of several alternating
runs (the ratio is the median of the paired ratios, which cancels slow drifts in machine
load), plus segrec's own time inside ``embed_texts`` (total minus time in the encoder);
then the rerun speed-up once a cache holds the vectors.

Results go to stdout (markdown) and to ``benchmarks/results/cluster.md``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DIM = 384
TARGET_SECONDS = 120.0
TARGET_PEAK_MIB = 4096.0
TARGET_EMBED_RATIO = 1.05
MOVIES = ROOT.parent / "shared" / "data" / "ml-latest-small" / "movies.csv"


def make_blobs(n: int, k: int, seed: int = 0, spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded unit-sphere blobs, generated in float32 chunks (no float64 copy of X)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    X = np.empty((n, DIM), dtype=np.float32)
    truth = rng.integers(0, k, size=n)
    scale = np.float32(spread / np.sqrt(DIM))
    for start in range(0, n, 65_536):
        rows = slice(start, min(n, start + 65_536))
        block = rng.standard_normal((rows.stop - start, DIM), dtype=np.float32)
        block *= scale
        block += centres[truth[rows]]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        X[rows] = block
    return X, truth


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(algorithm: str, n: int, k: int) -> dict[str, Any]:
    """One clustering case, meant to run alone in a fresh process."""
    from sklearn.metrics import adjusted_rand_score

    from segrec.cluster import cluster_vectors

    start = time.perf_counter()
    X, truth = make_blobs(n, k)
    generate_s = time.perf_counter() - start
    rss_before = peak_rss_mib()
    start = time.perf_counter()
    result = cluster_vectors(X, k=k, algorithm=algorithm, seed=0)
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    return {
        "algorithm": algorithm,
        "n": n,
        "k": k,
        "seconds": seconds,
        "generate_s": generate_s,
        "input_mib": X.nbytes / 2**20,
        "rss_before_mib": rss_before,
        "peak_rss_mib": peak,
        "silhouette": result.silhouette,
        "silhouette_sample": result.params["silhouette_sample"],
        "ari_vs_truth": float(adjusted_rand_score(truth, result.labels)),
    }


def run_case_in_subprocess(algorithm: str, n: int, k: int, threads: int) -> dict[str, Any]:
    """Run one case in a fresh process, with OpenMP and BLAS limited to ``threads``."""
    command = [sys.executable, __file__, "--case", f"{algorithm},{n},{k}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    load = os.getloadavg()[0]
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"case {algorithm} n={n} failed:\n{done.stderr}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row.update(threads=threads, load_before=load, load_after=os.getloadavg()[0])
    return row


def movie_texts(limit: int) -> list[str]:
    with MOVIES.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))[:limit]
    return [f"{row['title']}. Genres: {row['genres'].replace('|', ', ')}" for row in rows]


class TimedEncoder:
    """Wraps an encoder and adds up the time spent inside ``encode_batch``.

    Total time of ``embed_texts`` minus this is segrec's own overhead (hashing, lookup,
    batching, copying), a figure that does not drown in the encoder's run-to-run noise.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.encoder_id = inner.encoder_id
        self.dim = inner.dim
        self.seconds = 0.0

    def encode_batch(self, texts: Any) -> np.ndarray:
        start = time.perf_counter()
        try:
            return self.inner.encode_batch(texts)
        finally:
            self.seconds += time.perf_counter() - start


def run_embed(n_texts: int, repeats: int) -> dict[str, Any]:
    """embed_texts (no cache) vs SentenceTransformer.encode on the same model object."""
    import torch

    from segrec.embed import MemoryVectorCache, SentenceTransformerEncoder, embed_texts

    texts = movie_texts(n_texts)
    encoder = SentenceTransformerEncoder()
    timed = TimedEncoder(encoder)
    model = encoder.model
    model.encode(texts[:128], batch_size=encoder.batch_size)  # warm-up: threads, allocator

    raw_times: list[float] = []
    ours_times: list[float] = []
    overheads: list[float] = []
    raw = ours = np.empty(0)
    for _ in range(repeats):
        start = time.perf_counter()
        raw = model.encode(
            texts,
            batch_size=encoder.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        raw_times.append(time.perf_counter() - start)
        timed.seconds = 0.0
        start = time.perf_counter()
        ours = embed_texts(texts, timed)
        ours_times.append(time.perf_counter() - start)
        overheads.append(ours_times[-1] - timed.seconds)

    cache = MemoryVectorCache()
    start = time.perf_counter()
    embed_texts(texts, encoder, cache=cache)
    filling_s = time.perf_counter() - start
    cached_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        cached = embed_texts(texts, encoder, cache=cache)
        cached_times.append(time.perf_counter() - start)
    ours_s = statistics.median(ours_times)
    cached_s = statistics.median(cached_times)
    return {
        "n_texts": len(texts),
        "repeats": repeats,
        "batch_size": encoder.batch_size,
        "torch_threads": torch.get_num_threads(),
        "raw_s": statistics.median(raw_times),
        "ours_s": ours_s,
        "raw_min_s": min(raw_times),
        "ours_min_s": min(ours_times),
        "paired_ratio": statistics.median(
            [o / r for o, r in zip(ours_times, raw_times, strict=True)]
        ),
        "overhead_s": statistics.median(overheads),
        "filling_s": filling_s,
        "cached_s": cached_s,
        "speedup": ours_s / cached_s,
        "max_abs_diff": float(np.abs(np.asarray(raw) - ours).max()),
        "cached_equal": bool(np.array_equal(cached, ours)),
        "load": os.getloadavg()[0],
    }


def machine() -> str:
    mem = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        total_kib = int(meminfo.read_text().split("\n")[0].split()[1])
        mem = f", {total_kib / 2**20:.1f} GiB RAM"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.platform()}, {platform.machine()}, nproc={cores}{mem}"


def versions() -> str:
    names = ["numpy", "scikit-learn", "scipy", "torch", "sentence-transformers"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return f"Python {platform.python_version()}, " + ", ".join(found)


def cluster_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| algorithm | n | k | threads | seconds | peak RSS MiB | RSS before clustering MiB "
        "| input MiB | silhouette (cosine) | ARI vs planted | load avg before → after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        sample = " (sample 10k)" if row["silhouette_sample"] else ""
        lines.append(
            f"| {row['algorithm']} | {row['n']:,} | {row['k']} | {row['threads']} "
            f"| {row['seconds']:.1f} "
            f"| {row['peak_rss_mib']:,.0f} | {row['rss_before_mib']:,.0f} "
            f"| {row['input_mib']:,.0f} | {row['silhouette']:.3f}{sample} "
            f"| {row['ari_vs_truth']:.3f} "
            f"| {row['load_before']:.1f} → {row['load_after']:.1f} |"
        )
    return lines


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for row in rows:
        if row["n"] < 1_000_000:
            continue
        ok = row["seconds"] < TARGET_SECONDS and row["peak_rss_mib"] < TARGET_PEAK_MIB
        lines.append(
            f"- {row['algorithm']}, n={row['n']:,}, {row['threads']} thread(s): "
            f"{row['seconds']:.1f} s, "
            f"{row['peak_rss_mib'] / 1024:.2f} GiB peak → "
            f"{'meets' if ok else 'MISSES'} the target (< {TARGET_SECONDS:.0f} s and "
            f"< {TARGET_PEAK_MIB / 1024:.0f} GiB on this machine)"
        )
    return lines


def embed_lines(result: dict[str, Any]) -> list[str]:
    ratio = result["paired_ratio"]
    overhead_share = result["overhead_s"] / result["ours_s"]
    return [
        "| measure | value |",
        "|---|---:|",
        f"| texts (MovieLens movies.csv, first rows) | {result['n_texts']:,} |",
        f"| torch threads; load average (1 min) at the end | {result['torch_threads']}; "
        f"{result['load']:.1f} |",
        f"| `SentenceTransformer.encode` (batch {result['batch_size']}), median (min) s "
        f"| {result['raw_s']:.2f} ({result['raw_min_s']:.2f}) |",
        f"| `embed_texts`, no cache, median (min) s "
        f"| {result['ours_s']:.2f} ({result['ours_min_s']:.2f}) |",
        f"| ratio embed_texts / encode, median of paired runs (target ≤ {TARGET_EMBED_RATIO}) "
        f"| {ratio:.3f} {'(meets)' if ratio <= TARGET_EMBED_RATIO else '(MISSES)'} |",
        f"| segrec's own time in `embed_texts` (total − time inside the encoder), median s "
        f"| {result['overhead_s']:.4f} ({overhead_share:.2%} of the call) |",
        f"| max abs difference between the two outputs | {result['max_abs_diff']:.2e} |",
        f"| `embed_texts` filling an empty MemoryVectorCache, s | {result['filling_s']:.2f} |",
        f"| `embed_texts` rerun, all cached, median s | {result['cached_s']:.4f} |",
        f"| cached rerun speed-up | {result['speedup']:,.0f}× |",
        f"| cached output identical | {result['cached_equal']} |",
        f"| repeats (alternating raw / embed_texts) | {result['repeats']} |",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--algorithms", default="kmeans,minibatch")
    parser.add_argument(
        "--threads",
        default=str(len(os.sched_getaffinity(0))),
        help="comma-separated OpenMP/BLAS thread counts to run every case with",
    )
    parser.add_argument("--embed", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--embed-texts", type=int, default=2000)
    parser.add_argument("--embed-repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cluster.md")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.case:
        algorithm, n, k = args.case.split(",")
        print(json.dumps(run_case(algorithm, int(n), int(k))))
        return

    sizes = [int(size) for size in args.sizes.split(",")]
    rows = [
        run_case_in_subprocess(algorithm, n, args.k, int(threads))
        for n in sizes
        for algorithm in args.algorithms.split(",")
        for threads in args.threads.split(",")
    ]
    report = [
        "# Clustering and embedding benchmark",
        "",
        f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {machine()}",
        f"- software: {versions()}",
        f"- command: `python benchmarks/bench_cluster.py {' '.join(argv or sys.argv[1:])}`",
        "",
        "## cluster_vectors at scale",
        "",
        f"Synthetic {DIM}-d float32 vectors: {args.k} seeded gaussian blobs on the unit "
        "sphere (noise norm ≈ centre norm, so blobs overlap). Seconds = one "
        "`cluster_vectors` call (fit, centroids, distances, variances, cosine silhouette). "
        "Peak RSS = `getrusage(RUSAGE_SELF).ru_maxrss` of the case's own subprocess: "
        "interpreter, libraries and the input matrix included. Threads = OMP_NUM_THREADS "
        "and OPENBLAS_NUM_THREADS of the case's process. The load average (1 min) shows "
        "how busy the machine was with other work: on a shared 2-core machine, 2 OpenMP "
        "threads slow down badly when other processes hold the cores, so compare with the "
        "1-thread rows.",
        "",
        *cluster_table(rows),
        "",
        *target_lines(rows),
        "",
        "Why k-means needs about three times the input at its peak: scikit-learn's `KMeans` "
        "copies X to centre it (`copy_x=True`, kept so the caller's array is never touched) "
        "and its tolerance computes `np.var(X, axis=0)`, another transient copy. "
        "`MiniBatchKMeans` does neither, so it is the path for large inputs.",
    ]
    if args.embed:
        report += [
            "",
            "## Embedding overhead",
            "",
            "The bundled all-MiniLM-L6-v2 on CPU, same model object for both paths.",
            "",
            *embed_lines(run_embed(args.embed_texts, args.embed_repeats)),
        ]
    text = "\n".join(report) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
