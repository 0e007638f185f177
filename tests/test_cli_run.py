"""`python -m kvlib run` / `experiments`: the assignment's flags, one CSV row per repeat, answers computed from the
rows, and every bad input a one-line error with a non-zero exit and the CSV untouched."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import kvlib.cli.run as run_cli
import kvlib.measure.harness as harness
from kvlib.cli import main
from kvlib.cli.run import CSV_COLUMNS, answers
from kvlib.measure.harness import RUN_COLUMNS

TINY = ["--model", "tiny", "--weights", "random", "--warmup", "0", "--no-roofline"]
ASSIGNMENT_COLUMNS = [
    "model",
    "dtype",
    "device",
    "use_cache",
    "batch_size",
    "prompt_len",
    "max_new_tokens",
    "total_time_s",
    "tokens_generated",
    "tokens_per_s",
    "p50_latency_s",
    "p95_latency_s",
    "peak_mem_mb",
]
OUR_COLUMNS = [
    "engine",
    "cache",
    "weights",
    "ttft_s",
    "tpot_p50_s",
    "tpot_p90_s",
    "kv_cache_bytes",
    "kv_cache_bytes_formula",
    "peak_mem_mib",
    "mbu",
    "repeat",
    "git_commit",
    "torch_version",
    "transformers_version",
    "device_name",
    "threads",
    "timestamp",
]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `python -m kvlib ...` in-process: (exit code, stdout, stderr); argparse errors exit via SystemExit."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_assignment_flags_append_one_row_per_repeat(tmp_path, capsys):
    csv = tmp_path / "logs.csv"
    code, out, err = cli(
        capsys, "run", *TINY, "--use_cache", "1", "--batch_size", "2", "--prompt_len", "8", "--max_new_tokens", "4",
        "--csv", str(csv), "--repeats", "2",
    )  # fmt: skip
    assert code == 0, err
    assert out.count("\n") == 1 and "per-token p50" in out and "2 rows appended" in out and "RANDOM WEIGHTS" in out
    df = pd.read_csv(csv)
    assert list(df.columns) == list(CSV_COLUMNS)
    assert set(ASSIGNMENT_COLUMNS) <= set(df.columns) and set(OUR_COLUMNS) <= set(df.columns)
    assert list(df.columns[: len(ASSIGNMENT_COLUMNS)]) == ASSIGNMENT_COLUMNS
    assert len(df) == 2 and df.repeat.tolist() == [0, 1]
    assert (df.engine == "hf").all() and (df.cache == "dynamic").all() and (df.use_cache == 1).all()
    assert (df.tokens_generated == 8).all() and (df.experiment == "run").all()
    assert (df.kv_cache_bytes == df.kv_cache_bytes_formula).all()
    assert df.peak_mem_mb.to_numpy() == pytest.approx(df.peak_mem_bytes.to_numpy() / 1e6)  # MB: 10^6 bytes
    assert df.peak_mem_mib.to_numpy() == pytest.approx(df.peak_mem_bytes.to_numpy() / 2**20)  # MiB: 2^20 bytes

    # hyphenated spellings, another engine and no cache: appended under the same header
    code, out, err = cli(
        capsys, "run", *TINY, "--engine", "kvlib", "--use-cache", "0", "--batch-size", "1", "--prompt-len", "5",
        "--max-new-tokens", "3", "--csv", str(csv), "--repeats", "1",
    )  # fmt: skip
    assert code == 0, err
    df = pd.read_csv(csv)
    assert len(df) == 3 and csv.read_text().count("model,dtype") == 1
    last = df.iloc[-1]
    assert (last.engine, last.cache, last.use_cache, last.tokens_generated) == ("kvlib", "none", 0, 3)
    for name, kind in RUN_COLUMNS.items():  # typed when read back
        if kind in (int, float) and name not in ("peak_mem_reserved_mib", "mbu", "bandwidth_bytes_per_s"):
            assert pd.api.types.is_numeric_dtype(df[name]), name


@pytest.mark.parametrize(
    ("engine", "use_cache", "cache", "expected"),
    [("kvlib", "1", None, "static"), ("hf", "1", None, "dynamic"), ("kvlib", None, "dynamic", "dynamic"),
     ("hf", "1", "static", "static"), ("hf", "0", None, "none")],
)  # fmt: skip
def test_use_cache_and_cache_flags(tmp_path, capsys, engine, use_cache, cache, expected):
    csv = tmp_path / "logs.csv"
    extra = (["--use_cache", use_cache] if use_cache else []) + (["--cache", cache] if cache else [])
    argv = ["run", *TINY, "--engine", engine, *extra, "--prompt_len", "4", "--max_new_tokens", "3", "--csv", str(csv)]
    code, _, err = cli(capsys, *argv, "--repeats", "1")
    assert code == 0, err
    assert pd.read_csv(csv).cache.tolist() == [expected]


def test_steps_csv_has_a_row_per_decode_step(tmp_path, capsys):
    steps = tmp_path / "steps.csv"
    code, _, err = cli(
        capsys, "run", *TINY, "--prompt_len", "6", "--max_new_tokens", "5", "--repeats", "2",
        "--steps-csv", str(steps),
    )  # fmt: skip
    assert code == 0, err
    df = pd.read_csv(steps)
    assert len(df) == 2 * 4 and df.position.tolist() == [6, 7, 8, 9] * 2 and (df.latency_s > 0).all()


BAD = [
    (["--batch_size", "0"], "must be a positive integer"),
    (["--batch_size", "-3"], "must be a positive integer"),
    (["--batch_size", "1.5"], "not a whole number"),
    (["--prompt_len", "abc"], "not a whole number"),
    (["--max_new_tokens", "0"], "must be a positive integer"),
    (["--repeats", "0"], "must be a positive integer"),
    (["--use_cache", "2"], "must be 0 or 1"),
    (["--use-cache", "yes"], "must be 0 or 1"),
    (["--prompt_len", "250", "--max_new_tokens", "10"], "exceeds the tiny context of 256"),
    (["--model", "gpt5"], "unknown model"),
    (["--engine", "vllm"], "invalid choice"),
    (["--cache", "nonsense"], "unknown cache"),
    (["--engine", "hf", "--cache", "window"], "unknown cache"),
    (["--use_cache", "0", "--cache", "static"], "contradicts"),
    (["--use_cache", "1", "--cache", "none"], "contradicts"),
    (["--dtype", "int3"], "unknown dtype"),
    (["--weights", "best"], "invalid choice"),
    (["--engine", "hf", "--n_kv_head", "2"], "no grouped-query"),
    (["--model", "smollm2-135m", "--weights", "pretrained", "--n_kv_head", "1"], "no pretrained weights with n_kv"),
    (["--model", "smollm2-135m", "--prompt_len", "8190", "--max_new_tokens", "3"], "exceeds the smollm2-135m context"),
]
if not torch.cuda.is_available():
    BAD.append((["--device", "cuda"], "no CUDA device"))


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_nonzero_and_leaves_the_csv(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(harness, "load", lambda *a, **k: pytest.fail("loaded a model for bad input"))
    csv = tmp_path / "logs.csv"
    csv.write_text(",".join(CSV_COLUMNS) + "\n")
    before = csv.read_bytes()
    code, _, err = cli(capsys, "run", *TINY, "--prompt_len", "4", "--max_new_tokens", "2", *argv, "--csv", str(csv))
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert csv.read_bytes() == before


@pytest.mark.parametrize("where", ["missing_folder", "a_folder", "other_header"])
def test_unwritable_csv_fails_before_measuring(tmp_path, capsys, monkeypatch, where):
    monkeypatch.setattr(harness, "load", lambda *a, **k: pytest.fail("loaded a model for an unwritable CSV"))
    csv = {"missing_folder": tmp_path / "no" / "logs.csv", "a_folder": tmp_path}.get(where, tmp_path / "old.csv")
    if where == "other_header":
        csv.write_text("model,dtype,device,use_cache\ndistilgpt2,fp32,cpu,1\n")
    before = csv.read_bytes() if csv.is_file() else None
    code, _, err = cli(capsys, "run", *TINY, "--prompt_len", "4", "--csv", str(csv))
    assert code == 2 and err.count("\n") == 1
    assert ("different header" if where == "other_header" else "cannot write") in err
    assert (csv.read_bytes() if csv.is_file() else None) == before


def _fail_on_call(monkeypatch, n: int, error: BaseException) -> None:
    """Make the n-th kvlib generate call raise `error` (earlier calls run for real)."""
    real, calls = harness.generate, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(harness, "generate", flaky)


def test_interrupted_run_keeps_every_complete_row(tmp_path, capsys, monkeypatch):
    _fail_on_call(monkeypatch, 3, KeyboardInterrupt())  # Ctrl-C during the third repeat
    csv = tmp_path / "logs.csv"
    code, _, err = cli(capsys, "run", *TINY, "--engine", "kvlib", "--prompt_len", "4", "--max_new_tokens", "3",
                       "--repeats", "5", "--csv", str(csv))  # fmt: skip
    assert code == 130 and "interrupted" in err
    df = pd.read_csv(csv)
    assert df.repeat.tolist() == [0, 1] and df.notna().sum().sum() > 0
    assert csv.read_text().endswith("\n")


def test_out_of_memory_names_the_configuration_and_keeps_rows(tmp_path, capsys, monkeypatch):
    _fail_on_call(monkeypatch, 2, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    csv = tmp_path / "logs.csv"
    code, _, err = cli(capsys, "run", *TINY, "--engine", "kvlib", "--batch_size", "3", "--prompt_len", "4",
                       "--max_new_tokens", "3", "--repeats", "3", "--csv", str(csv))  # fmt: skip
    assert code == 2 and err.count("\n") == 1
    assert "out of memory measuring kvlib static tiny" in err and "batch=3 prompt=4 new=3" in err
    assert len(pd.read_csv(csv)) == 1


def test_experiments_run_all_three_and_answer_from_the_rows(tmp_path, capsys, monkeypatch):
    # The assignment's sizes do not fit tiny's 256-position context: scale every prompt down by 8.
    small = [(name, title, [(u, b, p // 8) for u, b, p in configs]) for name, title, configs in run_cli.EXPERIMENTS]
    monkeypatch.setattr(run_cli, "EXPERIMENTS", small)
    monkeypatch.setattr(run_cli, "EXPERIMENT_NEW_TOKENS", 4)
    csv = tmp_path / "logs.csv"
    code, out, err = cli(capsys, "experiments", *TINY, "--csv", str(csv), "--repeats", "1")
    assert code == 0, err
    df = pd.read_csv(csv)
    assert df.groupby("experiment").size().to_dict() == {"exp1_cache": 2, "exp2_batch": 3, "exp3_prompt": 3}
    e1 = df[df.experiment == "exp1_cache"]
    assert sorted(e1.use_cache) == [0, 1] and (e1.prompt_len == 32).all()
    assert sorted(df[df.experiment == "exp2_batch"].batch_size) == [1, 2, 4]
    assert sorted(df[df.experiment == "exp3_prompt"].prompt_len) == [4, 16, 32]
    assert (df.engine == "hf").all() and (df.max_new_tokens == 4).all()
    for n in ("1. Cache on vs off", "2. Batch size", "3. Prompt length"):
        assert n in out
    on, off = e1[e1.use_cache == 1].iloc[0], e1[e1.use_cache == 0].iloc[0]
    assert f"{on.tpot_p50_s * 1e3:.2f} ms with vs {off.tpot_p50_s * 1e3:.2f} ms without" in out


def test_experiments_at_the_assignment_sizes_do_not_fit_tiny(tmp_path, capsys):
    code, _, err = cli(capsys, "experiments", *TINY, "--csv", str(tmp_path / "logs.csv"))
    assert code == 2 and "exceeds the tiny context" in err and err.count("\n") == 1
    assert not (tmp_path / "logs.csv").exists()


def _rows(rows: list[dict]) -> pd.DataFrame:
    base = {"use_cache": 1, "batch_size": 1, "prompt_len": 256, "ttft_s": 0.1, "tpot_p50_s": 0.01,
            "tokens_per_s": 50.0, "peak_mem_mib": 500.0, "kv_cache_bytes": 2**20}  # fmt: skip
    return pd.DataFrame([{**base, **r} for r in rows])


def test_answers_are_computed_from_the_rows():
    results = {
        "exp1_cache": _rows([*[{"use_cache": 1, "tpot_p50_s": t} for t in (0.01, 0.011, 0.009)],
                             {"use_cache": 0, "tpot_p50_s": 0.031}, {"use_cache": 0, "tpot_p50_s": 0.029},
                             {"use_cache": 0, "tpot_p50_s": 0.5}]),
        "exp2_batch": _rows([{"batch_size": b, "prompt_len": 128, "tokens_per_s": 40.0 * b**0.5} for b in (1, 2, 4)]),
        "exp3_prompt": _rows([{"prompt_len": p, "ttft_s": p / 1000} for p in (256, 32, 128)]),
    }  # fmt: skip
    lines = answers(results)
    assert "10.00 ms with vs 31.00 ms without, 3.10x faster per token" in lines[0]  # median of the three
    assert "batch 2: 56.6 tok/s (1.41x)" in lines[1] and "batch 4: 80.0 tok/s (2.00x)" in lines[1]
    assert lines[2].startswith("3. Prompt length 32/128/256") and "TTFT 32.00 ms, 128.00 ms, 256.00 ms" in lines[2]
    slower = answers({"exp1_cache": _rows([{"use_cache": 1, "tpot_p50_s": 0.02}] * 3 + [{"use_cache": 0}] * 3)})
    assert "2.00x slower per token" in slower[0]
    # one repeat a side: the ratio is shown, but not called faster or slower (kvlib.core.stats: n too small)
    once = answers({"exp1_cache": _rows([{"use_cache": 1, "tpot_p50_s": 0.02}, {"use_cache": 0}])})
    assert "0.50x (n too small" in once[0] and "slower" not in once[0] and "faster" not in once[0]
