"""Issue 22, kind 1: a damaged cache of converted weights is never trusted (kvlib.models.gguf_cache).

The record written last into a converted folder holds the size and sha256 of every file in it; a folder that
differs in any way (a file truncated, emptied, damaged at the same size, missing, or one too many; a record
damaged; a folder converted by an older kvlib, with no record of its files) is converted again from the GGUF,
with one line on stderr saying why, and swapped in atomically. Swept over every file of the folder, for a
Llama-like stand-in (one GGUF in one package) and a Gemma-like one (a GGUF assembled from split packages).

The stand-ins are tiny: the GGUF is a few bytes and "converting" it saves a seeded tiny model and a word-level
tokenizer with save_pretrained, so from_pretrained reads a real folder; no 100 MB package, no network.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from dataclasses import replace

import pytest
import torch

import kvlib.models.gguf_cache as gguf_cache
from kvlib.cli import main
from kvlib.core.config import PRESETS, hf_config_from
from kvlib.models.decoders import build_model
from kvlib.models.loading import load

ARCHS = ("llama", "gemma")
PROMPT = "w5 w17 w42 w7 w300"


@pytest.fixture(scope="module")
def saved_models():
    """What "converting" each stand-in's GGUF produces: a seeded tiny HF model and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 512)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>")
    out = {}
    for arch, preset in (("llama", "tiny-llama"), ("gemma", "tiny-gemma")):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            hf = AutoModelForCausalLM.from_config(hf_config_from(PRESETS[preset]))
        out[arch] = (hf, tokenizer)
    return out


@pytest.fixture(params=ARCHS)
def standin(request, tmp_path, monkeypatch, saved_models):
    """(preset config, calls of the stand-in conversion): an installed-looking package holding the stand-in's GGUF
    (Gemma-like: assembled from split packages into the cache), an empty KVLIB_CACHE, a fresh in-process cache."""
    arch = request.param
    site = tmp_path / "site"
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("KVLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_cache, "_loaded", {})
    if arch == "llama":
        (site / "kvlib_fake_llama").mkdir(parents=True)
        (site / "kvlib_fake_llama" / "__init__.py").write_text("raise ImportError('never imported')\n")
        (site / "kvlib_fake_llama" / "Fake-1M.Q4_1.gguf").write_bytes(b"GGUF a stand-in" * 10)
        cfg = replace(PRESETS["tiny-llama"], name="fake-llama", gguf_requirement="kvlib-fake-llama==0.1",
                      gguf_file="Fake-1M.Q4_1.gguf")  # fmt: skip
    else:
        pkg = site / "kvlib_fake_gemma"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text(
            "from pathlib import Path\n"
            "def assemble(output_path, overwrite=False):\n"
            "    Path(output_path).write_bytes(b'GGUF parts joined')\n"
            "    return Path(output_path)\n"
        )
        (pkg / "data" / "SHA256SUMS").write_text(f"{hashlib.sha256(b'GGUF parts joined').hexdigest()}  fake.gguf\n")
        monkeypatch.delitem(sys.modules, "kvlib_fake_gemma", raising=False)
        monkeypatch.setitem(gguf_cache.SPLIT_PARTS, "kvlib-fake-gemma", 2)
        cfg = replace(PRESETS["tiny-gemma"], name="fake-gemma", gguf_requirement="kvlib-fake-gemma==1.0",
                      gguf_file="fake.gguf")  # fmt: skip
    monkeypatch.setitem(PRESETS, cfg.name, cfg)
    hf, tokenizer = saved_models[arch]
    calls = []

    def convert(gguf, dest):
        calls.append(gguf)
        with gguf_cache._quiet_transformers():  # as the real conversion is
            hf.save_pretrained(dest)
            tokenizer.save_pretrained(dest)

    monkeypatch.setattr(gguf_cache, "_check_readable", lambda cfg, gguf: None)  # the stand-in has no GGUF header
    monkeypatch.setattr(gguf_cache, "_convert", convert)
    return cfg, calls


def contents(folder):
    """Every file of a converted folder but its record (which holds the time of conversion), as bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != gguf_cache.SOURCE_FILE}


def truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def same_size(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0x5A for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))


def zero_bytes(path):
    path.write_bytes(b"")


def missing(path):
    path.unlink()


DAMAGE = {"truncated": truncated, "same_size": same_size, "zero_bytes": zero_bytes, "missing": missing}


def test_the_record_holds_the_size_and_sha256_of_every_file(standin):
    cfg, _ = standin
    folder, converted = gguf_cache.converted_folder(cfg)
    record = json.loads((folder / gguf_cache.SOURCE_FILE).read_text())
    names = sorted(p.name for p in folder.iterdir() if p.name != gguf_cache.SOURCE_FILE)
    assert converted and sorted(record["files"]) == names and "model.safetensors" in names
    for name in names:
        data = (folder / name).read_bytes()
        assert record["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert gguf_cache.damage(folder) is None


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_every_damaged_file_is_found_and_converted_again(standin, capsys, kind):
    """Each file of the folder in turn (the record included), damaged one way: the folder fails its check, is
    converted again with one line naming it and the file, and ends as it was made, with nothing left beside it."""
    cfg, calls = standin
    folder, _ = gguf_cache.converted_folder(cfg)
    made = contents(folder)
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) >= 5
    capsys.readouterr()
    for i, name in enumerate(names):
        DAMAGE[kind](folder / name)
        assert gguf_cache.converted_folder(cfg) == (folder, True), name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "again" in err and f"{folder}: the folder there failed its check" in err
        if name != gguf_cache.SOURCE_FILE or kind == "missing":
            assert name in err
        assert contents(folder) == made and gguf_cache.damage(folder) is None and len(calls) == i + 2
        assert sorted(p.name for p in gguf_cache.cache_root().iterdir() if p.name != "gguf") == [folder.name]


def test_an_extra_file_fails_the_check(standin, capsys):
    cfg, _ = standin
    folder, _ = gguf_cache.converted_folder(cfg)
    made = contents(folder)
    (folder / "pytorch_model.bin").write_bytes(b"weights from somewhere else")
    assert gguf_cache.converted_folder(cfg) == (folder, True)
    assert "pytorch_model.bin should not be there" in capsys.readouterr().err
    assert contents(folder) == made


def test_a_folder_converted_by_an_older_kvlib_is_converted_again(standin, capsys):
    """Older kvlib wrote a record without "files": nothing to check the folder against, so it is made again."""
    cfg, calls = standin
    folder, _ = gguf_cache.converted_folder(cfg)
    record = json.loads((folder / gguf_cache.SOURCE_FILE).read_text())
    old = {k: record[k] for k in ("gguf", "sha256", "requirement", "dtype", "transformers", "converted")}
    (folder / gguf_cache.SOURCE_FILE).write_text(json.dumps(old, indent=2) + "\n")
    capsys.readouterr()
    assert gguf_cache.converted_folder(cfg) == (folder, True) and len(calls) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "converted by an older kvlib" in err and str(folder) in err
    assert gguf_cache.damage(folder) is None


def assert_weights_are_the_standins(lm, hf):
    """kvlib's model holds the stand-in's weights (not random ones, not damaged ones)."""
    assert lm.weights == "pretrained" and lm.warning is None
    expected = dict(build_model(lm.cfg).load_hf_state(hf).named_parameters())
    got = dict(lm.model.named_parameters())
    assert sorted(got) == sorted(expected)
    for name, p in expected.items():
        assert torch.equal(got[name], p), name


@pytest.mark.parametrize("kind", [*DAMAGE, "extra"])
@pytest.mark.parametrize("weights", ["pretrained", "auto"])
def test_loading_damaged_weights_loads_the_right_weights(standin, saved_models, capsys, kind, weights):
    """The whole load: from_pretrained reads the folder made again, never the damaged file, and `auto` keeps
    the pretrained weights (no quiet fall back to random ones)."""
    cfg, calls = standin
    folder, _ = gguf_cache.converted_folder(cfg)
    if kind == "extra":
        (folder / "model-00002-of-00002.safetensors").write_bytes(b"x" * 64)
    else:
        DAMAGE[kind](folder / "model.safetensors")
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RANDOM WEIGHTS warning fails the test
        lm = load(cfg.name, weights=weights, with_hf=False)
    assert_weights_are_the_standins(lm, saved_models["llama" if cfg.arch == "llama" else "gemma"][0])
    assert len(calls) == 2 and "failed its check" in capsys.readouterr().err


def continuation(out: str) -> str:
    return out.split("--- continuation ---\n", 1)[1].split("\n---", 1)[0]


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_generate_on_damaged_weights_says_so_in_one_line_and_generates_as_before(standin, capsys, kind):
    cfg, _ = standin
    args = ["generate", "--model", cfg.name, "--weights", "pretrained", "--max_new_tokens", "4", "--prompt", PROMPT]
    assert main(args) == 0
    before = continuation(capsys.readouterr().out)
    gguf_cache._loaded.clear()  # as a new process would: read the folder from disk
    folder, _ = gguf_cache.converted_folder(cfg)
    DAMAGE[kind](folder / "model.safetensors")
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert continuation(out) == before
    assert err.count("\n") == 1 and "failed its check" in err and "model.safetensors" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("weights", ["pretrained", "auto"])
def test_when_it_cannot_be_converted_again_the_cli_says_why_in_one_line(standin, monkeypatch, capsys, weights):
    """The damage is told, and so is why the folder cannot be made again: `pretrained` stops (exit 2), `auto`
    falls back to random weights with its warning naming the reason."""
    cfg, _ = standin
    folder, _ = gguf_cache.converted_folder(cfg)
    truncated(folder / "model.safetensors")

    def broken(gguf, dest):
        raise ValueError("tensor blk.0 has a bad shape")

    monkeypatch.setattr(gguf_cache, "_convert", broken)
    capsys.readouterr()
    code = main(["generate", "--model", cfg.name, "--weights", weights, "--max_new_tokens", "2", "--prompt", PROMPT])
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert "failed its check (model.safetensors has" in lines[0] and "Traceback" not in err
    if weights == "pretrained":
        assert code == 2 and len(lines) == 2 and lines[1].startswith("error: pretrained weights for")
    else:
        assert code == 0 and "RANDOM WEIGHTS" in err and "RANDOM WEIGHTS" in out
    assert "cannot read" in lines[1] and "tensor blk.0 has a bad shape" in lines[1]


def test_a_process_reads_its_weights_again_when_the_files_change(standin, saved_models):
    """The in-process cache hands out the same objects while the files are untouched; a file rewritten in place
    (transformers maps it, so weights already loaded would follow it) is checked and the folder made again."""
    cfg, calls = standin
    hf = saved_models["llama" if cfg.arch == "llama" else "gemma"][0]
    first = gguf_cache.load_gguf_weights(cfg)
    again = gguf_cache.load_gguf_weights(cfg)
    assert again.hf is first.hf and not again.converted and len(calls) == 1
    same_size(first.folder / "model.safetensors")
    third = gguf_cache.load_gguf_weights(cfg)
    assert third.hf is not first.hf and third.converted and len(calls) == 2
    for (name, p), (_, q) in zip(third.hf.named_parameters(), hf.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_loading_in_a_second_dtype_leaves_the_first_loads_model_alone(standin):
    """Regression: `load` converted the process's cached Hugging Face model in place (Module.to), so loading a
    GGUF preset in bfloat16 turned every earlier float32 load's HF model into bfloat16 (the bench's long-context
    rows after its bfloat16 rows then failed in SDPA, on a CPU with native bfloat16)."""
    cfg, calls = standin
    f32 = load(cfg.name, weights="pretrained")
    bf16 = load(cfg.name, weights="pretrained", dtype="bfloat16")
    assert all(p.dtype == torch.float32 for p in f32.hf.parameters())
    assert all(p.dtype == torch.bfloat16 for p in bf16.hf.parameters()) and bf16.hf is not f32.hf
    again = load(cfg.name, weights="pretrained")
    assert again.hf is f32.hf and len(calls) == 1  # float32 on the CPU: the cached model itself, converted once
    for (name, p), (_, q) in zip(f32.hf.named_parameters(), bf16.hf.named_parameters(), strict=True):
        assert torch.equal(p.bfloat16(), q), name
