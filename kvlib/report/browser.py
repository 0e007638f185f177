"""`make check-report`: open every page of a report in headless Chromium, as a reader's browser would.

For `index.html` and every other `*.html` page of a report folder, the check (Playwright driving the system's
Chromium, offline) fails on:

- a resource the page tries to fetch from the network (a page must open offline), or one that fails to load;
- an image that did not render (missing file, broken data URI: `naturalWidth == 0`);
- a link to a file of the report that does not exist, or to an anchor (`#id`) the target page lacks;
- a JavaScript error raised on the page.

It writes a screenshot of each page (the first `MAX_SHOT_HEIGHT` pixels) to `<report>/screenshots/` for a person
to look at, and prints one line per problem. Exit code 0: every page passed; 1: problems; 2: no report or no
Chromium (the message names the install command).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from kvlib.core.errors import KvlibError

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WIDTH, MAX_SHOT_HEIGHT = 1280, 6000  # screenshot size in CSS pixels (the top of a long page)

_BROKEN_IMAGES = "Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)" + (
    ".map(i => (i.getAttribute('src') || '').slice(0, 80))"
)
_LINKS = "Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href'))"
_IDS = "Array.from(document.querySelectorAll('[id], a[name]')).map(e => e.id || e.getAttribute('name'))"


def find_browser() -> str:
    """The path of a Chromium-family browser on PATH; KvlibError naming the install command when there is none."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise KvlibError("no Chromium found for the browser check: install it with `apt-get install chromium`")


@dataclass
class PageResult:
    page: str  # file name within the report folder
    problems: list[str] = field(default_factory=list)
    screenshot: Path | None = None
    links: list[str] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)


def _local_target(report: Path, page: Path, href: str) -> tuple[Path | None, str]:
    """(file a relative link points to, its #fragment); (None, '') for links outside the report (http, mailto)."""
    parts = urlsplit(href)
    if parts.scheme or parts.netloc:
        return None, ""
    target = page if not parts.path else (page.parent / unquote(parts.path)).resolve()
    return target, parts.fragment


def check_report(report: str | Path, browser: str | None = None, screenshots: bool = True) -> list[PageResult]:
    """Open every page of `report` (a folder with index.html) headless; return each page's problems."""
    from playwright.sync_api import Error as PlaywrightError  # optional: only the browser check of a built report
    from playwright.sync_api import sync_playwright  # optional: only the browser check of a built report

    report = Path(report).resolve()
    if not (report / "index.html").is_file():
        raise KvlibError(f"no report at {report}: index.html is missing (run `make report` first)")
    pages = [report / "index.html", *sorted(p for p in report.glob("*.html") if p.name != "index.html")]
    shots = report / "screenshots"
    if screenshots:
        shots.mkdir(exist_ok=True)
    results: list[PageResult] = []
    with sync_playwright() as pw:
        try:
            chromium = pw.chromium.launch(executable_path=browser or find_browser(), args=["--no-sandbox"])
        except PlaywrightError as e:
            raise KvlibError(f"Chromium would not start: {str(e).splitlines()[0]}") from None
        try:
            for path in pages:
                results.append(_check_page(chromium, path, shots if screenshots else None))
        finally:
            chromium.close()
    by_file = {report / r.page: r for r in results}
    for r in results:  # links between pages: the target exists, and so does the anchor in it
        for href in r.links:
            target, fragment = _local_target(report, report / r.page, href)
            if target is None:
                continue
            if not target.exists():
                r.problems.append(f"broken link {href!r}: {target} does not exist")
            elif fragment and target in by_file and not {fragment, unquote(fragment)} & by_file[target].ids:
                # a browser looks for the fragment as written, then percent-decoded (HTML's indicated element);
                # nbconvert writes heading ids percent-encoded ("memory%E2%80%93quality"), and links to them so
                r.problems.append(f"broken link {href!r}: {target.name} has no anchor #{unquote(fragment)}")
    return results


def _check_page(chromium, path: Path, shots: Path | None) -> PageResult:
    result = PageResult(path.name)
    context = chromium.new_context(viewport={"width": WIDTH, "height": 900}, offline=True)
    page = context.new_page()

    def route(request_route, request) -> None:
        if request.url.startswith(("file:", "data:", "blob:", "about:")):
            request_route.continue_()
        else:
            result.problems.append(f"fetches {request.url[:100]} from the network (a page must open offline)")
            request_route.abort()

    page.route("**/*", route)
    page.on("pageerror", lambda e: result.problems.append(f"JavaScript error: {str(e).splitlines()[0][:160]}"))
    page.on(
        "requestfailed",
        lambda r: r.url.startswith("file:") and result.problems.append(f"could not load {unquote(r.url)[:120]}"),
    )
    page.goto(path.as_uri(), wait_until="load")
    for src in page.evaluate(_BROKEN_IMAGES):
        result.problems.append(f"image did not render: {src or '(no src)'}")
    result.links = page.evaluate(_LINKS)
    result.ids = set(page.evaluate(_IDS))
    if shots is not None:
        height = min(page.evaluate("document.documentElement.scrollHeight"), MAX_SHOT_HEIGHT)
        result.screenshot = shots / f"{path.stem}.png"
        page.screenshot(
            path=str(result.screenshot), full_page=True, clip={"x": 0, "y": 0, "width": WIDTH, "height": height}
        )
    context.close()
    return result
