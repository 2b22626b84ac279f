"""`segrec report` at scale: page build time, file size and projection time, beside the
clustering time of the same run.

Rerun with::

    python benchmarks/bench_report.py --sizes 10000,100000,1000000 --k 20

For each size, synthetic 384-d vectors (``bench_cluster.make_blobs``: seeded gaussian blobs
on the unit sphere, seed 0) are clustered with ``segrec.cluster.cluster_vectors``
(mini-batch k-means, seed 0: what a large run uses); its centroids are grouped into parents
with ``segrec.hierarchy.group`` (√k parents). Each segment gets facts of the size a real run
stores (5 top categories, 5 top items, 3 nearest members with a 200-character summary).
Then the page is built exactly as `segrec report` builds it: the seeded map sample
(``MAP_MAX_POINTS``), the 2-D projection (UMAP, and PCA for comparison), and
``segrec.report.render``. No LLM and no workspace: names are "Segment j" / "Parent p".

Results go to stdout (markdown) and to ``benchmarks/results/report.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_cluster import make_blobs  # noqa: E402

from segrec.cluster import cluster_vectors  # noqa: E402
from segrec.hierarchy import group  # noqa: E402
from segrec.report import (  # noqa: E402
    MAP_MAX_POINTS,
    PageInputs,
    project,
    render,
    sample_rows,
)
from segrec.store import HierarchyRecord, ParentRecord, RunRecord, SegmentRecord  # noqa: E402

TARGET_MB = 10.0


def synthetic_segments(clustering: object, n: int) -> list[SegmentRecord]:
    labels = clustering.labels  # type: ignore[attr-defined]
    sizes = np.bincount(labels, minlength=clustering.k)  # type: ignore[attr-defined]
    segments = []
    for j in range(clustering.k):  # type: ignore[attr-defined]
        facts = {
            "share": round(float(sizes[j] / n), 4),
            "top_categories": [
                {"category": f"Category {c}", "lift": round(2.0 - c / 10, 3), "members": 100}
                for c in range(5)
            ],
            "top_items": [
                {"item_id": str(i), "title": f"Item {j}-{i} (2001)", "lift": 3.0, "members": 50}
                for i in range(5)
            ],
            "nearest": [
                {"user_id": f"u{j}-{m}", "distance": 0.1, "summary": "x" * 200} for m in range(3)
            ],
            "silhouette": 0.1,
            "stability": 0.8,
            "variance": 0.5,
            "fallback_reason": None,
        }
        segments.append(
            SegmentRecord(
                segment_id=j,
                name=f"Segment {j}",
                description="A synthetic segment description of typical length. " * 2,
                fallback=False,
                described=True,
                size=int(sizes[j]),
                centroid=clustering.centroids[j],  # type: ignore[attr-defined]
                facts=facts,
            )
        )
    return segments


def synthetic_hierarchy(segments: list[SegmentRecord]) -> HierarchyRecord:
    k = len(segments)
    n_parents = max(2, round(k**0.5))
    labels = group(
        np.stack([s.centroid for s in segments]),
        np.array([s.size for s in segments], dtype=np.float64),
        n_parents,
        0,
    )
    parents = [
        ParentRecord(
            parent_id=p,
            level=1,
            name=f"Parent {p}",
            description="A synthetic parent description.",
            fallback=False,
            described=True,
            size=sum(s.size for s, lab in zip(segments, labels, strict=True) if lab == p),
            children=[s.segment_id for s, lab in zip(segments, labels, strict=True) if lab == p],
            parent=None,
            facts={"share": 0.0, "top_categories": [], "fallback_reason": None},
        )
        for p in range(n_parents)
    ]
    return HierarchyRecord(0, "", {"levels": 2}, [], parents)


def run_size(n: int, k: int) -> list[dict[str, object]]:
    X, _ = make_blobs(n, k, seed=0)
    start = time.perf_counter()
    clustering = cluster_vectors(X, k=k, algorithm="minibatch", seed=0)
    cluster_s = time.perf_counter() - start
    segments = synthetic_segments(clustering, n)
    hierarchy = synthetic_hierarchy(segments)
    run = RunRecord(
        1,
        "2026-01-01T00:00:00+00:00",
        {"k": k, "algorithm": "minibatch", "represent": "items", "min_segment_size": 10},
        {"users": n, "k": k, "silhouette": 0.1, "stability": 0.8, "curve": []},
        [],
    )
    rows = []
    for method in ("UMAP", "PCA"):
        start = time.perf_counter()
        sample = sample_rows(n, MAP_MAX_POINTS, seed=0)
        projection = project(X[sample], sample, n, seed=0, method=method.lower())
        projection_s = time.perf_counter() - start
        assert projection.method == method
        inputs = PageInputs(
            run=run,
            segments=segments,
            hierarchy=hierarchy,
            labels=clustering.labels,
            projection=projection,
            min_size=10,
            generated_at="benchmark",
        )
        start = time.perf_counter()
        page = render(inputs)
        render_s = time.perf_counter() - start
        rows.append(
            {
                "n": n,
                "k": k,
                "method": method,
                "points": len(sample),
                "cluster_s": cluster_s,
                "projection_s": projection_s,
                "render_s": render_s,
                "build_s": projection_s + render_s,
                "mb": len(page.encode()) / 1e6,
                "load": os.getloadavg()[0],
            }
        )
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/report.md")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    project(np.random.default_rng(0).standard_normal((50, 8)), np.arange(50), 50, seed=0)
    rows = [row for n in sizes for row in run_size(n, args.k)]
    versions = ", ".join(
        f"{p} {metadata.version(p)}" for p in ("plotly", "umap-learn", "numpy", "scikit-learn")
    )
    lines = [
        "# Report benchmark",
        "",
        f"- date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}",
        f"- machine: {platform.platform()}, nproc={os.cpu_count()}, shared with five other "
        "helpers' jobs (the load average is in the table)",
        f"- software: Python {platform.python_version()}, {versions}",
        f"- command: `python benchmarks/bench_report.py --sizes {args.sizes} --k {args.k}`",
        "",
        "Synthetic run (seeded blobs, mini-batch k-means, √k parents; see the script's "
        f"docstring). The map draws a seeded sample of at most {MAP_MAX_POINTS:,} users, so "
        "the page's size and build time stop growing with the number of users; clustering "
        "the same vectors is shown beside it. Build = projection + rendering (the whole "
        "page, Plotly's 4.8 MB of JavaScript included). UMAP's first call in a process also "
        "compiles numba code: a warm-up call runs before the table.",
        "",
        "| users | k | projection | map points | clustering s | projection s | render s "
        "| build s | build / clustering | file MB | load avg |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['k']} | {r['method']} | {r['points']:,} | {r['cluster_s']:.1f} "
            f"| {r['projection_s']:.1f} | {r['render_s']:.2f} | {r['build_s']:.1f} "
            f"| {r['build_s'] / r['cluster_s']:.2f} | {r['mb']:.2f} | {r['load']:.1f} |"
        )
    worst = max(r["mb"] for r in rows)
    lines += [
        "",
        f"- largest file: {worst:.2f} MB → "
        + ("meets" if worst < TARGET_MB else "MISSES")
        + f" the target (< {TARGET_MB:g} MB at 100k users and above)",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
