"""The timing noise floor between processes (kvlib.report.timing_floor): the same configuration timed by several
notebooks of one report."""

from __future__ import annotations

import pandas as pd
import pytest

from kvlib.report.timing_floor import spread, timing_floor_html

BASE = dict(model="m", dtype="float32", device="cpu", engine="kvlib", cache="static", batch_size=1, prompt_len=32,
            max_new_tokens=24, use_cache=True)  # fmt: skip


def _runs(tmp_path, nb: str, tpots: list[float], **over: object) -> None:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    pd.DataFrame([{**BASE, **over, "tpot_p50_s": t} for t in tpots]).to_csv(data / f"{nb}_runs.csv", index=False)


def test_the_same_configuration_in_three_processes_gives_the_floor(tmp_path):
    _runs(tmp_path, "03_huggingface", [0.030, 0.031, 0.032])
    _runs(tmp_path, "05_batch_sweep", [0.040, 0.041, 0.039])
    _runs(tmp_path, "06_prompt_sweep", [0.035, 0.035, 0.036])
    s = spread(tmp_path)
    assert len(s) == 1 and s.loc[0, "notebooks"] == "03, 05, 06"
    assert s.loc[0, "tpot_ms_low"] == pytest.approx(31.0) and s.loc[0, "tpot_ms_high"] == pytest.approx(40.0)
    assert s.loc[0, "spread_pct"] == pytest.approx(100 * (40 / 31 - 1))
    assert "29%" in timing_floor_html(tmp_path)


def test_configurations_timed_once_or_without_a_cache_give_no_floor(tmp_path):
    _runs(tmp_path, "02_naive_vs_cached", [0.03], max_new_tokens=48)
    _runs(tmp_path, "05_batch_sweep", [0.04])
    _runs(tmp_path, "06_prompt_sweep", [0.5], use_cache=False, max_new_tokens=48)
    assert spread(tmp_path).empty
    assert "No configuration was timed by two notebooks" in timing_floor_html(tmp_path)
