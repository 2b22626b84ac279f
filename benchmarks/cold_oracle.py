"""What would knowing each newcomer's true segment be worth on the product log's cold track?

#13 asks the cold track (3 known items) for ≥ 1.2× the best baseline. On the product-style
log the planted segment of every user is known (`write_synthetic_log` returns it), so the
"segments carry the signal" idea can be measured at its best: rank by the popularity among
the members of the user's **planted** segment (the true one, not a recovered one; an
oracle, not a method), alone and mixed with global popularity, beside MostPop and ItemKNN,
all with PROTOCOL's cold split (same 5 folds as `segrec eval`, models never fit on the
scored user). The `segrec` figure is read from `benchmarks/results/quality-product.json`
(the last `bench_quality.py` run on the same log), not recomputed here.

Usage: python benchmarks/cold_oracle.py [--work DIR]
Writes benchmarks/results/cold-oracle.md.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segrec.evaluate import (  # noqa: E402
    Split,
    cold_split,
    evaluate_scores,
    fold_scores,
    protocol_split,
)
from segrec.recommend import ItemKNN, MostPop, SegmentPopularity  # noqa: E402
from segrec.synthetic import write_synthetic_log  # noqa: E402

LOG: dict[str, Any] = {
    "n_users": 10_000,
    "n_events": 300_000,
    "n_items": 5_000,
    "seed": 0,
    "product": True,
}


def planted_segment_scores(cold: Split, planted: np.ndarray) -> np.ndarray:
    """Per fold, each scored user's planted segment's popularity among the fit users
    (``planted[u]``: the segment of user id ``u``, as `write_synthetic_log` returns it)."""
    segment_of = {str(user): int(segment) for user, segment in enumerate(planted)}
    fit_labels = np.array([segment_of[str(u)] for u in cold.fit_users])
    user_labels = np.array([segment_of[str(u)] for u in cold.users])

    def segment_pop(fit: np.ndarray, users: np.ndarray) -> np.ndarray:
        model = SegmentPopularity().fit(cold.fit[fit], fit_labels[fit])
        return model.score(cold.train[users], user_labels[users])

    return fold_scores(cold, segment_pop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "segrec-cold-oracle"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/cold-oracle.md"))
    args = parser.parse_args()
    load_before = os.getloadavg()
    started = time.perf_counter()
    log = write_synthetic_log(Path(args.work), **LOG)
    base = protocol_split(pd.read_csv(log.log))
    cold = cold_split(base, 3, folds=5, seed=0)

    def fitted(make: Callable[[], Any]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        return lambda fit, users: make().fit(cold.fit[fit]).score(cold.train[users])

    def unit(scores: np.ndarray) -> np.ndarray:
        return scores / np.maximum(scores.max(axis=1, keepdims=True), 1e-12)

    pop = fold_scores(cold, fitted(MostPop))
    seg = planted_segment_scores(cold, log.planted)
    rows = {
        "MostPop": evaluate_scores(pop, cold),
        "ItemKNN": evaluate_scores(fold_scores(cold, fitted(ItemKNN)), cold),
    }
    for mix in (0.0, 0.1, 0.3, 1.0):
        name = "oracle: planted segment's popularity" + (
            f" + {mix:g} × global popularity" if mix else ""
        )
        rows[name] = evaluate_scores(unit(seg) + mix * unit(pop), cold)
    recorded = json.loads((ROOT / "benchmarks/results/quality-product.json").read_text())
    segrec_cold = recorded["tracks"]["cold"]["segrec"]
    wall = time.perf_counter() - started
    load_after = os.getloadavg()
    best = max(rows["MostPop"]["ndcg@10"], rows["ItemKNN"]["ndcg@10"])
    lines = [
        "# Cold track with the true segments (product-style log, #13)",
        "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {platform.platform()}, {os.cpu_count()} cores (shared), load average "
        f"{load_before[0]:.2f} before / {load_after[0]:.2f} after; {wall:.0f} s wall",
        "- reproduce: `python benchmarks/cold_oracle.py`",
        f"- log: `write_synthetic_log({', '.join(f'{k}={v}' for k, v in LOG.items())})`; "
        f"{len(cold.users)} users evaluated, first 3 train items known; target 1.2 × "
        f"{best:.4f} = {1.2 * best:.4f}",
        "",
        "| method | NDCG@10 | Recall@20 |",
        "|---|---|---|",
        *(f"| {name} | {r['ndcg@10']:.4f} | {r['recall@20']:.4f} |" for name, r in rows.items()),
        f"| segrec (recorded: `benchmarks/results/quality-product.json`) | "
        f"{segrec_cold['ndcg@10']:.4f} | {segrec_cold['recall@20']:.4f} |",
        "",
    ]
    out = Path(args.out)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
