"""Notebook 10's prose and the index's llama.cpp rows, computed from tables (no model, no llama.cpp): each verdict
follows the numbers, and flips when they do."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from kvlib.core.errors import KvlibError
from kvlib.report.decision import llamacpp_rows
from kvlib.study import engine as page


def _q(q8=0.0030, q8_ci=(0.0028, 0.0032), rot=0.05, norot=0.25, floor=(0.0034, 0.0031, 0.0037), cross=0.006):
    rows = []

    def add(engine, variant, kind, kld, lo, hi, top1=90.0, ppl=1.0):
        rows.append(
            {
                "model": "m",
                "engine": engine,
                "variant": variant,
                "kind": kind,
                "bits_per_value": 8.5,
                "bytes_per_token": 100.0,
                "vs_16bit_pct": 53.0,
                "kld_mean": kld,
                "kld_lo": lo,
                "kld_hi": hi,
                "top1_pct": top1,
                "perplexity": 19.0,
                "ppl_change_pct": ppl,
                "tokens": 1024,
                "time_s": 1.0,
            }
        )

    add("llama.cpp", "f16", "baseline", 0.0, math.nan, math.nan, 100.0, 0.0)
    add("llama.cpp", "f16 no-fa", "floor", *floor)
    add("llama.cpp", "q8_0", "lossy", q8, *q8_ci)
    add("llama.cpp", "q4_0", "lossy", rot, rot * 0.9, rot * 1.1)
    add("llama.cpp", "q4_0 norot", "lossy", norot, norot * 0.9, norot * 1.1)
    add("kvlib", "exact (float32)", "baseline", 0.0, math.nan, math.nan, 100.0, 0.0)
    add("kvlib", "int8", "lossy", 5e-4, 4e-4, 6e-4)
    add("kvlib", "int4", "lossy", 0.11, 0.10, 0.12)
    add("kvlib", "int4 rotated", "lossy", 0.056, 0.05, 0.06)
    add("llama.cpp vs kvlib", "llama.cpp f16 against kvlib exact", "cross", cross, cross * 0.9, cross * 1.1, 93.0)
    return pd.DataFrame(rows, columns=page.QUALITY_COLUMNS)


def test_quality_sentence_follows_the_numbers():
    said = page.quality_sentence(_q(), "m")
    assert "q8_0: 0.003 nats" in said and "within the floor" in said
    assert "the rotation divides the KL divergence by 5" in said and "intervals apart" in said
    assert "kvlib's int4 cache" in said and "1.5x what llama.cpp's q8_0 cache costs" not in said
    assert "differ more than its 8-bit cache changes it" in said  # cross 0.006 > q8_0 0.003
    flipped = page.quality_sentence(_q(q8=0.02, q8_ci=(0.018, 0.022), norot=0.052, cross=0.001), "m")
    assert "q8_0: 0.02 nats" in flipped and "x the floor's upper end" in flipped
    assert "intervals overlap: not a finding" in flipped and "differ less than" in flipped
    assert "random weights" in page.quality_sentence(_q(), "m", meaningful=False)


def test_speed_sentence_calls_a_difference_only_when_the_ranges_are_apart():
    rows = []
    for r in range(1, 5):
        rows += [
            {"model": "m", "engine": "llama.cpp", "variant": "llama.cpp f16", "context": 4096, "round": r,
             "step_ms": 17.0 + 0.1 * r},
            {"model": "m", "engine": "llama.cpp", "variant": "llama.cpp q4_0", "context": 4096, "round": r,
             "step_ms": 35.0 + 0.1 * r},
            {"model": "m", "engine": "llama.cpp", "variant": "llama.cpp q8_0", "context": 4096, "round": r,
             "step_ms": 17.05 + 0.1 * r},
        ]  # fmt: skip
    said = page.speed_sentence(pd.DataFrame(rows, columns=page.SPEED_COLUMNS), "m")
    assert "llama.cpp q4_0 35.2 ms, 2.04x slower than llama.cpp's f16 cache (17.2 ms)" in said
    assert "llama.cpp q8_0" in said and "within the spread of" in said


def test_decision_table_gains_llamacpp_rows(tmp_path):
    (tmp_path / "data").mkdir()
    _q().to_csv(tmp_path / "data" / "10_quality.csv", index=False)
    rows, note = llamacpp_rows(tmp_path, "m")
    assert [r["layout"] for r in rows] == ["llama.cpp f16", "llama.cpp q8_0", "llama.cpp q4_0", "llama.cpp q4_0 norot"]
    assert "KLD within its floor" in rows[1]["note"] and "rotation turned off" in rows[3]["note"]
    assert "floor" in note and llamacpp_rows(tmp_path, "other") == ([], "")
    assert llamacpp_rows(tmp_path / "nothing", "m") == ([], "")


def test_page_parameters_are_checked_before_anything_runs():
    good = dict(model="smollm2-135m", more_models=[], weights="pretrained", device="cpu", dtype="float32", seed=0,
                tokens=64, cache_types=["q8_0"], unrotated=[], speed_models=["smollm2-135m"], contexts=[16],
                speed_types=["f16"], rounds=2)  # fmt: skip
    pytest.importorskip("llama_cpp")
    assert page.check_parameters(**good).models == ["smollm2-135m"]
    for change, message in (
        ({"device": "cuda"}, "runs on the CPU"),
        ({"cache_types": ["q3_k"]}, "unknown llama.cpp cache type"),
        ({"model": "tiny-llama", "weights": "random", "speed_models": []}, "heads of a multiple of 32"),
        ({"model": "gpt2", "speed_models": []}, "Llama or Gemma 3 preset"),
        ({"speed_models": ["gemma3-270m"]}, "speed_models must be a list of the page's models"),
    ):
        with pytest.raises(KvlibError, match=message):
            page.check_parameters(**{**good, **change})
