"""`make check-report`'s browser check on a small hand-made report: it must find each kind of fault it claims to.

Skipped where no Chromium is installed (`apt-get install chromium`); test_report.py runs it on the smoke report.
"""

from __future__ import annotations

import base64
import shutil

import pytest

from kvlib.cli import main
from kvlib.report import browser as browser_check

pytestmark = pytest.mark.skipif(
    not any(shutil.which(b) for b in browser_check.BROWSERS), reason="no Chromium (apt-get install chromium)"
)
PNG = base64.b64decode(  # a 1x1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)


def _page(body: str) -> str:
    return f"<!DOCTYPE html><html><head><meta charset=utf-8><title>t</title></head><body>{body}</body></html>"


def test_a_good_report_passes_and_gets_screenshots(tmp_path):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "f.png").write_bytes(PNG)
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    (tmp_path / "index.html").write_text(
        _page(f"<a href='a.html#sec'>a</a> <a href='https://example.org'>out</a><img src='{uri}'>")
    )
    (tmp_path / "a.html").write_text(_page("<h2 id=sec>s</h2><img src='figures/f.png'><a href='#sec'>top</a>"))
    results = browser_check.check_report(tmp_path)
    assert [r.page for r in results] == ["index.html", "a.html"]
    assert all(not r.problems for r in results), [r.problems for r in results]
    assert all(r.screenshot and r.screenshot.stat().st_size > 1000 for r in results)


def test_every_kind_of_fault_is_found(tmp_path, capsys):
    (tmp_path / "index.html").write_text(
        _page(
            "<a href='missing.html'>m</a> <a href='a.html#nope'>x</a>"
            "<img src='figures/nope.png'><img src='data:image/png;base64,AAAA'>"
            "<script src='https://cdn.example.org/require.min.js'></script>"
        )
    )
    (tmp_path / "a.html").write_text(_page("<script>throw new Error('boom')</script>"))
    assert main(["check-report", str(tmp_path), "--no-screenshots"]) == 1
    out = capsys.readouterr().out
    for expected in (
        "broken link 'missing.html'",
        "a.html has no anchor #nope",
        "image did not render: figures/nope.png",
        "image did not render: data:image/png",
        "fetches https://cdn.example.org/require.min.js from the network",
        "a.html: JavaScript error: boom",
        "0 of 2 pages passed",
    ):
        assert expected in out, expected
    assert not (tmp_path / "screenshots").exists()


def test_no_report_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["check-report", str(tmp_path / "nothing")]) == 2
    assert "index.html is missing" in capsys.readouterr().err


def test_percent_encoded_anchors_resolve_as_in_a_browser(tmp_path):
    """Regression: nbconvert writes a heading's id percent-encoded (08_quality: "memory%E2%80%93quality") and links
    to it so; a browser finds it (the fragment as written first, then decoded), so the check must too."""
    (tmp_path / "index.html").write_text(_page("<a href='a.html#x%E2%80%93y'>a</a> <a href='a.html#p%20q'>b</a>"))
    (tmp_path / "a.html").write_text(_page("<h2 id='x%E2%80%93y'>s</h2><h2 id='p q'>t</h2><a href='#nope%20'>n</a>"))
    results = {r.page: r.problems for r in browser_check.check_report(tmp_path, screenshots=False)}
    assert results["index.html"] == []
    assert results["a.html"] == ["broken link '#nope%20': a.html has no anchor #nope "]
