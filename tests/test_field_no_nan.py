"""Issue 22, kind 5 (wrong numbers): no "nan" or "inf" reaches a printed result or label.

`python -m kvlib run --max_new_tokens 1` printed "nan tok/s decode": with one new token (it comes from the prefill)
there is no decode step, so there is no decode rate to print. A figure that does not exist now reads
"n/a (one token: no decode step)", or "n/a" / "not measured" with its reason. These tests run every command that
takes a number of new tokens with one, on tiny models, and the bench's cheap paths (nothing measured, rows skipped),
and look for the words nan and inf in everything printed."""

from __future__ import annotations

import re

import pytest

import kvlib.core.hardware as hardware
from kvlib.cli import main
from kvlib.cli.run import NO_DECODE_STEP
from kvlib.measure.machine_load import LoadReading

NOT_A_NUMBER = re.compile(r"\b(nan|inf)\b", re.IGNORECASE)
RANDOM = ["--weights", "random"]
RUN = ["--prompt_len", "8", "--repeats", "2", "--warmup", "0", "--no_roofline"]

ONE = ["--max_new_tokens", "1"]
ONE_TOKEN = {
    "generate": ["generate", "--model", "tiny", *ONE],
    "run --engine hf": ["run", "--engine", "hf", "--model", "tiny", *ONE, *RUN],
    "run --engine kvlib": ["run", "--engine", "kvlib", "--model", "tiny-llama", *ONE, *RUN],
    "run --use_cache 0": ["run", "--engine", "kvlib", "--use_cache", "0", "--model", "tiny", *ONE, *RUN],
    "run hybrid": ["run", "--engine", "kvlib", "--model", "tiny-gemma", *ONE, *RUN],
    "verify": ["verify", "--model", "tiny", "--batch_size", "2", "--prompt_len", "8", *ONE],
    "verify gemma": ["verify", "--model", "tiny-gemma", "--batch_size", "2", "--prompt_len", "8", *ONE],
    "passkey": ["passkey", "--model", "tiny-llama", "--tokens", "64", "--keys", "1", "--new_tokens", "1"],
    "perplexity": ["perplexity", "--model", "tiny", "--tokens", "2"],  # the fewest tokens: one scored
}


def printed(capsys) -> str:
    out = capsys.readouterr()
    return out.out + out.err


@pytest.mark.parametrize("command", list(ONE_TOKEN))
def test_one_new_token_prints_no_nan(capsys, command):
    assert main([*ONE_TOKEN[command], *RANDOM]) == 0
    text = printed(capsys)
    assert not NOT_A_NUMBER.search(text), text
    if command.startswith("run"):  # the summary line says why the decode figures are missing
        assert text.count(NO_DECODE_STEP) == 2 and "tok/s end-to-end" in text


def test_bench_refuses_one_new_token_in_one_line(capsys):
    """The bench times decode steps: one new token leaves none, so it refuses before loading anything."""
    assert main(["bench", "--model", "tiny", *RANDOM, *ONE, "--dtypes", "float32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no decode step" in err


def test_bench_with_nothing_measured_prints_no_nan(capsys, monkeypatch, tmp_path):
    """No bandwidth probe (KVLIB_NO_ROOFLINE) and only an emulated dtype (its rows skipped): the header and the
    machine-load line have nothing measured to show, and say so."""
    monkeypatch.setenv("KVLIB_NO_ROOFLINE", "1")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2"}))
    argv = ["bench", "--model", "tiny", *RANDOM, "--dtypes", "bfloat16", "--csv", str(tmp_path / "b.csv")]
    assert main(argv) == 0
    text = printed(capsys)
    assert not NOT_A_NUMBER.search(text), text
    assert "read bandwidth not measured" in text and "load average n/a before, n/a after" in text


def test_bench_refuses_an_endless_time_bound(capsys):
    assert main(["bench", "--model", "tiny", *RANDOM, "--row-limit-s", "inf"]) == 2
    assert "--row-limit-s must be a positive number of seconds" in capsys.readouterr().err


def test_a_load_reading_without_load_averages_says_n_a():
    assert not NOT_A_NUMBER.search(LoadReading().text())
