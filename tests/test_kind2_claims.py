"""Issue 14, kind 2: a sentence, headline or printed answer never claims more than its data can carry.

Swept here, guard by guard:
- a trend needs two distinct points: every sweep of the notebooks is refused up front with one KvlibError naming
  its parameter (05 batch_sizes, 06 prompt_lens through papermill, as a user types it; every sweep in-process);
- a difference inside the spread of repeats (or with one repeat, no spread at all) is said to be so, never
  "contrary to expectation" on noise;
- a quantized result says how many tokens were quantized, and a lossy layout that quantized or evicted nothing
  is marked and left out of the results (notebook 07's table, its best-saving pick and its sentences);
- "agreement" and "saving" name their denominators;
- the memory panel of notebook 05 does not plot a "peak increase" that cannot mean what its label says;
- `experiments` answers compare nothing with itself and never print "nan".

The notebooks' page functions (kvlib.study's page modules, which the notebooks call) are run in-process on small
synthetic inputs, so the guards are tested in seconds; two single-value sweeps go through papermill end to end.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch

from kvlib import study
from kvlib.caches.base import KVCache
from kvlib.cli.run import answers
from kvlib.core.errors import KvlibError
from kvlib.models.hf_quantized import hf_greedy_loop, hf_quantized_tokens, make_hf_quantized_cache
from kvlib.report import pipeline
from kvlib.study import batch_sweep, prompt_sweep
from kvlib.study.strategies import (
    best_saving_at_equal_tokens,
    comparison_table,
    default_quantized_variants,
    lossy_tokens,
    page_savings,
    quantized_error,
)

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
# Every sweep whose sentences describe a trend ("from batch b0 to batch b1", "from length a to b"): notebook, parameter.
SWEEPS = [("05_batch_sweep", "batch_sizes"), ("06_prompt_sweep", "prompt_lens")]  # 07 lengths: tests/test_page_07.py
SWEEP_PAGES = {"05_batch_sweep": batch_sweep, "06_prompt_sweep": prompt_sweep}  # each sweep's page module


# ---- a trend needs two points ----------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [[2], [16, 16], (8,)])
def test_require_sweep_refuses_one_distinct_value_with_one_line(values):
    with pytest.raises(KvlibError) as e:
        study.require_sweep("batch_sizes", values)
    text = str(e.value)
    assert "batch_sizes" in text and "two different values" in text and "\n" not in text


def test_require_sweep_passes_two_points_unchanged():
    assert study.require_sweep("prompt_lens", [16, 64]) == [16, 64]


@pytest.mark.parametrize(("notebook", "parameter"), SWEEPS)
def test_every_sweep_is_refused_before_anything_runs(notebook, parameter):
    """The notebook's page's check_parameters, given one value on the smoke profile: a KvlibError naming the
    parameter; and the notebook checks before it makes its Outputs folder or loads a model."""
    one = {"batch_sizes": 2, "prompt_lens": "16"}[parameter]  # as papermill's -p passes them
    check = SWEEP_PAGES[notebook].check_parameters
    params = {**pipeline.profile_params(ROOT / "params", "smoke", notebook), parameter: one}
    with pytest.raises(KvlibError, match=rf"parameter {parameter} must hold at least two different values"):
        check(**{k: v for k, v in params.items() if k in inspect.signature(check).parameters})
    nb = nbformat.read(NOTEBOOKS / f"{notebook}.ipynb", as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert code.index("page.check_parameters(") < code.index("study.Outputs(") < code.index("pool.get(")


@pytest.mark.parametrize(("notebook", "parameter", "value"), [SWEEPS[0] + ("2",), SWEEPS[1] + ("16",)])
def test_single_value_sweep_fails_through_papermill(notebook, parameter, value, tmp_path):
    """The issue's inputs, as typed: papermill ... -p batch_sizes 2 / -p prompt_lens 16 fail with the KvlibError."""
    cmd = [sys.executable, "-m", "papermill", f"notebooks/{notebook}.ipynb", str(tmp_path / "out.ipynb")]
    cmd += ["-f", "params/smoke.yaml", "-f", f"params/smoke/{notebook}.yaml", "-p", parameter, value]
    cmd += ["-p", "out_dir", str(tmp_path), "--log-level", "ERROR"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    assert f"KvlibError: parameter {parameter} must hold at least two different values" in proc.stderr
    assert not (tmp_path / "data" / f"{notebook[:2]}_runs.csv").exists()


# ---- differences within the spread -----------------------------------------------------------------------------


def test_spread_comparisons():
    a, b = study.Spread.of([10, 11, 12, 13]), study.Spread.of([11.5, 12, 13, 14])
    assert a.separated(b) is False and study.spread_caveat(False).startswith("within the spread")
    assert a.separated(study.Spread.of([20, 21, 22])) is True and study.spread_caveat(True) == ""
    assert a.separated(study.Spread.of([20])) is None and "n too small" in study.spread_caveat(None)
    assert study.Spread.of([0.9, 1.0, 1.2]).excludes(1) is False
    assert study.Spread.of([2.0, 2.5, 3.0]).excludes(1) is True
    assert study.Spread.of([0.5]).excludes(1) is None


def _batch_runs(tput: dict[int, list[float]]) -> pd.DataFrame:
    rows = [
        {"path": "kvlib static cache", "cache": "static", "batch_size": b, "repeat": r, "decode_tokens_per_s": v,
         "tpot_p50_ms": 1000 * b / v}
        for b, values in tput.items() for r, v in enumerate(values)
    ]  # fmt: skip
    return pd.DataFrame(rows)


def _batch_sentence(tput: dict[int, list[float]], tmp_path: Path) -> str:
    """Notebook 05's sentence on these throughputs, its headline rows written through Outputs as the page does."""
    runs, out = _batch_runs(tput), study.Outputs("05_batch_sweep", tmp_path)
    for row in batch_sweep.headline_rows(runs, "static", sorted(tput), "tiny float32 cpu", 16):
        out.headline(**row)
    return batch_sweep.sentence(runs, "static", sorted(tput))


def test_batch_sentence_says_when_a_difference_is_noise(tmp_path):
    overlapping = _batch_sentence({1: [100, 120, 140], 4: [110, 130, 150]}, tmp_path)
    assert "could not tell the throughput" in overlapping and "overlap" in overlapping and "contrary" not in overlapping
    one_repeat = _batch_sentence({1: [100], 4: [105]}, tmp_path)
    assert "n too small" in one_repeat and "cannot be told" in one_repeat and "did not" not in one_repeat
    clear_drop = _batch_sentence({1: [200, 201, 202], 4: [100, 101, 102]}, tmp_path)
    assert "**Batching lowered throughput (0.50x)**" in clear_drop and "contrary to the usual expectation" in clear_drop
    scaling = _batch_sentence({1: [100, 101, 102], 2: [300, 301, 302], 4: [290, 300, 310]}, tmp_path)
    assert "no evidence that it fell" in scaling  # the peak at 2 and batch 4 overlap: no claim that it fell
    gain = pd.read_csv(tmp_path / "data" / "05_headline.csv").set_index("metric").loc["batch_throughput_gain"]
    assert "batch 4 / at batch 1" in gain["note"]  # the ratio names its denominator


def test_prompt_sentence_never_says_grew_when_it_fell(tmp_path):
    def rows(p: int, ttft: list[float]) -> list[dict]:
        return [{"path": "kvlib static cache", "cache": "static", "prompt_len": p, "repeat": r, "ttft_ms": t,
                 "tpot_p50_ms": 1.0 + r / 100, "kv_cache_mib": p / 1000} for r, t in enumerate(ttft)]  # fmt: skip

    def shown(runs: pd.DataFrame) -> str:  # notebook 06's headline written as the page does, then its sentence
        out = study.Outputs("06_prompt_sweep", tmp_path)
        out.headline(**prompt_sweep.ttft_headline(runs, "static", [16, 64], "tiny float32 cpu", 1))
        return prompt_sweep.sentence(runs, "static", [16, 64], weight_bytes=2**20)

    noisy = shown(pd.DataFrame(rows(16, [20.0, 25.0, 30.0]) + rows(64, [2.0, 2.1, 2.2])))
    assert "TTFT did not grow with the prompt (0.08x" in noisy and "grew much less" not in noisy
    overlap = shown(pd.DataFrame(rows(16, [2.0, 3.0, 4.0]) + rows(64, [1.9, 2.8, 3.9])))
    assert "within the spread" in overlap


def test_batch_memory_panel_leaves_out_a_peak_that_cannot_mean_an_increase(tmp_path):
    import matplotlib

    matplotlib.use("Agg")

    runs = _batch_runs({1: [100, 110], 2: [200, 210]}).assign(kv_cache_bytes=2**20, kv_cache_mib=1.0)
    out = study.Outputs("05_batch_sweep", tmp_path)

    def panel(runs: pd.DataFrame) -> pd.DataFrame:  # notebook 05's figure, saved as the page does: its memory rows
        fig = batch_sweep.batch_figure(runs, [1, 2], "tiny float32 cpu", 16)
        out.figure(fig, "batch", batch_sweep.batch_caption(runs, 2, 8, 4), key=True)
        return batch_sweep.memory_rows(runs)

    # CPU: the resident high-water mark; here it rose less than the cache the run holds (the batch 8)
    cpu = runs.assign(peak_mem_kind="rss", peak_mem_delta_bytes=2**19, peak_mem_delta_mib=0.5)
    assert set(panel(cpu)["memory"]) == {"KV cache"}
    caption = out.figures[-1]["caption"]
    assert "peak memory increase is not plotted" in caption and "high-water mark" in caption
    # CUDA: torch's peak allocation, reset before the run, covers the cache: plotted, and labelled as such
    cuda = runs.assign(peak_mem_kind="cuda_allocated", peak_mem_delta_bytes=2**21, peak_mem_delta_mib=2.0)
    assert set(panel(cuda)["memory"]) == {"KV cache", "peak increase in the run"}
    assert "peak increase: torch's peak CUDA allocation" in out.figures[-1]["caption"]


# ---- quantized results: how many tokens were quantized ---------------------------------------------------------

FAST = {"repeats": 1, "warmup": 0}


@pytest.fixture(scope="module")
def quant_smoke(tiny):
    """Notebook 07's smoke sizes: 24 + 8 - 1 = 31 stored tokens, all inside a 32-token full-precision tail."""
    return quantized_error(tiny.model, batch_size=2, prompt_len=24, new_tokens=8, hf_model=None, **FAST)


def test_quantized_rows_count_the_tokens_actually_quantized(tiny, quant_smoke):
    q = quant_smoke[quant_smoke["engine"] == "kvlib"].set_index("variant")
    assert (q["stored_tokens"] == 31).all()
    assert (
        q.loc["int8 per-token", "quantized_tokens"] == 31 and q.loc["full precision (static)", "quantized_tokens"] == 0
    )
    assert q.loc["int4 KIVI (per-channel keys, 32-token groups)", "quantized_tokens"] == 0  # the rows
    assert q.loc["int8 per-token, 32-token fp tail", "quantized_tokens"] == 0
    assert (q["compared_steps"] == 2 * 8).all() and (q["agreeing_steps"] <= q["compared_steps"]).all()
    tails = {k: v for k, v in default_quantized_variants().items() if v[1].get("residual_len")}
    longer = quantized_error(tiny.model, batch_size=1, prompt_len=40, new_tokens=4, variants=tails, **FAST)
    k = longer.set_index("variant")
    assert k.loc["int4 KIVI (per-channel keys, 32-token groups)", "quantized_tokens"] == 32  # one whole group
    assert k.loc["int8 per-token, 32-token fp tail", "quantized_tokens"] == 43 - 32


def test_hf_quantized_tokens(tiny):
    from transformers.cache_utils import DynamicCache

    ids = torch.arange(10).reshape(1, 10) % tiny.cfg.vocab_size
    fp8 = hf_greedy_loop(tiny.hf, ids, 3, lambda: make_hf_quantized_cache(tiny.hf, "fp8"))
    assert hf_quantized_tokens(fp8.cache) == 12  # fp8 has no full-precision residual: every stored token
    dyn = hf_greedy_loop(tiny.hf, ids, 3, lambda: DynamicCache(config=tiny.hf.config))
    assert hf_quantized_tokens(dyn.cache) == 0


def test_comparison_table_marks_lossy_layouts_that_lost_nothing(tiny):
    variants = {
        "static": ("static", {}),
        "int8": ("quantized", {"bits": 8}),
        "int4, 32-token tail": ("quantized", {"bits": 4, "key_axis": "channel", "residual_len": 32}),
        "window 4 + 64": ("window", {"sink": 4, "window": 64}),
        "window 2 + 4": ("window", {"sink": 2, "window": 4}),
    }
    t = comparison_table(tiny.model, 1, 12, 4, variants, **FAST).set_index("variant")
    assert (t["stored_tokens"] == 15).all()
    assert t["lossy_tokens"].to_dict() == {"static": 0, "int8": 15, "int4, 32-token tail": 0, "window 4 + 64": 0,
                                           "window 2 + 4": 9}  # fmt: skip
    lossy = type("Lossy", (), {"exact": False, "seq_len": 7, "lossy_tokens": KVCache.lossy_tokens})()
    assert lossy_tokens(lossy) == 7  # a lossy layout with no count of its own: every stored token


def test_best_saving_never_picks_a_lossy_layout_that_lost_nothing():
    table = pd.DataFrame(
        {
            "variant": ["static", "dynamic", "int4, tail", "int8"],
            "cache": ["static", "dynamic", "quantized", "quantized"],
            "exact": [True, True, False, False],
            "held_bytes": [100, 97, 10, 40],
            "bytes_per_token": [1.0, 0.97, 0.1, 0.4],
            "saving_vs_static_pct": [0.0, 3.0, 90.0, 60.0],
            "tokens_equal": [True, True, True, True],
            "stored_tokens": [31] * 4,
            "lossy_tokens": [0, 0, 0, 31],
        }
    )
    best = best_saving_at_equal_tokens(table)
    assert best["variant"].tolist() == ["int8"] and best["lossy_tokens"].tolist() == [31]
    assert best_saving_at_equal_tokens(table.assign(lossy_tokens=0))["variant"].tolist() == ["dynamic"]


def test_notebook_07_quantized_sentence_leaves_out_what_quantized_nothing(tmp_path, quant_smoke):
    """The issue's smoke report: "int4 KIVI ...: -18.8% saving, 100.0% agreement" listed as a result. The page's
    sentence and headline row (kvlib.study.strategies.page_savings), on the smoke sizes' rows."""
    text = page_savings.quantized_sentence(quant_smoke, batch_size=2, new_tokens=8)
    results, _, untested = text.partition("**Not quantization results:**")
    assert "int4 KIVI" not in results and "-18.8%" not in results
    assert "int4 KIVI" in untested and "int8 per-token, 32-token fp tail" in untested and "none of the 31" in untested
    assert "quantized 31 of the 31 tokens" in results  # the int8 headline says how many
    assert "16 of 16 teacher-forced token choices" in results  # agreement names its denominator
    assert "full-precision static cache of the same run" in results  # so does the saving
    out = study.Outputs("07_cache_strategies", tmp_path)
    out.headline(**page_savings.int8_headline(quant_smoke))
    head = pd.read_csv(tmp_path / "data" / "07_headline.csv").set_index("metric").loc["int8_saving_pct"]
    assert "31 of 31 tokens per sequence quantized" in head["note"]
    only_tail = quant_smoke[quant_smoke["variant"].str.contains("fp tail|full precision|KIVI")]
    assert page_savings.int8_headline(only_tail) is None
    only_tail_text = page_savings.quantized_sentence(only_tail, batch_size=2, new_tokens=8)
    assert only_tail_text.startswith("No kvlib int8 variant quantized any token")


# ---- experiments answers ---------------------------------------------------------------------------------------


def _rows(rows: list[dict]) -> pd.DataFrame:
    base = {"use_cache": 1, "batch_size": 1, "prompt_len": 128, "ttft_s": 0.1, "tpot_p50_s": 0.01,
            "tokens_per_s": 50.0, "peak_mem_mib": 500.0, "kv_cache_bytes": 2**20}  # fmt: skip
    return pd.DataFrame([{**base, **r} for r in rows])


def test_answers_with_one_point_claim_no_comparison_or_trend():
    lines = answers(
        {
            "exp1_cache": _rows([{"use_cache": 1}, {"use_cache": 1}]),
            "exp2_batch": _rows([{"batch_size": 2}, {"batch_size": 2}]),
            "exp3_prompt": _rows([{"prompt_len": 32}]),
        }
    )
    assert lines[0] == "1. Cache on vs off: only runs with the cache were measured, so there is nothing to compare."
    assert "only batch 2 was measured" in lines[1] and "no trend" in lines[1] and not re.search(r"\d\.\d+x", lines[1])
    assert lines[2].endswith("one prompt length only, so there is no trend with the length to report.")
    nan_base = answers({"exp2_batch": _rows([{"batch_size": 1, "tokens_per_s": float("nan")}, {"batch_size": 2}])})
    assert "nan" not in nan_base[0].lower().replace("n/a", "") and "(n/a)" in nan_base[0]
    two = answers({"exp2_batch": _rows([{"batch_size": 1}, {"batch_size": 4, "tokens_per_s": 150.0}])})
    assert "relative to batch 1" in two[0] and "batch 4: 150.0 tok/s (3.00x)" in two[0]
