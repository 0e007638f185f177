"""kvlib's few-row matrix kernel: a decode step's matrix work at the speed of reading the weights.

A decode step multiplies one row per sequence by every weight matrix: each weight is read once and used for a few
multiply-adds, so the step can go no faster than memory delivers the weights (the floor, kvlib.measure.roofline).
The libraries PyTorch calls for a single row read far slower than that on some CPUs. Measured on a 2-core AMD EPYC
Zen 4 (AVX-512, 2026-12-08), SmolLM2-135M's 121 matrices (513 MiB float32) streamed one after the other, the
kernels interleaved: F.linear (MKL) about 11 GB/s, oneDNN's packed kernel about 15 GB/s in the model, the
torch.compile'd one-row kernel 18-20 GB/s, while a plain read of the same matrices (`w.sum(dim=1)`) took 27-36
GB/s. This kernel (`matvec.c`, beside this file) is that plain read with the multiply-adds in it, and it read as
fast as the plain read (36.0 against 36.5 GB/s in float32, 39.7 against 38.0 GB/s in bfloat16, one run):
docs/2026-12-08-matvec.md. For up to MAX_ROWS input rows (a decode batch) each weight row is read once and
multiplied by every input row while it sits in the L1 cache.

It is a C file compiled for this CPU by the system's C compiler (`$CC`, else `cc`; `-O3 -march=native
-fopenmp`) the first time a process asks for it, and kept in `$KVLIB_CACHE/kernels/` (default ~/.cache/kvlib), one
file per source, compiler and CPU, then loaded with ctypes: no build step, no Python headers, no extra package.
Each call asks OpenMP for `torch.get_num_threads()` threads. With the PyTorch CPU wheel this project pins, torch's
own libgomp.so.1 is loaded first and the kernel's OpenMP resolves to it (one thread pool for both); a PyTorch built
with another OpenMP (a renamed libgomp, libomp) would add the system's as a second pool. Where it cannot be built or
loaded (no compiler, no OpenMP, an unwritable cache...) `available` says no, one note is printed per process, and
the fast path uses the library kernels. KVLIB_C_KERNEL=0 turns it off (read when asked).

Float32 results equal F.linear's within float32 rounding (the additions in the vector lanes' order: tests give
the same tokens as the naive path); bfloat16 accumulates in float32 and rounds once to bfloat16, as oneDNN does.
It is one candidate of the fast path's measured choice (kvlib.models.fastpath.one_row_kernel, batch_kernel), not a
given.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from kvlib.core.hardware import cpu_flags
from kvlib.models.gguf_cache import cache_root

SOURCE = Path(__file__).with_name("matvec.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c11", "-shared", "-fPIC")
DTYPES = (torch.float32, torch.bfloat16)
MAX_ROWS = 16  # the rows one call takes (a decode step's batch): their inputs stay in the L1/L2 cache
ENV = "KVLIB_C_KERNEL"  # "0", "false", "no" or "off": not used

_lib: ctypes.CDLL | None = None
_why_not: str | None = None  # why the kernel is unavailable in this process (set on the first failure)
_noted = False


def enabled() -> bool:
    """Whether KVLIB_C_KERNEL allows the kernel (on unless set to 0, false, no or off)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def compiler() -> list[str] | None:
    """The C compiler's command: $CC (split as a shell would: "ccache gcc"), else `cc` or `gcc` on PATH; None when
    there is none."""
    cc = shlex.split(os.environ.get("CC", ""))
    found = shutil.which("cc") or shutil.which("gcc")
    return cc or ([found] if found else None)


def library_path(cc: list[str]) -> Path:
    """Where the kernel built by `cc` for this CPU is kept: one file per source text, compiler (its version line),
    flags, machine and CPU flags, so that a changed source or another CPU builds anew."""
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(cc).encode(), version.encode(), " ".join(FLAGS).encode(),
                 platform.machine().encode(), " ".join(sorted(cpu_flags() or ())).encode()):  # fmt: skip
        key.update(part + b"\0")
    return cache_root() / "kernels" / f"matvec-{key.hexdigest()[:16]}.so"


def build(cc: list[str], target: Path) -> None:
    """Compile SOURCE with `cc` into `target` (written whole under a temporary name, then renamed: processes
    building at once never load a half-written file; readable by all, like any file the umask allows). Raises
    OSError or RuntimeError (the compiler's first error line)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([*cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            errors = [line for line in lines if "error" in line.lower()] or lines
            message = errors[0] if errors else "no message"
            raise RuntimeError(f"{' '.join(cc)} exited with {done.returncode}: {message}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o755 & ~umask)  # mkstemp made it private
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL | None:
    global _lib, _why_not
    if _lib is not None or _why_not is not None:
        return _lib
    cc = compiler()
    if cc is None:
        _why_not = "no C compiler (set CC or install gcc)"
        return None
    try:
        path = library_path(cc)
        if not path.exists():
            build(cc, path)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:  # a damaged file (a disk filled while another process wrote it...): built once more
            path.unlink(missing_ok=True)
            build(cc, path)
            lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _why_not = f"could not build or load it ({e})"
        return None
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.kvlib_linear_f32.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, c_int]
    lib.kvlib_linear_bf16.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, c_int, ptr]
    lib.kvlib_linear_f32.restype = lib.kvlib_linear_bf16.restype = None
    _lib = lib
    return lib


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the kernel serves weights of `dtype` in this process: float32 or bfloat16, KVLIB_C_KERNEL not off,
    and built and loaded (the first call builds it: about a second; a failure prints one note per process)."""
    global _noted
    if dtype not in DTYPES or not enabled():
        return False
    if _lib is not None:  # asked on every one-row Linear call: the quick answer first
        return True
    if _load() is not None:
        return True
    if not _noted:
        _noted = True
        print(f"note: kvlib's C matrix-vector kernel is not used: {_why_not}", file=sys.stderr)
    return False


def reads(w: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Whether the kernel can read weight `w` and bias `b` as they are: a row-major (out, in) CPU matrix of float32
    or bfloat16, and no bias or an (out,) CPU vector of the same dtype. (Whether it is built: `available`.)"""
    if w.dtype not in DTYPES or not w.is_cpu or w.dim() != 2 or not w.is_contiguous():
        return False
    return b is None or (b.dtype == w.dtype and b.is_cpu and b.dim() == 1 and b.numel() == w.shape[0])


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor | None:
    """x @ w.T (+ b) for a few rows: x (rows, in) with 1 <= rows <= MAX_ROWS, w (out, in), b (out,) or None, all
    CPU tensors of one dtype (float32 or bfloat16); returns (rows, out) in that dtype, or None where the kernel
    cannot serve them (unavailable, another dtype or device, more rows, a weight that is not row-major, a bias of
    another shape: `reads`): the caller then uses another kernel. Inference only: the result has no gradient."""
    if not reads(w, b) or x.dtype != w.dtype or not x.is_cpu or x.dim() != 2 or x.shape[1] != w.shape[1]:
        return None
    if not 1 <= x.shape[0] <= MAX_ROWS or not available(w.dtype):
        return None
    return run(x, w, b)


def run(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor | None:
    """`linear` without its checks, for a caller that made them once (kvlib.models.fastpath.Linear.kernel_for:
    `reads`, `available`, the dtype, the row count), so that a decode step does not pay for them twice per matrix.
    None only if the kernel is not loaded."""
    lib = _lib
    if lib is None:
        return None
    rows = x.shape[0]
    x = x.contiguous()
    b = None if b is None else b.contiguous()
    out, inp = w.shape
    y = torch.empty(rows, out, dtype=w.dtype)
    bias = None if b is None else b.data_ptr()
    threads = torch.get_num_threads()
    if w.dtype == torch.float32:
        lib.kvlib_linear_f32(w.data_ptr(), x.data_ptr(), bias, y.data_ptr(), out, inp, rows, threads)
    else:
        scratch = torch.empty(rows, inp, dtype=torch.float32)
        lib.kvlib_linear_bf16(
            w.data_ptr(), x.data_ptr(), bias, y.data_ptr(), out, inp, rows, threads, scratch.data_ptr()
        )
    return y
