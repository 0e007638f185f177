"""Issue 14, kind 1: a results file is never destroyed, and a bad output path is found before any model is loaded.

The contract, for every command that writes results (swept over every CSV option of every command): each output
path is checked before a model is loaded (its folder exists and takes files, two outputs are never one file, an
existing file has this command's header); an incompatible file is refused with one line and exit 2 and left
byte for byte as it was; rows are only ever appended.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import pytest

import kvlib.measure.harness
import kvlib.models.loading
from kvlib import study
from kvlib.cli import build_parser, main
from kvlib.core.errors import KvlibError
from kvlib.measure.results import check_outputs

TINY = ["--model", "tiny", "--weights", "random", "--repeats", "1", "--warmup", "0", "--no-roofline"]
RUN = ["run", "--engine", "kvlib", *TINY, "--prompt_len", "8", "--max_new_tokens", "3"]
# the experiments' sizes (prompt 256 + 128 new tokens) exceed the tiny model's context; refused before loading anyway
EXPERIMENTS = ["experiments", "--engine", "kvlib", "--model", "distilgpt2", *TINY[2:]]
BENCH = ["bench", "--model", "tiny", "--weights", "random", "--batch-sizes", "1", "--dtypes", "float32"]
BENCH += ["--prompt-len", "8"]
BENCH += ["--max-new-tokens", "3", "--repeats", "1", "--warmup", "0", "--no-compile"]
PERPLEXITY = ["perplexity", "--model", "tiny-llama", "--weights", "random", "--tokens", "16"]
PASSKEY = ["passkey", "--model", "tiny-llama", "--weights", "random", "--tokens", "96", "--depths", "0.5"]
PASSKEY += ["--keys", "1", "--cache", "static"]
# Every (command, option) that writes results; test_every_results_option_is_swept keeps this list complete.
OUTPUTS = {
    ("run", "--csv"): RUN,
    ("run", "--steps-csv"): RUN,
    ("experiments", "--csv"): EXPERIMENTS,
    ("experiments", "--steps-csv"): EXPERIMENTS,
    ("bench", "--csv"): BENCH,
    ("bench", "--long-csv"): BENCH,
    ("perplexity", "--csv"): PERPLEXITY,
    ("passkey", "--csv"): PASSKEY,
}


def _csv_options(parser: argparse.ArgumentParser) -> set[tuple[str, str]]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = set()
    for command, p in sub.choices.items():
        for action in p._actions:
            if action.dest.endswith("csv"):
                found.add((command, max(action.option_strings, key=lambda s: ("-" in s[2:], len(s)))))
    return found


def test_every_results_option_is_swept():
    assert _csv_options(build_parser()) == set(OUTPUTS)


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: every refusal must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output paths were checked")

    monkeypatch.setattr(kvlib.measure.harness, "load", refuse)
    monkeypatch.setattr(kvlib.models.loading, "load", refuse)
    monkeypatch.setenv("KVLIB_NO_ROOFLINE", "1")


def _refused(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(("command", "option"), list(OUTPUTS))
def test_an_incompatible_file_is_refused_untouched_before_loading(tmp_path, capsys, no_model, command, option):
    target = tmp_path / "logs.csv"
    target.write_text("some,other,header\n1,2,3\n")
    before = target.read_bytes()
    line = _refused(capsys, [*OUTPUTS[command, option], option, str(target)])
    assert "different header" in line and str(target) in line
    assert target.read_bytes() == before


@pytest.mark.parametrize(("command", "option"), list(OUTPUTS))
def test_a_missing_folder_is_refused_and_not_created(tmp_path, capsys, no_model, command, option):
    target = tmp_path / "mistyped" / "logs.csv"
    line = _refused(capsys, [*OUTPUTS[command, option], option, str(target)])
    assert "does not exist" in line
    assert not target.parent.exists()


@pytest.mark.parametrize(("command", "option"), list(OUTPUTS))
def test_a_folder_that_takes_no_files_is_refused_before_loading(capsys, no_model, command, option):
    # /proc takes no new files, even for root (whom permission bits would not stop): a real unwritable folder.
    line = _refused(capsys, [*OUTPUTS[command, option], option, "/proc/kvlib-results.csv"])
    assert "not writable" in line


@pytest.mark.parametrize("command", ["run", "experiments"])
def test_two_outputs_naming_one_file_are_refused(tmp_path, capsys, no_model, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    argv = RUN if command == "run" else EXPERIMENTS
    line = _refused(capsys, [*argv, "--csv", "logs.csv", "--steps-csv", "./sub/../logs.csv"])
    assert "--csv and --steps-csv name the same file" in line


def test_check_outputs_sees_one_file_through_a_link(tmp_path):
    real = tmp_path / "a.csv"
    real.write_text("")
    (tmp_path / "b.csv").symlink_to(real)
    with pytest.raises(KvlibError, match="same file"):
        check_outputs({"--csv": (real, ["x"]), "--steps-csv": (tmp_path / "b.csv", ["y"])})


def test_bench_into_a_run_csv_is_refused_and_the_rows_survive(tmp_path, capsys):
    """The issue's example: `run` wrote 2 rows, then `bench --csv` into the same file replaced it with exit 0."""
    logs = tmp_path / "logs.csv"
    assert main([*RUN, "--repeats", "2", "--csv", str(logs)]) == 0
    before = logs.read_bytes()
    assert len(pd.read_csv(logs)) == 2
    capsys.readouterr()  # what the run printed
    _refused(capsys, [*BENCH, "--csv", str(logs)])
    assert logs.read_bytes() == before
    assert main([*RUN, "--csv", str(logs)]) == 0  # the file still takes run rows
    assert len(pd.read_csv(logs)) == 3


def test_bench_appends_to_its_own_csv(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLIB_NO_ROOFLINE", "1")
    csv = tmp_path / "bench.csv"
    assert main([*BENCH, "--csv", str(csv)]) == 0
    first = csv.read_bytes()
    assert main([*BENCH, "--csv", str(csv)]) == 0
    assert csv.read_bytes().startswith(first)
    assert len(pd.read_csv(csv)) == 2


def test_notebook_outputs_check_out_dir_before_loading(tmp_path):
    with pytest.raises(KvlibError, match="does not exist"):
        study.Outputs("09_x", tmp_path / "mistyped" / "report")
    assert not (tmp_path / "mistyped").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(KvlibError, match="not a folder"):
        study.Outputs("09_x", tmp_path / "file")
    with pytest.raises(KvlibError, match="out_dir"):
        study.Outputs("09_x", "/proc/kvlib-report")
    out = study.Outputs("09_x", tmp_path / "new")  # a new folder under an existing one is fine
    out.csv(pd.DataFrame({"a": [1]}), "rows")
    assert (tmp_path / "new" / "data" / "09_rows.csv").read_text() == "a\n1\n"
    assert not list((tmp_path / "new" / "data").glob(".*tmp"))  # written through a temporary file, renamed


def test_the_report_refuses_a_missing_reports_folder_before_running(tmp_path):
    import subprocess
    import sys

    missing = tmp_path / "mistyped" / "reports"
    proc = subprocess.run(
        [sys.executable, "-m", "kvlib", "report", "--reports", str(missing), "run", "01_concept", "--profile", "smoke"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert not missing.parent.exists()


@pytest.mark.parametrize("out_dir", [None, "null", "None", "", 3])
def test_notebook_out_dir_null_is_refused_not_a_folder_named_null(tmp_path, monkeypatch, out_dir):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KvlibError, match="parameter out_dir must be a folder"):
        study.Outputs("09_x", out_dir)
    assert not (tmp_path / "null").exists()
