"""Synthetic behaviour logs with planted segments, for scale benchmarks and tests.

The generator (seeded; the same arguments give the same files):

- **Items.** ``n_items`` items split evenly over ``n_segments`` themes. An item's title is
  "<Brand> <word> <word> #<id>" with words from its theme's vocabulary, and its category is
  the theme's name, so a sentence encoder puts items of one theme near each other.
- **Users.** Each of ``n_users`` users belongs to one planted segment (segment sizes are
  uneven: proportional to 1, 2, …, ``n_segments``, shuffled). Events per user follow a
  geometric distribution with mean ``n_events / n_users`` (at least ``min_events``).
- **Events.** With probability ``affinity`` an event picks an item of the user's theme,
  else any item; either way by a Zipf law over item rank (exponent ``zipf``), so a few items
  are very popular and most are rare. Timestamps increase strictly within a user, so no
  two events of a user repeat (user, item, behavior, timestamp).

With ``product=True`` the log looks like a shop's implicit feedback rather than a
catalogue with categories (`segrec eval`'s "not tuned to movies" check):

- **Titles** are long product names ("Nordic compact tent with backpack, trail edition,
  2-pack, graphite — #17"), and ``items.csv`` has **no category column**: the theme is
  only in the words.
- **Sequences.** Each segment owns ``chains`` item chains of ``chain_length`` items of its
  theme (drawn uniformly, so they are not just the popular items). At each own-theme event
  a user starts one of their segment's chains with probability ``chain_start`` and then
  follows it in order over their next events (timestamps increasing), so the next item
  after a chain item is predictable from order alone.

The planted segment of every user is returned, to score recovered segments against
(adjusted Rand index).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

THEMES: dict[str, list[str]] = {
    "Camping and hiking": ["tent", "backpack", "sleeping bag", "trail", "lantern", "hiking"],
    "Baking and kitchen": ["oven", "whisk", "baking tray", "flour", "mixer", "recipe"],
    "Video games": ["console", "controller", "headset", "gaming", "joystick", "arcade"],
    "Baby care": ["stroller", "diaper", "crib", "baby bottle", "pacifier", "nursery"],
    "Gardening": ["seeds", "garden hose", "shovel", "flower pot", "compost", "pruning"],
    "Fitness": ["dumbbell", "yoga mat", "treadmill", "protein", "running", "kettlebell"],
    "Pet supplies": ["dog leash", "cat litter", "aquarium", "pet bed", "chew toy", "kibble"],
    "Skin care and beauty": ["lipstick", "moisturiser", "mascara", "serum", "perfume", "nail"],
    "Office supplies": ["stapler", "notebook", "printer", "desk lamp", "envelope", "binder"],
    "Car parts": ["brake pad", "engine oil", "tyre", "spark plug", "wiper", "car battery"],
    "Musical instruments": ["guitar", "violin", "drum kit", "piano", "ukulele", "amplifier"],
    "Fishing": ["fishing rod", "reel", "fishing lure", "tackle box", "bait", "wader"],
}
BRANDS = ["Acme", "Nordic", "Zen", "Apex", "Blue", "Prime", "Vista", "Nova", "Orbit", "Terra"]
ADJECTIVES = ["compact", "deluxe", "lightweight", "heavy-duty", "classic", "pro", "eco", "smart"]
EDITIONS = ["everyday", "travel", "family", "starter", "expert", "limited", "outdoor", "home"]
COLOURS = ["graphite", "ivory", "forest green", "navy", "sand", "crimson", "slate", "teal"]


@dataclass(frozen=True)
class SyntheticLog:
    """Paths of the written files, and the planted segment of each user (index = user id)."""

    log: Path
    items: Path
    planted: np.ndarray
    n_events: int


def write_synthetic_log(
    folder: Path,
    *,
    n_users: int,
    n_events: int,
    n_items: int,
    n_segments: int = 8,
    seed: int = 0,
    zipf: float = 1.05,
    affinity: float = 0.85,
    min_events: int = 3,
    product: bool = False,
    chains: int = 40,
    chain_length: int = 4,
    chain_start: float = 0.15,
) -> SyntheticLog:
    """Write ``log.csv`` (user_id, item_id, behavior, timestamp) and ``items.csv``
    (item_id, title, category; no category when ``product``) under ``folder``; see the
    module docstring for the model. Chains are planted only when ``product``."""
    if not 2 <= n_segments <= len(THEMES):
        raise ValueError(f"n_segments={n_segments}: between 2 and {len(THEMES)}")
    if n_items < n_segments or n_users < n_segments:
        raise ValueError("need at least one item and one user per segment")
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    themes = list(THEMES)[:n_segments]

    item_theme = np.arange(n_items) % n_segments
    words = [THEMES[t] for t in themes]
    titles = []
    for i in range(n_items):
        vocabulary = words[item_theme[i]]
        a, b = rng.choice(len(vocabulary), size=2, replace=False)
        brand = BRANDS[int(rng.integers(len(BRANDS)))]
        if product:
            adjective, edition, colour = (
                options[int(rng.integers(len(options)))]
                for options in (ADJECTIVES, EDITIONS, COLOURS)
            )
            pack = int(rng.choice([1, 2, 3, 6]))
            titles.append(
                f"{brand} {adjective} {vocabulary[a]} with {vocabulary[b]}, {edition} "
                f"edition, {pack}-pack, {colour} — #{i}"
            )
        else:
            titles.append(f"{brand} {vocabulary[a]} {vocabulary[b]} #{i}")
    columns = {"item_id": pa.array([f"i{i}" for i in range(n_items)]), "title": pa.array(titles)}
    if not product:
        columns["category"] = pa.array([themes[t] for t in item_theme])
    items_path = folder / "items.csv"
    pa_csv.write_csv(pa.table(columns), items_path)

    weights = rng.permutation(np.arange(1, n_segments + 1)).astype(float)
    planted = rng.choice(n_segments, size=n_users, p=weights / weights.sum())
    mean = max(n_events / n_users, min_events + 1e-9)
    counts = min_events + rng.geometric(1.0 / (mean - min_events + 1), size=n_users) - 1
    users = np.repeat(np.arange(n_users), counts)
    total = int(users.size)

    # Zipf over rank: inside a theme (theme items in a random order) and over the catalogue.
    def zipf_draw(pool_size: int, size: int) -> np.ndarray:
        p = 1.0 / np.arange(1, pool_size + 1) ** zipf
        return np.searchsorted(np.cumsum(p / p.sum()), rng.random(size), side="right").clip(
            0, pool_size - 1
        )

    global_order = rng.permutation(n_items)
    theme_items = [rng.permutation(np.flatnonzero(item_theme == j)) for j in range(n_segments)]
    items = global_order[zipf_draw(n_items, total)]
    own = rng.random(total) < affinity
    event_theme = planted[users]
    for j in range(n_segments):
        rows = np.flatnonzero(own & (event_theme == j))
        items[rows] = theme_items[j][zipf_draw(len(theme_items[j]), rows.size)]

    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    if product:
        _plant_chains(
            rng, items, own, planted, starts, counts, theme_items, chains, chain_length, chain_start
        )
    gaps = rng.integers(1, 86_400, size=total)
    clock = np.cumsum(gaps)
    base = 1_600_000_000 + rng.integers(0, 10**7, size=n_users)
    times = base[users] + clock - clock[starts][users]
    log_path = folder / "log.csv"
    with pa_csv.CSVWriter(
        str(log_path),
        pa.schema(
            [
                ("user_id", pa.int64()),
                ("item_id", pa.string()),
                ("behavior", pa.string()),
                ("timestamp", pa.int64()),
            ]
        ),
        write_options=pa_csv.WriteOptions(quoting_style="none"),
    ) as writer:
        behaviors = np.array(["view", "click", "purchase"])
        kinds = rng.choice(3, size=total, p=[0.7, 0.2, 0.1])
        step = 2_000_000
        for start in range(0, total, step):
            part = slice(start, start + step)
            writer.write_table(
                pa.table(
                    {
                        "user_id": pa.array(users[part]),
                        "item_id": pa.array(np.char.add("i", items[part].astype(str))),
                        "behavior": pa.array(behaviors[kinds[part]]),
                        "timestamp": pa.array(times[part]),
                    }
                )
            )
    return SyntheticLog(log=log_path, items=items_path, planted=planted, n_events=total)


def _plant_chains(
    rng: np.random.Generator,
    items: np.ndarray,
    own: np.ndarray,
    planted: np.ndarray,
    starts: np.ndarray,
    counts: np.ndarray,
    theme_items: list[np.ndarray],
    chains: int,
    length: int,
    start_p: float,
) -> None:
    """Overwrite runs of each user's events (in time order) with their segment's chains."""
    if chains < 1 or length < 2:
        raise ValueError("chains must be >= 1 and chain_length >= 2")
    table = [
        np.stack([rng.choice(pool, size=length, replace=pool.size < length) for _ in range(chains)])
        for pool in theme_items
    ]
    begins = rng.random(items.size) < start_p
    which = rng.integers(chains, size=items.size)
    for user, (start, count) in enumerate(zip(starts, counts, strict=True)):
        position, end = int(start), int(start + count)
        while position < end:
            if own[position] and begins[position]:
                chain = table[planted[user]][which[position]]
                run = min(length, end - position)
                items[position : position + run] = chain[:run]
                position += run
            else:
                position += 1
