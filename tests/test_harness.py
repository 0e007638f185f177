"""The harness: exact token counts, every column present and typed, interleaved repeats, honest derived figures,
memory formula == held bytes, models loaded once, bad specs refused before any work, OOM named."""

from __future__ import annotations

import re
from datetime import datetime

import pandas as pd
import pytest
import torch

import kvlib.measure.harness as harness
from kvlib.core.errors import KvlibError
from kvlib.measure.harness import RUN_COLUMNS, STEP_COLUMNS, RunSpec, measure, measure_grid
from kvlib.measure.provenance import provenance

KINDS = {int: pd.api.types.is_integer_dtype, float: pd.api.types.is_float_dtype, str: pd.api.types.is_string_dtype}


@pytest.fixture(autouse=True)
def no_roofline(monkeypatch):
    monkeypatch.setenv("KVLIB_NO_ROOFLINE", "1")  # tests don't need the machine's bandwidth; keep them quick


@pytest.fixture(scope="module")
def grid():
    """Every engine and cache mode on tiny, batch 2, 2 repeats: shared by the tests that only read results."""
    specs = [
        RunSpec(engine, cache, batch_size=2, prompt_len=7, max_new_tokens=5)
        for engine in ("kvlib", "hf")
        for cache in ("none", "dynamic", "static")
    ]
    return measure_grid(specs, repeats=2, warmup=0, roofline=False)


def test_every_column_present_and_typed(grid):
    assert list(grid.runs.columns) == list(RUN_COLUMNS)
    assert list(grid.steps.columns) == list(STEP_COLUMNS)
    for df, columns in ((grid.runs, RUN_COLUMNS), (grid.steps, STEP_COLUMNS)):
        for name, kind in columns.items():
            assert KINDS[kind](df[name]), f"{name} is {df[name].dtype}, expected {kind.__name__}"
    unmeasured = ["peak_mem_reserved_mib", "bandwidth_bytes_per_s", "matmul_flops_per_s", "floor_step_s", "mbu"]
    assert grid.runs.drop(columns=unmeasured).notna().all().all()  # CUDA only / roofline off: NaN; all else set


def test_exact_token_counts_and_steps(grid):
    runs, steps = grid.runs, grid.steps
    assert len(runs) == 6 * 2
    assert (runs.tokens_generated == 2 * 5).all()
    per_run = steps.groupby(["spec_id", "repeat"]).size()
    assert len(per_run) == 12 and (per_run == 5 - 1).all()
    assert sorted(steps.position.unique()) == [7, 8, 9, 10]  # tokens already in the sequence: P + step
    assert (steps.position == steps.prompt_len + steps.step).all()


def test_derived_figures_follow_their_definitions(grid):
    r, s = grid.runs, grid.steps
    assert r.total_time_s.to_numpy() == pytest.approx((r.ttft_s + r.decode_time_s).to_numpy())
    assert r.tokens_per_s.to_numpy() == pytest.approx((r.tokens_generated / r.total_time_s).to_numpy())
    assert r.decode_tokens_per_s.to_numpy() == pytest.approx((2 * 4 / r.decode_time_s).to_numpy())
    assert (r.p50_latency_s == r.tpot_p50_s).all()
    assert (r.tpot_p50_s <= r.tpot_p90_s).all() and (r.tpot_p90_s <= r.tpot_p99_s).all()
    sums = s.groupby(["spec_id", "repeat"]).latency_s.sum()
    meds = s.groupby(["spec_id", "repeat"]).latency_s.median()
    keyed = r.set_index(["spec_id", "repeat"]).loc[sums.index]
    assert keyed.decode_time_s.to_numpy() == pytest.approx(sums.to_numpy())
    assert keyed.tpot_p50_s.to_numpy() == pytest.approx(meds.to_numpy())
    assert r.peak_mem_mb.to_numpy() == pytest.approx((r.peak_mem_bytes / 1e6).to_numpy())
    assert r.peak_mem_mib.to_numpy() == pytest.approx((r.peak_mem_bytes / 2**20).to_numpy())
    assert (r.other_mem_bytes == r.peak_mem_bytes - r.resident_weights_bytes - r.kv_cache_bytes).all()


def test_memory_formula_equals_held_bytes_in_every_row(grid):
    r = grid.runs
    assert (r.kv_cache_bytes == r.kv_cache_bytes_formula).all()
    assert (r[r.cache == "none"].kv_cache_bytes == 0).all()
    assert (r[r.cache != "none"].kv_cache_bytes > 0).all()
    assert (r.use_cache == (r.cache != "none").astype(int)).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_formula_equals_held_across_batches_lengths_and_gqa(dtype):
    specs = [
        RunSpec(engine, cache, batch_size=b, prompt_len=p, max_new_tokens=n, dtype=dtype)
        for engine in ("kvlib", "hf")
        for cache in ("dynamic", "static")
        for b, p, n in ((1, 3, 2), (3, 20, 6))
    ]
    specs += [
        RunSpec("kvlib", cache, batch_size=2, prompt_len=9, dtype=dtype, n_kv_head=2) for cache in ("dynamic", "static")
    ]
    r = measure_grid(specs, repeats=1, warmup=0).runs
    assert (r.kv_cache_bytes == r.kv_cache_bytes_formula).all()
    assert (r.dtype == dtype).all()
    assert sorted(r[r.n_kv_head == 2].cache) == ["dynamic", "static"]


def test_repeats_are_interleaved_and_warmups_unrecorded(monkeypatch):
    calls = []
    real = harness.generate

    def counting(model, ids, n, cache):
        calls.append(cache)
        return real(model, ids, n, cache=cache)

    monkeypatch.setattr(harness, "generate", counting)
    order = []
    specs = [RunSpec("kvlib", "dynamic", prompt_len=4, max_new_tokens=3), RunSpec("kvlib", "static", prompt_len=4)]
    m = measure_grid(specs, repeats=3, warmup=2, on_run=lambda row, steps: order.append((row["spec_id"], len(steps))))
    assert calls[:4] == ["dynamic", "dynamic", "static", "static"]  # warm-ups first
    assert order == [(0, 2), (1, 15), (1, 15), (0, 2), (0, 2), (1, 15)]  # A B, B A, A B
    assert len(calls) == 2 * 2 + 3 * 2 and len(m.runs) == 6
    assert m.runs.repeat.tolist() == [0, 0, 1, 1, 2, 2]


def test_each_model_is_loaded_once_per_grid(monkeypatch):
    loads = []
    real = harness.load

    def counting(*args, **kwargs):
        loads.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(harness, "load", counting)
    specs = [RunSpec(e, c, prompt_len=3, max_new_tokens=2) for e in ("kvlib", "hf") for c in ("dynamic", "static")]
    measure_grid([*specs, RunSpec(prompt_len=3, max_new_tokens=2, dtype="bfloat16")], repeats=1, warmup=0)
    assert len(loads) == 2  # float32 (both engines) and bfloat16


def test_hf_only_runs_do_not_hold_kvlib_weights():
    r = measure(RunSpec("hf", "dynamic", prompt_len=3, max_new_tokens=2), repeats=1, warmup=0).runs
    assert (r.resident_weights_bytes == r.weights_bytes).all()
    both = measure_grid([RunSpec("hf", "dynamic", prompt_len=3), RunSpec("kvlib", prompt_len=3)], 1, 0).runs
    # Each engine's own weights (kvlib's include the copy its CPU fast path packs); resident = both together.
    assert (both.resident_weights_bytes == both.weights_bytes.sum()).all()


def test_mbu_uses_the_measured_bandwidth(monkeypatch, tmp_path):
    from kvlib.measure.roofline import MachineProbe, Rates

    monkeypatch.delenv("KVLIB_NO_ROOFLINE")
    probe = MachineProbe("cpu", "cpu", Rates((1e10,)), Rates((2e10,)), {"float32": Rates((1e11,))}, {"float32": 64},
                         1 << 20, 1, "test cpu", (), "2026-12-07T00:00:00+00:00", 0.1)  # fmt: skip
    probe.save(tmp_path / "machine.json")
    monkeypatch.setenv("KVLIB_MACHINE_PROBE", str(tmp_path / "machine.json"))  # the report's one probe
    r = measure(RunSpec("kvlib", "static", batch_size=2, prompt_len=6, max_new_tokens=5), 1, 0).runs.iloc[0]
    from kvlib.core.config import get_preset
    from kvlib.measure.roofline import decode_step_bytes

    # the mean decode step reads the keys/values of P + N/2 tokens: 6 + 2.5
    expected_bytes = (
        decode_step_bytes(get_preset("tiny"), 2, 6, "float32") + decode_step_bytes(get_preset("tiny"), 2, 11, "float32")
    ) / 2
    assert r.decode_step_bytes == round(expected_bytes)
    assert r.mbu == pytest.approx(r.decode_step_bytes / (r.tpot_p50_s * 1e10))
    assert r.floor_step_s == pytest.approx(r.decode_step_bytes / 1e10)
    assert r.bandwidth_bytes_per_s == 1e10 and r.matmul_flops_per_s == 1e11


def test_roofline_disabled_leaves_mbu_empty():
    r = measure(RunSpec(prompt_len=3, max_new_tokens=2), 1, 0, roofline=False).runs
    assert r.mbu.isna().all() and r.bandwidth_bytes_per_s.isna().all()


def test_a_short_generation_is_refused(monkeypatch):
    real = harness.generate

    def short(model, ids, n, cache):
        return real(model, ids, n - 1, cache=cache)

    monkeypatch.setattr(harness, "generate", short)
    with pytest.raises(KvlibError, match=r"expected \(1, 4\) and 3"):
        measure(RunSpec(prompt_len=3, max_new_tokens=4), 1, 0)


@pytest.mark.parametrize(
    "error", [torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("DefaultCPUAllocator: can't allocate memory")]
)
def test_out_of_memory_names_the_configuration(monkeypatch, error):
    def oom(*args, **kwargs):
        raise error

    monkeypatch.setattr(harness, "generate", oom)
    with pytest.raises(KvlibError, match=r"out of memory measuring kvlib static tiny .* batch=3 prompt=5 new=2"):
        measure(RunSpec(batch_size=3, prompt_len=5, max_new_tokens=2), 1, 0)


def test_other_errors_are_not_disguised_as_oom(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(harness, "generate", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        measure(RunSpec(prompt_len=3, max_new_tokens=2), 1, 0)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (RunSpec(batch_size=0), "batch_size must be a positive integer"),
        (RunSpec(prompt_len=-2), "prompt_len must be a positive integer"),
        (RunSpec(max_new_tokens=1.5), "max_new_tokens must be a positive integer"),
        (RunSpec(batch_size=True), "batch_size must be a positive integer"),
        (RunSpec(engine="vllm"), "unknown engine"),
        (RunSpec(cache="nonsense"), "unknown cache"),
        (RunSpec(engine="hf", cache="quantized"), "unknown cache"),
        (RunSpec(model="gpt5"), "unknown model"),
        (RunSpec(weights="best"), "unknown weights"),
        (RunSpec(dtype="int3"), "unknown dtype"),
        (RunSpec(prompt_len=250, max_new_tokens=10), "exceeds the tiny context of 256"),
        (RunSpec(engine="hf", cache="dynamic", n_kv_head=2), "no grouped-query"),
        (RunSpec(n_kv_head=0), "n_kv_head must be"),
    ],
)
def test_bad_specs_are_refused_before_loading(monkeypatch, spec, message):
    monkeypatch.setattr(harness, "load", lambda *a, **k: pytest.fail("loaded a model for a bad spec"))
    with pytest.raises(KvlibError, match=message):
        measure_grid([spec], 1, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_for_but_absent():
    with pytest.raises(KvlibError, match="no CUDA device"):
        measure_grid([RunSpec(device="cuda")], 1, 0)


@pytest.mark.parametrize(("repeats", "warmup"), [(0, 0), (1, -1), (True, 0)])
def test_bad_repeat_counts(repeats, warmup):
    with pytest.raises(KvlibError, match="must be"):
        measure_grid([RunSpec()], repeats, warmup)


def test_summary_has_one_row_per_spec(grid):
    s = grid.summary()
    assert len(s) == 6 and (s.repeats == 2).all()
    assert {"tpot_p50_s", "tpot_p50_s_range", "ttft_s"} <= set(s.columns)


def test_provenance_is_in_every_row(grid):
    r = grid.runs.iloc[0]
    assert r.torch_version == torch.__version__ and r.threads == torch.get_num_threads()
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", r.git_commit)
    assert datetime.fromisoformat(r.timestamp).utcoffset().total_seconds() == 0
    assert r.device_name and r.weights == "random" and r.weights_source == "random(seed=0)"
    info = provenance("cpu", "float32")
    assert info["dtype"] == "float32" and {"python_version", "transformers_version", "platform"} <= set(info)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_memory_is_allocator_peak():
    r = measure(RunSpec("kvlib", "static", device="cuda", batch_size=2, prompt_len=16), 2, 1).runs
    assert (r.peak_mem_kind == "cuda_allocated").all()
    assert (r.peak_mem_bytes >= r.weights_bytes + r.kv_cache_bytes).all()
    assert (r.peak_mem_reserved_mib >= r.peak_mem_mib).all()
    assert (r.kv_cache_bytes == r.kv_cache_bytes_formula).all()


@pytest.mark.parametrize("layout", sorted(harness.CACHE_LAYOUTS))
@pytest.mark.parametrize("model", ["tiny", "tiny-gemma"])
def test_step_cache_bytes_follow_the_layout(layout, model):
    """Every kvlib layout's step reads what it holds (quantized: codes and scales; eviction: its budget), bounded by
    the dense cache cut to each sliding layer's window; HF's caches read the dense one. The regression: every layout
    was once counted as the dense float cache, which overstated the int8 cache's MBU (1.7x at SmolLM2's batch 4 x
    4096)."""
    from kvlib.core.config import PRESETS
    from kvlib.measure.memory import kv_cache_bytes_formula

    cfg, B, dtype = PRESETS[model], 2, torch.float32
    for tokens in (1, 7, 300):
        dense = kv_cache_bytes_formula(cfg, B, tokens, dtype, "hybrid")
        try:
            held = harness.CACHE_LAYOUTS[layout].used_bytes_after(cfg, tokens, dtype, B)
        except KvlibError:  # a layout this model refuses (Gemma's hybrid model: window, quantized) never runs
            pytest.skip(f"{layout} does not run on {model}")
        got = harness.step_cache_bytes(RunSpec("kvlib", layout, model), cfg, B, tokens, dtype)
        assert got == min(dense, held)
        assert harness.step_cache_bytes(RunSpec("hf", "dynamic", model), cfg, B, tokens, dtype) == dense
    if layout == "quantized":  # int8: one byte an element plus scales (head_dim 16 here), under half the float cache
        assert got < dense / 2


def test_hf_generate_runs_under_inference_mode_as_kvlib_does():
    """Both engines time their steps under torch.inference_mode (no autograd bookkeeping on either side).
    Regression: a helper inserted above hf_generate once took its decorator, and HF's runs lost it silently."""
    from kvlib.models.decode import generate
    from kvlib.models.hf import hf_generate
    from kvlib.models.loading import load

    lm = load("tiny", weights="random", seed=0, with_hf=True)
    ids = torch.randint(0, lm.cfg.vocab_size, (1, 6))
    assert hf_generate(lm.hf, ids, 3).tokens.is_inference()
    assert generate(lm.model, ids, 3).tokens.is_inference()
