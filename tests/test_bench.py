"""`python -m kvlib bench`: end to end on the tiny model, the summary arithmetic, and the targets' verdicts."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pandas as pd
import pytest

import kvlib.measure.bench as bench
from kvlib.cli import main
from kvlib.measure.harness import Measurement

TINY = ["bench", "--model", "tiny", "--prompt_len", "8", "--max_new_tokens", "4", "--repeats", "1", "--warmup", "0"]
TINY += ["--no-compile"]  # compiling is tested in test_fast_decode.py; here it would only cost seconds


def test_bench_runs_end_to_end_on_tiny_and_writes_every_column(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KVLIB_NO_ROOFLINE", "1")  # skip the bandwidth probe: MBU is then not measured (NaN)
    csv = tmp_path / "bench.csv"
    assert main([*TINY, "--batch-sizes", "1,2", "--threads", "1", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "kvlib ms" in out and "targets (" in out and str(csv) in out
    df = pd.read_csv(csv)
    assert list(df.columns) == list(bench.COLUMNS)
    assert list(zip(df["dtype"], df["batch_size"], strict=True)) == [
        ("float32", 1),
        ("float32", 2),
        ("bfloat16", 1),
        ("bfloat16", 2),
    ]
    assert (df["threads"] == 1).all() and (df["max_new_tokens"] == 4).all() and (df["prompt_len"] == 8).all()
    assert not df["kvlib_compile"].any() and (df["kvlib_setup_s"] >= 0).all()
    for col in ("kvlib_tpot_p50_ms", "hf_dynamic_tpot_p50_ms", "hf_static_tpot_p50_ms", "kvlib_tokens_per_s"):
        assert (df[col] > 0).all(), col
    ratio = df["hf_dynamic_tpot_p50_ms"] / df["kvlib_tpot_p50_ms"]
    assert (ratio - df["ratio_hf_dynamic"]).abs().max() < 1e-9
    fp32, bf16 = df[df["dtype"] == "float32"], df[df["dtype"] == "bfloat16"]
    assert fp32["agreement_vs_fp32"].isna().all()  # fp32 is the reference, not compared with itself
    assert bf16["agreement_vs_fp32"].between(0, 1).all()
    assert (df.loc[df["batch_size"] == 1, "target_b1_mbu"] == "fail").all()  # MBU not measured: not met
    # "n/a" (a target that does not apply to the row) reads back as missing, which it is.
    assert df.loc[df["batch_size"] == 2, "target_b1_mbu"].isna().all()
    assert fp32.loc[fp32["batch_size"] == 1, "target_b1_fp32_vs_hf_dynamic"].isin(["pass", "fail"]).all()
    assert bf16["target_b1_fp32_vs_hf_dynamic"].isna().all()


def test_compile_is_used_for_batch_1_rows_only_and_switched_back(tmp_path, monkeypatch):
    import kvlib.models.fastpath as fastpath

    monkeypatch.setenv("KVLIB_NO_ROOFLINE", "1")
    monkeypatch.setattr(fastpath, "COMPILE_ONE_ROW", False)
    csv = tmp_path / "b.csv"
    args = [*TINY[:-1], "--compile", "--batch_sizes", "1,2", "--dtypes", "fp32", "--csv", str(csv)]
    assert main(args) == 0
    df = pd.read_csv(csv)
    assert df["kvlib_compile"].tolist() == [True, False]
    assert fastpath.COMPILE_ONE_ROW is False  # the bench's choice does not leak into the process


@pytest.mark.parametrize(("minimum", "code"), [(0.0, 0), (1e9, 1)])
def test_strict_exits_1_only_when_a_target_is_missed(tmp_path, monkeypatch, minimum, code):
    monkeypatch.setenv("KVLIB_NO_ROOFLINE", "1")
    always = bench.Target("ratio", "ratio_hf_best", minimum, lambda r: True, "synthetic")
    monkeypatch.setattr(bench, "TARGETS", (always,))
    args = [*TINY, "--batch_sizes", "1", "--dtypes", "float32", "--csv", str(tmp_path / "b.csv")]
    assert main([*args, "--strict"]) == code
    assert main(args) == 0  # without --strict a benchmark's verdict is printed, not turned into a failure


def _row(**kw):
    base = {"batch_size": 1, "dtype": "float32", "device": "cpu", "ratio_hf_dynamic": 1.5, "ratio_hf_best": 1.2}
    return {**base, "mbu": 0.6, **kw}


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (_row(), ("pass", "pass", "pass")),
        (_row(ratio_hf_dynamic=1.3, ratio_hf_best=1.0, mbu=0.5), ("pass", "pass", "pass")),  # bounds are inclusive
        (_row(ratio_hf_dynamic=1.29), ("fail", "pass", "pass")),
        (_row(ratio_hf_best=0.99), ("pass", "fail", "pass")),
        (_row(mbu=0.49), ("pass", "pass", "fail")),
        (_row(mbu=math.nan), ("pass", "pass", "fail")),  # not measured is not met
        (_row(batch_size=4, mbu=0.1, ratio_hf_dynamic=0.5), ("n/a", "pass", "n/a")),
        (_row(dtype="bfloat16", ratio_hf_dynamic=1.0), ("n/a", "pass", "pass")),
        (_row(device="cuda", dtype="float32", ratio_hf_dynamic=1.0), ("n/a", "pass", "pass")),
    ],
)
def test_targets_verdicts_on_synthetic_numbers(row, expected):
    got = bench.check_targets(row)
    assert (got["target_b1_fp32_vs_hf_dynamic"], got["target_vs_hf_best"], got["target_b1_mbu"]) == expected


def test_target_report_names_the_missed_target():
    rows = [{**_row(), **bench.check_targets(_row())}, {**_row(batch_size=8, ratio_hf_best=0.8)}]
    rows[1].update(bench.check_targets(rows[1]))
    text, all_met = bench.target_report(rows)
    assert not all_met
    assert "MISSED every row" in text and "float32 b8: 0.80" in text
    assert "met    batch 1: kvlib MBU" in text


def test_summarize_takes_medians_and_divides_hf_by_kvlib():
    def run(engine, cache, tpot_s, repeat):
        return {
            "engine": engine, "cache": cache, "tpot_p50_s": tpot_s, "decode_tokens_per_s": 1 / tpot_s,
            "ttft_s": 0.1, "mbu": 0.02 / tpot_s, "repeat": repeat, "model": "tiny", "weights": "random",
            "device": "cpu", "dtype": "float32", "batch_size": 1, "prompt_len": 8, "max_new_tokens": 4,
            "threads": 2, "bandwidth_bytes_per_s": 1e10, "decode_step_bytes": 2e8, "device_name": "cpu",
            "torch_version": "t", "transformers_version": "x", "git_commit": "c", "timestamp": "now",
        }  # fmt: skip

    rows = [run("kvlib", "static", t, i) for i, t in enumerate((0.010, 0.030, 0.011))]
    rows += [run("hf", "dynamic", t, i) for i, t in enumerate((0.020, 0.022, 0.021))]
    rows += [run("hf", "static", t, i) for i, t in enumerate((0.016, 0.015, 0.017))]
    s = bench.summarize(Measurement(pd.DataFrame(rows), pd.DataFrame()))
    assert s["kvlib_tpot_p50_ms"] == pytest.approx(11.0)  # the median, not the mean (the 30 ms outlier)
    assert s["kvlib_tpot_range_ms"] == pytest.approx(20.0)
    assert s["ratio_hf_dynamic"] == pytest.approx(21.0 / 11.0)
    assert s["ratio_hf_best"] == pytest.approx(16.0 / 11.0)  # HF static is HF's best here
    assert s["floor_step_ms"] == pytest.approx(20.0)  # 2e8 bytes at 1e10 bytes/s
    assert s["repeats"] == 3


def _exit_code(argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dtypes", "float33"], "unknown dtype 'float33'"),
        (["--batch_sizes", "1,0"], "must be a positive integer"),
        (["--prompt_len", "400"], "exceeds the tiny context"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    code = _exit_code([*TINY, "--csv", str(tmp_path / "b.csv"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b.csv").exists()  # nothing measured, nothing written


def test_make_bench_passes_quick():
    root = Path(__file__).resolve().parent.parent
    dry = subprocess.run(["make", "-n", "bench", "QUICK=1"], cwd=root, capture_output=True, text=True, check=True)
    assert "-m kvlib bench" in dry.stdout and "--quick" in dry.stdout
    full = subprocess.run(["make", "-n", "bench"], cwd=root, capture_output=True, text=True, check=True)
    assert "-m kvlib bench" in full.stdout and "--quick" not in full.stdout
