""" "Which cache should I use?": one table on the index, every layout and eviction policy in one row, computed from the
notebooks' CSVs of this run.

Columns, each from the notebook that measured it (blank where the run did not measure it):
- bytes held per 1024-token passage against a 16-bit full cache (08_agreement.csv; evicting layouts at the page's
  token budget), the cache engines run, whatever this run's dtype;
- mean KL divergence from the exact cache with its 95% interval, and the noise floor (08_agreement.csv);
- top-1 agreement and the perplexity change (08_agreement.csv);
- pass-key retrieval at the budget fraction `RETRIEVAL_AT` in both question settings, with how many of the successes
  were keys the policy had to select (outside its sinks and recent window) (09_accuracy.csv);
- the decode step (TPOT) against the static cache's, measured on one short prompt (08_latency.csv).
llama.cpp's cache types follow kvlib's layouts (10_quality.csv, 10_speed.csv, notebook 10): each against llama.cpp's
own f16 cache and its own floor (f16 with flash attention off), its step against llama.cpp's f16 step at the longest
context timed.
A note per row says only what the row's numbers carry (within the floor; slower per step when the ranges are apart).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pandas as pd

from kvlib.caches.base import evicts
from kvlib.measure.divergence import within_floor
from kvlib.study.agreement import floor_bound, primary

RETRIEVAL_AT = 0.25  # the budget fraction of the retrieval columns
COLUMNS = ["layout", "bytes vs 16-bit", "KLD (nats, 95% CI)", "top-1", "perplexity", "retrieval, question after",
           "retrieval, question seen", "step vs static", "note"]  # fmt: skip


def _csv(out: Path, name: str) -> pd.DataFrame | None:
    path = out / "data" / name
    return pd.read_csv(path) if path.exists() else None


def _retrieval(acc: pd.DataFrame | None, model: str, cache: str, setting: str) -> str:
    """ "k/n (s selected)" for one policy and setting at RETRIEVAL_AT; "" when not measured."""
    if acc is None or not evicts(cache):
        return ""
    rows = acc[(acc["cache"] == cache) & (acc["setting"] == setting)]
    if "budget_fraction" in acc:
        rows = rows[(rows["budget_fraction"] - RETRIEVAL_AT).abs() < 1e-9]
    if "model" in acc:
        rows = rows[rows["model"] == model]
    if rows.empty:
        return ""
    k, n = int(rows["retrieved"].sum()), int(rows["n"].sum())
    sel = f" ({int(rows['selected'].sum())} selected)" if "selected" in rows else ""
    return f"{k}/{n}{sel}"


def _step(lat: pd.DataFrame | None, variant: str, cache: str) -> tuple[float | None, bool | None]:
    """TPOT against the static cache's (None: not measured) and whether the min–max ranges are apart (None: not
    measured or too few repeats)."""
    if lat is None:
        return None, None
    ours = lat[lat["engine"] == "kvlib"]
    if "status" in ours:
        ours = ours[ours["status"] == "ok"]
    rows = ours[ours["variant"] == variant]
    if rows.empty and "cache" in ours and evicts(cache):  # evicting layouts are timed at a budget of their own
        rows = ours[ours["cache"] == cache]
    base = ours.iloc[:1]
    if rows.empty or base.empty:
        return None, None
    r, b = rows.iloc[0], base.iloc[0]
    apart = None
    if int(r["repeats"]) >= 3:
        apart = r["tpot_ms_min"] > b["tpot_ms_max"] or r["tpot_ms_max"] < b["tpot_ms_min"]
    return float(r["tpot_vs_full"]), apart


def _kld_text(r: Any) -> str:
    """ "mean (lo–hi)", or the mean alone where too few tokens gave no interval."""
    if r.kld_lo != r.kld_lo or r.kld_hi != r.kld_hi:  # NaN: fewer than two bootstrap blocks
        return f"{r.kld_mean:.2g} (no interval)"
    return f"{r.kld_mean:.2g} ({r.kld_lo:.2g}–{r.kld_hi:.2g})"


def llamacpp_rows(out: Path, model: str) -> tuple[list[dict[str, str]], str]:
    """llama.cpp's cache types on `model` as decision-table rows (notebook 10's CSVs; none when it did not run or
    measured another model) and the sentence's addition naming their baseline and floor."""
    quality = _csv(out, "10_quality.csv")
    if quality is None:
        return [], ""
    q = quality[(quality["model"] == model) & (quality["engine"] == "llama.cpp")]
    if q.empty:
        return [], ""
    floor = q[q["kind"] == "floor"]
    hi = float(floor["kld_hi"].iloc[0]) if len(floor) else float("nan")
    speed = _csv(out, "10_speed.csv")
    steps: dict[str, float] = {}
    if speed is not None and len(speed):
        s = speed[(speed["model"] == model) & (speed["engine"] == "llama.cpp")]
        s = s[s["context"] == s["context"].max()]
        steps = s.groupby("variant")["step_ms"].median().to_dict()
    base_step = steps.get("llama.cpp f16")
    rows = []
    for r in q[q["kind"].isin(["baseline", "lossy"])].itertuples():
        notes = ["llama.cpp's f16 cache, the reference of its rows" if r.kind == "baseline" else ""]
        if r.kind == "lossy" and within_floor(r.kld_mean, hi):
            notes.append("indistinguishable from llama.cpp's f16 cache on this text (KLD within its floor)")
        if r.variant.endswith("norot"):
            notes.append("llama.cpp's Hadamard rotation turned off")
        step = steps.get(f"llama.cpp {r.variant}")
        rows.append({
            "layout": f"llama.cpp {r.variant}",
            "bytes vs 16-bit": f"{r.vs_16bit_pct:.0f}%",
            "KLD (nats, 95% CI)": "0 (reference)" if r.kind == "baseline" else _kld_text(r),
            "top-1": f"{r.top1_pct:.1f}%",
            "perplexity": f"{r.ppl_change_pct:+.2f}%",
            "retrieval, question after": "",
            "retrieval, question seen": "",
            "step vs static": "" if step is None or base_step is None else f"{step / base_step:.2f}x (vs f16)",
            "note": "; ".join(n for n in notes if n),
        })  # fmt: skip
    context = f" at {int(speed['context'].max())} tokens" if speed is not None and len(speed) else ""
    floor_text = f"KLD ≤ {hi:.2g} nats" if hi == hi else "no interval (too few tokens for two blocks)"
    note = (
        f" llama.cpp rows (notebook 10): the GGUF as stored, against llama.cpp's own f16 cache; its floor (f16 with "
        f"flash attention off): {floor_text}; step against its f16 cache's{context}."
    )
    return rows, note


def decision_table(out: str | Path) -> tuple[pd.DataFrame, str] | None:
    """The table (COLUMNS, one row per layout, the exact baseline first) and the sentence under it (the floor and
    what the retrieval columns count); None when the run has no 08_agreement.csv (notebook 08 not run)."""
    out = Path(out)
    every = _csv(out, "08_agreement.csv")
    if every is None:
        return None
    agree = primary(every)  # the page's model; further models' rows are on notebook 08's page
    acc, lat = _csv(out, "09_accuracy.csv"), _csv(out, "08_latency.csv")
    floor_hi = floor_bound(agree)
    rows = []
    for r in agree[agree["kind"].isin(["baseline", "lossy"])].itertuples():
        step, apart = _step(lat, r.variant, r.cache)
        notes = []
        if r.kind == "baseline":
            notes.append("the exact cache every row is compared with")
        elif within_floor(r.kld_mean, floor_hi):
            notes.append("indistinguishable from exact on this text (KLD within the floor)")
        if apart and step is not None and step > 1:
            notes.append("slower per decode step than the static cache (ranges apart)")
        elif apart and step is not None:
            notes.append("faster per decode step than the static cache (ranges apart)")
        rows.append({
            "layout": r.variant,
            "bytes vs 16-bit": f"{r.vs_16bit_pct:.0f}%",
            "KLD (nats, 95% CI)": "0 (reference)" if r.kind == "baseline" else _kld_text(r),
            "top-1": f"{r.top1_pct:.1f}%",
            "perplexity": f"{r.ppl_change_pct:+.2f}%",
            "retrieval, question after": _retrieval(acc, r.model, r.cache, "question-after"),
            "retrieval, question seen": _retrieval(acc, r.model, r.cache, "question-aware"),
            "step vs static": "" if step is None else f"{step:.2f}x",
            "note": "; ".join(notes),
        })  # fmt: skip
    engine_rows, engine_note = llamacpp_rows(out, agree["model"].iloc[0])
    table = pd.DataFrame(rows + engine_rows, columns=COLUMNS)
    first = agree.iloc[0]
    sentence = (
        f"{first['model']}, {int(first['passages'])} passages of {int(first['passage_tokens'])} tokens; evicting "
        f"layouts keep {int(agree['budget_tokens'].dropna().max()) if agree['budget_tokens'].notna().any() else '?'} "
        f"tokens. Noise floor (two exact paths): KLD ≤ {floor_hi:.2g} nats. Retrieval at {RETRIEVAL_AT:.0%} of the "
        'pass-key prompt (the same number of tokens kept); "selected": successes on keys outside the positions the '
        "policy keeps whatever it scores (sinks, recent window). Step: decode TPOT on one short prompt, against the "
        "static cache's."
    )
    sentence += engine_note
    others = [m for m in every["model"].unique() if m != agree["model"].iloc[0]]
    if others:
        sentence += f" The same table for {', '.join(others)}: notebook 08."
    return table, sentence


def decision_html(out: str | Path) -> str:
    """The index's section: heading, table and sentence ("" when notebook 08 did not run)."""
    made = decision_table(out)
    if made is None:
        return ""
    table, sentence = made
    return (
        '<section id="decision"><h2>Which cache should I use?</h2>'
        + table.to_html(index=False, escape=True, border=0, classes="decision")
        + f"<p>{html.escape(sentence)}</p></section>"
    )
