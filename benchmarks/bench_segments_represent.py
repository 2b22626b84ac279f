"""Segment representations on the PROTOCOL segments track (track 4): ``items`` vs ``collab``.

Two datasets, all users, PROTOCOL split (train part only for every vector):
- ml-latest-small (610 users, ratings, genres);
- a product-style implicit log: ``write_synthetic_log(n_users=10000, n_events=300000,
  n_items=5000, seed=0, product=True)`` (long titles, no category column, 8 planted segments).

For each k (default 3..10) the rows are exactly what `segrec eval --tracks segments` reports
(``segrec.quality._segments_track``): lift = NDCG@10 of "most popular train items within the
user's segment" / global MostPop; stability = mean ARI over 5 seeds; silhouette (cosine).
Two reference rows at the headline k only, labelled as such:
- ``items (n_init 10)``: the items vectors clustered with collab's 10 k-means restarts, to
  tell the representation's effect from the restarts';
- ``ceiling: test-item clusters``: k-means on an 8-component SVD of each user's *test* items
  (leaks the answer on purpose; not a method): how much lift any k-segmentation of these
  users could show on this metric.

Usage: python benchmarks/bench_segments_represent.py [--k 5] [--curve 3-10] [--data DIR]
Writes benchmarks/results/segments-represent.md (and .json beside it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segrec.cluster import cluster_vectors, seed_ari  # noqa: E402
from segrec.config import Settings  # noqa: E402
from segrec.data import load_dataset  # noqa: E402
from segrec.embed import SentenceTransformerEncoder  # noqa: E402
from segrec.evaluate import evaluate_scores, protocol_split  # noqa: E402
from segrec.quality import _Context, _segments_track  # noqa: E402
from segrec.ranker import history_vectors  # noqa: E402
from segrec.segments import (  # noqa: E402
    COLLAB_FIT_USERS,
    COLLAB_N_INIT,
    CollabSpace,
    Histories,
)
from segrec.store import Store  # noqa: E402
from segrec.synthetic import write_synthetic_log  # noqa: E402


def _data_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    for base in (ROOT.parent, *ROOT.parents):
        if (base / "shared" / "data" / "ml-latest-small").is_dir():
            return base / "shared" / "data" / "ml-latest-small"
    raise SystemExit("ml-latest-small not found: pass --data DIR")


def _lift(labels: np.ndarray, k: int, part: Any, X: sp.csr_matrix, mostpop: float) -> float:
    counts = np.stack([np.asarray(X[labels == j].sum(axis=0)).ravel() for j in range(k)])
    return evaluate_scores(counts[labels], part)["ndcg@10"] / mostpop


def test_matrix(part: Any, n_rows: int) -> sp.csr_matrix:
    """Binary ``n_rows`` × items matrix of the evaluated users' *test* items (row i: the
    split's user i; any further rows empty, e.g. the rest of a ``fit`` matrix)."""
    rows = np.repeat(np.arange(len(part.users)), [len(t) for t in part.test])
    cols = np.concatenate([np.empty(0, np.int64), *part.test]).astype(np.int64)
    return sp.csr_matrix(
        (np.ones(rows.size, dtype=np.float32), (rows, cols)), shape=(n_rows, len(part.items))
    )


def svd_ceiling(
    part: Any, X: sp.csr_matrix, k: int, mostpop: float, seed: int = 0
) -> tuple[float, int]:
    """Leaky bound: k-means (10 restarts) on an SVD of each user's *test* items, the best
    lift over 8/16/32 components, and that size."""
    from sklearn.utils.extmath import randomized_svd

    Y = test_matrix(part, X.shape[0])
    best = (0.0, 0)
    for dim in (8, 16, 32):
        _, _, vt = randomized_svd(Y, dim, random_state=seed)
        Z = np.asarray(Y @ vt.T, dtype=np.float32)
        Z /= np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
        oracle = cluster_vectors(Z, k=k, seed=seed, n_init=10)
        best = max(best, (_lift(oracle.labels, k, part, X, mostpop), dim))
    return best


def _references(ctx: _Context, k: int, seed: int) -> dict[str, dict[str, Any]]:

    part = ctx.evaluated
    X = sp.csr_matrix(part.train, dtype=np.float32)
    pop = np.asarray(X.sum(axis=0)).ravel()
    mostpop = evaluate_scores(np.tile(pop, (len(part.users), 1)), part)["ndcg@10"]
    items = history_vectors(part.train, ctx.vectors_for(part))
    clustering = cluster_vectors(items, k=k, seed=seed, n_init=10)
    out = {
        "items (n_init 10)": {
            "lift": round(_lift(clustering.labels, k, part, X, mostpop), 4),
            "stability_ari": round(seed_ari(items, k=k, seeds=range(seed, seed + 5), n_init=10), 4),
        }
    }
    best = svd_ceiling(part, X, k, mostpop, seed)
    out[f"leaky: clusters of the test items (best of SVD 8/16/32: {best[1]})"] = {
        "lift": round(best[0], 4),
        "stability_ari": None,
    }
    return out


def scale(n_users: int, n_items: int, per_user: int, k: int) -> dict[str, Any]:
    """The collab-specific work at scale on planted behaviour (no ingest, no LLM): fit on
    the seeded sample, project every user, MiniBatchKMeans with collab's restarts."""
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    segment = rng.integers(0, k, n_users)
    ranks = np.arange(1, n_items // k + 1)
    zipf = 1.0 / ranks**1.05
    zipf /= zipf.sum()
    own = rng.random((n_users, per_user)) < 0.85
    within = rng.choice(ranks.size, size=(n_users, per_user), p=zipf)
    anywhere = rng.integers(0, n_items, (n_users, per_user))
    cols = np.where(own, within * k + segment[:, None], anywhere).ravel()
    rows = np.repeat(np.arange(n_users), per_user)
    started = time.perf_counter()
    histories = Histories.from_pairs(
        [str(u) for u in range(n_users)], [str(i) for i in range(n_items)], rows, cols
    )
    built = time.perf_counter() - started
    started = time.perf_counter()
    space = CollabSpace.fit(histories)
    fitted = time.perf_counter() - started
    started = time.perf_counter()
    X = space.project(histories)
    projected = time.perf_counter() - started
    started = time.perf_counter()
    clustering = cluster_vectors(X, k=k, algorithm="minibatch", seed=0, n_init=COLLAB_N_INIT)
    clustered = time.perf_counter() - started
    return {
        "users": n_users,
        "items": n_items,
        "events": int(rows.size),
        "histories_s": round(built, 1),
        "fit_s": round(fitted, 1),
        "project_s": round(projected, 1),
        "minibatch_kmeans_s": round(clustered, 1),
        "ari_planted": round(adjusted_rand_score(segment, clustering.labels), 4),
    }


def _dataset(name: str, data: Path, work: Path) -> tuple[Path, Path]:
    if name == "ml-latest-small":
        return data / "ratings.csv", data / "movies.csv"
    folder = work / "product-10k"
    if not (folder / "log.csv").exists():
        write_synthetic_log(
            folder, n_users=10_000, n_events=300_000, n_items=5_000, seed=0, product=True
        )
    return folder / "log.csv", folder / "items.csv"


def run(name: str, data: Path, work: Path, ks: list[int], k: int) -> dict[str, Any]:
    ratings, items = _dataset(name, data, work)
    dataset = load_dataset(ratings, items)
    split = protocol_split(dataset.interactions)
    settings = Settings(workspace=work / f"ws-{name}")
    result: dict[str, Any] = {"users": len(split.users), "items": len(split.items), "k": {}}
    with Store.open(work / f"ws-{name}", create=True) as store:
        started = time.perf_counter()
        ctx = _Context(
            settings, dataset, split, split, store, SentenceTransformerEncoder(settings.encoder)
        )
        result["item_embedding_s"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        histories = Histories.from_frame(split.train_frames, split.users, split.items)
        space = CollabSpace.fit(histories)
        space.project(histories)
        result["collab_fit_project_s"] = round(time.perf_counter() - started, 2)
        for kk in ks:
            started = time.perf_counter()
            rows = _segments_track(ctx, {}, kk, 0)
            result["k"][kk] = {"rows": rows, "wall_s": round(time.perf_counter() - started, 1)}
            print(name, kk, json.dumps(rows), flush=True)
        result["references"] = _references(ctx, k, 0)
    return result


def _table(result: dict[str, Any], k: int) -> list[str]:
    lines = [
        "| represent | lift | stability (ARI, 5 seeds) | silhouette | sizes |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["k"][k]["rows"].items():
        lines.append(
            f"| {name} | {row['lift']} | {row['stability_ari']} | {row['silhouette']} | "
            f"{row['sizes']} |"
        )
    for name, row in result["references"].items():
        ari = "—" if row["stability_ari"] is None else row["stability_ari"]
        lines.append(f"| *{name}* (reference) | {row['lift']} | {ari} | — | — |")
    return lines


def _curve(result: dict[str, Any]) -> list[str]:
    names = list(next(iter(result["k"].values()))["rows"])
    head = "| k | " + " | ".join(f"{n} lift | {n} ARI" for n in names) + " |"
    lines = [head, "|---" * (1 + 2 * len(names)) + "|"]
    for kk, entry in result["k"].items():
        cells = []
        for n in names:
            row = entry["rows"][n]
            cells += [str(row["lift"]), str(row["stability_ari"])]
        lines.append(f"| {kk} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--curve", default="3-10", help="k range, e.g. 3-10 ('' for k only)")
    parser.add_argument("--data", default=None, help="the ml-latest-small folder")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "segrec-bench-rep"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/segments-represent.md"))
    parser.add_argument(
        "--scale", default="1000000:20000:20", help="users:items:events per user ('' skips)"
    )
    args = parser.parse_args()
    ks = [args.k]
    if args.curve:
        low, high = (int(x) for x in args.curve.split("-"))
        ks = sorted({args.k, *range(low, high + 1)})
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = _data_dir(args.data)
    load_before = os.getloadavg()
    started = time.perf_counter()
    results = {
        name: run(name, data, work, ks, args.k) for name in ("ml-latest-small", "product-10k")
    }
    scaled = None
    if args.scale:
        users, n_items, per_user = (int(x) for x in args.scale.split(":"))
        scaled = scale(users, n_items, per_user, 8)
        print("scale", json.dumps(scaled), flush=True)
    wall = time.perf_counter() - started
    load_after = os.getloadavg()
    out = Path(args.out)
    out.with_suffix(".json").write_text(
        json.dumps({**results, "scale": scaled}, indent=1, default=str)
    )
    lines = [
        "# Segment representations: items vs collab (PROTOCOL track 4)",
        "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {platform.platform()}, {os.cpu_count()} cores (shared), load average "
        f"{load_before[0]:.2f} before / {load_after[0]:.2f} after; {wall:.0f} s wall",
        f"- reproduce: `python benchmarks/bench_segments_represent.py --k {args.k} "
        f"--curve {args.curve}`",
        "- rows as `segrec eval --tracks segments` reports them (train part only for every "
        "vector; all users); `collab` = `segrec cluster --represent collab`",
        "- targets (#13): lift ≥ 1.5 with stability ARI ≥ 0.8 on both datasets",
        "",
    ]
    for name, result in results.items():
        lines += [
            f"## {name}: {result['users']} users, {result['items']} items",
            "",
            f"collab space fit + projection of every user: {result['collab_fit_project_s']} s; "
            f"item embeddings (cached after the first run): {result['item_embedding_s']} s",
            "",
            f"### k = {args.k}",
            "",
            *_table(result, args.k),
            "",
        ]
        if len(result["k"]) > 1:
            lines += ["### k curve", "", *_curve(result), ""]
    if scaled is not None:
        lines += [
            f"## Scale: the collab part at {scaled['users']:,} users / {scaled['items']:,} items",
            "",
            f"Planted behaviour (8 segments, {scaled['events']:,} events, Zipf within a "
            "segment's items, 15% anywhere), arrays in memory (no ingest, no LLM): sparse "
            f"histories {scaled['histories_s']} s; SVD fit on a seeded sample of "
            f"{min(scaled['users'], COLLAB_FIT_USERS):,} users {scaled['fit_s']} s; "
            f"projecting every user {scaled['project_s']} s; MiniBatchKMeans (k=8, "
            f"{COLLAB_N_INIT} restarts, 8 dimensions) {scaled['minibatch_kmeans_s']} s; "
            f"ARI with the planted segments {scaled['ari_planted']}.",
            "",
        ]
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
