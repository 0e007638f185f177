"""The per-layer KV-cache formula of models with sliding-window layers (Gemma 3): by hand, against the bytes the
caches hold (kvlib's hybrid layout and Hugging Face's caches on Gemma 3), and the published-architectures table
with its window column, checked against the installed transformers' own configs."""

from __future__ import annotations

import pytest
import torch

from kvlib.caches.base import CACHE_LAYOUTS
from kvlib.core.config import get_preset
from kvlib.core.errors import KvlibError
from kvlib.measure.memory import cache_tokens, held_cache_bytes, kv_cache_bytes_formula, layer_slots, layer_windows
from kvlib.study import costs

TINY_GEMMA = get_preset("tiny-gemma")  # 4 layers: sliding, sliding, full, sliding; window 8; 2 kv heads of 32
GEMMA = get_preset("gemma3-270m")  # 18 layers, full at 5, 11, 17; window 512; 1 kv head of 256
needs_hybrid = pytest.mark.skipif("hybrid" not in CACHE_LAYOUTS, reason="the hybrid layout is not registered yet")


def test_layer_windows_and_slots_by_hand():
    assert layer_windows(TINY_GEMMA) == [8, 8, None, 8]
    assert layer_windows(get_preset("tiny")) == [None, None]
    assert layer_slots(TINY_GEMMA, 20, "hybrid") == [8, 8, 20, 8]
    assert layer_slots(TINY_GEMMA, 5, "hybrid") == [5, 5, 5, 5]  # shorter than the window: every token
    assert layer_slots(TINY_GEMMA, 20, "static") == [20] * 4  # a full layout keeps every token everywhere
    assert layer_slots(TINY_GEMMA, 20) == [20] * 4
    assert layer_slots(TINY_GEMMA, 20, "dynamic", engine="hf") == [7, 7, 20, 7]  # HF keeps window - 1
    assert layer_slots(TINY_GEMMA, 20, "static", engine="hf") == [8, 8, 20, 8]
    assert layer_slots(get_preset("tiny"), 20, "hybrid") == [20, 20]  # no sliding layers: nothing changes


def test_formula_by_hand():
    # one slot of one layer: 2 (K, V) x batch 3 x 2 kv heads x head_dim 32 x 4 bytes = 1536 bytes
    assert kv_cache_bytes_formula(TINY_GEMMA, 3, 20, torch.float32, "hybrid") == 1536 * (8 + 8 + 20 + 8)
    assert kv_cache_bytes_formula(TINY_GEMMA, 3, 20, "float32") == 1536 * 4 * 20  # a full cache of the same shape
    assert kv_cache_bytes_formula(TINY_GEMMA, 3, 20, "bfloat16", "hybrid") == 768 * 44
    assert kv_cache_bytes_formula(TINY_GEMMA, 3, 0, "float32", "hybrid") == 0
    # Gemma 3 270M at 32K tokens: 15 sliding layers keep 512, 3 full layers keep 32768; one slot of one layer is
    # 2 x 1 kv head x 256 x 4 bytes = 2 KiB
    hybrid = kv_cache_bytes_formula(GEMMA, 1, 32768, "float32", "hybrid")
    full = kv_cache_bytes_formula(GEMMA, 1, 32768, "float32")
    assert hybrid == 2048 * (15 * 512 + 3 * 32768) and full == 2048 * 18 * 32768
    assert hybrid / full == pytest.approx(0.1796875)
    assert full == GEMMA.kv_bytes_per_token(4) * 32768  # the full formula is the familiar per-token one


def test_cache_tokens_of_the_hybrid_layout():
    assert cache_tokens("kvlib", "hybrid", 10, 5) == 15  # preallocated like static (full layers: P + N slots)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((TINY_GEMMA, 1, 4, "float32"), {"layout": 3}),
        ((TINY_GEMMA, 1, 4, "float32"), {"layout": ""}),
        ((TINY_GEMMA, 1, 4, "float32"), {"engine": "vllm"}),
        ((TINY_GEMMA, 1, -1, "float32"), {"layout": "hybrid"}),
        (("tiny-gemma", 1, 4, "float32"), {"layout": "hybrid"}),
    ],
)
def test_formula_refuses_bad_arguments(args, kwargs):
    with pytest.raises(KvlibError):
        kv_cache_bytes_formula(*args, **kwargs)


# ---- Hugging Face's caches on a Gemma 3 of tiny-gemma's shape hold what the formula says ---------------------


@pytest.fixture(scope="module")
def hf_tiny_gemma():
    from transformers import Gemma3ForCausalLM

    from kvlib.core.config import hf_config_from

    torch.manual_seed(0)
    return Gemma3ForCausalLM(hf_config_from(TINY_GEMMA)).eval()


@pytest.mark.parametrize(("prompt", "new"), [(5, 2), (6, 9), (21, 4)])  # within, across and well past the window
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_formula_equals_held_hf_gemma(hf_tiny_gemma, cache, prompt, new):
    ids = torch.randint(0, TINY_GEMMA.vocab_size, (2, prompt), generator=torch.Generator().manual_seed(1))
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.inference_mode():
        out = hf_tiny_gemma.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
            return_dict_in_generate=True, pad_token_id=0, **extra,
        )  # fmt: skip
    tokens = cache_tokens("hf", cache, prompt, new)
    held = held_cache_bytes(out.past_key_values)
    assert held == kv_cache_bytes_formula(TINY_GEMMA, 2, tokens, torch.float32, cache, engine="hf") > 0
    if tokens > TINY_GEMMA.sliding_window:  # the window really saved something
        assert held < kv_cache_bytes_formula(TINY_GEMMA, 2, tokens, torch.float32)


def test_hf_dynamic_sliding_layers_keep_views_of_larger_tensors(hf_tiny_gemma):
    """What HF's DynamicCache keeps alive on a sliding layer is more than the window - 1 keys it shows: right after
    the prefill the whole prompt (the slice is a view into it), after a decode step the window."""
    from kvlib.measure.memory import held_storage_bytes

    ids = torch.randint(0, TINY_GEMMA.vocab_size, (1, 21), generator=torch.Generator().manual_seed(3))
    per_slot = 2 * 2 * 32 * 4  # K and V, 2 kv heads of 32, float32: one token of one layer
    for new, sliding_slots in ((1, 21), (4, 8)):  # 1 new token: no decode step yet
        with torch.inference_mode():
            out = hf_tiny_gemma.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                return_dict_in_generate=True, pad_token_id=0,
            )  # fmt: skip
        tokens = 21 + new - 1
        assert held_cache_bytes(out.past_key_values) == per_slot * (3 * 7 + tokens)  # what the views show
        assert held_storage_bytes(out.past_key_values) == per_slot * (3 * sliding_slots + tokens)  # what they keep


def test_kvlib_caches_hold_no_hidden_storage():
    from kvlib.caches.base import make_cache
    from kvlib.measure.memory import held_storage_bytes

    for layout in ("static", "dynamic") + (("hybrid",) if "hybrid" in CACHE_LAYOUTS else ()):
        cache = make_cache(layout, TINY_GEMMA, 2, 30, "cpu", torch.float32)
        if layout == "dynamic":
            for layer in range(TINY_GEMMA.n_layer):
                k = torch.zeros(2, 2, 30, 32)
                cache.update(layer, k, k.clone(), 0)
        assert held_storage_bytes(cache) == held_cache_bytes(cache) > 0, layout


# ---- kvlib's hybrid layout holds what the formula says (once the layout exists) -----------------------------


@pytest.fixture(scope="module")
def tiny_gemma():
    from kvlib.models.loading import load

    return load("tiny-gemma", weights="random")


@needs_hybrid
@pytest.mark.parametrize(("batch", "prompt", "new"), [(1, 3, 2), (2, 8, 1), (3, 9, 12), (2, 20, 17)])
def test_formula_equals_held_kvlib_hybrid(tiny_gemma, batch, prompt, new):
    from kvlib.models.decode import generate
    from kvlib.models.prompts import synthetic_prompts

    ids = synthetic_prompts(TINY_GEMMA.vocab_size, batch, prompt, seed=2)
    g = generate(tiny_gemma.model, ids, new, cache="hybrid")
    tokens = cache_tokens("kvlib", "hybrid", prompt, new)
    assert held_cache_bytes(g.cache) == kv_cache_bytes_formula(TINY_GEMMA, batch, tokens, torch.float32, "hybrid")


@needs_hybrid
def test_measured_cache_bytes_of_hybrid_and_static(tiny_gemma):
    df = costs.measured_cache_bytes(tiny_gemma, ["static", "hybrid"], [1, 2], [4, 8, 9, 30])
    assert len(df) == 16 and (df["held_bytes"] == df["formula_bytes"]).all()
    h = df[(df["layout"] == "hybrid") & (df["batch_size"] == 1)].set_index("tokens")["held_bytes"]
    s = df[(df["layout"] == "static") & (df["batch_size"] == 1)].set_index("tokens")["held_bytes"]
    assert h[4] == s[4] and h[8] == s[8]  # within the window the two hold the same
    assert h[9] < s[9] and h[30] < s[30] and h[30] - h[9] == (30 - 9) * 2 * 2 * 32 * 4  # then only the full layer grows


# ---- the published-architectures table -----------------------------------------------------------------------


def test_table_windowed_bytes_by_hand():
    t = costs.kv_bytes_table(bytes_per_element=2, context_tokens=32768).set_index("architecture")
    # Mistral-7B-v0.1: window 4096 on all 32 layers, so at 32K the cache is 8x smaller (the Mistral paper's figure)
    assert t.loc["Mistral-7B-v0.1", "sliding_window"] == 4096 and t.loc["Mistral-7B-v0.1", "n_global_layers"] == 0
    assert t.loc["Mistral-7B-v0.1", "windowed_over_full"] == pytest.approx(1 / 8)
    # Gemma 3 27B: 62 layers, every sixth global (10), 16 kv heads of 128, window 1024
    per = 2 * 16 * 128 * 2
    g = t.loc["Gemma-3-27B"]
    assert (g["n_global_layers"], g["n_sliding_layers"]) == (10, 52)
    assert g["kv_bytes_global_layers"] == 10 * per * 32768 and g["kv_bytes_sliding_layers"] == 52 * per * 1024
    assert g["kv_bytes_full_cache"] == 62 * per * 32768
    # Gemma 2: half the layers local, window 4096, and a context of 8192: the table stops there, not at 32K
    assert t.loc["Gemma-2-9B", "context_tokens"] == 8192
    assert t.loc["Gemma-2-9B", "windowed_over_full"] == pytest.approx(0.5 + 0.5 * 4096 / 8192)
    # Llama has no window: ratio 1
    assert t.loc["Llama-3-8B", "windowed_over_full"] == 1 and t.loc["Llama-3-8B", "sliding_window"] == 0
    # own context (None): Gemma-3-1B at 32768 positions
    own = costs.kv_bytes_table(bytes_per_element=2).set_index("architecture")
    assert own.loc["Gemma-3-1B", "context_tokens"] == 32768 and own.loc["Gemma-3-4B", "context_tokens"] == 131072
    assert own["config_source"].str.len().gt(10).all()


def test_table_windows_short_context():
    """Below the window a sliding layer holds every token: no saving."""
    t = costs.kv_bytes_table(bytes_per_element=2, context_tokens=512).set_index("architecture")
    assert (t["windowed_over_full"] == 1).all()


def test_table_refuses_bad_context():
    with pytest.raises(KvlibError):
        costs.kv_bytes_table(2, context_tokens=0)


def test_table_rows_match_the_installed_transformers():
    """The rows the table says come from transformers' config defaults agree with the installed version."""
    from transformers import Gemma2Config, Gemma3TextConfig, MistralConfig

    t = costs.kv_bytes_table(bytes_per_element=2).set_index("architecture")
    rows = {a.cfg.name: a for a in costs.PUBLISHED}
    for name, hf in (("Gemma-2-2B", Gemma2Config()), ("Mistral-7B-v0.1", MistralConfig())):
        row = t.loc[name]
        assert (row["n_layer"], row["n_head"], row["n_kv_head"], row["head_dim"], row["sliding_window"]) == (
            hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim, hf.sliding_window,
        )  # fmt: skip
    assert list(rows["Gemma-2-2B"].layer_types) == Gemma2Config().layer_types  # local first, alternating
    for name, n in (("Gemma-3-1B", 26), ("Gemma-3-4B", 34), ("Gemma-3-12B", 48), ("Gemma-3-27B", 62)):
        assert list(rows[name].layer_types) == Gemma3TextConfig(num_hidden_layers=n).layer_types
    # the study's own preset: the pattern HF derives is the one its config holds
    assert costs.layer_pattern(18, 6) == GEMMA.layer_types == rows["gemma3-270m"].layer_types


def test_runtimes_cite_a_source():
    assert {r["runtime"].split(" (")[0].split(",")[0] for r in costs.SLIDING_RUNTIMES} >= {
        "Hugging Face transformers",
        "vLLM",
        "llama.cpp",
    }
    assert all(r["source"] for r in costs.SLIDING_RUNTIMES)


def test_max_context_tokens_windowed_by_hand():
    f = costs.max_context_tokens_windowed
    # 1 global + 3 sliding layers of window 8, 10 bytes per token per layer, budget leaves 1000 bytes
    assert f(1100, 100, 10, 1, 3, 8) == 100 - 3 * 8  # past the window: 3 x 8 fixed, the rest on the global layer
    assert f(1100, 100, 10, 1, 3, 50) == 25  # within the window every layer holds every token: 1000 / (4 x 10)
    assert f(1100, 100, 10, 1, 3, 8, batch_size=2) == 50 - 24
    assert f(100, 200, 10, 1, 3, 8) == 0  # the weights alone exceed the budget
    assert f(1100, 100, 10, 0, 4, 8, context_limit=4096) == 4096  # no global layer: memory stops growing
    assert f(1100, 100, 10, 4, 0, 8) == costs.max_context_tokens(1100, 100, 40)  # no sliding layer: the old rule
    with pytest.raises(KvlibError):
        f(1100, 100, 10, 0, 0, 8)


def test_context_budget_has_windowed_rows():
    arch = costs.kv_bytes_table(bytes_per_element=2)
    fits = costs.context_budget(16 * 2**30, [1], "tiny", 1e6, 1024, 256, architectures=arch).set_index("model")
    assert "Mistral-7B-v0.1 (windowed cache)" in fits.index and "Llama-3-8B (windowed cache)" not in fits.index
    m, w = fits.loc["Mistral-7B-v0.1"], fits.loc["Mistral-7B-v0.1 (windowed cache)"]
    assert m["limited_by"] == "memory" and w["limited_by"] == "context length" and w["max_tokens"] == 32768
    g, gw = fits.loc["gemma3-270m"], fits.loc["gemma3-270m (windowed cache)"]
    assert gw["max_tokens_memory"] > g["max_tokens_memory"]  # the window leaves room for a longer context


# ---- `run` on a model with sliding layers -------------------------------------------------------------------


def test_run_defaults_to_the_hybrid_cache_on_gemma():
    from kvlib.measure.harness import resolve_cache

    assert (
        resolve_cache("kvlib", 1, None, "tiny-gemma") == "hybrid" == resolve_cache("kvlib", None, None, "gemma3-270m")
    )
    assert resolve_cache("kvlib", 1, None, "tiny-llama") == "static" and resolve_cache("hf", 1, None, "tiny-gemma") == (
        "dynamic"
    )
    assert resolve_cache("kvlib", 1, "static", "tiny-gemma") == "static"  # an explicit --cache wins
    assert resolve_cache("kvlib", 1, None, "no-such-model") == "static"  # validation reports the bad name later


@needs_hybrid
@pytest.mark.parametrize("engine", ["kvlib", "hf"])
def test_run_on_tiny_gemma_holds_the_per_layer_formula(tmp_path, engine):
    import pandas as pd

    from kvlib.cli import main

    csv = tmp_path / "runs.csv"
    argv = ["run", "--model", "tiny-gemma", "--weights", "random", "--engine", engine, "--prompt_len", "20"]
    argv += ["--max_new_tokens", "6", "--repeats", "1", "--warmup", "0", "--no-roofline", "--csv", str(csv)]
    assert main(argv) == 0
    r = pd.read_csv(csv).iloc[0]
    assert r["cache"] == ("hybrid" if engine == "kvlib" else "dynamic")
    per_layer = kv_cache_bytes_formula(TINY_GEMMA, 1, int(r["kv_cache_tokens"]), "float32", r["cache"], engine)
    assert r["kv_cache_bytes"] == per_layer


@needs_hybrid
def test_harness_formula_column_is_per_layer_on_gemma(tmp_path):
    import pandas as pd

    from kvlib.cli import main

    csv = tmp_path / "runs.csv"
    argv = ["run", "--model", "tiny-gemma", "--weights", "random", "--engine", "kvlib", "--prompt_len", "20"]
    argv += ["--max_new_tokens", "6", "--repeats", "1", "--warmup", "0", "--no-roofline", "--csv", str(csv)]
    assert main(argv) == 0
    r = pd.read_csv(csv).iloc[0]
    assert r["kv_cache_bytes"] == r["kv_cache_bytes_formula"]


def test_decode_step_bytes_read_only_the_window_on_sliding_layers(tmp_path):
    """Regression: the harness counted every cached key as read at each decode step (the full-cache bytes per
    token), overstating MBU on Gemma 3, whose sliding layers read at most their window."""
    import pandas as pd

    from kvlib.cli import main
    from kvlib.measure.memory import bytes_per_element
    from kvlib.measure.roofline import decode_weight_bytes

    csv = tmp_path / "runs.csv"
    P, N = 20, 6
    argv = ["run", "--model", "tiny-gemma", "--weights", "random", "--engine", "kvlib", "--prompt_len", str(P)]
    argv += ["--max_new_tokens", str(N), "--repeats", "1", "--warmup", "0", "--no-roofline", "--csv", str(csv)]
    assert main(argv) == 0
    r = pd.read_csv(csv).iloc[0]
    per_slot = 2 * TINY_GEMMA.n_kv_head * TINY_GEMMA.head_dim * bytes_per_element("float32")
    windows = [TINY_GEMMA.window_of(i) for i in range(TINY_GEMMA.n_layer)]
    read = [sum(P + s if w is None else min(P + s, w) for w in windows) * per_slot for s in range(1, N)]
    expected = decode_weight_bytes(TINY_GEMMA, 1, "float32") + sum(read) / len(read)
    assert r["decode_step_bytes"] == round(expected)
    full = decode_weight_bytes(TINY_GEMMA, 1, "float32") + TINY_GEMMA.kv_bytes_per_token(4) * (P + N / 2)
    assert r["decode_step_bytes"] < full


def test_attention_flops_count_the_window():
    """Counted work (notebook 01): a query on a sliding layer reads at most the window's keys."""
    for window in (None, 1, 5, 8, 40):
        for start in (0, 3, 7, 8, 30):
            for n in (0, 1, 2, 9, 25):
                brute = sum(p + 1 if window is None else min(p + 1, window) for p in range(start, start + n))
                assert costs.keys_seen(n, start, window) == brute, (window, start, n)
    # tiny-gemma: 3 sliding layers (window 8) and 1 full; 4 heads of 32; one query at position 20
    assert costs.attention_flops(TINY_GEMMA, 1, 20) == 4 * 32 * 4 * (3 * 8 + 21)
    assert costs.attention_flops(get_preset("tiny"), 1, 20) == 4 * 16 * 4 * 2 * 21  # no window: every key
