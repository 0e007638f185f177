"""Notebooks 01 and 04 through their pages (kvlib.study.concept, kvlib.study.memory): the parameter checks refuse
each bad value by name before anything is loaded, and every sentence says what its data carry (the same outputs or
loudly not, a packed copy only when there is one, a missed peak said so, which published model fits), on small
synthetic inputs; the notebooks themselves stay thin."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from kvlib.caches.base import REFERENCE
from kvlib.core.config import get_preset
from kvlib.core.errors import KvlibError
from kvlib.models.decode import Generation
from kvlib.models.loading import load
from kvlib.study import concept, costs, memory, memory_windows

ROOT = Path(__file__).resolve().parents[1]
TINY = get_preset("tiny")
TINY_GEMMA = get_preset("tiny-gemma")  # 4 layers: sliding, sliding, full, sliding; window 8


def code_lines(notebook: str) -> list[str]:
    """Non-blank, non-comment lines of a notebook's code cells, the parameters cell left out."""
    cells = json.loads((ROOT / "notebooks" / f"{notebook}.ipynb").read_text())["cells"]
    return [
        line
        for c in cells
        if c["cell_type"] == "code" and "parameters" not in c["metadata"].get("tags", [])
        for line in "".join(c["source"]).splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


@pytest.mark.parametrize("notebook", ["01_concept", "04_memory"])
def test_the_notebooks_are_thin(notebook):
    lines = code_lines(notebook)
    assert len(lines) <= 100, f"{notebook}: {len(lines)} code lines"
    assert not [line for line in lines if line.lstrip().startswith(("def ", "class "))]  # logic lives in the page


# ---- notebook 01 ----------------------------------------------------------------------------------------------

CONCEPT = dict(model="tiny", toy_len=5, toy_dim=4, prompt_len=16, max_new_tokens=32, check_new_tokens=8)


def test_concept_parameters_are_checked_by_name():
    p = concept.check_parameters(**{**CONCEPT, "toy_len": "5", "max_new_tokens": "32"})  # papermill's text
    assert (p.toy_len, p.max_new_tokens, p.cfg.name) == (5, 32, "tiny")
    for name in ("toy_len", "toy_dim", "prompt_len", "max_new_tokens", "check_new_tokens"):
        for bad in (0, -1, 2.5, "x", None, True):
            with pytest.raises(KvlibError, match=f"parameter {name}"):
                concept.check_parameters(**{**CONCEPT, name: bad})
    with pytest.raises(KvlibError, match="prompt_len \\+ max_new_tokens = 200 \\+ 100 exceeds the tiny context"):
        concept.check_parameters(**{**CONCEPT, "prompt_len": 200, "max_new_tokens": 100})
    with pytest.raises(KvlibError, match="prompt_len \\+ check_new_tokens"):
        concept.check_parameters(**{**CONCEPT, "prompt_len": 200, "max_new_tokens": 8, "check_new_tokens": 100})


def test_toy_head_gives_the_same_outputs_and_counts_the_projections():
    toy = concept.toy_attention(0, 5, 4)
    assert toy.naive.shape == toy.cached.shape == (5, 4) and toy.naive.dtype == torch.float64
    table = concept.toy_table(toy)
    assert table[("kv_projected", "naive")].tolist() == [2, 4, 6, 8, 10]
    assert table[("kv_projected", "cached")].tolist() == [2] * 5 and table[("kv_stored", "cached")].iloc[-1] == 10
    text = concept.toy_sentence(toy)
    assert text.startswith("Over 5 steps the naive loop projected **30** key/value vectors, the cached loop **10**")
    assert "Both produced the same outputs" in text and "outputs differ" not in text
    wrong = concept.Toy(toy.steps, toy.naive, toy.cached + torch.eye(5, 4, dtype=torch.float64))
    text = concept.toy_sentence(wrong)
    assert "**The outputs differ** by up to 1.000e+00: the cached loop is wrong." in text and "same" not in text


class _Words:
    """A tokenizer of one word per id, with a newline and Markdown's marks to escape."""

    def decode(self, ids):
        return "".join({0: "a*", 1: " b_", 2: "\n"}.get(i, f" w{i}") for i in ids)


def _lm(weights="pretrained", tokenizer=None):
    cfg = SimpleNamespace(name="tiny", vocab_size=512)
    return SimpleNamespace(cfg=cfg, weights=weights, dtype_name="float32", device="cpu", tokenizer=tokenizer)


def _check(naive_tokens, cached_tokens, diff=0.0, tokenizer=None):
    ids = torch.tensor([[0, 1, 2, 3]])
    logits = torch.full((len(naive_tokens), 1, 8), 2.5)
    g_naive = Generation(torch.tensor([naive_tokens]), 0.0, [], step_logits=logits)
    g_cached = Generation(torch.tensor([cached_tokens]), 0.0, [], step_logits=logits + diff)
    tokens = pd.DataFrame(
        {"step": range(len(naive_tokens)), "naive token": naive_tokens, "cached token": cached_tokens}
    )
    return concept.ModelCheck(ids, g_naive, g_cached, tokens, None)


def test_model_check_sentence_says_identical_or_differ_and_quotes_only_real_text():
    same, wrong = _check([4, 5, 6], [4, 5, 6]), _check([4, 5, 6], [4, 7, 6], diff=0.5)
    text = concept.model_check_sentence(_lm("random"), same)
    assert text.startswith("tiny (random weights, float32, cpu), a prompt of 4 tokens (")
    assert (
        "3 new tokens: **the tokens are identical**; the largest logit difference is 0.00e+00 (logits reach 2.5)."
        in text
    )
    assert "\n" not in text  # random weights: nothing quoted
    text = concept.model_check_sentence(_lm("random"), wrong)
    assert "**the tokens DIFFER**; the largest logit difference is 5.00e-01" in text
    words = _Words()
    text = concept.model_check_sentence(_lm("pretrained", words), same)
    assert "The prompt, 4 tokens of the novel:\n\n> a\\* b\\_ ⏎  w3\n\n" in text
    assert "Continued with the static cache:\n\n>  w4 w5 w6\n\n" in text
    assert text.endswith("The same text, token for token (the table below lists the token ids).")
    text = concept.model_check_sentence(_lm("pretrained", words), wrong)
    assert text.endswith("**The two continuations differ**: the cached path is wrong.")
    assert not concept.real_text(_lm("random", words)) and not concept.real_text(_lm("pretrained"))


def test_model_check_on_a_real_model_keeps_text_for_pretrained_weights_only():
    lm = load("tiny", weights="random", seed=0, with_hf=False)
    check = concept.model_check(lm, 8, 4, 0)
    assert check.ids.shape == (1, 8) and check.continuations is None
    assert list(check.tokens.columns) == ["step", "naive token", "cached token"]
    assert check.tokens["naive token"].tolist() == check.tokens["cached token"].tolist()
    assert "**the tokens are identical**" in concept.model_check_sentence(lm, check)


def test_work_sentence_and_headlines_follow_the_counts():
    work = costs.decode_work(TINY, 16, 32)
    last = work[work["step"] == 31].set_index("mode")
    rows = {r["metric"]: r for r in concept.work_headlines(work, "tiny")}
    kv = last.loc["naive", "cumulative_kv_projections"] / last.loc["cached", "cumulative_kv_projections"]
    assert rows["kv_projection_ratio"]["value"] == kv and rows["flop_ratio"]["unit"] == "x"
    assert rows["flop_ratio"]["note"] == "tiny, prompt 16, 32 new tokens"
    text = concept.work_sentence(work)
    assert text.startswith("Generating 32 tokens after a 16-token prompt, the naive decoder projects ")
    assert f"**{kv:.0f}x** fewer with the cache" in text and "Going from 16 to 32 new tokens (2x)" in text
    one = costs.decode_work(TINY, 16, 1)  # no decode step: nothing to compare, no ratio claimed
    assert concept.work_headlines(one, "tiny") == []
    assert concept.work_sentence(one).startswith("With max_new_tokens = 1 there is no decode step")
    assert concept.work_figure(work, "tiny").axes[0].get_title() == "K/V vectors projected per step"


# ---- notebook 04 ----------------------------------------------------------------------------------------------

MEMORY = dict(
    model="tiny", batch_sizes=[1, 2], seq_lens=[16, 64], layouts=["dynamic", "static"], breakdown_new_tokens=4,
    budget_gib=1.0, budget_batch_sizes=[1, 8], hybrid_model="tiny-gemma", hybrid_weights="random",
    hybrid_measured_lens=[4, 8, 9, 20], hybrid_max_tokens=256, hybrid_ratio_at=[16, 64, 256], window_context=32768,
)  # fmt: skip


def test_memory_parameters_are_checked_by_name_before_anything_loads(tmp_path):
    p = memory.check_parameters(**{**MEMORY, "batch_sizes": "[2, 1, 2]", "budget_gib": "1.5"})
    assert p.batch_sizes == [1, 2] and p.budget_gib == 1.5 and p.hybrid_cfg.name == "tiny-gemma"
    for name, bad in (
        ("batch_sizes", [0]), ("seq_lens", "x"), ("budget_batch_sizes", []), ("breakdown_new_tokens", 0),
        ("budget_gib", -1), ("layouts", ["paged"]), ("hybrid_measured_lens", [1.5]), ("hybrid_ratio_at", None),
        ("hybrid_max_tokens", 0), ("window_context", "long"), ("hybrid_weights", "some"),
    ):  # fmt: skip
        with pytest.raises(KvlibError, match=f"parameter {name}"):
            memory.check_parameters(**{**MEMORY, name: bad})
    with pytest.raises(KvlibError, match="parameter hybrid_model: tiny has no sliding-window layers"):
        memory.check_parameters(**{**MEMORY, "hybrid_model": "tiny"})
    with pytest.raises(KvlibError, match=r"max\(hybrid_ratio_at\) \(with 0 new tokens\) = 300"):
        memory.check_parameters(**{**MEMORY, "hybrid_ratio_at": [16, 300]})
    with pytest.raises(KvlibError, match=r"max\(seq_lens\) \+ breakdown_new_tokens = 256 \+ 4"):
        memory.check_parameters(**{**MEMORY, "seq_lens": [16, 256]})


def _fake_lm(weight_bytes=1000, n_positions=256):
    cfg = dataclasses.replace(TINY, n_positions=n_positions)
    model = SimpleNamespace(weight_bytes=lambda: weight_bytes)
    return SimpleNamespace(cfg=cfg, dtype=torch.float32, dtype_name="float32", model=model, weights="random")


def _measured(held_extra=0):
    per_token = TINY.kv_bytes_per_token(4)  # 2 x 2 layers x 4 kv heads x 16 x 4 bytes = 1024
    rows = []
    for b in (1, 2):
        for t in (4, 8):
            formula = per_token * b * t
            held = formula + (held_extra if (b, t) == (2, 8) else 0)
            sizes = dict(held_bytes=held, formula_bytes=formula, held_mib=held / 2**20, formula_mib=formula / 2**20)
            rows.append(dict(layout="static", batch_size=b, tokens=t, **sizes, held_over_formula=held / formula))
    return pd.DataFrame(rows)


def test_cache_bytes_sentence_says_exact_or_the_largest_ratio():
    lm = _fake_lm()
    text = memory.cache_bytes_sentence(_measured(), lm)
    assert text.startswith("In **4 of 4** configurations the bytes held equal the formula exactly. One token of ")
    assert "**1.0 KiB**" in text and "= 1,024 bytes)" in text and "batch 2 x 8 tokens" in text
    text = memory.cache_bytes_sentence(_measured(held_extra=8192), lm)
    assert "In **3 of 4** configurations" in text and "; the largest ratio is 1.500." in text
    row = memory.cache_bytes_headline(_measured(), lm)
    assert row["metric"] == "kv_mib_per_token" and row["value"] == 1024 / 2**20 and row["headline"] is True


def _breakdown(weights, packed, cache, rest, peak):
    parts = {"weights": weights, "packed weight copy": packed, "KV cache": cache, "rest": rest}
    return pd.DataFrame(
        [dict(component=k, bytes=v, mib=v / 2**20, peak_kind="rss", peak_bytes=peak, layout="static", batch_size=2,
              prompt_len=64, new_tokens=4) for k, v in parts.items()]
    )  # fmt: skip


def test_breakdown_sentence_names_the_packed_copy_only_when_held_and_a_missed_peak():
    lm, mib = _fake_lm(weight_bytes=2**20), 2**20
    text = memory.breakdown_sentence(_breakdown(mib, 0, mib // 4, 10 * mib, 12 * mib), lm, 1024)
    assert "packed copy" not in text and "not measured" not in text
    assert "the cache outweighs the weights once batch x length exceeds **1,024 tokens** (e.g. batch 4 at the " in text
    text = memory.breakdown_sentence(_breakdown(mib, mib // 2, mib // 4, 0, mib), lm, 1024)
    assert "kvlib's CPU fast path also holds a packed copy of the weights for its kernels: 0.5 MiB; " in text
    assert "add up to more than the measured peak of 1 MiB" in text and "shown as 0, not measured" in text
    rows = {r["metric"]: r["value"] for r in memory.breakdown_headlines(lm, 1024)}
    assert rows == {"weights_mib": 1.0, "cache_equals_weights_tokens": 1024.0}
    assert memory.breakdown_layout(["dynamic", "static"]) == REFERENCE  # the reference layout when measured
    assert memory.breakdown_layout(["dynamic"]) == "dynamic"


def test_hybrid_section_on_a_real_model():
    hlm = load("tiny-gemma", weights="random", seed=0, with_hf=False)
    computed, measured = memory_windows.hybrid_bytes(hlm, TINY_GEMMA, [4, 8, 9, 20], 256, [16, 64, 256], 0)
    grid = memory_windows.hybrid_grid(TINY_GEMMA, 256, [16, 64, 256], [4, 8, 9, 20])
    assert grid == sorted(set(grid)) and grid[-1] == 256 and {4, 8, 9, 16, 20, 64, 256} <= set(grid)  # window 8, 8 + 1
    assert sorted(set(computed["tokens"])) == grid and len(grid) > 40
    summary = memory_windows.hybrid_summary(computed, [16, 64, 256])
    assert summary["tokens"].tolist() == [16, 64, 256]
    assert summary["hybrid / full"].tolist() == [(8 * 3 + t) / (4 * t) for t in (16, 64, 256)]  # 3 sliding layers
    rows = memory_windows.hybrid_headlines(computed, measured, TINY_GEMMA, [16, 64, 256])
    assert [r["headline"] for r in rows] == [False, False, True]
    assert rows[0]["note"].endswith("measured == formula in 8 of 8 caches")
    text = memory_windows.hybrid_sentence(computed, measured, TINY_GEMMA, [16, 64, 256])
    assert text.startswith("3 of tiny-gemma's 4 layers slide over a window of 8 tokens; the other 1 attend to every")
    assert "In **8 of 8** measured caches the bytes held equal the per-layer formula exactly." in text
    assert "Measured after 20 tokens, the hybrid cache holds " in text and "(55.0%)" in text  # (24 + 20) / 80
    assert "so the ratio tends to 25.0% (their share of the layers)" in text
    assert "random weights: the bytes a cache holds" in memory_windows.hybrid_caption(TINY_GEMMA, hlm)
    off = measured.assign(held_bytes=measured["held_bytes"] + (measured["tokens"] == 20), held_over_formula=1.25)
    assert "(largest ratio 1.250)." in memory_windows.hybrid_sentence(computed, off, TINY_GEMMA, [16, 64, 256])


def test_windowed_sentence_picks_the_largest_saving_and_shorter_contexts():
    windowed = costs.kv_bytes_table(bytes_per_element=2, context_tokens=32768)
    text = memory_windows.windowed_sentence(windowed, 32768)
    best = windowed[windowed["n_sliding_layers"] > 0].sort_values("windowed_over_full").iloc[0]
    assert best["architecture"] == "Mistral-7B-v0.1" and "the window saves most on **Mistral-7B-v0.1**" in text
    assert "with its window on every layer" not in text  # the best one: not named twice
    assert "Gemma-2-2B " in text and "(at its 8,192-token context)" in text  # Gemma 2's own context is shorter
    shorter = costs.kv_bytes_table(bytes_per_element=2, context_tokens=8192)
    text = memory_windows.windowed_sentence(shorter, 8192)
    assert "the window saves most on **Gemma-3-" in text and "at its" not in text  # no model's context is shorter
    assert "Mistral-7B-v0.1, with its window on every layer, keeps 50.0%. " in text  # 4096 of 8192 tokens
    table = memory_windows.windowed_table(windowed)
    assert "full cache (GiB)" in table and (table["sliding_window"] > 0).all()


def test_budget_sentence_says_whether_the_published_model_fits():
    arch = memory.architectures()
    assert (arch["kv_kib_per_token"] == arch["kv_bytes_per_token"] / 1024).all()
    lm = _fake_lm(weight_bytes=2**20, n_positions=256)
    fits = memory.context_fits(lm, 16.0, [1, 8], 1024, arch)
    text = memory.budget_sentence(fits, lm, 16.0)
    assert text.startswith("In 16 GiB, after its 1 MiB of weights, tiny has room for **")
    assert "at batch 1 the limit is: **context length**" in text
    assert "For Llama-3-8B in 16-bit the weights alone take 15.0 GiB" in text
    small = memory.context_fits(lm, 1.0, [1], 1024, arch)
    text = memory.budget_sentence(small, lm, 1.0)
    assert "Llama-3-8B does not fit in 1 GiB in 16-bit: its weights alone take 15.0 GiB." in text
    assert " per sequence at batch" not in text  # one batch size: no second one to name
    row = memory.budget_headline(fits, lm, 16.0)
    assert row["label"] == "Longest context in 16 GiB, batch 1, memory only"
    assert row["value"] == (16 * 2**30 - 2**20) // 1024
    pivot = memory.budget_table(fits, "float32")
    assert "tiny (float32, measured)" in pivot.index and list(pivot.columns) == [1, 8]
