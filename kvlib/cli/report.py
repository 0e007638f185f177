"""`python -m kvlib report run|index|check` and `python -m kvlib check-report`: the report's commands (`make report`,
`make check-report`); the work is kvlib.report's (pipeline, index, browser).

    python -m kvlib report probe --profile smoke                    # the machine probe, data/machine.json
    python -m kvlib report run 02_naive_vs_cached --profile smoke   # one notebook (kvlib.report.pipeline)
    python -m kvlib report index --profile smoke                    # each page's verdict box, the index page
    python -m kvlib report check                                    # every profile's keys vs every notebook
    python -m kvlib check-report reports/smoke                      # every page in headless Chromium
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvlib.report.browser import check_report
from kvlib.report.index import build_index
from kvlib.report.pipeline import (
    NotebookFailed,
    add_verdicts,
    check_profiles,
    discover,
    ensure_machine_probe,
    run_notebook,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="run the study's notebooks; build the report (make report)")
    p.add_argument("--notebooks", default="notebooks", help="folder of the study's notebooks [notebooks]")
    p.add_argument("--params", default="params", help="folder of the parameter profiles [params]")
    p.add_argument("--reports", default="reports", help="reports go to REPORTS/<profile>/ [reports]")
    steps = p.add_subparsers(dest="step", required=True, parser_class=type(p))
    m = steps.add_parser(
        "probe",
        help="measure the machine probe (read bandwidth, matmul) into REPORTS/<profile>/data/machine.json, replacing "
        "it: every notebook of the report divides by it (make report runs this once, before any notebook)",
    )
    m.add_argument("--profile", default="default")
    r = steps.add_parser(
        "run",
        help="execute one notebook with papermill into REPORTS/<profile>/ (with the report's machine probe: the one "
        "in REPORTS/<profile>/data/machine.json, measured first when there is none)",
    )
    r.add_argument("notebook")
    r.add_argument("--profile", default="default")
    i = steps.add_parser(
        "index",
        help="open each notebook's HTML page with its findings (What this page found), then write "
        "REPORTS/<profile>/index.html",
    )
    i.add_argument("--profile", default="default")
    steps.add_parser("check", help="check every profile's keys against every notebook's parameters")
    p.set_defaults(func=run)

    c = sub.add_parser("check-report", help="open every page of a report in headless Chromium (make check-report)")
    c.add_argument("report", help="a report folder, e.g. reports/smoke")
    c.add_argument("--browser", default=None, help="path of the Chromium binary [the first of chromium, ... on PATH]")
    c.add_argument("--no-screenshots", action="store_true", help="check only; write no screenshots")
    c.set_defaults(func=check)


def run(args: argparse.Namespace) -> int:
    """One step of the report; a failed notebook exits 1 (papermill's error already printed), bad input 2."""
    try:
        if args.step == "probe":
            ensure_machine_probe(args.profile, args.reports, args.params, args.notebooks, fresh=True)
        elif args.step == "run":
            run_notebook(args.notebook, args.profile, args.reports, args.params, args.notebooks)
        elif args.step == "index":
            out, notebooks = Path(args.reports) / args.profile, discover(args.notebooks)
            add_verdicts(out, notebooks)  # before the index: the pages stay older than index.html (make)
            build_index(out, args.profile, notebooks)
        else:
            problems = check_profiles(args.params, args.notebooks)
            for line in problems:
                print(f"error: {line}", file=sys.stderr)
            return 2 if problems else 0
    except NotebookFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the report keeps its previous notebooks and pages", file=sys.stderr)
        return 130
    return 0


def check(args: argparse.Namespace) -> int:
    """Every page of the report opened; exit 1 when a page has a problem (broken image, link, script)."""
    results = check_report(args.report, args.browser, screenshots=not args.no_screenshots)
    bad = 0
    for r in results:
        for problem in r.problems:
            print(f"{r.page}: {problem}")
        bad += bool(r.problems)
    shots = f"; screenshots in {Path(args.report) / 'screenshots'}" if not args.no_screenshots else ""
    print(f"check-report: {len(results) - bad} of {len(results)} pages passed{shots}")
    return 1 if bad else 0
