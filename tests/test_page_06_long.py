"""Notebook 06's long-context section (kvlib.study.long_context): its parameters, and prose computed from the data."""

from __future__ import annotations

import pandas as pd
import pytest

from kvlib.core.errors import KvlibError
from kvlib.study import long_context

COMMON = {"model": "tiny-llama", "weights": "random", "device": "cpu", "dtype": "float32", "seed": 0}


def test_parameters_empty_skips_and_bad_ones_are_one_line_errors():
    assert long_context.check_parameters(**COMMON, long_contexts=[], long_batch=4, long_rounds=6) is None
    sweep = long_context.check_parameters(**COMMON, long_contexts="[64, 32]", long_batch=2, long_rounds=3)
    assert sweep.contexts == [32, 64] and sweep.row.context == 64 and sweep.row.batch_size == 2
    with pytest.raises(KvlibError, match="long_batch"):
        long_context.check_parameters(**COMMON, long_contexts=[32], long_batch=0, long_rounds=3)
    with pytest.raises(KvlibError, match="long_rounds"):
        long_context.check_parameters(**COMMON, long_contexts=[32], long_batch=1, long_rounds="x")
    with pytest.raises(KvlibError, match=r"exceeds|context"):  # longer than the model's context
        long_context.check_parameters(**COMMON, long_contexts=[10**6], long_batch=1, long_rounds=3)


def _data(static_ms: float, int8_ms: float, hf_ms: float, rounds: int = 6) -> tuple[pd.DataFrame, pd.DataFrame]:
    per = {"kvlib static": static_ms, "kvlib int8": int8_ms, "hf-dynamic": hf_ms * 1.5, "hf-static": hf_ms}
    steps = pd.DataFrame(
        [
            {"context": 4096, "engine": e, "round": r, "latency_ms": ms * (1 + 0.01 * (r % 3))}
            for e, ms in per.items()
            for r in range(1, rounds + 1)
        ]
    )
    int8 = "kvlib int8"
    rows = pd.DataFrame(
        [
            {"context": 4096, "batch_size": 4, "engine": e, "dtype": "float32", "tpot_p50_ms": ms,
             "floor_ms": 30.0 if e == int8 else 50.0,
             "mbu": 50.0 / ms, "cache_mib": 202.5 if e == int8 else 720.0,
             "kld_vs_kvlib_static": 2e-4 if e == int8 else 0.0, "top1_vs_kvlib_static": 0.9 if e == int8 else 1.0}
            for e, ms in per.items()
        ]
    )  # fmt: skip
    return rows, steps


def test_sentence_says_when_the_saved_bytes_did_not_buy_speed():
    rows, steps = _data(static_ms=200, int8_ms=230, hf_ms=260)
    text = long_context.sentence(rows, steps, 513 * 2**20)
    assert "720 MiB against 513 MiB of weights (1.40x)" in text and "**200.0 ms**" in text
    assert "hf static cache" in text and "kvlib faster" in text  # 1.3x, beyond the rounds' spread
    assert "the int8 cache slower" in text and "did not make the step faster" in text and "2.00e-04" in text
    assert (
        "Reading 28% of the cache's bytes" in text
        and "runs at 25% of the speed its bytes allow" in text
        and "not what bounds it" in text
    )
    rows, steps = _data(static_ms=200, int8_ms=120, hf_ms=200)
    text = long_context.sentence(rows, steps, 513 * 2**20)
    assert "the int8 cache faster" in text and "did not make" not in text
    assert "no difference beyond the rounds' spread" in text  # HF equal to kvlib
    rows, steps = _data(static_ms=200, int8_ms=120, hf_ms=260, rounds=2)
    assert "too few rounds (n=2)" in long_context.sentence(rows, steps, 513 * 2**20)


def test_headline_is_kvlib_static_at_the_longest_context():
    rows, steps = _data(static_ms=200, int8_ms=230, hf_ms=260)
    h = long_context.headline(rows, steps, "smollm2-135m float32 cpu")
    assert h["metric"] == "long_context_step_ms" and h["value"] == pytest.approx(202.0) and h["unit"] == "ms"


@pytest.mark.parametrize("profile", ["smoke", "default", "full", "gpu"])
def test_every_profiles_long_context_parameters_are_accepted(profile):
    """Each profile's notebook-06 parameters pass the section's checks (the context fits its model: gpt2-medium on
    the gpu profile has 1024 positions). Regression: the gpu profile once asked for 4096 tokens of gpt2-medium."""
    from kvlib.report.pipeline import profile_params

    p = profile_params("params", profile, "06_prompt_sweep")
    common = {k: p[k] for k in ("model", "weights", "dtype", "seed")}
    common["device"] = "cpu"  # the gpu profile's CUDA is not here; what is checked is the contexts against the model
    sweep = long_context.check_parameters(
        **common, long_contexts=p["long_contexts"], long_batch=p["long_batch"], long_rounds=p["long_rounds"]
    )
    assert sweep is not None and sweep.row.model == p["model"]
