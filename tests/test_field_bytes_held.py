"""Issue 22, kind 5 (wrong numbers): the bytes a cache holds come from the cache, never from a guess by its name.

`python -m kvlib perplexity --cache hybrid --method fast` reported a full cache's bytes (131,072 on tiny-gemma) where
the token-by-token method, reading the cache itself, reported 45,056: the one-pass method guessed bytes from the
layout's name, and every name it did not know (hybrid, paged, the eviction policies) counted as full. Now every
layout answers for itself: `used_bytes()` on a cache, `used_bytes_after(...)` (the same rule, without a cache) for a
computation that fills none. These tests sweep every registered layout (the registry, not a list written here) on
the three tiny architectures, with options small enough that windows slide, budgets evict and quantized groups fill,
and skip only what a layout itself refuses with its own error."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import kvlib.caches  # noqa: F401  (registers every layout)
from kvlib.caches.base import CACHE_LAYOUTS, layout_options, make_cache
from kvlib.cli import main
from kvlib.core.errors import KvlibError
from kvlib.measure.perplexity import perplexity
from kvlib.models.decode import generate
from kvlib.models.loading import load

ARCHS = ("tiny", "tiny-llama", "tiny-gemma")  # GPT-2, Llama, Gemma 3 (sliding-window layers)
N = 24  # tokens scored: past the small windows and budgets below
# Small values by option name (whatever layout has the option), so that every lossy layout keeps fewer than N
SMALL = {"budget": 10, "sink": 2, "window": 8, "residual_len": 4, "observation": 4, "block_size": 4}


def option_sets(layout: str, head_dim: int) -> list[dict]:
    """The layout's options at the small values above, and a second set with its other storage choices (int4,
    per-channel keys, groups of channels) where it has them."""
    names = set(layout_options(layout))
    small = {k: v for k, v in SMALL.items() if k in names}
    other = {"bits": 4, "key_axis": "channel", "group": head_dim // 2, "rotate": True}
    other = {k: v for k, v in other.items() if k in names}
    return [small, {**small, **other}] if other else [small]


CASES = [
    pytest.param(arch, layout, i, id=f"{arch}-{layout}-{i}")
    for arch in ARCHS
    for layout in CACHE_LAYOUTS
    for i in range(2 if {"bits", "key_axis"} & set(layout_options(layout)) else 1)
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    return {arch: load(arch, weights="random", seed=0, with_hf=False).model for arch in ARCHS}


@pytest.fixture(scope="module")
def models_in():
    """(arch, dtype name) -> the model, loaded once."""
    loaded = {}

    def get(arch: str, dtype: str):
        if (arch, dtype) not in loaded:
            loaded[arch, dtype] = load(arch, weights="random", seed=0, dtype=dtype, with_hf=False).model
        return loaded[arch, dtype]

    return get


def formula_or_skip(layout: str, cfg, n_tokens: int, dtype: torch.dtype, batch_size: int, opts: dict) -> int:
    """The layout's own formula; a skip only when the layout refuses this model or these options with its own
    error, the same one making the cache raises."""
    try:
        return CACHE_LAYOUTS[layout].used_bytes_after(cfg, n_tokens, dtype, batch_size, **opts)
    except KvlibError as e:
        with pytest.raises(KvlibError) as made:
            make_cache(layout, cfg, batch_size, n_tokens, "cpu", dtype, **opts)
        assert str(made.value) == str(e)
        pytest.skip(f"{layout} refuses {cfg.name}: {e}")


@pytest.mark.parametrize(("arch", "layout", "variant"), CASES)
def test_both_perplexity_methods_report_the_bytes_the_cache_holds(models, arch, layout, variant):
    model = models[arch]
    cfg, dtype = model.cfg, model.wte.weight.dtype
    opts = option_sets(layout, cfg.head_dim)[variant]
    formula = formula_or_skip(layout, cfg, N, dtype, 1, opts)
    ids = torch.randint(0, cfg.vocab_size, (1, N), generator=torch.Generator().manual_seed(1))
    token = perplexity(model, ids, layout, opts, "token")  # reads the cache object's used_bytes()
    assert token.kv_bytes_held == formula
    try:
        fast = perplexity(model, ids, layout, opts, "fast")
    except KvlibError as e:  # the one-pass method has no mask for this layout here: its own refusal, not a guess
        assert "method fast" in str(e) and "use method token" in str(e)
    else:
        assert fast.kv_bytes_held == token.kv_bytes_held == formula


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(("arch", "layout", "variant"), CASES)
def test_used_bytes_of_a_batch_after_prefill_and_decode_is_the_layouts_formula(models_in, arch, layout, variant, dtype):
    """The cache object after a real generation (a prompt written at once, then one token per step, batch 2),
    against the formula, in two dtypes (scales and tails are stored in the cache's dtype)."""
    model = models_in(arch, str(dtype).removeprefix("torch."))
    cfg = model.cfg
    opts = option_sets(layout, cfg.head_dim)[variant]
    P, new = 12, 6
    formula = formula_or_skip(layout, cfg, P + new - 1, dtype, 2, opts)  # the last new token is never written
    ids = torch.randint(0, cfg.vocab_size, (2, P), generator=torch.Generator().manual_seed(2))
    g = generate(model, ids, new, cache=layout, cache_options=opts)
    assert g.cache.used_bytes() == formula


def test_the_sweep_reaches_layouts_that_hold_less_than_a_full_cache(models):
    """Guards the sweep itself: with these options the layouts really differ from the dense rule (else the tests
    above would pass even if every layout were counted as full, the bug)."""
    less = set()
    for arch, model in models.items():
        cfg = model.cfg
        dense = N * cfg.kv_bytes_per_token(4)
        for layout in CACHE_LAYOUTS:
            for opts in option_sets(layout, cfg.head_dim):
                try:
                    held = CACHE_LAYOUTS[layout].used_bytes_after(cfg, N, torch.float32, **opts)
                except KvlibError:
                    continue
                assert held <= dense
                if held < dense:
                    less.add((arch, layout))
    lossy = {name for name, cls in CACHE_LAYOUTS.items() if not cls.exact}
    assert lossy <= {layout for _, layout in less}  # every lossy layout holds less somewhere
    assert ("tiny-gemma", "hybrid") in less  # and the exact hybrid layout on a model with sliding layers


def test_perplexity_command_hybrid_fast_reports_the_hybrid_bytes_regression_issue22(tmp_path, capsys):
    """The report: `perplexity --model tiny-gemma --cache hybrid --method fast` printed and wrote 131,072 bytes held
    (a full cache) where the token-by-token method holds 45,056."""
    csv = tmp_path / "ppl.csv"
    for method in ("fast", "token"):
        args = ["perplexity", "--model", "tiny-gemma", "--weights", "random", "--cache", "hybrid"]
        assert main([*args, "--method", method, "--tokens", "64", "--csv", str(csv)]) == 0
        assert "KV held 45,056 bytes" in capsys.readouterr().out
    df = pd.read_csv(csv)
    assert df["kv_bytes_held"].tolist() == [45_056, 45_056] and (df["cache"] == "hybrid").all()


@pytest.mark.parametrize("layout", list(CACHE_LAYOUTS))
def test_perplexity_command_rows_hold_the_layouts_bytes_for_every_method(tmp_path, capsys, layout):
    """Through the command line (default options, tiny-gemma, 80 tokens: its sliding window of 8 slides): the row
    of each method that runs holds the layout's formula; a method or layout that refuses says so in one line."""
    csv = tmp_path / "ppl.csv"
    cfg = load("tiny-gemma", weights="random", with_hf=False).cfg
    formula = formula_or_skip(layout, cfg, 80, torch.float32, 1, {})
    ran = []
    for method in ("token", "fast"):
        args = ["perplexity", "--model", "tiny-gemma", "--weights", "random", "--cache", layout, "--tokens", "80"]
        code = main([*args, "--method", method, "--csv", str(csv)])
        err = capsys.readouterr().err
        if code == 0:
            ran.append(method)
        else:
            assert code == 2 and method == "fast" and err.count("error:") == 1 and "Traceback" not in err
    assert "token" in ran
    assert pd.read_csv(csv)["kv_bytes_held"].tolist() == [formula] * len(ran)


def test_the_formula_checks_its_arguments_as_the_layout_does():
    cfg = load("tiny-llama", weights="random", with_hf=False).cfg
    for layout, opts, match in (
        ("window", {"windw": 4}, "windw"),
        ("quantized", {"bits": 3}, "bits"),
        ("static", {}, "n_tokens"),
    ):
        n = -1 if layout == "static" else 8
        with pytest.raises(KvlibError, match=match):
            CACHE_LAYOUTS[layout].used_bytes_after(cfg, n, torch.float32, **opts)
