"""Baselines on ml-latest-small under shared/eval/PROTOCOL.md, and top-n ranking speed.

Rerunnable; writes benchmarks/results/baselines.md and prints the same markdown:

    python benchmarks/bench_baselines.py [--data ../shared/data/ml-latest-small] [--out FILE]

1. The warm split, λ for EASE tuned on the validation split, then MostPop, ItemKNN and EASE
   side by side (with the PROTOCOL reference figures and the wall time of each method); the
   same on the cold track (first 3 train items known, models fit in 5 folds of users).
2. `recommend_top_n` (seen-item exclusion, deterministic ties) against a plain numpy
   ``argpartition`` top-k over the same EASE score matrix.
3. One-user latency (cosine of a 384-d user vector against a synthetic catalogue, then
   top-10) for 10k and 100k items.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import scipy.sparse as sp

from segrec.evaluate import Split, cold_split, evaluate_scores, fold_scores, protocol_split
from segrec.recommend import (
    EASE,
    ItemKNN,
    MostPop,
    Scorer,
    cosine_scores,
    recommend_top_n,
    tune_ease,
)

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "data" / "ml-latest-small"
T = TypeVar("T")
REFERENCE = {
    "MostPop": (0.0877, 0.0973),
    "ItemKNN": (0.1052, 0.1359),
    "EASE λ=200": (0.1301, 0.1671),
}


def load_ratings(path: Path) -> pd.DataFrame:
    """ratings.csv in segrec's interaction shape (line = file line, header is line 1)."""
    ratings = pd.read_csv(path)
    return pd.DataFrame(
        {
            "user_id": ratings["userId"].astype(str),
            "item_id": ratings["movieId"].astype(str),
            "value": ratings["rating"].astype(float),
            "timestamp": ratings["timestamp"].astype("Int64"),
            "line": np.arange(2, len(ratings) + 2),
        }
    )


def timed(action: Callable[[], T]) -> tuple[T, float]:
    started = time.perf_counter()
    result = action()
    return result, time.perf_counter() - started


def median_time(action: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _, seconds = timed(action)
        times.append(seconds)
    return statistics.median(times)


def plain_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """The usual numpy idiom: no exclusion, arbitrary order among ties."""
    part = np.argpartition(scores, -k, axis=1)[:, -k:]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def quality(data: Path) -> tuple[list[str], np.ndarray, sp.csr_matrix]:
    lines: list[str] = []
    frame, load_s = timed(lambda: load_ratings(data / "ratings.csv"))
    split, split_s = timed(lambda: protocol_split(frame))
    (lam, by_lam), tune_s = timed(lambda: tune_ease(split))
    lines += [
        "## Warm track (PROTOCOL split, all users)",
        "",
        *[f"- {note}" for note in split.notes],
        f"- {split.n_items} rankable items; load {load_s:.2f} s, split {split_s:.2f} s",
        f"- EASE λ tuned on the validation split (last 20% of train) in {tune_s:.1f} s: "
        + ", ".join(f"λ={k:g} → NDCG@10 {v:.4f}" for k, v in by_lam.items())
        + f"; chosen λ={lam:g}",
        "",
        "| method | NDCG@10 | Recall@20 | reference NDCG@10 / Recall@20 | fit+score s | eval s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    methods: list[tuple[str, Scorer]] = [("MostPop", MostPop()), ("ItemKNN", ItemKNN())]
    methods.append((f"EASE λ={lam:g}", EASE(lam)))
    if lam != 200.0:
        methods.append(("EASE λ=200", EASE(200.0)))
    rows, scores_by_label = baseline_rows(split, methods)
    lines += [*rows, f"\nUsers evaluated: {split.n_users}."]

    cold = cold_split(split, known=3)
    lines += [
        "",
        "## Cold track (first 3 train items known)",
        "",
        *[f"- {note}" for note in cold.notes[len(split.notes) :]],
        "",
        "| method | NDCG@10 | Recall@20 | reference NDCG@10 / Recall@20 | fit+score s | eval s |",
        "| --- | --- | --- | --- | --- | --- |",
        *baseline_rows(cold, methods[:3])[0],
    ]
    return lines, scores_by_label[methods[2][0]], split.train


def baseline_rows(
    split: Split, methods: list[tuple[str, Scorer]]
) -> tuple[list[str], dict[str, np.ndarray]]:
    """One markdown row per method (fit in folds where the split asks for it)."""
    rows, scores_by_label = [], {}
    for label, scorer in methods:

        def score(fit_rows: np.ndarray, users: np.ndarray, s: Scorer = scorer) -> np.ndarray:
            return s.fit(split.fit[fit_rows]).score(split.train[users])

        scores, fit_s = timed(lambda score=score: fold_scores(split, score))
        result, eval_s = timed(lambda sc=scores: evaluate_scores(sc, split))
        ref = REFERENCE.get(label) if split.track == "warm" else None
        ref_text = f"{ref[0]:.4f} / {ref[1]:.4f}" if ref else "–"
        rows.append(
            f"| {label} | {result['ndcg@10']:.4f} | {result['recall@20']:.4f} | {ref_text} "
            f"| {fit_s:.2f} | {eval_s:.2f} |"
        )
        scores_by_label[label] = scores
    return rows, scores_by_label


def throughput(scores: np.ndarray, seen: sp.csr_matrix) -> list[str]:
    lines = [
        "",
        "## Top-n throughput over the EASE score matrix",
        "",
        f"{scores.shape[0]} users × {scores.shape[1]} items, float32; median of 7 runs. "
        "`recommend_top_n` excludes seen items and breaks ties by item index; the plain "
        "idiom does neither.",
        "",
        "| n | recommend_top_n ms | plain argpartition ms | ratio | users/s (recommend_top_n) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n in (10, 100):
        ours = median_time(lambda n=n: recommend_top_n(scores, seen, n), 7)
        plain = median_time(lambda n=n: plain_top_k(scores, n), 7)
        lines.append(
            f"| {n} | {ours * 1e3:.1f} | {plain * 1e3:.1f} | {ours / plain:.2f}× "
            f"| {scores.shape[0] / ours:,.0f} |"
        )
    return lines


def latency(seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lines = [
        "",
        "## One-user latency (synthetic catalogue, 384-d unit vectors, 50 seen items, top 10)",
        "",
        "| items | top-n p50 ms | top-n p99 ms | cosine + top-n p50 ms | cosine + top-n p99 ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n_items, trials in ((10_000, 300), (100_000, 100)):
        items = rng.standard_normal((n_items, 384)).astype(np.float32)
        items /= np.linalg.norm(items, axis=1, keepdims=True)
        only_top, both = [], []
        for _ in range(trials):
            user = rng.standard_normal((1, 384)).astype(np.float32)
            seen_cols = np.sort(rng.choice(n_items, size=50, replace=False))
            seen = sp.csr_matrix((np.ones(50, np.float32), seen_cols, [0, 50]), shape=(1, n_items))
            started = time.perf_counter()
            scores = cosine_scores(user, items, normalise_items=False)
            scored = time.perf_counter()
            recommend_top_n(scores, seen, 10)
            done = time.perf_counter()
            only_top.append(done - scored)
            both.append(done - started)
        p = {
            name: np.percentile(np.array(v) * 1e3, [50, 99])
            for name, v in (("top", only_top), ("both", both))
        }
        lines.append(
            f"| {n_items:,} | {p['top'][0]:.3f} | {p['top'][1]:.3f} "
            f"| {p['both'][0]:.3f} | {p['both'][1]:.3f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "baselines.md")
    args = parser.parse_args()

    started = time.perf_counter()
    header = [
        "# Baselines and ranking speed",
        "",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {platform.platform()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, numpy {np.__version__}",
        "- load average at start (other jobs share the CPUs; timings are noisy when it exceeds "
        f"the CPU count): {', '.join(f'{x:.1f}' for x in os.getloadavg())}",
        f"- data: {args.data.name} (`benchmarks/bench_baselines.py` reruns this file)",
        "",
    ]
    quality_lines, ease_scores, seen = quality(args.data)
    body = header + quality_lines + throughput(ease_scores, seen) + latency()
    body.append(f"\nTotal wall time: {time.perf_counter() - started:.0f} s.")
    text = "\n".join(body) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
