"""The findings that open the report: a few plain sentences, each computed from the notebooks' CSVs, with its number
and the notebook that shows it.

Every finding first checks that its data can carry it, by the study's one rule for "different" (kvlib.core.stats): a
comparison that rests on fewer than three repeats a side is left out (n too small); one whose intervals of measured
values overlap is reported as no measurable difference; counts are compared by their 95% Wilson intervals; a lossy
layout that quantized or evicted nothing is left out. When the data contradict the textbook, the sentence says so.
A finding whose input is missing (a notebook not run, a profile without naive runs, a headline row the run did not
write) is left out, never guessed; any other error in a finding fails the index build with one line naming it, so
a bug never passes for a missing sentence. Findings read typed fields of the headline rows (layout, condition,
baseline), never parse a display label.

Notebooks the module does not know (a new 09_...) contribute their headline rows (headline=True) as findings; so
does a known one none of whose data files is there.

One concept in one file (over 400 lines): the report's findings, one function per sentence.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from kvlib.caches.base import REFERENCE, evicts
from kvlib.core.errors import KvlibError
from kvlib.measure.divergence import within_floor
from kvlib.measure.passkey import NO_SETTING, SETTINGS
from kvlib.study import Spread, fmt, published, snapkv_check
from kvlib.study.agreement import floor_bound, primary
from kvlib.study.passkey import SETTING_WORDS, leader_text, metric_suffix, quality_verdict, selection_text
from kvlib.study.quality import SINK_EFFECT


@dataclass(frozen=True)
class Finding:
    html: str  # one sentence; numbers in <b>; no link (the index adds it)
    notebook: str  # "02_naive_vs_cached": the page that shows it
    contradicts: bool = False  # the data disagree with the textbook


class MissingInput(Exception):
    """An input a finding needs was not produced by this run: a data file, or a headline row."""


def _read(out: Path, name: str, **kwargs: object) -> pd.DataFrame:
    """A CSV of the report's data folder; MissingInput when the run did not write it."""
    path = out / "data" / name
    if not path.exists():
        raise MissingInput(name)
    return pd.read_csv(path, **kwargs)


def _headline(out: Path, prefix: str) -> pd.DataFrame:
    return _read(out, f"{prefix}_headline.csv", keep_default_na=False, na_values=[""]).set_index("metric")


def _metric(h: pd.DataFrame, metric: str) -> pd.Series:
    """One headline row; MissingInput when the run wrote none of this name."""
    if metric not in h.index:
        raise MissingInput(metric)
    return h.loc[metric]


def _spread(row: pd.Series) -> Spread:
    n = int(row["n"]) if not pd.isna(row["n"]) else 1
    q25 = float(row["q25"]) if not pd.isna(row["q25"]) else math.nan
    q75 = float(row["q75"]) if not pd.isna(row["q75"]) else math.nan
    return Spread(float(row["value"]), q25, q75, n)


def _x(v: float) -> str:
    return f"{v:.2f}x" if v < 10 else f"{v:.0f}x"


def _iqr(s: Spread, what: str = "paired repeats") -> str:
    return f"IQR {_x(s.q25)}–{_x(s.q75)} over {s.n} {what}"


def speedup(out: Path) -> Finding | None:
    """02: cached vs naive total time, paired by repeat."""
    row = _metric(_headline(out, "02"), "speedup")
    s = _spread(row)
    beyond = s.excludes(1)
    if beyond is None:
        return None  # n too small (fewer than 3 paired repeats) to tell the difference from noise
    cache, cond = row["layout"], row["condition"]
    if beyond and s.median > 1:
        return Finding(
            f"Decoding with the {cache} cache was <b>{_x(s.median)} faster</b> than naive decoding, which recomputes "
            f"every earlier token at each step (naive / cached total time, {_iqr(s)}; {cond}).",
            "02_naive_vs_cached",
        )
    if not beyond:  # not apart: no claim either way, and no ⚠ (kvlib.core.stats)
        return Finding(
            f"These runs could not tell decoding with the {cache} cache from naive decoding: naive / cached total "
            f"time {_x(s.median)}, and its interval ({_iqr(s)}) holds 1; {cond}.",
            "02_naive_vs_cached",
        )
    return Finding(
        f"<b>Contrary to the textbook</b>, decoding with the {cache} cache was <b>{_x(1 / s.median)} slower</b> "
        f"than naive decoding (naive / cached total time {_x(s.median)}, {_iqr(s)}; {cond}).",
        "02_naive_vs_cached",
        True,
    )


def hf_speedup(out: Path) -> Finding | None:
    """03: Hugging Face generate with its dynamic cache vs use_cache=False."""
    h = _headline(out, "03")
    if "hf_speedup_dynamic" not in h.index:
        return None
    s = _spread(h.loc["hf_speedup_dynamic"])
    beyond = s.excludes(1)
    if beyond is None:
        return None
    if beyond and s.median > 1:
        return Finding(
            f"Inside Hugging Face's <code>generate</code>, its dynamic cache made a generation <b>{_x(s.median)}</b> "
            f"as fast as <code>use_cache=False</code> ({_iqr(s)}).",
            "03_huggingface",
        )
    if not beyond:  # not apart: no claim either way, and no ⚠ (kvlib.core.stats)
        return Finding(
            f"These runs could not tell Hugging Face's dynamic cache from <code>use_cache=False</code> inside "
            f"<code>generate</code>: ratio {_x(s.median)}, and its interval ({_iqr(s)}) holds 1.",
            "03_huggingface",
        )
    return Finding(
        f"<b>Contrary to the textbook</b>, Hugging Face's dynamic cache made a generation <b>{_x(1 / s.median)} "
        f"slower</b> than <code>use_cache=False</code> (ratio {_x(s.median)}, {_iqr(s)}): at these sizes "
        "<code>generate</code>'s fixed cost per step likely outweighs the recomputation the cache saves.",
        "03_huggingface",
        True,
    )


def kv_per_token(out: Path) -> Finding | None:
    """04: bytes of cache per token, measured, against the formula."""
    h = _headline(out, "04")
    row = _metric(h, "kv_mib_per_token")
    kib = float(row["value"]) * 1024
    measured = _read(out, "04_cache_bytes.csv")
    exact = int((measured["held_bytes"] == measured["formula_bytes"]).sum())
    what = row["condition"]
    agree = (
        f"exactly the formula 2 × layers × key/value heads × head size × bytes in all {len(measured)} configurations"
        if exact == len(measured)
        else f"<b>not the formula</b> in {len(measured) - exact} of {len(measured)} configurations"
    )
    text = f"The cache costs <b>{fmt(kib)} KiB per token</b> of every sequence{f' ({what})' if what else ''}: {agree}"
    if "cache_equals_weights_tokens" in h.index:
        tokens = float(h.loc["cache_equals_weights_tokens", "value"])
        weights = float(h.loc["weights_mib", "value"]) if "weights_mib" in h.index else math.nan
        text += (
            f"; it outweighs the {fmt(weights)} MiB of weights once batch × length passes <b>{tokens:,.0f} tokens</b>"
        )
    return Finding(text + ".", "04_memory", exact != len(measured))


def hybrid_saving(out: Path) -> Finding | None:
    """04: what a model trained with sliding windows saves with the hybrid cache: measured bytes against the
    per-layer formula, and the computed share of a full cache at the longest length."""
    measured = _read(out, "04_hybrid_measured.csv")
    computed = _read(out, "04_hybrid_computed.csv")
    hyb = computed[computed["layout"] != REFERENCE].sort_values("tokens")  # the layout set against the full cache
    if hyb.empty:
        return None
    last = hyb.iloc[-1]
    exact = int((measured["held_bytes"] == measured["formula_bytes"]).sum())
    agree = (
        f"its measured bytes equalled the per-layer formula in all {len(measured)} caches measured"
        if exact == len(measured)
        else f"its measured bytes <b>differed from the formula</b> in {len(measured) - exact} of {len(measured)}"
    )
    return Finding(
        f"{last['model']} attends over a sliding window of {int(last['sliding_window'])} tokens on "
        f"{int(last['n_sliding_layers'])} of its layers, so a cache that keeps only the window there is exact: at "
        f"{int(last['tokens']):,} tokens it holds <b>{100 * float(last['ratio_to_full']):.0f}%</b> of a full cache "
        f"of the same shape ({fmt(float(last['kv_mib']))} MiB per sequence); {agree}.",
        "04_memory",
        exact != len(measured),
    )


def batching(out: Path) -> Finding | None:
    """05: decode throughput from the smallest to the largest batch, cached path."""
    runs = _read(out, "05_runs.csv")
    cached = runs[runs["cache"] != "none"]
    if cached.empty or cached["batch_size"].nunique() < 2:
        return None
    b0, b1 = int(cached["batch_size"].min()), int(cached["batch_size"].max())
    s0 = Spread.of(cached.loc[cached["batch_size"] == b0, "decode_tokens_per_s"])
    s1 = Spread.of(cached.loc[cached["batch_size"] == b1, "decode_tokens_per_s"])
    apart = s0.separated(s1)
    if apart is None:
        return None
    gain, ideal = s1.median / s0.median, b1 / b0
    numbers = f"{s0.median:,.0f} → {s1.median:,.0f} tokens/s, medians; perfect scaling: {_x(ideal)}"
    beyond_ideal = s0.scaled(ideal).separated(s1) and gain > ideal  # above perfect scaling, by the same rule
    if apart and beyond_ideal:
        return Finding(
            f"Batching {b1} sequences instead of {b0} raised throughput <b>{_x(gain)}</b> ({numbers}): <b>more than "
            "perfect scaling</b>, which the computation cannot do; the smaller batch was most likely slowed by other "
            "work on the machine, so take this gain as an upper bound.",
            "05_batch_sweep",
            True,
        )
    if apart and gain >= 1.2:
        return Finding(
            f"Decoding a batch of {b1} sequences instead of {b0} raised throughput <b>{_x(gain)}</b> ({numbers}): "
            "a decode step reads the weights once for the whole batch.",
            "05_batch_sweep",
        )
    if not apart:  # not apart: no claim either way, and no ⚠ (kvlib.core.stats)
        return Finding(
            f"These runs could not tell the decode throughput of a batch of {b1} from a batch of {b0} ({numbers}; "
            "the intervals of their repeats overlap).",
            "05_batch_sweep",
        )
    return Finding(
        f"<b>Contrary to the textbook</b>, batching {b1} sequences instead of {b0} changed throughput only "
        f"<b>{_x(gain)}</b> ({numbers}): a decode step here is likely limited by arithmetic or by threads competing "
        "for the cores, not by reading the weights.",
        "05_batch_sweep",
        True,
    )


def prompt_advantage(out: Path) -> Finding | None:
    """06: naive / cached per-token latency at the shortest and the longest prompt, paired by repeat."""
    adv = _read(out, "06_advantage.csv")  # missing: no naive runs in this profile
    p0, p1 = int(adv["prompt_len"].min()), int(adv["prompt_len"].max())
    if p0 == p1:
        return None
    a0, a1 = (Spread.of(adv.loc[adv["prompt_len"] == p, "advantage"]) for p in (p0, p1))
    grew = a0.separated(a1)
    if grew is None:
        return None
    numbers = f"<b>{_x(a0.median)}</b> a cached step at a {p0}-token prompt and <b>{_x(a1.median)}</b> at {p1} tokens"
    if grew and a1.median > a0.median:
        return Finding(
            f"The cache's advantage per token grows with the prompt: a naive step cost {numbers} (medians of "
            f"paired repeats), because it recomputes the whole sequence.",
            "06_prompt_sweep",
        )
    if not grew:  # not apart: no claim either way, and no ⚠ (kvlib.core.stats)
        return Finding(
            f"These runs could not tell whether the cache's advantage per token changes with the prompt: a naive "
            f"step cost {numbers} (medians of paired repeats, whose intervals overlap).",
            "06_prompt_sweep",
        )
    return Finding(
        f"<b>Contrary to the textbook</b>, the cache's advantage per token shrank with the prompt: a naive step "
        f"cost {numbers} (medians of paired repeats; the textbook expects it to grow with the length).",
        "06_prompt_sweep",
        True,
    )


def paged_waste(out: Path) -> Finding | None:
    """07: reserved but unused memory on the most mixed batch, contiguous vs paged (byte counts: deterministic)."""
    waste = _read(out, "07_paged_waste.csv")
    top = float(waste["spread"].max())
    if top <= 0:
        return None  # no mix of lengths: nothing to waste memory on
    w = waste[waste["spread"] == top].groupby("layout")["waste_pct"].median()
    static, paged = float(w["static"]), float(w["paged"])
    theirs = published.paged_waste()
    lo, hi, below = theirs["contiguous_low_pct"], theirs["contiguous_high_pct"], theirs["paged_below_pct"]
    vllm = static >= lo and paged < below
    reported = f"vLLM's reported {lo}–{hi}% and under {below}%"
    return Finding(
        f"On a batch of mixed lengths, a contiguous cache left <b>{static:.0f}%</b> of its memory holding no token, "
        f"the paged cache <b>{paged:.1f}%</b> "
        + (f"(in line with {reported})." if vllm else f"(<b>unlike</b> {reported})."),
        "07_cache_strategies",
        not vllm,
    )


def lossy_quality(out: Path) -> Finding | None:
    """08: every lossy layout against the exact cache (kvlib.study.agreement): the floor, then the layouts within it
    and the best and worst by mean KL divergence, with top-1 agreement and bytes against a 16-bit cache."""
    meta = _quality_meta(out)
    if meta is None:
        return None
    a = primary(_read(out, "08_agreement.csv"))  # the page's model (further models: on the page)
    lossy = a[a["kind"] == "lossy"].sort_values("kld_mean")
    hi = floor_bound(a)
    if math.isnan(hi) or lossy.empty:
        return None  # nothing lossy (or no floor) measured in this run

    def one(r: pd.Series) -> str:
        return (f"{r['variant']} <b>{r['kld_mean']:.2g}</b> nats (95% CI {r['kld_lo']:.2g}–{r['kld_hi']:.2g}), top-1 "
                f"<b>{r['top1_pct']:.1f}%</b>, {r['vs_16bit_pct']:.0f}% of a 16-bit cache")  # fmt: skip

    within = lossy[[within_floor(m, hi) for m in lossy["kld_mean"]]]
    head = (f"Against the exact cache ({meta.get('span', 'the text')}; noise floor: KLD ≤ {hi:.2g} nats between two "
            "exact paths): ")  # fmt: skip
    body = (f"within the floor: {', '.join(within['variant'])}; " if len(within) else "no lossy layout is within "
            "the floor; ") + f"lowest KLD: {one(lossy.iloc[0])}; highest: {one(lossy.iloc[-1])}."  # fmt: skip
    return Finding(head + body, "08_quality")


def window(out: Path) -> Finding | None:
    """07: the sliding window once it evicted tokens."""
    win = _read(out, "07_window.csv")
    w = win[win["cache"].map(evicts) & ~win["fits"].astype(bool)]
    if w.empty:
        return None  # nothing evicted: the window was exact
    r = w.sort_values("total_tokens").iloc[-1]
    st = win[(win["cache"] == REFERENCE) & (win["total_tokens"] == r["total_tokens"])]
    if st.empty:
        return None
    less = float(st["held_bytes"].iloc[0]) / float(r["held_bytes"])
    return Finding(
        f"Once it evicted tokens, the sliding-window cache held <b>{less:.1f}x</b> less memory than the full cache at "
        f"{int(r['total_tokens'])} tokens; what that costs in quality is measured over whole passages against the "
        "exact cache in notebook 08 (KL divergence, top-1 agreement) and in the table below.",
        "07_cache_strategies",
    )


def passkey_retrieval(out: Path) -> Finding | None:
    """09: for each model on the page, pass-key retrieval under eviction at the smallest budget, both question
    settings, against the full cache; how many of the successes over every budget were the policy's selection (the
    key sentence outside the positions it keeps whatever it scores) rather than recency; and, where the page set
    notebook 08's agreement beside it (09_quality.csv), whether 08's KLD ranked the policies as retrieval did at the
    same cache budget in tokens, in both settings. Left out for random weights (not a headline)."""
    h = _headline(out, "09")
    acc_all = _read(out, "09_accuracy.csv", keep_default_na=False)
    quality_path = out / "data" / "09_quality.csv"
    quality_all = pd.read_csv(quality_path) if quality_path.exists() else None  # only when 08 ran first
    sentences = []
    for i, (model, acc) in enumerate(acc_all.groupby("model", sort=False)):
        metric = f"full_cache_retrieval{metric_suffix(i, model)}"
        if metric not in h.index or str(h.loc[metric, "headline"]).lower() not in ("true", "1"):
            continue  # random weights (or no tokenizer): this model's numbers are meaningless, no finding
        tokens = int(acc["tokens"].iloc[0])
        if not (acc["setting"] == NO_SETTING).any():
            continue  # no full-cache run of this model: nothing to compare with
        full = acc[acc["setting"] == NO_SETTING].iloc[0]
        ev = acc[acc["setting"] != NO_SETTING]
        b = ev["budget_fraction"].min()
        parts = [
            f"<b>{leader_text(s)}</b> {SETTING_WORDS[setting]}"
            for setting in SETTINGS
            if len(s := ev[(ev["setting"] == setting) & (ev["budget_fraction"] == b)])
        ]
        if not parts:
            continue
        selection = "; ".join(t for setting in SETTINGS if (t := selection_text(ev, setting)))
        quality = ""
        both = None if quality_all is None else quality_all[quality_all["model"] == model]
        if both is not None and len(both):
            clauses = [quality_verdict(both, s)[0] for s in SETTINGS if (both["setting"] == s).any()]
            quality = f" Against notebook 08 at the same cache budget in tokens: {'; '.join(clauses)}."
        sentences.append(
            f"{model}: evicting down to {100 * b:g}% of a {tokens}-token prompt, the most pass keys retrieved were "
            f"{' and '.join(parts)}, against <b>{int(full['retrieved'])}/{int(full['n'])}</b> for the full cache. "
            f"Over every budget, {selection}.{quality}"
        )
    if not sentences:
        return None
    return Finding(" ".join(sentences), "09_what_a_cache_forgets")


def snapkv_examined(out: Path) -> Finding | None:
    """09: SnapKV's ablation (kvlib.study.snapkv_check), its sentence computed from 09_snapkv_ablation.csv; ⚠ when
    SnapKV retrieved fewer keys than the full cache in the paper's own setting. Left out for random weights."""
    df = _read(out, "09_snapkv_ablation.csv")
    if (df["weights"] != "pretrained").any():
        return None
    sentence = html.escape(snapkv_check.ablation_sentence(df))
    return Finding("SnapKV and H2O examined: " + sentence, "09_what_a_cache_forgets", "⚠" in sentence)


def _quality_meta(out: Path) -> dict | None:
    """08's facts about its run; None when its weights were random (every perplexity meaningless: no finding)."""
    path = out / "data" / "08_meta.json"
    if not path.exists():
        raise MissingInput(path.name)
    meta = json.loads(path.read_text())
    return None if "random" in meta.get("weights", ["random"]) else meta


def sinks(out: Path) -> Finding | None:
    """08: perplexity at the largest cache budget, window only against the best sink count (StreamingLLM)."""
    meta = _quality_meta(out)
    if meta is None:
        return None
    s = _read(out, "08_streaming.csv")
    full = float(s.loc[s["cache"] == REFERENCE, "perplexity"].iloc[0])
    win = s[s["cache"].map(evicts) & (s["positions"] != "cache")]
    if win.empty:
        return None  # no window in this run
    W = int(win["budget"].max())
    at = win[win["budget"] == W].set_index("sink")["perplexity"]
    if 0 not in at.index or len(at) < 2:
        return None
    only, best_sink = float(at[0]), int(at.drop(index=0).idxmin())
    best = float(at[best_sink])
    where = f"{meta.get('text', 'the text')}, {meta.get('tokens', '?')} tokens"
    numbers = (
        f"window only <b>{only:.2f}</b>, {best_sink} sink{'s' if best_sink > 1 else ''} + {W - best_sink} recent "
        f"<b>{best:.2f}</b>, full cache {full:.2f} ({where})"
    )

    if only >= SINK_EFFECT * best:
        return Finding(
            f"With a cache budget of {W} tokens, evicting the first tokens cost perplexity and keeping a few "
            f"attention sinks won it back: {numbers}; <b>{only / best:.2f}x</b>, the direction of StreamingLLM's "
            "result at a far smaller size (its 5158 against 5.40 came from 65K tokens on Llama-2-13B).",
            "08_quality",
        )
    return Finding(
        f"<b>Contrary to StreamingLLM</b>, attention sinks did not help at a cache budget of {W} tokens: {numbers}.",
        "08_quality",
        True,
    )


def quality_saving(out: Path) -> Finding | None:
    """08: the largest memory saving of a quantized cache whose perplexity rose by at most 1%, on real text."""
    meta = _quality_meta(out)
    if meta is None:
        return None
    q = _read(out, "08_quantized.csv")
    lossy = q.iloc[1:]
    if lossy.empty:
        return None  # only the full-precision cache in this run
    ok = lossy[(lossy["ppl_change_pct"] <= 1.0) & (lossy["saving_pct"] > 0)]
    worst = lossy.sort_values("ppl_change_pct").iloc[-1]
    where = meta.get("span", f"{meta.get('text', 'the text')}, {meta.get('tokens', '?')} tokens")
    tail = f"; the largest loss: {worst['variant']}, {worst['ppl_change_pct']:+.1f}% ({where})."
    if ok.empty:
        return Finding(
            "<b>No quantized cache stayed within +1% perplexity</b> of the full-precision cache" + tail,
            "08_quality",
            True,
        )
    best = ok.sort_values("saving_pct").iloc[-1]
    return Finding(
        f"The best KV-memory saving within +1% perplexity: <b>{100 - best['vs_16bit_pct']:.0f}%</b> against a "
        f"16-bit cache ({best['saving_pct']:.0f}% against this run's {meta.get('dtype', 'full-precision')} cache; "
        f"{best['variant']}, {best['bits_per_element']:.1f} bits per element, perplexity "
        f"{best['ppl_change_pct']:+.2f}%)" + tail,
        "08_quality",
    )


KNOWN: dict[str, tuple[Callable[[Path], Finding | None], ...]] = {
    "02": (speedup,),
    "03": (hf_speedup,),
    "04": (kv_per_token, hybrid_saving),
    "05": (batching,),
    "06": (prompt_advantage,),
    "07": (paged_waste, window),
    "08": (lossy_quality, quality_saving, sinks),
    "09": (passkey_retrieval, snapkv_examined),
}


def _generic(out: Path, notebook: str) -> list[Finding]:
    """A notebook the index does not know: its headline rows, as sentences."""
    try:
        rows = _headline(out, notebook.split("_", 1)[0]).reset_index()
    except MissingInput:
        return []
    rows = rows[rows["headline"].astype(str).str.lower().isin(("true", "1"))]
    found = []
    for _, r in rows.iterrows():
        note = f" ({r['note']})" if isinstance(r["note"], str) and r["note"] else ""
        found.append(Finding(f"{r['label']}: <b>{fmt(float(r['value']))} {r['unit']}</b>{note}.", notebook))
    return found


def findings(out: str | Path, notebooks: list[str]) -> list[Finding]:
    """The findings of the report in `out`, in the notebooks' order; what the run did not produce is left out.
    Raises KvlibError (one line, naming the finding) for any other error in a finding."""
    out = Path(out)
    found: list[Finding] = []
    for nb in notebooks:
        prefix = nb.split("_", 1)[0]
        if prefix not in KNOWN:
            found += _generic(out, nb)
            continue
        missing = 0
        for compute in KNOWN[prefix]:
            try:
                f = compute(out)
            except MissingInput:
                f, missing = None, missing + 1
            except Exception as e:  # a bug in a finding, or data it cannot read: never a silently missing sentence
                raise KvlibError(f"finding {compute.__name__} of {nb}: {type(e).__name__}: {e}") from e
            if f is not None:
                found.append(replace(f, notebook=nb))
        if missing == len(KNOWN[prefix]):  # none of its data files: its headline rows, as for an unknown notebook
            found += _generic(out, nb)
    return found
