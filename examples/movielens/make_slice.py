"""Rebuild this slice of MovieLens ml-latest-small (see NOTICE.md).

Usage: python examples/movielens/make_slice.py PATH/TO/ml-latest-small
"""

from __future__ import annotations

import csv
import random
import sys
from collections import defaultdict
from pathlib import Path

USERS, SEED, MIN_RATINGS, MAX_RATINGS = 36, 7, 20, 150


def main(source: Path, target: Path) -> None:
    with (source / "ratings.csv").open(newline="") as handle:
        ratings = list(csv.DictReader(handle))
    by_user: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in ratings:
        by_user[row["userId"]].append(row)
    candidates = sorted(
        (u for u, rows in by_user.items() if MIN_RATINGS <= len(rows) <= MAX_RATINGS), key=int
    )
    random.seed(SEED)
    users = sorted(random.sample(candidates, USERS), key=int)
    kept = [row for user in users for row in by_user[user]]
    with (target / "ratings.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(
            handle, fieldnames=["userId", "movieId", "rating", "timestamp"], lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(kept)
    movie_ids = {row["movieId"] for row in kept}
    with (source / "movies.csv").open(newline="") as handle:
        movies = [row for row in csv.DictReader(handle) if row["movieId"] in movie_ids]
    with (target / "movies.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(
            handle, fieldnames=["movieId", "title", "genres"], lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(movies)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).parent)
