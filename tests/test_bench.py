"""`python -m kvlib bench`: end to end on the tiny model, the summary arithmetic, and the targets' verdicts."""

from __future__ import annotations

import argparse
import math
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

import kvlib.core.hardware as hardware
import kvlib.measure.bench as bench
from kvlib.cli import main
from kvlib.measure.harness import Measurement

TINY = [
    "bench",
    "--model",
    "tiny",
    "--weights",
    "random",
    "--prompt_len",
    "8",
    "--max_new_tokens",
    "4",
    "--repeats",
    "1",
    "--warmup",
    "0",
]
TINY += ["--no-compile"]  # compiling is tested in test_fast_decode.py; here it would only cost seconds


@pytest.fixture
def native_bf16(monkeypatch):
    """A CPU that computes in bfloat16 (whatever this machine's flags): its rows are measured."""
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "avx512_bf16"})


def test_bench_runs_end_to_end_on_tiny_and_writes_every_column(tmp_path, capsys, monkeypatch, native_bf16):
    monkeypatch.setenv("KVLIB_NO_ROOFLINE", "1")  # skip the bandwidth probe: MBU is then not measured (NaN)
    csv = tmp_path / "bench.csv"
    assert main([*TINY, "--batch-sizes", "1,2", "--threads", "1", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "kvlib ms" in out and "targets (" in out and str(csv) in out
    assert out.count("matrix kernel ") == 4 and "matrix kernel ?" not in out  # each row says what it measured
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
    # tiny is a GPT-2: the Llama batch-1 targets are "n/a", which reads back as missing; every row has vs_hf_best.
    assert df["target_b1_mbu"].isna().all() and df["target_b1_fp32_vs_hf_best"].isna().all()
    assert df["target_vs_hf_best"].isin(["pass", "fail"]).all()
    assert (df["arch"] == "gpt2").all() and df["native_dtype"].all() and not df["time_bound_hit"].any()
    assert (df["row_s"] > 0).all() and (df["repeats"] == 1).all()
    assert "bfloat16: native (CPU flags avx512_bf16)" in out


def test_emulated_dtype_is_skipped_and_said_or_one_short_labelled_row(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KVLIB_NO_ROOFLINE", "1")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "fma"})  # an AVX2-only CPU
    csv = tmp_path / "b.csv"
    assert main([*TINY, "--batch_sizes", "1,2", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "bfloat16 is emulated on this CPU (no avx512_bf16 or amx_bf16" in out and "rows skipped" in out
    assert pd.read_csv(csv)["dtype"].tolist() == ["float32", "float32"]
    csv2 = tmp_path / "b2.csv"
    assert main([*TINY, "--batch_sizes", "1,2", "--emulated", "--csv", str(csv2)]) == 0
    out = capsys.readouterr().out
    df = pd.read_csv(csv2)
    emulated = df[df["dtype"] == "bfloat16"]
    assert len(emulated) == 1 and emulated["batch_size"].tolist() == [1] and not emulated["native_dtype"].any()
    assert (emulated["max_new_tokens"] <= bench.EMULATED_ROW["max_new_tokens"]).all()
    assert emulated[[f"target_{t.name}" for t in bench.TARGETS]].isna().all(axis=None)  # labelled, not judged
    assert "bfloat16 EMULATED, not judged" in out


def test_float16_and_no_flags_fall_back_to_the_right_checks(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx512_fp16", "avx512f"})
    assert bench.dtype_support("float16", cpu).native and not bench.dtype_support("bfloat16", cpu).native
    assert bench.dtype_support("float32", cpu).native
    monkeypatch.setattr(hardware, "cpu_flags", lambda: None)  # no /proc/cpuinfo: oneDNN's own check decides
    assert "oneDNN" in bench.dtype_support("bfloat16", cpu).why


def test_a_row_stops_at_its_time_bound_and_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KVLIB_NO_ROOFLINE", "1")
    csv = tmp_path / "b.csv"
    args = [*TINY, "--batch_sizes", "1", "--dtypes", "float32", "--repeats", "500", "--csv", str(csv)]
    assert main([*args, "--row-limit-s", "2"]) == 0
    out = capsys.readouterr().out
    row = pd.read_csv(csv).iloc[0]
    assert bool(row["time_bound_hit"]) and row["repeats"] < 500 and row["row_s"] < 2 + 1.0
    if row["repeats"] >= 1:  # the repeats that completed are reported (none on a very busy machine: NaN figures)
        assert row["kvlib_tpot_p50_ms"] > 0
    else:
        assert math.isnan(row["kvlib_tpot_p50_ms"])
    assert "TIME BOUND" in out


def test_time_bound_interrupts_work_in_progress():
    import time

    t0 = time.perf_counter()
    with pytest.raises(bench.RowTimeBound), bench.time_bound(0.2):
        while time.perf_counter() - t0 < 5:
            torch.zeros(10).sum()
    assert time.perf_counter() - t0 < 1.0
    with bench.time_bound(5.0):  # no alarm left behind once the block is done
        pass
    time.sleep(0.05)


def test_quick_bound_fits_the_rows_into_the_budget():
    quick = argparse.Namespace(row_limit_s=None, quick=True)
    limits = bench.row_limits_s(quick, [1, 4, 8, 1, 4, 8])
    assert sum(limits) <= bench.QUICK_BUDGET_S + 1e-9 and limits[0] < limits[1] < limits[2] and limits[:3] == limits[3:]
    assert bench.row_limits_s(quick, [1] * 1000) == [bench.QUICK_MIN_ROW_S] * 1000
    full = argparse.Namespace(row_limit_s=None, quick=False)
    assert bench.row_limits_s(full, [1, 8]) == [bench.FULL_ROW_LIMIT_S] * 2
    assert bench.row_limits_s(argparse.Namespace(row_limit_s=3.0, quick=True), [1, 8]) == [3.0, 3.0]


def test_compile_is_used_for_batch_1_rows_only_and_does_not_leak(tmp_path, monkeypatch):
    import kvlib.models.fastpath as fastpath
    from kvlib.models.loading import load

    monkeypatch.setenv("KVLIB_NO_ROOFLINE", "1")
    monkeypatch.delenv("KVLIB_COMPILE", raising=False)  # the process default: no compiled kernel
    csv = tmp_path / "b.csv"
    args = [*TINY[:-1], "--compile", "--batch_sizes", "1,2", "--dtypes", "fp32", "--csv", str(csv)]
    assert main(args) == 0
    df = pd.read_csv(csv)
    assert df["kvlib_compile"].tolist() == [True, False]
    # the bench's choice does not leak into the process: it is an argument of the bench's models' preparation, not
    # a module switch, and a model prepared afterwards without saying gets the process default
    assert not hasattr(fastpath, "COMPILE_ONE_ROW") and fastpath.compile_default() is False
    lm = load("tiny", weights="random", with_hf=False)
    fastpath.prepare_for_inference(lm.model, batch_size=1)
    assert "compiled" not in fastpath.model_kernel(lm.model, 1)


@pytest.mark.parametrize(("minimum", "code"), [(0.0, 0), (1e9, 1)])
def test_strict_exits_1_only_when_a_target_is_missed(tmp_path, monkeypatch, minimum, code):
    monkeypatch.setenv("KVLIB_NO_ROOFLINE", "1")
    always = bench.Target("ratio", "ratio_hf_best", minimum, lambda r: True, "synthetic")
    monkeypatch.setattr(bench.table, "TARGETS", (always,))  # where the verdicts and the CSV's columns read them
    args = [*TINY, "--batch_sizes", "1", "--dtypes", "float32", "--csv", str(tmp_path / "b.csv")]
    assert main([*args, "--strict"]) == code
    assert main(args) == 0  # without --strict a benchmark's verdict is printed, not turned into a failure


def _row(**kw):
    base = {"arch": "llama", "batch_size": 1, "dtype": "float32", "device": "cpu", "native_dtype": True}
    return {**base, "ratio_hf_dynamic": 2.5, "ratio_hf_best": 1.5, "mbu": 0.9, **kw}


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (_row(), ("pass", "n/a", "pass", "n/a")),  # the Llama batch-1 float32 row: its own two targets
        (_row(ratio_hf_best=1.0, mbu=0.85), ("pass", "n/a", "pass", "n/a")),  # bounds are inclusive
        (_row(ratio_hf_best=0.99), ("fail", "n/a", "pass", "n/a")),  # slower than HF's best cache
        (_row(mbu=0.84), ("pass", "n/a", "fail", "n/a")),
        (_row(mbu=math.nan), ("pass", "n/a", "fail", "n/a")),  # not measured is not met
        (_row(batch_size=4, mbu=0.1, ratio_hf_dynamic=0.5), ("n/a", "pass", "n/a", "n/a")),
        (_row(batch_size=8, ratio_hf_best=1.29), ("n/a", "fail", "n/a", "n/a")),
        (_row(arch="gpt2", ratio_hf_best=1.3, mbu=0.1), ("n/a", "pass", "n/a", "n/a")),  # distilgpt2: >= 1.3x
        (_row(dtype="bfloat16", mbu=0.7), ("n/a", "pass", "n/a", "pass")),  # native bfloat16: its own MBU target
        (_row(dtype="bfloat16", mbu=0.69), ("n/a", "pass", "n/a", "fail")),
        (_row(dtype="bfloat16", native_dtype=False, ratio_hf_best=0.1), ("n/a", "n/a", "n/a", "n/a")),  # emulated
        (_row(device="cuda", dtype="float32", ratio_hf_dynamic=1.0), ("n/a", "pass", "n/a", "n/a")),
    ],
)
def test_targets_verdicts_on_synthetic_numbers(row, expected):
    got = bench.check_targets(row)
    names = ("b1_fp32_vs_hf_best", "vs_hf_best", "b1_mbu", "b1_bf16_mbu")
    assert tuple(got[f"target_{n}"] for n in names) == expected


def test_target_report_names_the_missed_target():
    rows = [{**_row(), **bench.check_targets(_row())}, {**_row(batch_size=8, ratio_hf_best=0.8)}]
    rows[1].update(bench.check_targets(rows[1]))
    text, all_met = bench.target_report(rows)
    assert not all_met
    assert "MISSED every other row" in text and "float32 b8: 0.80" in text
    assert "met    Llama batch 1, float32: kvlib MBU" in text


def test_targets_are_read_from_the_data_file_each_with_its_source():
    """The targets are data (kvlib/data/bench_targets.yaml): each says where it comes from, in words; an entry the
    bench cannot apply is refused when read."""
    assert [t.name for t in bench.TARGETS] == ["b1_fp32_vs_hf_best", "vs_hf_best", "b1_mbu", "b1_bf16_mbu"]
    assert [t.minimum for t in bench.TARGETS] == [1.0, 1.3, 0.85, 0.7] and bench.table.GEMMA_TARGET == 1.0
    for t in (*bench.TARGETS, bench.table.GEMMA_RULE):
        assert t.source and "issue" not in t.source.lower(), t.name
    bad = "targets: [{name: x, column: mbu, minimum: 1, rows: some_rows, text: t, source: s}]\nhybrid_cache: {}"
    with pytest.raises(ValueError, match="judges rows 'some_rows'"):
        bench.table.load_targets(bad)


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


def test_regression_time_bound_is_not_swallowed_by_an_except_exception_fallback():
    """The quick bench once ran a row past its bound: the alarm's exception, raised inside the compiled kernel's
    call, was caught by its `except Exception` fall-back (and taken for a compile failure)."""
    import time

    t0 = time.perf_counter()
    with pytest.raises(bench.RowTimeBound), bench.time_bound(0.2):
        while time.perf_counter() - t0 < 3:
            try:  # the pattern under test: a fall-back that catches Exception
                torch.zeros(10).sum()
            except Exception:
                continue
    assert time.perf_counter() - t0 < 1.0


# ---- Gemma 3: its own row, kvlib's hybrid cache, the "no slower than HF generate" check ----------------------


def _plan_args(**over) -> argparse.Namespace:
    args = dict(
        model=None, weights="random", device="cpu", dtypes=None, batch_sizes=bench.DEFAULT_BATCH_SIZES,
        prompt_len=bench.DEFAULT_PROMPT_LEN, max_new_tokens=None, repeats=None, warmup=None, seed=0, quick=False,
        emulated=False, row_limit_s=None,
    )  # fmt: skip
    args.update(over)
    return argparse.Namespace(**args)


def test_gemma_row_shape_and_hybrid_cache(native_bf16):
    args = _plan_args(model=["smollm2-135m", "gemma3-270m"])
    rows, _ = bench.plan_rows(args, torch.device("cpu"), ["float32", "bfloat16"])
    gemma = [r.specs for r in rows if r.specs[0].model == "gemma3-270m"]
    assert len(gemma) == 1  # batch 1, float32 only
    kv, dyn, sta = gemma[0]
    assert (kv.batch_size, kv.prompt_len, kv.dtype) == (1, 4096, "float32")
    assert (kv.engine, kv.cache) == ("kvlib", "hybrid") and (dyn.cache, sta.cache) == ("dynamic", "static")
    smol = [r.specs for r in rows if r.specs[0].model == "smollm2-135m"]
    assert len(smol) == 6 and all(s[0].cache == "static" and s[0].prompt_len == 256 for s in smol)
    # an explicit --prompt-len / --batch-sizes wins over the model's own shape
    args = _plan_args(model=["gemma3-270m"], prompt_len=600, batch_sizes=[2])
    rows, _ = bench.plan_rows(args, torch.device("cpu"), ["float32"])
    assert [(r.specs[0].batch_size, r.specs[0].prompt_len) for r in rows] == [(2, 600)]


def test_quick_judges_bfloat16_where_the_cpu_has_it(native_bf16, monkeypatch):
    """Regression: --quick measured float32 only, so on a CPU with native bfloat16 the bfloat16 batch-1 target
    printed "n/a (no such row)". Now its batch-1 row is measured there (and only that row), and not elsewhere."""
    from kvlib.cli import bench as cli_bench

    cpu = torch.device("cpu")
    assert cli_bench.default_dtypes(cpu, quick=True) == ["float32", "bfloat16"]
    rows, _ = bench.plan_rows(_plan_args(model=["smollm2-135m"], quick=True), cpu, ["float32", "bfloat16"])
    shapes = [(r.specs[0].dtype, r.specs[0].batch_size) for r in rows]
    assert shapes == [("float32", 1), ("float32", 4), ("float32", 8), ("bfloat16", 1)]
    rows, _ = bench.plan_rows(_plan_args(model=["smollm2-135m"], quick=False), cpu, ["bfloat16"])
    assert [r.specs[0].batch_size for r in rows] == [1, 4, 8]  # the full bench: every batch size
    monkeypatch.setattr(bench.plan, "dtype_support", lambda dt, dev: hardware.DtypeSupport(dt, True, "a GPU"))
    rows, _ = bench.plan_rows(_plan_args(model=["smollm2-135m"], quick=True), torch.device("cuda"), ["bfloat16"])
    assert [r.specs[0].batch_size for r in rows] == [1, 4, 8]  # on CUDA --quick keeps every batch size
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert cli_bench.default_dtypes(cpu, quick=True) == ["float32"]


def test_quick_leaves_gemma_out_of_its_default_models():
    assert "gemma3-270m" in bench.DEFAULT_MODELS and "gemma3-270m" not in bench.QUICK_MODELS
    assert set(bench.QUICK_MODELS) < set(bench.DEFAULT_MODELS)


def test_gemma_report_and_targets():
    row = {
        "model": "gemma3-270m", "arch": "gemma3", "dtype": "float32", "batch_size": 1, "prompt_len": 2048,
        "device": "cpu", "native_dtype": True, "ratio_hf_best": 1.2, "ratio_hf_dynamic": 1.5, "mbu": 0.1,
        "kvlib_tpot_p50_ms": 30.0,
    }  # fmt: skip
    assert set(bench.check_targets(row).values()) == {"n/a"}  # the speed targets do not judge Gemma rows
    text = bench.gemma_report([row])
    assert text.strip().startswith("met") and "1.20x" in text and "1.50x" in text
    assert bench.gemma_report([{**row, "ratio_hf_best": 0.8}]).strip().startswith("MISSED")
    assert "not measured" in bench.gemma_report([{**row, "ratio_hf_best": math.nan}])
    assert bench.gemma_report([{**row, "arch": "llama"}]) is None


@pytest.mark.skipif(
    "hybrid" not in __import__("kvlib.caches.base", fromlist=["CACHE_LAYOUTS"]).CACHE_LAYOUTS,
    reason="the hybrid layout is not registered yet",
)
def test_bench_runs_tiny_gemma_on_its_hybrid_cache(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KVLIB_NO_ROOFLINE", "1")
    csv = tmp_path / "bench.csv"
    args = ["bench", "--model", "tiny-gemma", "--weights", "random", "--prompt_len", "20", "--max_new_tokens", "3"]
    args += ["--repeats", "1", "--warmup", "0", "--no-compile", "--batch-sizes", "1", "--dtypes", "fp32"]
    assert main([*args, "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "hybrid cache vs HF generate" in out and "tiny-gemma float32 batch 1, prompt 20" in out
    df = pd.read_csv(csv)
    assert len(df) == 1 and df.loc[0, "arch"] == "gemma3" and df.loc[0, "kvlib_tpot_p50_ms"] > 0


def test_a_ratio_target_below_the_memory_floor_is_reported_unreachable():
    """On a machine where HF already runs near the memory floor, a speed-up target can ask for a step faster than
    the bytes it must read allow (kvlib MBU > 1): the report says so under the missed target, with the figures."""
    row = _row(
        model="distilgpt2", arch="gpt2", ratio_hf_best=1.11, hf_dynamic_tpot_p50_ms=16.54,
        hf_static_tpot_p50_ms=18.84, floor_step_ms=13.5, mbu=0.91,
    )  # fmt: skip
    reachable = _row(
        model="smollm2-135m", batch_size=4, ratio_hf_best=1.2, hf_dynamic_tpot_p50_ms=85.8,
        hf_static_tpot_p50_ms=79.5, floor_step_ms=23.0,
    )  # fmt: skip
    rows = [{**r, **bench.check_targets(r)} for r in (row, reachable)]
    report, all_met = bench.target_report(rows)
    assert not all_met
    assert "distilgpt2 float32 b1: unreachable at the bandwidth measured in this run, it asks for 12.7 ms" in report
    assert "memory floor of 13.5 ms (kvlib MBU 1.06 > 1; HF itself reaches MBU 0.82)" in report
    assert "smollm2-135m float32 b4: unreachable" not in report  # 79.5 / 1.3 = 61 ms is above its floor
    ratio = next(t for t in bench.TARGETS if t.column == "ratio_hf_best")
    mbu = next(t for t in bench.TARGETS if t.column == "mbu")
    assert bench.beyond_the_floor(mbu, row) is None  # an MBU target has no HF time to divide
    assert bench.beyond_the_floor(ratio, {**row, "floor_step_ms": math.nan}) is None  # no bandwidth measured


def test_each_row_names_the_kernel_its_decode_steps_used(monkeypatch, tmp_path, capsys):
    """Read off the model after its set-up (fastpath.model_kernel), not worked out again: a forced kernel this
    build lacks, or switched-off packing, must show as what actually ran."""
    import kvlib.models.fastpath as fastpath

    monkeypatch.setenv("KVLIB_NO_ROOFLINE", "1")
    monkeypatch.setattr(fastpath, "BATCH_KERNEL", "mkl")
    monkeypatch.setattr(fastpath, "_mkl_packable", lambda dtype: False)  # a build without MKL: oneDNN instead
    args = [*TINY, "--dtypes", "float32", "--batch-sizes", "2", "--threads", "1", "--csv", str(tmp_path / "a.csv")]
    assert main(args) == 0
    assert "matrix kernel oneDNN packed;" in capsys.readouterr().out
    monkeypatch.setattr(fastpath, "PACK_CPU_WEIGHTS", False)
    assert main([*args[:-1], str(tmp_path / "b.csv")]) == 0
    assert "matrix kernel F.linear;" in capsys.readouterr().out
