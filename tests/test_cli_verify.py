"""`python -m kvlib verify`: passes when paths agree, fails when one doesn't, one-line errors on bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import kvlib.measure.verify
from kvlib.cli import main
from kvlib.core.errors import KvlibError
from kvlib.models.loading import resolve_dtype

TINY = ["verify", "--model", "tiny", "--weights", "random"]


def test_verify_passes_on_tiny(capsys):
    assert main([*TINY, "--batch_size", "2", "--prompt_len", "20", "--max_new_tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "all paths agree" in out and "RANDOM WEIGHTS" in out
    for path in ("kvlib naive", "kvlib dynamic cache", "kvlib static cache", "hf dynamic cache", "hf static cache"):
        assert path in out


def test_verify_passes_with_left_padding(capsys):
    assert main([*TINY, "--batch-size", "3", "--prompt-len", "16", "--max-new-tokens", "6", "--padded"]) == 0
    assert "left-padded" in capsys.readouterr().out


def test_verify_fails_when_a_path_disagrees(monkeypatch, capsys):
    real = kvlib.measure.verify.generate

    def off_by_one(model, ids, n, cache, **kw):
        g = real(model, ids, n, cache=cache, **kw)
        if cache == "static":
            g.tokens = g.tokens.clone()
            g.tokens[0, -1] += 1
        return g

    monkeypatch.setattr(kvlib.measure.verify, "generate", off_by_one)
    assert main([*TINY, "--prompt_len", "10", "--max_new_tokens", "4"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH: kvlib static cache" in out and "no (step 3)" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt_len", "250", "--max_new_tokens", "20"], "exceeds the tiny context of 256"),
        (["--batch_size", "0"], "must be a positive integer"),
        (["--prompt_len", "-3"], "must be a positive integer"),
        (["--max_new_tokens", "2.5"], "is not a whole number"),
        (["--model", "gpt7"], "unknown model preset 'gpt7'"),
        (["--device", "quantum"], "device 'quantum'"),
        (["--dtype", "int3"], "unknown dtype 'int3'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    model_args = TINY if "--model" not in args else ["verify", "--weights", "random"]
    assert main([*model_args, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_dtype_the_device_cannot_run_is_a_clear_error(monkeypatch):
    def unsupported(*args, **kwargs):
        raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'\nmore detail")

    monkeypatch.setattr(torch.nn.functional, "linear", unsupported)
    with pytest.raises(KvlibError, match=r"dtype fp16 does not run on cpu: .*not implemented"):
        resolve_dtype("fp16", torch.device("cpu"))


def test_verify_passes_on_distilgpt2_architecture_with_random_weights():
    """The issue's acceptance command, as a user runs it."""
    cmd = [sys.executable, "-m", "kvlib", "verify", "--model", "distilgpt2", "--weights", "random"]
    cmd += ["--batch_size", "3", "--prompt_len", "100", "--max_new_tokens", "20"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all paths agree" in run.stdout
