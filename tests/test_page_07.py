"""Notebook 07's page (kvlib.study.strategies.page and page_savings), without running the notebook.

- the parameters: check_parameters refuses a one-value sweep and a bad value by name before anything runs, and reads
  papermill's text ("[16, 32]", "null") as the parameters cell's literals;
- every page function on real measurements of the tiny model at small sizes: figures with their titles, headline
  rows that Outputs takes as they are, sentences computed from the frames;
- the sentences' branches on small synthetic frames: what they claim follows from the data they are given.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
from matplotlib.figure import Figure

from kvlib import study
from kvlib.core.errors import KvlibError
from kvlib.report import pipeline
from kvlib.study import strategies
from kvlib.study.strategies import page, page_savings

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "07_cache_strategies"
FAST = {"repeats": 1, "warmup": 0}


def smoke(**overrides) -> dict:
    """check_parameters' arguments as the smoke profile sets them, then `overrides` (as papermill passes them)."""
    params = {**pipeline.profile_params(ROOT / "params", "smoke", NOTEBOOK), **overrides}
    return {k: v for k, v in params.items() if k in inspect.signature(page.check_parameters).parameters}


# ---- parameters ----------------------------------------------------------------------------------------------------


def test_notebook_07_sweep_is_refused_before_anything_runs(tmp_path):
    """The page's check, given one length (as papermill's -p passes it): a KvlibError naming the parameter."""
    with pytest.raises(KvlibError, match=r"parameter lengths must hold at least two different values"):
        page.check_parameters(**smoke(lengths="[32]"))
    assert not (tmp_path / "out").exists()  # a check: no Outputs, no folder, no model


def test_check_parameters_reads_papermill_text_and_fits_the_model():
    p = page.check_parameters(**smoke(lengths="[48, 16, 32]", gqa_kv_heads="null", spreads="[1, 0]"))
    assert p.lengths == [16, 32, 48] and p.gqa_kv_heads is None and p.spreads == [0.0, 1.0]
    assert p.cfg.name == "tiny-llama" and p.memory_layouts == ["static", "dynamic", "paged", "window"]
    assert page.check_parameters(**smoke(gqa_kv_heads="[4, 1]")).gqa_kv_heads == [1, 4]
    bad = {
        "memory_prompt_len": (16, "every length must exceed memory_prompt_len"),
        "gqa_kv_heads": ("[3]", "gqa_kv_heads"),
        "memory_layouts": ("[static, bogus]", "unknown"),
        "prompt_len": (100_000, "prompt_len \\+ new_tokens"),
        "warmup": (-1, "warmup"),
    }
    for name, (value, message) in bad.items():
        with pytest.raises(KvlibError, match=message):
            page.check_parameters(**smoke(**{name: value}))


# ---- every page function on real measurements ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def measured(tiny):
    """Each measurement of notebook 07 on the tiny model, at sizes that take seconds."""
    variants = strategies.default_variants(block_size=8, sink=2, window=6)
    return {
        "table": strategies.comparison_table(tiny.model, 1, 12, 4, variants, **FAST),
        "waste": strategies.paged_waste(tiny.model, 3, 12, 4, [0.0, 1.0], (8,)),
        "latency": strategies.paged_latency(tiny.model, 1, 8, 4, (8,), **FAST),
        "quant": strategies.quantized_error(tiny.model, 1, 12, 4, hf_model=None, **FAST),
        "gqa": strategies.gqa_reduction("tiny", None, 1, 8, 4, base=tiny, **FAST),
        "memory": strategies.memory_by_length(
            tiny.model, [10, 20], 4, 1, page_savings.memory_variants(variants, ["static", "window"])
        ),
        "win": strategies.window_memory(tiny.model, [6, 20], 4, 2, 6, 1),
        "prefix": strategies.prefix_sharing(tiny.model, 2, 8, 4, 2, 8, **FAST),
        "variants": variants,
    }


def test_comparison_section(measured, tmp_path):
    table = measured["table"]
    view = page.comparison_view(table)
    assert list(view.columns) == page.COMPARISON_COLUMNS
    assert (view["kib_per_token"] * page.KIB == table["bytes_per_token"]).all()
    fig = page.comparison_figure(table, "tiny", "float32", 1, 12, 4)
    assert isinstance(fig, Figure)
    assert fig._suptitle.get_text() == "Cache layouts, tiny float32, batch 1, prompt 12, 4 new tokens"
    out = study.Outputs(NOTEBOOK, tmp_path)
    out.figure(fig, "comparison", page.comparison_caption(table, 1), key=True)
    best = page.best_saving_headline(table)
    assert best is not None and best["metric"] == "best_saving_equal_tokens" and best["unit"] == "%"
    out.headline(**best)
    assert pd.read_csv(tmp_path / "data" / "07_headline.csv")["metric"].tolist() == ["best_saving_equal_tokens"]
    assert page.best_saving_sentence(table).startswith("The largest saving that still produced exactly")
    text = page.comparison_sentence(table)
    assert text.startswith("Exact layouts that changed a token: **0** (none).") and "Fastest median decode step" in text
    assert "n too small" in text  # one repeat: no claim about which is faster


def test_paged_section(measured):
    waste, latency = measured["waste"], measured["latency"]
    fig = page.waste_figure(waste, 3)
    assert isinstance(fig, Figure) and "batch of 3 mixed lengths" in fig._suptitle.get_text()
    row = page.waste_headline(waste, 8)
    w = waste[waste["spread"] == 1.0].set_index("layout")
    assert row["value"] == w.loc["paged", "waste_pct"] and row["label"] == "Paged cache waste, mixed batch (block 8)"
    assert row["note"] == f"contiguous (static): {w.loc['static', 'waste_pct']:.1f}%"
    text = page.waste_sentence(waste)
    assert text.startswith("At spread 1, the contiguous cache") and "vLLM reports 60–80% waste" in text
    assert text.endswith("Tokens equal to the static layout in every run: **True**.")
    text = page.paged_latency_sentence(latency, 8, 1)
    assert text.startswith("Decode step, median over 1 repeats: static **") and "n too small" in text


def test_savings_sections(measured, tiny):
    quant = measured["quant"]
    assert list(page_savings.quantized_view(quant).columns) == [c for c in page_savings.QUANTIZED_COLUMNS if c in quant]
    int8 = page_savings.int8_headline(quant)
    assert int8 is not None and "15 of 15 tokens per sequence quantized" in int8["note"]
    assert "4 steps x 1 sequences" in page_savings.quantized_sentence(quant, 1, 4)

    gqa = page_savings.label_random_weights(measured["gqa"])
    kinds = {"multi-head (random weights)", "grouped-query (random weights)", "multi-query (random weights)"}
    assert set(gqa["attention"]) == kinds  # the tiny model's own weights are random too
    assert list(page_savings.gqa_view(gqa).columns) == page_savings.GQA_COLUMNS
    assert isinstance(page_savings.gqa_figure(gqa, 1, 12), Figure)
    row = page_savings.gqa_headline(gqa)
    assert row["metric"] == "gqa_reduction" and row["value"] == 4.0 and "expected n_head / n_kv_head = 4" in row["note"]
    text = page_savings.gqa_sentence(gqa, "tiny", "random", 4, tiny.model.weight_bytes())
    assert text.startswith("Held bytes shrink by exactly n_head / n_kv_head in **3 of 3** models")  # its own: 4 of 4
    assert "(1 / 4 heads: " in text and "of the bytes a decode step reads" in text
    text = page_savings.gqa_sentence(gqa, "tiny", "random", 2, tiny.model.weight_bytes())  # a model of 2 of 4 heads
    assert text.startswith("The page's model (tiny, random weights) shares 2 key/value heads among 4 query heads: its")
    assert "its cache is **2x** smaller" in text

    assert isinstance(page_savings.memory_figure(measured["memory"], "tiny", "float32"), Figure)
    assert set(measured["memory"]["cache"]) == {"static", "window"}
    text = page_savings.window_sentence(measured["win"])
    assert text.startswith("From length 6 to 20, the static cache grew") and "fit in 2 + 6 tokens" in text
    assert "tokens equal: True" in text and "Once tokens were evicted: length 20" in text

    prefix = measured["prefix"]
    row = page_savings.prefix_headline(prefix)
    assert row["metric"] == "prefix_ttft_speedup" and row["note"].startswith("2 prompts sharing 8 tokens; full prompts")
    text = page_savings.prefix_sentence(prefix)
    assert "prefilled **16** positions instead of 24" in text and text.endswith("full prompt: **True**.")


# ---- the sentences' branches on synthetic frames ------------------------------------------------------------------


def _timed(**columns) -> dict:
    """Timing columns of one row: median, min, max and repeats for tpot and ttft."""
    t = columns.pop("t", 1.0)
    return {"tpot_ms": t, "tpot_ms_min": t * 0.9, "tpot_ms_max": t * 1.1, "ttft_ms": t, "ttft_ms_min": t * 0.9,
            "ttft_ms_max": t * 1.1, "repeats": 3, **columns}  # fmt: skip


def test_comparison_sentences_name_what_lost_nothing_and_what_changed():
    rows = [
        _timed(variant="static", cache="static", exact=True, t=1.0, tokens_equal=True, lossy_tokens=0),
        _timed(variant="paged (block 8)", cache="paged", exact=True, t=5.0, tokens_equal=False, lossy_tokens=0),
        _timed(variant="int4, tail", cache="quantized", exact=False, t=2.0, tokens_equal=True, lossy_tokens=0),
        _timed(variant="int8", cache="quantized", exact=False, t=2.0, tokens_equal=False, lossy_tokens=15),
    ]
    table = pd.DataFrame(rows).assign(stored_tokens=15, first_divergence_step=[pd.NA, pd.NA, pd.NA, 3])
    table = table.assign(bytes_per_token=[1.0, 0.9, 0.1, 0.5], saving_vs_static_pct=[0.0, 10.0, 90.0, 50.0])
    table = table.assign(held_bytes=table["bytes_per_token"] * 15)
    assert page.untouched_lossy(table).tolist() == [False, False, True, False]
    assert page.marked_variants(table).tolist()[2] == "int4, tail [0 quantized]"
    assert "[0 quantized] / [0 evicted]" in page.comparison_caption(table, 3)
    assert "[0 quantized]" not in page.comparison_caption(table.assign(lossy_tokens=1), 3)
    text = page.comparison_sentence(table)
    assert "changed a token: **1** (paged (block 8))" in text and "1 of the 1 that quantized" in text
    assert "(int8 at step 3)" in text and "int4, tail quantized or evicted none of the 15" in text
    assert "Fastest median decode step: **static** (1 ms); slowest: paged (block 8) (5 ms): paged (block 8)" in text
    assert text.endswith("on every step.")  # apart beyond their ranges: what the slowest pays for
    assert page.best_saving_headline(table) is None  # no candidate kept every token and saved memory
    assert page.best_saving_sentence(table).startswith("No layout other than the static cache")
    lossy_best = table.assign(tokens_equal=[True, False, True, True])
    row = page.best_saving_headline(lossy_best)
    assert row["note"] == "int8; lossy (15 of 15 tokens per sequence quantized), tokens happened to match"
    assert "but this layout is lossy" in page.best_saving_sentence(lossy_best)


def test_waste_sentence_at_spread_zero_does_not_compare_with_vllm():
    layouts = ["static", "static_context", "dynamic", "paged_keep", "paged"]
    waste = pd.DataFrame({"spread": 0.0, "layout": layouts, "waste_pct": [70.0, 90.0, 5.0, 3.0, 1.0],
                          "tokens_match_static": True})  # fmt: skip
    text = page.waste_sentence(waste)
    assert text.startswith("At spread 0,") and "do not apply" in text and "vLLM reports" not in text
    assert "**in line with**" in page.waste_sentence(waste.assign(spread=0.5))
    assert "**unlike**" in page.waste_sentence(waste.assign(spread=0.5, waste_pct=[50.0, 90.0, 5.0, 3.0, 1.0]))


def test_gqa_sentence_with_only_the_multi_head_model():
    gqa = pd.DataFrame([_timed(n_head=4, n_kv_head=4, attention="multi-head", held_bytes=100, reduction=1.0)])
    assert page_savings.gqa_headline(gqa) is None
    assert page_savings.gqa_sentence(gqa, "tiny", "random", 4, 1000).startswith("Only the multi-head model (4 key/")


def test_quantized_sentence_names_unavailable_backends():
    quant = pd.DataFrame({"engine": ["kvlib", "hf"], "variant": ["full precision (static)", "HF quanto int4"],
                          "status": ["ok", "unavailable: no optimum-quanto"], "exact": [True, False],
                          "quantized_tokens": [0, 0], "stored_tokens": [15, 15], "bits": [32, 4],
                          "held_bytes": [100, 50]})  # fmt: skip
    assert page_savings.int8_headline(quant) is None
    text = page_savings.quantized_sentence(quant, 1, 4)
    assert text.startswith("No kvlib int8 variant") and text.endswith("(unavailable: no optimum-quanto).")


def test_prefix_sentence_says_slower_when_sharing_did_not_pay():
    rows = [
        _timed(variant="full prompts, static", t=1.0, prefill_tokens=80, held_bytes=2**20),
        _timed(variant="shared prefix, paged (block 8)", t=4.0, prefill_tokens=40, held_bytes=2**19),
    ]
    prefix = pd.DataFrame(rows).assign(batch_size=2, prefix_len=32, tokens_equal=True)
    text = page_savings.prefix_sentence(prefix)
    assert "(full prompts, static / shared: 0.25x, slower: the saved prefill did not pay" in text
    assert page_savings.prefix_headline(prefix)["value"] == 0.25


def test_window_sentence_when_nothing_was_evicted():
    win = pd.DataFrame({"cache": ["static", "window"], "total_tokens": [8, 8], "sink": 2, "window": 8,
                        "fits": True, "held_bytes": [1024, 1024], "tokens_equal": True})  # fmt: skip
    win = pd.concat([win, win.assign(total_tokens=9)])
    text = page_savings.window_sentence(win)
    assert "From length 8 to 9" in text and "(tokens equal: True)" in text
    assert text.endswith("No measured length exceeded the window.")
