"""The report: reports/<profile>/index.html, one self-contained page (styles inline, figures embedded as base64
PNG, so it opens offline) with the headline numbers, the key figures, a link to each notebook's page, provenance,
and a banner when any run used random weights.

It reads what the notebooks wrote (data/NN_headline.csv, data/NN_meta.json, figures/NN_*.png; see kvlib.study)
and the papermill metadata of the executed notebooks; it never re-runs or re-parses a notebook's outputs.

    python -m kvlib report run 02_naive_vs_cached --profile smoke   # one notebook (kvlib.report.pipeline)
    python -m kvlib report index --profile smoke                    # the index page
    python -m kvlib report check                                    # every profile's keys vs every notebook
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from kvlib.core.stats import MIN_REPEATS
from kvlib.measure.results import write_whole
from kvlib.report.decision import decision_html
from kvlib.report.findings import findings
from kvlib.report.machine import machine_section
from kvlib.report.timing_floor import timing_floor_html

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.95em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.banner { background: #fff3cd; border: 3px solid #d9534f; padding: 0.8em 1em; font-size: 1.1em; margin: 1em 0; }
.banner strong { color: #b52b27; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; } .muted { color: #777; font-size: 0.9em; }
code { background: #f6f6f6; padding: 0 0.2em; }
ul.findings { font-size: 1.08em; padding-left: 1.2em; } ul.findings li { margin: 0.45em 0; }
ul.findings li.contradicts { list-style: "⚠ "; } td.metric { min-width: 22em; }
span.meaning { font-size: 0.88em; color: #555; }
"""

# What each headline number means, for a reader who did not write the notebooks (by metric; else its note).
MEANINGS = {
    "speedup": "How many times faster a whole generation was with the cache than without it (naive total time / "
    "cached total time, paired repeat by repeat). Above 1: the cache helped.",
    "ttft_ms": "Time to first token: from the start of a generation (the cache's creation) to the first new token; "
    "mostly the prefill of the prompt.",
    "tpot_ms": "Time per output token after the first: the median decode step, with the cache.",
    "tpot_naive_ms": "Time per output token without a cache: each step recomputes the whole sequence.",
    "kv_mib_per_token": "Memory the cache holds for one token of one sequence: a key and a value per layer and "
    "key/value head.",
    "mbu": "Model bandwidth utilisation: the bytes a decode step must read (weights and cache) per second, as a "
    "share of this machine's measured read bandwidth. Near 100%: the step runs as fast as memory allows.",
    "best_throughput": "The most tokens generated per second, all sequences of a batch together, over the batch "
    "sizes measured.",
    "best_saving_equal_tokens": "The largest memory saving over the plain static cache by a layout whose tokens "
    "were still exactly the static cache's.",
    "batch_throughput_gain": "Decode throughput at the largest batch over the smallest; perfect scaling would equal "
    "the ratio of the batch sizes.",
    "paged_waste_pct": "Share of the reserved cache memory that held no token of a sequence still generating.",
}


def reading_page(nb: str) -> str:
    """The reading view of a notebook: prose, tables and figures, code hidden (Makefile: nbconvert --no-input)."""
    return f"{nb}.reading.html"


def _fmt(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return html.escape(str(value))
    if math.isnan(v):
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _is_true(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def _notebook_info(out: Path, nb: str) -> dict[str, Any]:
    """Title, papermill parameters and duration of an executed notebook; its headline rows, metadata and figures."""
    prefix = nb.split("_", 1)[0]
    info: dict[str, Any] = {"name": nb, "ran": False, "title": nb, "parameters": {}, "duration_s": math.nan}
    executed = out / f"{nb}.ipynb"
    if executed.exists():
        doc = json.loads(executed.read_text())
        pm = doc.get("metadata", {}).get("papermill", {})
        info.update(ran=True, parameters=pm.get("parameters", {}), duration_s=pm.get("duration") or math.nan)
        for cell in doc.get("cells", []):
            if cell.get("cell_type") == "markdown":
                first = "".join(cell.get("source", "")).strip().splitlines()
                if first and first[0].startswith("#"):
                    info["title"] = first[0].lstrip("#").strip().replace("`", "")
                    break
    headline = out / "data" / f"{prefix}_headline.csv"
    info["headline"] = pd.read_csv(headline) if headline.exists() else pd.DataFrame()
    meta = out / "data" / f"{prefix}_meta.json"
    info["meta"] = json.loads(meta.read_text()) if meta.exists() else {}
    info["failed"] = (out / f"{nb}.failed.ipynb").exists()
    return info


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _headline_table(rows: pd.DataFrame, with_source: bool = True) -> str:
    head = "<tr><th>metric: what it means</th><th>value</th><th>spread (IQR)</th><th>conditions</th>"
    head += "<th>from</th></tr>" if with_source else "</tr>"
    body = []
    for _, r in rows.iterrows():
        spread = ""
        if not (pd.isna(r["q25"]) or pd.isna(r["q75"])):
            spread = f"{_fmt(r['q25'])}–{_fmt(r['q75'])} (n={int(r['n'])})"
        source = f'<td><a href="{html.escape(reading_page(r["notebook"]))}">{html.escape(r["notebook"])}</a></td>'
        meaning = MEANINGS.get(str(r["metric"]), "")
        body.append(
            f"<tr><td class=metric><b>{html.escape(str(r['label']))}</b>"
            + (f"<br><span class=meaning>{html.escape(meaning)}</span>" if meaning else "")
            + f"</td><td class=num>{_fmt(r['value'])} {html.escape(str(r['unit']))}"
            f"</td><td class=num>{spread}</td><td>{html.escape(str(r['note']) if pd.notna(r['note']) else '')}</td>"
            f"{source if with_source else ''}</tr>"
        )
    return f"<table class=headline>{head}{''.join(body)}</table>"


def _random_weights(infos: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(the notebooks whose runs used random weights, what their loaders said, each reason once)."""
    names, reasons = [], []
    for info in infos:
        used = info["meta"].get("weights", [])
        used = [used] if isinstance(used, str) else used
        if "random" in used:
            names.append(info["name"])
            why = info["meta"].get("weights_warning") or info["meta"].get("weights_source") or ""
            if why and why not in reasons:
                reasons.append(why)
    return names, reasons


def _provenance(infos: list[dict[str, Any]], profile: str) -> str:
    rows = [("profile", profile), ("index built", datetime.now(UTC).isoformat(timespec="seconds"))]
    prov = next((i["meta"].get("provenance") for i in infos if i["meta"].get("provenance")), None) or {}
    rows += [(k, v) for k, v in prov.items() if k != "timestamp"]
    table = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    per_nb = []
    for info in infos:
        params = ", ".join(f"{k}={v!r}" for k, v in info["parameters"].items() if k != "out_dir")
        when = info["meta"].get("provenance", {}).get("timestamp", "")
        per_nb.append(
            f"<tr><td>{html.escape(info['name'])}</td><td class=num>{_fmt(info['duration_s'])} s</td>"
            f"<td>{html.escape(when)}</td><td><code>{html.escape(params)}</code></td></tr>"
        )
    return (
        f"<table>{table}</table><table><tr><th>notebook</th><th>ran for</th><th>finished</th>"
        f"<th>parameters</th></tr>{''.join(per_nb)}</table>"
    )


def _findings_html(out: Path, notebooks: Sequence[str]) -> str:
    """The findings (kvlib.report.findings), each with a link to the reading view of the notebook that shows it."""
    found = findings(out, list(notebooks))
    if not found:
        return "<h2>Findings</h2><p>No finding yet: the data of this report cannot carry one (see the notebooks).</p>"
    items = []
    for f in found:
        number = f.notebook.split("_", 1)[0]
        items.append(
            f"<li{' class=contradicts' if f.contradicts else ''}>{f.html} "
            f"<a href='{html.escape(reading_page(f.notebook))}'>notebook {html.escape(number)}</a></li>"
        )
    return (
        "<h2>Findings</h2><ul class=findings>" + "".join(items) + "</ul><p class=muted>Each sentence is computed "
        "from the CSVs in data/ when the index is built. Two measurements are called different only when each rests "
        f"on at least {MIN_REPEATS} repeats and their intervals of measured values do not overlap, two counts only "
        "when their 95% Wilson intervals do not overlap; a comparison the data cannot carry, or a lossy layout that "
        "lost no token in its run, is left out rather than overstated. ⚠ marks a result that contradicts the "
        "textbook.</p>"
    )


def _models_line(infos: list[dict[str, Any]]) -> str:
    """The models this report measured, exactly (weights' provenance and dtype), one clause each."""
    seen: dict[tuple[str, str, str], list[str]] = {}
    for info in infos:
        meta = info["meta"]
        if "model" in meta:
            key = (str(meta["model"]), str(meta.get("weights_source", "")), str(meta.get("dtype", "")))
            seen.setdefault(key, []).append(info["name"].split("_", 1)[0])
    if not seen:
        return ""
    items = [
        f"<b>{html.escape(m)}</b> ({html.escape(src)}; {html.escape(dt)}; notebooks {', '.join(nbs)})"
        for (m, src, dt), nbs in seen.items()
    ]
    return "<p>Models: " + "; ".join(items) + ".</p>"


def build_index(out: str | Path, profile: str, notebooks: Sequence[str]) -> Path:
    """Write out/index.html from what the notebooks left in out/; returns its path."""
    out = Path(out)
    infos = [_notebook_info(out, nb) for nb in notebooks]
    parts = [
        f"<h1>KV caching, measured — profile <code>{html.escape(profile)}</code></h1>",
        "<p>What a KV cache buys and what it costs, measured on this machine by the study's notebooks. Every number "
        "below was computed from the CSVs in <a href='data/'>data/</a>; each notebook's page shows how.</p>",
        _models_line(infos),
        _findings_html(out, notebooks),
        decision_html(out),
        machine_section(out),
        timing_floor_html(out),
    ]
    random_nbs, reasons = _random_weights(infos)
    if random_nbs:
        every = len(random_nbs) == len([i for i in infos if i["ran"]])
        which = "every notebook" if every else "notebooks " + ", ".join(random_nbs)
        parts.append(
            f"<div class=banner><strong>⚠ RANDOM WEIGHTS</strong> in {html.escape(which)}. Pretrained weights were "
            "not available, so these runs used the real architecture with seeded random weights. Times and memory "
            "are those of the real model; generated tokens are meaningless."
            + (f" <span class=muted>({html.escape(' '.join(reasons))})</span>" if reasons else "")
            + "</div>"
        )
    missing = [i["name"] for i in infos if not i["ran"]]
    failed = [i["name"] for i in infos if i["failed"]]
    if missing or failed:
        parts.append(
            "<div class=banner>Incomplete: "
            + html.escape(", ".join([f"{m} not run" for m in missing] + [f"{f} failed" for f in failed]))
            + "</div>"
        )

    frames = [i["headline"] for i in infos if not i["headline"].empty]
    allrows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    parts.append("<h2>Headline numbers</h2>")
    if not allrows.empty and allrows["headline"].map(_is_true).any():
        parts.append(_headline_table(allrows[allrows["headline"].map(_is_true)]))
    else:
        parts.append("<p>No headline numbers yet.</p>")

    parts.append("<h2>Key figures</h2>")
    for info in infos:
        for f in info["meta"].get("figures", []):
            path = out / "figures" / f["file"]
            if f.get("key") and path.exists():
                parts.append(
                    f"<figure>{_img(path)}<figcaption><b>{html.escape(f.get('title', ''))}</b> — "
                    f"{html.escape(f.get('caption', ''))} (<a href='{html.escape(reading_page(info['name']))}'>"
                    f"{html.escape(info['name'])}</a>)</figcaption></figure>"
                )

    parts.append(
        "<h2>Notebooks</h2><p class=muted>Each title opens the notebook's reading view (prose, tables and figures, "
        "code hidden); beside it, the full executed notebook with its code.</p><ol>"
    )
    for info in infos:
        status = "" if info["ran"] else " <span class=muted>(not run)</span>"
        name = html.escape(info["name"])
        page = f"<a href='{html.escape(reading_page(info['name']))}'>{html.escape(info['title'])}</a>"
        parts.append(
            f"<li>{page if info['ran'] else html.escape(info['title'])}{status} <span class=muted>({name}"
            + (
                f": <a href='{name}.html'>full notebook with code</a>, <a href='{name}.ipynb'>executed .ipynb</a>"
                if info["ran"]
                else ""
            )
            + ")</span>"
        )
        if not info["headline"].empty:
            parts.append(_headline_table(info["headline"], with_source=False))
        parts.append("</li>")
    parts.append("</ol>")

    parts.append("<h2>Data</h2><ul>")
    for csv in sorted((out / "data").glob("*.csv")) if (out / "data").is_dir() else []:
        parts.append(f"<li><a href='data/{html.escape(csv.name)}'>data/{html.escape(csv.name)}</a></li>")
    parts.append("</ul><h2>Provenance</h2>")
    parts.append(_provenance(infos, profile))

    page = (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>KV caching, measured ({html.escape(profile)})</title><style>{CSS}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>\n"
    )
    target = out / "index.html"
    write_whole(target, lambda tmp: tmp.write_text(page, encoding="utf-8"))  # two builds at once: the last wins
    return target
