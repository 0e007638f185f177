"""The timing noise floor of a report: the same decode configuration measured by several notebooks, each in a
process of its own, and how far their medians lie apart.

Every notebook of a report runs in its own process (papermill starts a kernel per notebook), and several of them time
the same configuration (the same model, dtype, device, engine, cache, batch size, prompt length and new tokens: the
timing harness's NN_runs.csv rows). Within one process a page reports the spread of its repeats; between processes
the machine itself moves (frequency, memory placement, other work, a VM's neighbours), and that spread is the floor
under any comparison of timings across pages: a difference between two pages smaller than it is not a result.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

KEY = ["model", "dtype", "device", "engine", "cache", "batch_size", "prompt_len", "max_new_tokens"]


def per_process(out: str | Path) -> pd.DataFrame:
    """One row per (configuration, notebook) measured with the cache: the notebook's median TPOT (ms) over its
    repeats, and how many; only configurations that at least two notebooks measured."""
    frames = []
    for path in sorted((Path(out) / "data").glob("*_runs.csv")):
        runs = pd.read_csv(path)
        if not set(KEY) | {"tpot_p50_s"} <= set(runs.columns):
            continue
        if "use_cache" in runs:
            runs = runs[runs["use_cache"].astype(str).str.lower() == "true"]
        frames.append(runs.assign(notebook=path.name.split("_", 1)[0]))
    if not frames:
        return pd.DataFrame(columns=[*KEY, "notebook", "tpot_ms", "repeats"])
    runs = pd.concat(frames, ignore_index=True)
    g = (
        runs.groupby([*KEY, "notebook"], dropna=False)
        .agg(tpot_ms=("tpot_p50_s", "median"), repeats=("tpot_p50_s", "size"))
        .reset_index()
    )
    g["tpot_ms"] *= 1e3
    shared = g.groupby(KEY, dropna=False)["notebook"].transform("nunique") >= 2
    return g[shared].reset_index(drop=True)


def spread(out: str | Path) -> pd.DataFrame:
    """Per configuration that several notebooks timed: notebooks, lowest and highest median TPOT (ms) and the
    spread highest / lowest - 1 (%), widest first."""
    p = per_process(out)
    if p.empty:
        return pd.DataFrame(columns=[*KEY, "notebooks", "tpot_ms_low", "tpot_ms_high", "spread_pct"])
    s = (
        p.groupby(KEY, dropna=False)
        .agg(notebooks=("notebook", lambda n: ", ".join(sorted(n))), tpot_ms_low=("tpot_ms", "min"),
             tpot_ms_high=("tpot_ms", "max"))
        .reset_index()
    )  # fmt: skip
    s["spread_pct"] = 100 * (s["tpot_ms_high"] / s["tpot_ms_low"] - 1)
    return s.sort_values("spread_pct", ascending=False).reset_index(drop=True)


def timing_floor_html(out: str | Path) -> str:
    """The index's section: the widest spread between processes, and every configuration behind it."""
    s = spread(out)
    head = "<h2>Timing noise floor</h2>"
    if s.empty:
        return f"{head}<p>No configuration was timed by two notebooks in this report: no floor between processes.</p>"
    w = s.iloc[0]
    rows = "".join(
        f"<tr><td>{html.escape(str(r.engine))} {html.escape(str(r.cache))}, batch {r.batch_size}, prompt "
        f"{r.prompt_len}, {r.max_new_tokens} new</td><td>{html.escape(r.notebooks)}</td>"
        f"<td class=num>{r.tpot_ms_low:.2f}–{r.tpot_ms_high:.2f} ms</td><td class=num>{r.spread_pct:.0f}%</td></tr>"
        for r in s.itertuples()
    )
    return (
        f"{head}<p>The same decode step timed by several notebooks, each in a process of its own: medians "
        f"<b>{w.tpot_ms_low:.2f}–{w.tpot_ms_high:.2f} ms</b> per token ({html.escape(str(w.model))}, "
        f"{html.escape(str(w.dtype))}), <b>{w.spread_pct:.0f}%</b> apart. Timings compared across pages within this "
        "spread are indistinguishable; each page's own comparisons are paired and interleaved within one process, "
        "and judged by their own repeats.</p><table><tr><th>configuration</th><th>notebooks</th>"
        f"<th>median TPOT, lowest–highest</th><th>spread</th></tr>{rows}</table>"
    )
