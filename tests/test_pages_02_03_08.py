"""The pages of notebooks 02 (naive vs cached), 03 (Hugging Face) and 08 (quality): their parameter checks refuse bad
values before anything runs, and their sentences, headline rows and figures say what the data carry, on small
synthetic frames (the page functions the notebooks call, by name).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from kvlib import study
from kvlib.caches.base import REFERENCE
from kvlib.core.errors import KvlibError
from kvlib.study import huggingface, quality, quality_page
from kvlib.study import naive_vs_cached as naive_page

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parent.parent
PAGES = {"02_naive_vs_cached": naive_page, "03_huggingface": huggingface, "08_quality": quality_page}


# ---- the notebooks stay thin -------------------------------------------------------------------------------------


@pytest.mark.parametrize("notebook", sorted(PAGES))
def test_notebook_is_thin_and_checks_through_its_page(notebook):
    """At most about 100 code lines besides the parameters; the cell after them calls the page's check_parameters."""
    cells = json.loads((ROOT / "notebooks" / f"{notebook}.ipynb").read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code" and "parameters" not in c["metadata"].get("tags", [])]
    lines = [
        ln for c in code for ln in "".join(c["source"]).splitlines() if ln.strip() and not ln.strip().startswith("#")
    ]
    assert len(lines) <= 100, f"{notebook}: {len(lines)} code lines"
    assert "page.check_parameters(" in "".join(code[0]["source"])


# ---- 02: naive vs cached -----------------------------------------------------------------------------------------

NAIVE_PARAMS = dict(prompt_len=16, max_new_tokens=8, batch_size=1, caches="[none, dynamic, static]", repeats=3,
                    warmup=0, check_new_tokens=4)  # fmt: skip


def _naive_check(**overrides):
    return naive_page.check_parameters("tiny", "random", "cpu", "float32", 0, **{**NAIVE_PARAMS, **overrides})


def test_naive_parameters_are_checked_before_anything_runs():
    p = _naive_check()
    assert p.caches == ["none", "dynamic", "static"] and p.cached == ["dynamic", "static"] and p.main == REFERENCE
    assert [s.cache for s in p.specs] == p.caches
    assert _naive_check(caches=["none", "dynamic"]).main == "dynamic"  # the reference layout not measured: the first
    for bad, match in [
        (dict(caches=["dynamic", "static"]), "caches must hold 'none'"),
        (dict(caches="none"), "caches must hold 'none'"),
        (dict(max_new_tokens=1), "max_new_tokens"),
        (dict(warmup=-1), "warmup"),
        (dict(prompt_len=240, check_new_tokens=20), "prompt_len \\+ check_new_tokens"),
    ]:
        with pytest.raises(KvlibError, match=match) as e:
            _naive_check(**bad)
        assert "\n" not in str(e.value)


def _runs(total: dict[str, list[float]], mbu: float = 0.3) -> pd.DataFrame:
    rows = [
        {"engine": "kvlib", "cache": c, "repeat": r, "total_time_s": t, "ttft_ms": 5.0 + r, "tpot_p50_ms": 10 * t,
         "mbu": mbu, "decode_tokens_per_s": 1 / t}
        for c, values in total.items() for r, t in enumerate(values)
    ]  # fmt: skip
    df = pd.DataFrame(rows)
    return df.assign(path=[study.path_label(e, c) for e, c in zip(df["engine"], df["cache"], strict=True)])


def _steps(naive: list[float], cached: list[float], repeats: int = 3) -> pd.DataFrame:
    rows = [
        {"path": study.path_label("kvlib", c), "cache": c, "repeat": r, "step": i, "position": 16 + i,
         "latency_ms": v * (1 + 0.01 * r)}
        for c, values in (("none", naive), ("static", cached)) for r in range(repeats) for i, v in enumerate(values)
    ]  # fmt: skip
    return pd.DataFrame(rows)


def test_naive_step_trend_sentence():
    growing = naive_page.step_trend_text(_steps([10.0 + 2 * i for i in range(20)], [1.0] * 20), "static", 16, 21)
    assert growing.startswith("From position 16 to 35, a naive step went from **11.1 ms to 47.5 ms** (4.3x)")
    assert "Unexpected" not in growing and "cached step grew" not in growing
    flat = naive_page.step_trend_text(_steps([10.0] * 20, [1.0] * 20), "static", 16, 21)
    assert "**Unexpected:** the naive step barely grew" in flat
    cached_grew = naive_page.step_trend_text(_steps([10.0] * 20, [1.0] * 10 + [3.0] * 10), "static", 16, 21)
    assert "The cached step grew noticeably too (3.0x)" in cached_grew
    one = naive_page.step_trend_text(_steps([10.0], [2.0]), "static", 16, 2)
    assert one.startswith("Each run has a single decode step (max_new_tokens = 2), at position 16: there is no trend")


def test_naive_totals_sentence_claims_only_what_the_paired_ratio_carries():
    cached = ["dynamic", "static"]
    faster = _runs({"none": [4.0, 4.1, 4.2], "dynamic": [1.0, 1.0, 1.0], "static": [2.0, 2.0, 2.0]})
    text = naive_page.totals_text(faster, "static", naive_page.speedups(faster, cached), 8)
    assert text.startswith("Generating 8 tokens took 4.10 s naively and 2.00 s with the static cache (medians):")
    assert "- dynamic cache: **4.10x** faster than naive" in text and "- static cache: **2.05x** faster" in text
    assert "MBU" in text and "impossible" not in text
    slower = _runs({"none": [1.0, 1.0, 1.0], "static": [2.0, 2.1, 2.2]})
    text = naive_page.totals_text(slower, "static", naive_page.speedups(slower, ["static"]), 8)
    assert text.startswith("**Contrary to expectation, the static cache was slower here**")
    assert "**2.10x** slower than naive" in text
    noise = _runs({"none": [1.0, 1.0, 1.0], "static": [0.9, 1.0, 1.1]})
    text = naive_page.totals_text(noise, "static", naive_page.speedups(noise, ["static"]), 8)
    assert text.startswith("These runs could not tell the static cache from naive decoding") and "faster" not in text
    two = _runs({"none": [2.0, 2.0], "static": [1.0, 1.0]}, mbu=1.5)
    text = naive_page.totals_text(two, "static", naive_page.speedups(two, ["static"]), 8)
    assert ", n too small" in text.split("\n")[0] and "**An MBU above 100% is impossible**" in text


def test_naive_headline_rows_carry_the_typed_fields(tmp_path):
    runs = _runs({"none": [4.0, 4.1, 4.2], "static": [2.0, 2.0, 2.0]})
    ratios = naive_page.speedups(runs, ["static"])
    lm = type("LM", (), {"cfg": type("C", (), {"name": "tiny"}), "dtype_name": "float32", "device": "cpu"})
    cond = naive_page.condition(lm, 1, 16, 8)
    rows = naive_page.headline_rows(runs, "static", ratios, cond)
    assert [r["metric"] for r in rows] == ["speedup", "ttft_ms", "tpot_ms", "tpot_naive_ms", "mbu"]
    out = study.Outputs("02_naive_vs_cached", tmp_path)
    for row in rows:
        out.headline(**row)
    head = pd.read_csv(tmp_path / "data" / "02_headline.csv").set_index("metric")
    speedup = head.loc["speedup"]
    assert (speedup["layout"], speedup["baseline"]) == ("static", "none")
    assert speedup["condition"] == "tiny float32 cpu, batch 1, prompt 16, 8 new" == cond
    assert speedup["value"] == pytest.approx(2.05) and bool(speedup["headline"])
    assert head.loc["mbu", "value"] == pytest.approx(30.0)  # a percentage
    assert naive_page.tokens_headline({"dynamic": True, "static": False}, 4, 1)["value"] == 1


def test_naive_token_check_and_its_sentence(tiny):
    tokens, identical = naive_page.token_check(tiny, ["none", "dynamic", "static"], 2, 8, 4, 0)
    assert identical == {"dynamic": True, "static": True}
    assert tokens.shape == (4, 3) and tokens.index.name == "new token"
    text = naive_page.tokens_text({"dynamic": True, "static": False}, 4, 2)
    assert text == (
        "4 new tokens for each of 2 sequence(s): dynamic cache: **identical** to naive; static cache: "
        "**DIFFERENT** to naive. The first sequence:"
    )


def test_naive_figures():
    steps = _steps([10.0, 11.0, 12.0], [1.0, 1.0, 1.0])
    fig = naive_page.step_latency_figure(steps, "tiny", 1, 16)
    assert isinstance(fig, Figure) and [ax.get_title() for ax in fig.axes[:2]] == ["All paths", "Cached paths only"]
    fig = naive_page.totals_figure(_runs({"none": [2.0, 2.1], "static": [1.0, 1.1]}), "tiny", 1, 8)
    assert fig._suptitle.get_text() == "8 new tokens, tiny, batch 1"


# ---- 03: Hugging Face --------------------------------------------------------------------------------------------

HF_PARAMS = dict(prompt_len=16, max_new_tokens=8, batch_size=1, hf_caches="[none, dynamic, static]",
                 kvlib_caches="[dynamic, static]", repeats=3, warmup=0, check_new_tokens=4)  # fmt: skip


def test_hf_parameters_are_checked_before_anything_runs():
    p = huggingface.check_parameters("tiny", "random", "cpu", "float32", 0, **HF_PARAMS)
    assert [(s.engine, s.cache) for s in p.specs] == [("hf", "none"), ("hf", "dynamic"), ("hf", "static"),
                                                       ("kvlib", "dynamic"), ("kvlib", "static")]  # fmt: skip
    with pytest.raises(KvlibError, match="hf_caches") as e:
        huggingface.check_parameters("tiny", "random", "cpu", "float32", 0, **{**HF_PARAMS, "hf_caches": ["paged"]})
    assert "\n" not in str(e.value)


def _hf_runs(times: dict[tuple[str, str], list[float]]) -> pd.DataFrame:
    rows = [
        {"engine": e, "cache": c, "repeat": r, "total_time_s": t, "tpot_p50_s": t / 10, "ttft_s": t / 5,
         "tpot_p50_ms": 100 * t}
        for (e, c), values in times.items() for r, t in enumerate(values)
    ]  # fmt: skip
    df = pd.DataFrame(rows)
    return df.assign(path=[study.path_label(e, c) for e, c in zip(df["engine"], df["cache"], strict=True)])


def test_hf_sentences_and_headlines():
    runs = _hf_runs({("hf", "none"): [1.0, 1.0, 1.0], ("hf", "dynamic"): [2.0, 2.1, 2.2],
                     ("kvlib", "dynamic"): [0.5, 0.5, 0.5]})  # fmt: skip
    hf = huggingface.hf_speedups(runs, ["none", "dynamic"])
    both = huggingface.kvlib_over_hf(runs, ["dynamic"], ["none", "dynamic"])
    lines = huggingface.comparison_lines(hf, both)
    assert "— **slower, contrary to expectation**" in lines[0] and "**0.48x** the speed of use_cache=False" in lines[0]
    assert lines[1].startswith("- dynamic cache, kvlib / Hugging Face: per-token latency **0.24x**")
    text = huggingface.comparison_text(runs, lines)
    assert text.startswith("Medians over paired repeats") and "Fastest median per-token latency: kvlib dynamic" in text
    rows = huggingface.headline_rows(hf, both, 8, 16)
    assert [r["metric"] for r in rows] == ["hf_speedup_dynamic", "kvlib_over_hf_tpot_dynamic"]
    assert rows[0]["note"] == "total time, 8 new tokens, prompt 16" and rows[1]["unit"] == "ratio"
    assert huggingface.hf_speedups(runs, ["dynamic"]) == {}  # no use_cache=False run: nothing to compare with
    alone = _hf_runs({("hf", "dynamic"): [1.0, 1.1]})
    text = huggingface.comparison_text(alone, [])
    assert text.startswith("Nothing to compare pairwise") and "Only one path was measured (hf dynamic cache" in text
    noisy = _hf_runs({("hf", "none"): [1.0, 1.0], ("hf", "static"): [2.0, 2.0]})
    line = huggingface.comparison_lines(huggingface.hf_speedups(noisy, ["none", "static"]), {})[0]
    assert "contrary" not in line and "n too small" in line


def test_hf_agreement(tiny):
    table = huggingface.agreement(tiny, 1, 8, 3, 0)
    assert table["ok"].all() and huggingface.agreement_text(table).startswith(f"**All {len(table)} paths agree**")
    row = huggingface.agreement_headline(table, 3)
    assert row["value"] == len(table) and row["note"] == f"of {len(table)}; 3 new tokens"
    bad = table.assign(ok=[False] + [True] * (len(table) - 1))
    assert huggingface.agreement_text(bad) == f"**Disagreement** on {table['path'].iloc[0]}: see the table."
    fig = huggingface.comparison_figure(_hf_runs({("hf", "none"): [1.0], ("kvlib", "static"): [0.5]}).assign(
        ttft_ms=1.0, decode_tokens_per_s=10.0), "tiny", 1, 16)  # fmt: skip
    assert [ax.get_title() for ax in fig.axes[:3]] == [t for _, t, _ in huggingface.PANELS]


# ---- 08: quality -------------------------------------------------------------------------------------------------

QUALITY_PARAMS = dict(tokens=96, passages=2, passage_tokens=64, budget_tokens=40, floor_tokens=16,
                      budgets="[16, 32]", sinks="[0, 1, 4]", rolling_width=16,
                      recompute_every=4, kivi_group=8, residuals=[8], hf_tokens=24, hf_bits=[4], hf_residual=8,
                      latency_prompt_len=72, latency_new_tokens=4, latency_repeats=1, greedy_prompts=2,
                      greedy_prompt_len=24, greedy_new_tokens=8, greedy_sink=2, greedy_window=12,
                      method="fast")  # fmt: skip


def test_quality_parameters_are_checked_before_anything_runs():
    p = quality_page.check_parameters("tiny-llama", **QUALITY_PARAMS)
    assert p.budgets == [16, 32] and p.budget == 32 and p.sinks == [0, 1, 4]
    for model, bad, match in [
        ("tiny", {}, "needs a Llama-architecture model"),
        ("tiny-llama", {"budget_tokens": 64}, "must be below passage_tokens"),
        ("tiny-llama", {"passages": 0}, "passages"),
        ("tiny-llama", {"budget_tokens": 8}, "budget_tokens gives a budget of 8 tokens that snapkv refuses"),
        ("tiny-llama", {"latency_prompt_len": 16}, r"latency_prompt_len \(timed at half of it\)"),
        ("tiny-llama", {"sinks": [16]}, "every sink count must be below every budget"),
        ("tiny-llama", {"budgets": [16, 96]}, "every budget must be below tokens"),
        ("tiny-llama", {"method": "slow"}, "method"),
        ("tiny-llama", {"tokens": 1}, "tokens"),
    ]:
        with pytest.raises(KvlibError, match=match) as e:
            quality_page.check_parameters(model, **{**QUALITY_PARAMS, **bad})
        assert "\n" not in str(e.value)


def _stream(window_only: float, sinks: dict[int, float], cache_positions: float | None = None) -> pd.DataFrame:
    rows = [{"variant": "full (static)", "cache": "static", "sink": None, "window": None, "positions": None,
             "perplexity": 10.0, "time_s": 1.0}]  # fmt: skip
    for s, ppl in {0: window_only, **sinks}.items():
        label = quality.variant_label("window", {"sink": s, "window": 32 - s})
        rows.append({"variant": label, "cache": "window", "sink": s, "window": 32 - s, "positions": "original",
                     "perplexity": ppl, "time_s": 2.0})  # fmt: skip
    if cache_positions is not None:
        rows.append({"variant": "cachepos", "cache": "window", "sink": 4, "window": 28, "positions": "cache",
                     "perplexity": cache_positions, "time_s": 2.0})  # fmt: skip
    df = pd.DataFrame(rows).astype({"sink": "Int64", "window": "Int64"})
    df["budget"] = (df["sink"].fillna(0) + df["window"]).where(df["window"].notna())
    return df


def test_quality_sinks_sentence_and_headlines():
    text = quality.Text(torch.zeros(1, 96, dtype=torch.long), "the novel", True)
    s = quality_page.sinks_at_budget(_stream(20.0, {1: 12.0, 4: 11.0}, cache_positions=11.5), 32)
    assert (s.best_sink, s.four) == (4, 11.0) and s.ratio == pytest.approx(20 / 11)
    said = quality_page.sinks_sentence(s, 96, True)
    assert "window only gives perplexity **20.000** against **11.000** with 4 sink(s) (1.82x)" in said
    assert "**reproduced in direction, far smaller in size**" in said and "4 sinks give 11.500" in said
    assert "meaningless" not in said
    rows = quality_page.streaming_headlines(s, text, 96)
    assert [r["metric"] for r in rows] == ["window_only_ppl", "sink4_ppl"] and rows[1]["headline"] is True
    same = quality_page.sinks_at_budget(_stream(10.5, {1: 10.4, 4: 10.0}), 32)
    said = quality_page.sinks_sentence(same, 96, False)
    assert "**did not reproduce** at this scale" in said and said.endswith(" (Random weights: meaningless.)")
    assert quality_page.streaming_table(_stream(20.0, {1: 12.0})).shape == (2, 1)


def test_quality_recompute_sentence():
    stream = _stream(20.0, {1: 12.0, 4: 11.0})
    common = {"budget": 32, "tokens_scored": 16, "every": 4, "first_token": 33}
    recomp = pd.DataFrame([
        {**common, "variant": quality.RECOMPUTE, "perplexity": 10.5, "time_s": 0.8},
        {**common, "variant": quality.FULL, "perplexity": 10.0, "time_s": float("nan")},
        *({**common, "variant": quality.variant_label("window", {"sink": s, "window": 32 - s}), "perplexity": p,
           "time_s": float("nan")} for s, p in ((0, 20.0), (1, 12.0), (4, 11.0))),
    ])  # fmt: skip
    r = quality_page.recompute_at_budget(recomp, stream, 32, 4)
    assert (r.rec, r.full, r.window_only, r.best_label, r.best_ppl) == (10.5, 10.0, 20.0, "window 4+28", 11.0)
    assert r.per_token_s == pytest.approx(0.05) and r.sample == "1 token in 4"
    said = quality_page.recompute_sentence(r, 96, True)
    assert "Re-computation is closer to the full cache than window only" in said and "and within 5%" in said
    assert "**50 ms a token**" in said
    assert quality_page.recompute_headline(r)["note"].startswith("16 tokens (1 token in 4 past 32)")
    assert quality_page.recompute_at_budget(recomp.iloc[:0], stream, 32, 4) is None
    assert quality_page.no_recompute_sentence(32, 30).startswith("No token past budget 32")


def test_quality_frontier_and_latency_sentences():
    quant = pd.DataFrame({
        "variant": ["full (static)", "int8", "int4"], "bits_per_element": [32.0, 8.5, 4.5],
        "ppl_change_pct": [0.0, 0.2, 3.0], "saving_pct": [0.0, 70.0, 85.0], "tokens": [64] * 3,
        "bytes_per_token": [100.0, 30.0, 15.0],
    })  # fmt: skip
    text = quality.Text(torch.zeros(1, 64, dtype=torch.long), "the novel", False)
    said = quality_page.frontier_sentence(quant, False)
    assert said.startswith("Best memory saving within +1% perplexity: **70.0%** (int8, +0.20%).")
    assert "The largest loss: int4 at +3.00%" in said and said.endswith("(Random weights: meaningless.)")
    row = quality_page.best_saving_headline(quant, 64, text)
    assert row["value"] == 70.0 and row["headline"] is False
    worse = quant.assign(ppl_change_pct=[0.0, 2.0, 3.0])
    assert quality_page.best_saving_headline(worse, 64, text) is None
    assert quality_page.frontier_sentence(worse, True).startswith("No lossy variant stayed within +1% perplexity.")
    assert isinstance(quality_page.frontier_figure(quant, "tiny-llama", 64), Figure)
    latency = pd.DataFrame({
        "variant": ["full (static)", "int8", "int4", "hf full (dynamic)", "hf quanto int4 r8"],
        "engine": ["kvlib", "kvlib", "kvlib", "hf", "hf"], "status": ["ok"] * 5,
        "tpot_ms": [1.0, 1.05, 2.0, 3.0, 3.0], "tpot_ms_min": [0.9, 0.95, 1.9, 2.9, 2.9],
        "tpot_ms_max": [1.1, 1.15, 2.1, 3.1, 3.1], "repeats": [3, 3, 3, 3, 1],
        "tpot_vs_full": [1.0, 1.05, 2.0, 1.0, 1.0],
    })  # fmt: skip
    said = quality_page.latency_sentence(latency, 3)
    assert said.startswith("Per decode step, against the same engine's full-precision cache (kvlib's: 1 ms;")
    assert "int8 1.05x (no measurable difference: ranges overlap)" in said and "int4 2.00x (slower)" in said
    assert "hf quanto int4 r8 1.00x (n too small" in said
