"""The measurement functions of notebook 07: tidy tables, correct arithmetic, honest about what is unavailable."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from kvlib.core.errors import KvlibError
from kvlib.models.decode import Generation
from kvlib.models.loading import load
from kvlib.study.strategies import (
    best_saving_at_equal_tokens,
    comparison_table,
    default_kv_heads,
    error_vs_exact,
    gqa_reduction,
    interleaved_runs,
    memory_by_length,
    mixed_batch,
    paged_latency,
    paged_waste,
    prefix_sharing,
    quantized_error,
    run_mixed_batch,
    timing_summary,
    waste_pct,
    window_memory,
)

FAST = {"repeats": 1, "warmup": 0}


@pytest.fixture(scope="module")
def lm():
    return load("tiny", weights="random", seed=0)


def test_interleaved_runs_alternate_variants_and_summarise_in_ms():
    calls = []

    def run(label):
        def f():
            calls.append(label)
            return Generation(torch.zeros(1, 3, dtype=torch.long), 0.010, [0.001, 0.003])

        return f

    runs, last = interleaved_runs({"a": run("a"), "b": run("b")}, repeats=2, warmup=1)
    assert calls == ["a", "b"] * 3  # warm-up, then A/B within every repeat
    assert list(runs["variant"]) == ["a", "b", "a", "b"] and set(last) == {"a", "b"}
    summary = timing_summary(runs).set_index("variant")
    assert summary.loc["a", "ttft_ms"] == pytest.approx(10.0) and summary.loc["a", "tpot_ms"] == pytest.approx(2.0)
    with pytest.raises(KvlibError, match="repeats"):
        interleaved_runs({"a": run("a")}, repeats=0)


def test_error_vs_exact_on_a_hand_made_case():
    exact_logits = torch.tensor([[[0.0, 2.0]], [[3.0, 0.0]], [[0.0, 1.0]]])  # (N=3, B=1, V=2)
    forced = exact_logits.clone()
    forced[2, 0] = torch.tensor([1.5, 1.0])  # step 2's argmax flips
    exact_tokens = torch.tensor([[1, 0, 1]])
    err = error_vs_exact(exact_logits, exact_tokens, forced, torch.tensor([[1, 0, 0]]))
    assert err["max_abs_logit_diff"] == pytest.approx(1.5) and err["rel_logit_diff"] == pytest.approx(0.5)
    assert err["token_agreement_pct"] == pytest.approx(200 / 3)
    assert not err["tokens_equal"] and err["first_divergence_step"] == 2


def test_comparison_table_is_tidy_and_exact_where_claimed(lm):
    table = comparison_table(lm.model, batch_size=2, prompt_len=12, new_tokens=6, **FAST)
    assert table["variant"].is_unique and len(table) == 7
    for col in ("held_bytes", "bytes_per_token", "waste_pct", "ttft_ms", "tpot_ms", "max_abs_logit_diff"):
        assert col in table and table[col].notna().all()
    exact = table[table["exact"]]
    assert set(exact["cache"]) == {"static", "dynamic", "paged"}
    assert exact["tokens_equal"].all() and (exact["max_abs_logit_diff"] < 1e-4).all()
    lossy = table[~table["exact"]]
    assert set(lossy["cache"]) == {"quantized", "window"}
    static = table.set_index("variant").loc["static"]
    assert static["saving_vs_static_pct"] == 0 and static["held_bytes"] == lm.cfg.kv_bytes_per_token(4) * 2 * 18
    assert static["waste_pct"] == pytest.approx(100 / 18)  # one preallocated slot of 18 is never written
    int8 = table.set_index("variant").loc["quantized int8"]
    assert int8["held_bytes"] < static["held_bytes"] and int8["max_abs_logit_diff"] > 0


def test_comparison_table_needs_its_reference(lm):
    with pytest.raises(KvlibError, match="exact reference"):
        comparison_table(lm.model, variants={"paged": ("paged", {})}, **FAST)


def test_best_saving_at_equal_tokens_picks_only_among_equal_tokens():
    table = pd.DataFrame(
        {
            "variant": ["static", "a", "b", "c"],
            "cache": ["static", "paged", "quantized", "window"],
            "exact": [True, True, False, False],
            "held_bytes": [100, 90, 30, 10],
            "bytes_per_token": [1.0, 0.9, 0.3, 0.1],
            "saving_vs_static_pct": [0.0, 10.0, 70.0, 90.0],
            "tokens_equal": [True, True, True, False],
        }
    )
    best = best_saving_at_equal_tokens(table)
    assert list(best["variant"]) == ["b"]
    assert best_saving_at_equal_tokens(table.assign(tokens_equal=[True, False, False, False])).empty


def test_waste_on_a_hand_checked_mixed_batch(lm):
    """Prompts of 4 and 2 tokens, 3 and 1 new tokens, blocks of 4. Live tokens per step: 4 + 2, then 5 (the
    second sequence is done), then 6: 17 token-steps. Held slots per step: paged 8, 8, 8 (the finished sequence's
    block is freed as the first needs a second block); static 2 x 7 at every step; dynamic 2 x 4, 2 x 5, 2 x 6."""
    bpt = lm.cfg.kv_bytes_per_token(4)
    expected_slots = {"paged": [8, 8, 8], "paged_keep": [8, 12, 12], "static": [14] * 3, "dynamic": [8, 10, 12]}
    for layout, slots in expected_slots.items():
        run = run_mixed_batch(lm.model, [4, 2], [3, 1], layout, block_size=4)
        steps = run.steps
        assert list(steps["held_bytes"]) == [s * bpt for s in slots], layout
        assert list(steps["live_tokens"]) == [6, 5, 6]
        assert waste_pct(steps) == pytest.approx(100 * (1 - 17 / sum(slots)))
        if layout == "paged":
            assert run.cache.used_bytes() == 6 * bpt  # the live sequence's tokens, counted by the cache itself
            run.cache.release_all()
            assert run.cache.pool.num_used == 0


def test_mixed_batch_lengths_and_bad_spread():
    prompts, news = mixed_batch(5, 40, 20, spread=0.0, seed=1)
    assert prompts == [40] * 5 and news == [20] * 5
    prompts, news = mixed_batch(200, 40, 20, spread=0.5, seed=1)
    assert min(prompts) >= 20 and max(prompts) <= 40 and min(news) >= 10 and max(news) <= 20
    with pytest.raises(KvlibError, match="spread"):
        mixed_batch(2, 4, 4, spread=1.5)


def test_paged_waste_is_below_contiguous_on_a_mixed_batch(lm):
    df = paged_waste(lm.model, batch_size=4, max_prompt_len=24, max_new_tokens=12, spreads=(0.0, 1.0), block_sizes=(4,))
    assert df["tokens_match_static"].all()
    assert set(df["layout"]) == {"static", "static_context", "dynamic", "paged", "paged_keep"}
    mixed = df[df["spread"] == 1.0].set_index("layout")
    assert (
        mixed.loc["paged", "waste_pct"] < mixed.loc["dynamic", "waste_pct"] < mixed.loc["static_context", "waste_pct"]
    )
    assert mixed.loc["paged", "peak_held_bytes"] <= mixed.loc["static", "peak_held_bytes"]
    assert (df["waste_pct"] >= 0).all() and (df["waste_pct"] < 100).all()


def test_paged_latency_rows(lm):
    df = paged_latency(lm.model, batch_size=2, prompt_len=8, new_tokens=4, block_sizes=(4, 16), **FAST)
    assert list(df["variant"]) == ["static", "dynamic", "paged (block 4)", "paged (block 16)"]
    assert df["tokens_equal_reference"].all() and (df["tpot_ms"] > 0).all()


def test_quantized_error_reports_every_hf_backend_never_skips(lm):
    df = quantized_error(lm.model, prompt_len=12, new_tokens=6, hf_model=lm.hf, **FAST)
    kv = df[df["engine"] == "kvlib"]
    assert (kv["status"] == "ok").all() and kv["exact"].sum() == 1  # only the full-precision reference
    lossy = kv[~kv["exact"]]
    assert (lossy["rel_logit_diff"] < 0.05).all()
    # Without a full-precision tail every token is stored in 8 or 4 bits (plus scales): always a saving.
    no_tail = kv.set_index("variant").loc[["int8 per-token", "int4 per-token"]]
    assert (no_tail["saving_vs_full_pct"] > 50).all()
    hf = df[df["engine"] == "hf"]
    assert len(hf) == 1 + 4  # HF's full-precision reference (its backends are usable) and every backend asked for
    assert hf["variant"].str.match("HF (quanto|hqq|fp8|dynamic)").all()
    assert hf["status"].map(lambda s: s == "ok" or s.startswith("unavailable: ")).all()
    ok = hf[hf["status"] == "ok"]
    assert (ok["held_bytes"] > 0).all() and ok["max_abs_logit_diff"].notna().all()
    none = quantized_error(lm.model, prompt_len=8, new_tokens=3, hf_model=None, variants={}, **FAST)
    assert none[none["engine"] == "hf"]["status"].str.startswith("unavailable: no Hugging Face model").all()


def test_gqa_reduction_is_exactly_n_head_over_n_kv_head():
    assert default_kv_heads(12) == [12, 4, 1] and default_kv_heads(4) == [4, 2, 1]
    df = gqa_reduction("tiny", batch_size=2, prompt_len=8, new_tokens=4, **FAST)
    assert list(df["n_kv_head"]) == [4, 2, 1]
    assert df["reduction_exact"].all() and (df["held_bytes"] == df["formula_bytes"]).all()
    assert list(df["reduction"]) == [1.0, 2.0, 4.0]


def test_gqa_reduction_measures_the_loaded_model_as_it_is_next_to_random_variants():
    """Issue 9: notebook 07 measures SmolLM2's own 3 of 9 KV heads (pretrained) next to 9 and 1 (random weights)."""
    assert (
        default_kv_heads(9, 3) == [9, 3, 1] and default_kv_heads(9) == [9, 3, 1] and default_kv_heads(4, 2) == [4, 2, 1]
    )
    base = load("tiny-llama", "random", "cpu", "float32", 0, with_hf=False)  # 4 query heads, 2 KV heads
    base.weights = "pretrained"  # stands for real weights: the base model must be used as it is, not rebuilt
    df = gqa_reduction("tiny-llama", batch_size=1, prompt_len=8, new_tokens=3, base=base, **FAST)
    assert list(df["n_kv_head"]) == [4, 2, 1] and list(df["weights"]) == ["random", "pretrained", "random"]
    assert df.loc[df["n_kv_head"] == 2, "model"].item() == "tiny-llama"
    assert df["reduction_exact"].all() and list(df["reduction"]) == [1.0, 2.0, 4.0]


def test_window_memory_is_flat_and_exact_while_it_fits(lm):
    df = window_memory(lm.model, lengths=(20, 29, 40, 80), prompt_len=8, sink=4, window=24)
    win = df[df["cache"] == "window"].set_index("total_tokens")
    assert win.loc[29, "fits"] and not win.loc[40, "fits"]
    assert (win.loc[[20, 29], "max_abs_logit_diff"] == 0).all()
    assert win.loc[40, "held_bytes"] == win.loc[80, "held_bytes"] == 28 * lm.cfg.kv_bytes_per_token(4)
    static = df[df["cache"] == "static"].set_index("total_tokens")
    assert static.loc[80, "held_bytes"] == 2 * static.loc[40, "held_bytes"]


def test_memory_by_length_rows(lm):
    df = memory_by_length(lm.model, lengths=(12, 20), prompt_len=8)
    assert len(df) == 2 * 7 and (df["used_bytes"] <= df["held_bytes"]).all()
    with pytest.raises(KvlibError, match="must exceed"):
        memory_by_length(lm.model, lengths=(8,), prompt_len=8)


def test_prefix_sharing_prefills_less_and_holds_less_with_the_same_tokens(lm):
    df = prefix_sharing(lm.model, batch_size=3, prefix_len=40, suffix_len=4, new_tokens=5, **FAST).set_index("variant")
    assert df["tokens_equal"].all()
    shared, full = df.loc["shared prefix, paged (block 16)"], df.loc["full prompts, paged (block 16)"]
    assert shared["prefill_tokens"] == 40 + 3 * 4 and full["prefill_tokens"] == 3 * 44
    assert shared["held_bytes"] < full["held_bytes"]
