"""How much segment lift can any k-segmentation of ml-latest-small's users show? (#13)

PROTOCOL track 4's lift = NDCG@10 of "most popular train items within the user's segment"
divided by the same for global MostPop. #13 asks for ≥ 1.5 at k = 5. This script measures
*leaky* ceilings: partitions built from the users' own **test** items, which no method may
see. They are not methods; they bound what a method could reach.

- ``shipped collab``: `segrec cluster --represent collab`'s partition (train only), as the
  segments track reports it.
- ``leaky: k-means on test-item SVD``: k-means (10 restarts) on an SVD of each user's test
  items, best of 8/16/32 components (also in bench_segments_represent.py).
- ``leaky: the metric itself``: coordinate ascent on the lift: each round, every user's
  NDCG@10 under each segment's popularity is computed on their test items, and each user
  moves to the segment that ranks their test items best with probability ½ (damped, since
  moving users changes every segment's counts); the best partition seen in ``--rounds``
  rounds, from the shipped partition and from ``--starts`` random ones.
- ``train only: the same ascent on the validation items``: a method a user could run (no
  test item seen): the ascent on PROTOCOL's validation split (counts from the first 80% of
  each train history, each user's NDCG@10 on the last 20%), from the shipped partition; the
  lift of the partition it ends with, on validation and on test. It tells structure (which
  would carry over to the test items) from per-user selection on the answer (which would
  not).

Usage: python benchmarks/segment_lift_ceiling.py [--k 5] [--rounds 30] [--starts 3]
Writes benchmarks/results/segment-lift-ceiling.md (and .json beside it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segrec.cluster import cluster_vectors  # noqa: E402
from segrec.data import load_dataset  # noqa: E402
from segrec.evaluate import (  # noqa: E402
    Split,
    evaluate_scores,
    per_user_metrics,
    protocol_split,
    validation_split,
)
from segrec.segments import COLLAB_N_INIT, CollabSpace, Histories  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_segments_represent import (  # noqa: E402
    _data_dir,
    svd_ceiling,
)
from bench_segments_represent import _lift as lift  # noqa: E402


def segment_counts(labels: np.ndarray, k: int, X: sp.csr_matrix) -> np.ndarray:
    return np.stack([np.asarray(X[labels == j].sum(axis=0)).ravel() for j in range(k)])


def ascend(
    start: np.ndarray, k: int, part: Split, X: sp.csr_matrix, mostpop: float, rounds: int, seed: int
) -> tuple[float, list[float]]:
    """Coordinate ascent on the lift with the test items (leaky): best lift seen, trace."""
    rng = np.random.default_rng(seed)
    labels = start.copy()
    n = len(part.users)
    best, trace = 0.0, []
    for _ in range(rounds):
        counts = segment_counts(labels, k, X)
        per = np.stack(
            [per_user_metrics(np.tile(counts[j], (n, 1)), part)["ndcg@10"] for j in range(k)]
        )
        current = float(per[labels, np.arange(n)].mean()) / mostpop
        trace.append(round(current, 4))
        best = max(best, current)
        move = rng.random(n) < 0.5
        labels = np.where(move, per.argmax(axis=0), labels)
    return best, trace


def ascend_on_validation(
    start: np.ndarray, k: int, part: Split, X: sp.csr_matrix, mostpop: float, rounds: int
) -> dict[str, float]:
    """The ascent on the validation split (train only); lift on validation and on test."""
    val = validation_split(part)
    Xv = sp.csr_matrix(val.train, dtype=np.float32)
    popv = np.asarray(Xv.sum(axis=0)).ravel()
    mostpop_v = evaluate_scores(np.tile(popv, (len(val.users), 1)), val)["ndcg@10"]
    position = {u: i for i, u in enumerate(part.users)}
    rows = np.array([position[u] for u in val.users])
    labels = start[rows].copy()
    rng = np.random.default_rng(0)
    n = len(val.users)
    for _ in range(rounds):
        counts = segment_counts(labels, k, Xv)
        per = np.stack(
            [per_user_metrics(np.tile(counts[j], (n, 1)), val)["ndcg@10"] for j in range(k)]
        )
        move = rng.random(n) < 0.5
        labels = np.where(move, per.argmax(axis=0), labels)
    full = start.copy()
    full[rows] = labels
    return {
        "validation": round(lift(labels, k, val, Xv, mostpop_v), 4),
        "test": round(lift(full, k, part, X, mostpop), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--data", default=None, help="the ml-latest-small folder")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/segment-lift-ceiling.md"))
    args = parser.parse_args()
    data = _data_dir(args.data)
    load_before = os.getloadavg()
    started = time.perf_counter()
    dataset = load_dataset(data / "ratings.csv", data / "movies.csv")
    part = protocol_split(dataset.interactions)
    X = sp.csr_matrix(part.train, dtype=np.float32)
    pop = np.asarray(X.sum(axis=0)).ravel()
    mostpop = evaluate_scores(np.tile(pop, (len(part.users), 1)), part)["ndcg@10"]
    k = args.k
    histories = Histories.from_frame(part.train_frames, part.users, part.items)
    vectors = CollabSpace.fit(histories, seed=0).project(histories)
    shipped = cluster_vectors(vectors, k=k, seed=0, n_init=COLLAB_N_INIT).labels
    rows: dict[str, Any] = {
        "shipped collab (train only)": round(lift(shipped, k, part, X, mostpop), 4)
    }
    svd, dim = svd_ceiling(part, X, k, mostpop)
    rows[f"leaky: k-means on test-item SVD (best of 8/16/32: {dim})"] = round(svd, 4)
    starts = {"from the shipped partition": shipped}
    rng = np.random.default_rng(0)
    for s in range(args.starts):
        starts[f"from random partition {s + 1}"] = rng.integers(0, k, len(part.users))
    traces = {}
    for name, start in starts.items():
        best, trace = ascend(start, k, part, X, mostpop, args.rounds, seed=len(traces))
        rows[f"leaky: the metric itself, {name}"] = round(best, 4)
        traces[name] = trace
        print(name, round(best, 4), flush=True)
    honest = ascend_on_validation(shipped, k, part, X, mostpop, args.rounds)
    rows["train only: the same ascent on the validation items → lift on validation"] = honest[
        "validation"
    ]
    rows["train only: the same ascent on the validation items → lift on test"] = honest["test"]
    print("validation ascent", honest, flush=True)
    wall = time.perf_counter() - started
    load_after = os.getloadavg()
    out = Path(args.out)
    out.with_suffix(".json").write_text(
        json.dumps({"k": k, "mostpop_ndcg@10": mostpop, "lift": rows, "traces": traces}, indent=1)
    )
    lines = [
        "# Segment lift ceiling on ml-latest-small (PROTOCOL track 4, #13)",
        "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {platform.platform()}, {os.cpu_count()} cores (shared), load average "
        f"{load_before[0]:.2f} before / {load_after[0]:.2f} after; {wall:.0f} s wall",
        f"- reproduce: `python benchmarks/segment_lift_ceiling.py --k {k} --rounds "
        f"{args.rounds} --starts {args.starts}`",
        f"- {len(part.users)} users, {len(part.items)} items; global MostPop NDCG@10 "
        f"{mostpop:.4f}; target lift ≥ 1.5 at k = {k}",
        "- *leaky* rows use each user's test items: bounds, not methods",
        "",
        f"| partition (k = {k}) | lift |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows.items()),
        "",
        "Lift per round of the ascent (the best is the row above):",
        "",
        *(f"- {name}: {' '.join(map(str, trace))}" for name, trace in traces.items()),
        "",
    ]
    # A hand-written reading below the generated part is kept.
    reading = out.read_text().partition("\n## Reading")[1:] if out.exists() else ("", "")
    out.write_text("\n".join(lines) + "".join(reading))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
