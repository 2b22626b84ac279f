"""Make ``docs/report.png``: a `segrec report` of ml-latest-small, screenshot in Chromium.

Rerun with::

    python docs/make_report_png.py --workspace /tmp/ml-report

Steps already done in the workspace are skipped. Profiles are the deterministic ones built
from each user's history (an LLM that never answers valid JSON forces them: profiling 610
users with the bundled model takes over an hour on 2 cores, and the default ``items``
representation does not use profiles). 8 segments and their parents (3 levels) are named
by the LLM given with ``--llm`` (default: deterministic fallback labels, marked as such, as
the committed screenshot shows: the bundled model took over 20 minutes for 8 names on the
shared, overloaded 2-core machine of the day). The page is opened in headless Chromium and
the top of it is saved, scaled to 1000 px wide.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from segrec import pipeline
from segrec.config import Settings
from segrec.hierarchy import make_hierarchy
from segrec.report import write_report
from segrec.store import Store
from segrec.testing import FakeLLM, visit_page

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "ml-latest-small"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/ml-report"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "report.png")
    parser.add_argument("--llm", action="store_true", help="Name with the bundled model.")
    args = parser.parse_args()
    settings = Settings(workspace=args.workspace, domain="movie", validation_attempts=1)
    if not (args.workspace / "segrec.db").exists():
        pipeline.ingest(settings, DATA / "ratings.csv", DATA / "movies.csv")
        users = pipeline.select_users(settings).user_ids
        pipeline.run_profiles(settings, users, llm=FakeLLM(default="not JSON"))
    with Store.open(args.workspace) as store:
        run = store.active_run()
        built = run is not None and store.hierarchy(run.id) is not None
    namer = None if args.llm else FakeLLM(default="not JSON")
    if run is None or run.params["k"] != 8:
        pipeline.run_clustering(settings, k=8, llm=namer, on_stage=print)
        built = False
    if not built:
        make_hierarchy(settings, levels=3, llm=namer, on_stage=print)
    page = args.workspace / "report.html"
    print(write_report(settings, out=page))
    visit = visit_page(
        page.as_uri(), ready="document.body && document.body.dataset.drawn", height=1500
    )
    from PIL import Image

    image = Image.open(io.BytesIO(visit.screenshot)).convert("RGB")
    image = image.resize((1000, round(image.height * 1000 / image.width)), Image.LANCZOS)
    buffer = io.BytesIO()
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(buffer, "PNG", optimize=True)
    args.out.write_bytes(buffer.getvalue())
    print(f"{args.out}: {len(buffer.getvalue()) / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
