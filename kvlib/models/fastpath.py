"""The fast path of CPU inference: the kernels kvlib's model uses when no gradient is needed.

A decode step multiplies one row per sequence by every weight matrix, so its time is mostly the time to stream
the weights from memory (kvlib.measure.roofline), and that depends on the kernel more than on anything else. What plain
PyTorch does for these shapes on CPU, and what this module does instead (measured, README "Speed"):

- `Linear`: F.linear hands MKL (float32) or oneDNN (bfloat16) a plain weight. oneDNN then re-packs the whole
  matrix into its blocked layout on every call, and MKL's kernels for a few rows were slow on the study's CPU.
  `Linear` packs the weight for oneDNN once and keeps the packed copy (it costs the weight's size in memory).
  For several rows (batch > 1 decoding) MKL's own packed matrix product (`cblas_sgemm_pack` / `_compute`, float32
  only; the kernel Inductor uses for frozen float32 linears) is a second candidate: packed for exactly that many
  rows, it streamed smollm2's and distilgpt2's matrices 10-12% faster than oneDNN's at 4 and 8 rows on an Intel
  Xeon; `batch_kernel` measures which one this CPU runs faster, and only the winner's copy is held. For one row
  (batch-1 decoding)
  which kernel wins depends on the CPU (measured: MKL's plain F.linear on an Intel Xeon with AVX-512, the packed
  one on an AMD EPYC): `prepare_for_inference` times both on the model's own matrices once per process
  (`ONE_ROW_KERNEL = "auto"`), and when plain wins, batch-1 decoding holds no packed copy at all (the copies are
  released; the prompt's many rows go through F.linear, as fast for many rows).
- kvlib's C kernel (`kvlib.models.matvec`, "kvlib C"): a few rows times a weight matrix, each weight row read once
  while every input row multiplies it, compiled for this CPU by the system's C compiler on first use. On a 2-core
  AMD EPYC Zen 4 (2026-12-08) it streamed SmolLM2's matrices as fast as a plain read of them, where oneDNN's and
  MKL's kernels reached a third to a half of that, and took the batch-1 step from 35.9 to 25.9 ms (interleaved,
  6 rounds each, ranges 34.9-38.6 and 25.5-26.3 ms: docs/2026-12-08-matvec.md). It is one more measured
  candidate, for one row (`one_row_kernel`) and for a decode batch of up to `matvec.MAX_ROWS` rows
  (`batch_kernel`); where it wins, no packed copy is held. Where there is no C compiler it is left out, with one
  note.
- `one_row_matvec`: for a single row (batch 1 decoding) a matrix-vector product written as one float32 dot
  product per output, compiled by torch.compile into one vectorised loop over the weight: faster than either
  library's kernel here. Optional (`prepare_for_inference(..., compile_one_row=True)`; its default is the
  environment's KVLIB_COMPILE=1, `compile_default`): compiling takes seconds once per process, which
  `prepare_for_inference` spends before any timed step. The model keeps the choice (each Linear's), so that a later
  preparation that does not say (`generate`'s own, the harness's) keeps it too.
- `one_query_attention`: attention of one new token written out; in half precision PyTorch's fused CPU kernel
  (tiled for many queries) was slower for one query.
- A dtype the CPU only emulates (kvlib.core.hardware decides: no native half-precision arithmetic): weights are packed
  for oneDNN only where PyTorch's oneDNN accepts the dtype on this CPU (float16 never: it always takes F.linear),
  and `prepare_for_inference` prints one note per process and dtype naming the CPU feature missing.

Everything here computes the function of the textbook path (float32 tokens are identical; tests prove it) and
steps aside under autograd, on CUDA and under torch.compile.

One concept in one file (over 400 lines): the CPU fast path of a decode step (kernel choice, packed weights, one-row
kernels).
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
import warnings
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kvlib.core.hardware import dtype_support
from kvlib.models import matvec

# Module-level switches, so that the tests can compare with and without each part (nothing sets them at run time).
PACK_CPU_WEIGHTS = True  # Linear multiplies with packed weights, oneDNN's or MKL's, or kvlib's C kernel (False: plain
# F.linear, the reference the tests compare the fast kernels with)
# one-row inputs: "packed", "plain" (F.linear), "cmatvec" (kvlib's C kernel, kvlib.models.matvec), "compiled" (needs
# compile_one_row, prepare_for_inference) or "auto"
ONE_ROW_KERNEL = "auto"
# several rows (batch > 1 decoding): "packed" (oneDNN), "mkl" (MKL's packed sgemm), "cmatvec" (kvlib's C kernel, up
# to matvec.MAX_ROWS rows), "plain" (F.linear) or "auto"
BATCH_KERNEL = "auto"


def compile_default() -> bool:
    """Whether the one-row kernel is compiled where no caller said (`prepare_for_inference`'s `compile_one_row`):
    the environment's KVLIB_COMPILE ("1", "true", "yes" or "on"; off when unset), read when asked."""
    return os.environ.get("KVLIB_COMPILE", "0").lower() in ("1", "true", "yes", "on")


class _PackedWeight:
    """A weight packed for oneDNN or for MKL, and the weight it was made from. A cache, not state: copies and
    pickles of a model start without the packed tensor (opaque, it can be neither), with the kernel chosen."""

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None
        self.source: weakref.ref | None = None  # the storage packed from: a new tensor means a new packing
        self.version = -1  # its version counter then: an in-place write (copy_, init_random) means a new packing
        self.packed_as: tuple[str, int] | None = None  # ("onednn", 0) or ("mkl", rows) of `tensor`
        # What prepare_for_inference chose: "onednn" (every row count), "mkl" (for `rows` rows; any other count
        # goes through F.linear), "cmatvec" (kvlib's C kernel for `rows` rows, nothing held) or None (nothing held:
        # F.linear, or a one-row kernel that needs no copy: compiled, kvlib's C kernel).
        self.kind: str | None = "onednn"
        self.rows = 0
        # Whether one-row inputs may take the compiled kernel, as prepare_for_inference was told (None: not
        # prepared yet, the environment's default, `compile_default`).
        self.compile_one_row: bool | None = None

    def __deepcopy__(self, memo: dict) -> _PackedWeight:
        return _PackedWeight._chosen(self.kind, self.rows, self.compile_one_row)

    def __reduce__(self) -> tuple:
        return (_PackedWeight._chosen, (self.kind, self.rows, self.compile_one_row))

    def clear(self) -> None:
        """Drop the packed tensor (the kernel chosen stays): it is made again when wanted."""
        self.tensor, self.source, self.packed_as = None, None, None

    def compiles_one_row(self) -> bool:
        """Whether one-row inputs may take the compiled kernel: as prepared, else the environment's default."""
        return compile_default() if self.compile_one_row is None else self.compile_one_row

    @staticmethod
    def _chosen(kind: str | None, rows: int, compile_one_row: bool | None = None) -> _PackedWeight:
        """A new, empty cache for the same choice of kernel (what copies and unpickled models get)."""
        pk = _PackedWeight()
        pk.kind, pk.rows, pk.compile_one_row = kind, rows, compile_one_row
        return pk


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state_dict, same function) with the fast CPU inference kernels."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self._packed = _PackedWeight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fast_cpu_inference(x) and x.dtype == self.weight.dtype:
            rows = x.numel() // x.shape[-1]
            kernel = self.kernel_for(rows)
            if kernel == "compiled":
                y = one_row_matvec(x.reshape(-1), self.weight, self.bias)
                if y is not None:
                    return y.view(*x.shape[:-1], -1)
                kernel = self.kernel_for(rows)  # compiling failed (warned once): the next kernel in line
            if kernel == "cmatvec":  # kernel_for made matvec.linear's checks: run it without them
                y = matvec.run(x.reshape(rows, -1), self.weight, self.bias)
                if y is not None:
                    return y.view(*x.shape[:-1], -1)
            packed = self.packed_weight() if kernel in ("packed", "mkl") else None
            if packed is not None and kernel == "mkl":  # packed for exactly this many rows
                return torch.ops.mkl._mkl_linear(x, packed, self.weight, self.bias, rows)
            if packed is not None:
                return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def kernel_for(self, rows: int) -> str:
        """The kernel `forward` uses for an input of `rows` rows on CPU without autograd: "compiled" (the one-row
        kernel, where this Linear was prepared with `compile_one_row`), "cmatvec" (kvlib's C kernel, where it was
        chosen or forced for this row count and can read this weight), "mkl" (MKL's packing, made for exactly this
        many rows), "packed" (oneDNN's) or "plain" (F.linear: PACK_CPU_WEIGHTS off, no packing chosen, another row
        count than MKL's, or a weight no library can pack)."""
        w, pk = self.weight, self._packed
        compiling = rows == 1 and pk.compiles_one_row()  # asked once: it reads the environment
        if compiling and not _compile_failed and _one_row_compiled(w.dtype):
            return "compiled"
        if not PACK_CPU_WEIGHTS or not w.is_cpu:
            return "plain"
        c_kernel = (rows == 1 and _one_row_cmatvec(w.dtype, compiling)) or (
            pk.kind == "cmatvec" and rows == pk.rows and matvec.available(w.dtype)
        )
        if c_kernel and matvec.reads(w, self.bias):
            return "cmatvec"
        if w.is_inference():  # no version counter: see packed_weight
            return "plain"
        if pk.kind == "mkl":
            return "mkl" if rows == pk.rows and _mkl_packable(w.dtype) else "plain"
        if pk.kind == "onednn" and _onednn(w.dtype):
            return "plain" if rows == 1 and _one_row_plain(w.dtype) else "packed"
        return "plain"

    def packed_weight(self) -> torch.Tensor | None:
        """The weight packed for the kernel chosen (`_packed.kind`: oneDNN's, or MKL's for `_packed.rows` rows),
        packed now if the weight changed since, or None where that library can't serve it."""
        w, pk = self.weight, self._packed
        if pk.kind == "mkl":
            if not _mkl_packable(w.dtype) or not w.is_cpu:
                return None
            packed_as = ("mkl", pk.rows)
        else:
            if not w.is_cpu or not _onednn(w.dtype):
                return None
            packed_as = ("onednn", 0)
        try:
            version = w._version
        except RuntimeError:  # a weight made under inference_mode has no version counter: changes would go unseen
            return None
        storage = w.untyped_storage()
        stale = pk.source is None or pk.source() is not storage or pk.version != version
        if pk.tensor is None or stale or pk.packed_as != packed_as:
            pk.tensor = None  # free the stale copy before making the new one
            if packed_as[0] == "mkl":
                pk.tensor = torch.ops.mkl._mkl_reorder_linear_weight(w.detach(), pk.rows)
            else:
                pk.tensor = torch.ops.mkldnn._reorder_linear_weight(w.detach())
            pk.source, pk.version, pk.packed_as = weakref.ref(storage), version, packed_as
        return pk.tensor


def fast_cpu_inference(x: torch.Tensor) -> bool:
    """Whether the fast kernels may serve `x`: on CPU, no autograd, and not inside torch.compile's tracing (which
    chooses its own kernels)."""
    return x.is_cpu and not torch.is_grad_enabled() and not torch.compiler.is_compiling()


_ONEDNN: dict[torch.dtype, bool] = {}
PACKED_DTYPES = (torch.float32, torch.bfloat16)  # the dtypes whose weights the fast path packs for oneDNN
_NOTED: set[torch.dtype] = set()  # dtypes whose emulation note this process has printed


def _onednn(dtype: torch.dtype) -> bool:
    """Whether the fast path may pack weights of `dtype` for oneDNN: one of PACKED_DTYPES, and accepted by PyTorch's
    oneDNN on this CPU (kvlib.core.hardware.dtype_support decides: bfloat16 needs AVX-512 or AVX-NE-CONVERT there, and
    oneDNN raises instead of running it without). float16 is never packed: it takes F.linear."""
    if dtype not in _ONEDNN:
        _ONEDNN[dtype] = dtype in PACKED_DTYPES and dtype_support(dtype, "cpu").onednn
    return _ONEDNN[dtype]


def note_emulated(dtype: torch.dtype) -> None:
    """Print one line on stderr, once per process and dtype, when the CPU only emulates `dtype` (no native
    arithmetic: kvlib.core.hardware), saying which CPU feature is missing and which kernels run it instead."""
    if dtype in _NOTED:
        return
    _NOTED.add(dtype)
    note = dtype_support(dtype, "cpu").note
    if note:
        print(f"note: {note}", file=sys.stderr)


@functools.cache  # asked on every Linear call of the decode path: answered once per dtype
def _mkl_packable(dtype: torch.dtype) -> bool:
    """Whether MKL's packed matrix product is available for `dtype` (float32 only, a build with MKL: x86 wheels)."""
    return (
        dtype == torch.float32
        and torch.backends.mkl.is_available()
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    )


def _matvec(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """w @ x + b for one row x (in,) and w (out, in), as one dot product per output, in float32.
    Compiled, this is a single loop that reads each weight row once with vector instructions; eager PyTorch
    would first materialise the whole product w * x."""
    y = (w.float() * x.float()).sum(-1)  # (out,)
    if b is not None:
        y = y + b.float()
    return y.to(x.dtype)


_compiled_matvec: Callable | None = None
_compile_failed = False


def one_row_matvec(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor | None:
    """The compiled `_matvec` (shapes dynamic: one compilation serves every matrix), or None when torch.compile
    is not available here (no C++ compiler, ...): then the caller uses the packed kernel, after one warning."""
    global _compiled_matvec, _compile_failed
    if _compile_failed:
        return None
    if _compiled_matvec is None:
        _compiled_matvec = torch.compile(_matvec, dynamic=True)
    try:
        # Detached, the weight is a plain tensor to torch.compile: its shape is then dynamic like any input's,
        # so one compilation per (dtype, bias or not) serves every matrix. A Parameter's shape would be
        # specialised: a recompilation per matrix shape, and past torch's limit of 8, silent eager execution.
        return _compiled_matvec(x, w.detach(), None if b is None else b.detach())
    except Exception as e:  # compile errors surface on the first call
        _compile_failed = True
        warnings.warn(f"torch.compile of the one-row kernel failed, using oneDNN instead: {e}", stacklevel=2)
        return None


def one_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention of one new token over S keys, written out: scores, softmax (in float32), weighted sum of values.

    q (B, nh, 1, hd); k, v (B, nkv, S, hd); mask None or bool (B or 1, 1, 1, S), True where a key may be seen.
    For a single query the work is two matrix-vector products per head. PyTorch's fused CPU kernel for
    scaled_dot_product_attention is tiled for many queries; in bfloat16 it was slower for one query than these
    three plain ops, in float32 it was not (so float32 keeps it). Grouped-query attention needs no copy of K or V:
    the g = nh / nkv query heads of a group are g rows multiplying their group's keys.
    """
    B, nh, _, hd = q.shape
    nkv = k.shape[1]
    q = q.reshape(B, nkv, nh // nkv, hd)  # (B, nkv, g, hd)
    scores = (q @ k.transpose(-1, -2)).float() * hd**-0.5  # (B, nkv, g, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    y = scores.softmax(-1).to(v.dtype) @ v  # (B, nkv, g, hd)
    return y.reshape(B, nh, 1, hd)


_matvec_ready: set[tuple] = set()  # (dtype, out, in, has bias) already run through the compiled kernel
_ONE_ROW_CHOICE: dict[torch.dtype, str] = {}  # dtype -> "packed", "plain" or "cmatvec": the measured one-row winner
_COMPILED_CHOICE: dict[torch.dtype, str] = {}  # dtype -> the winner with the compiled kernel among the candidates
_BATCH_CHOICE: dict[tuple, str] = {}  # (dtype, rows, the model's matrix shapes) -> "packed", "mkl", "cmatvec", "plain"
KERNEL_NAMES = {
    "plain": "F.linear",
    "packed": "oneDNN packed",
    "mkl": "MKL packed",
    "compiled": "compiled",
    "cmatvec": "kvlib C",
}


def _shapes(model: nn.Module, dtype: torch.dtype) -> dict[tuple[int, int], int]:
    """(out_features, in_features) -> how many of `model`'s CPU Linears in `dtype` have that shape."""
    shapes: dict[tuple[int, int], int] = {}
    for m in model.modules():
        if isinstance(m, Linear) and m.weight.is_cpu and m.weight.dtype == dtype:
            shapes[(m.out_features, m.in_features)] = shapes.get((m.out_features, m.in_features), 0) + 1
    return shapes


STREAM_BYTES = 64 * 2**20  # `_fastest` cycles through distinct copies of a shape's weight up to this many bytes


def stream_copies(shape: tuple[int, int], count: int, element_size: int, model_bytes: int) -> int:
    """How many distinct weights of `shape` `_fastest` times in turn, so that the kernels read them from memory as a
    decode step does, not from a CPU cache that one repeated matrix fits in: enough to fill STREAM_BYTES (at least
    one). A model whose matrices all fit in STREAM_BYTES (`model_bytes`) is read from the cache in its own decode
    steps too: then no more copies than the model has of that shape (`count`). Otherwise a shape's few copies
    would fit the cache although, in a decode step, every other matrix evicts them between two uses."""
    n = max(1, math.ceil(STREAM_BYTES / (shape[0] * shape[1] * element_size)))
    return min(n, count) if model_bytes <= STREAM_BYTES else n


def _fastest(model: nn.Module, dtype: torch.dtype, rows: int, candidates: list[str]) -> str:
    """The fastest of `candidates` ("plain", "packed", "mkl", "compiled") for `rows` rows times `model`'s matrices
    in `dtype`: every distinct Linear shape (weighted by how often it occurs: one decode step's matrix work), each
    kernel in turn, interleaved (order reversed every other round), median of 5 rounds after one warm-up round.
    Each shape is timed over `stream_copies` distinct random weights in turn (filling STREAM_BYTES), so that the
    weights stream from memory as a decode step's do. One shape at a time, its weights and packed copies freed
    before the next: the memory this borrows is at most STREAM_BYTES (and their packed copies) or one matrix.
    Regression: timed on one weight per shape, read again and again from the CPU's cache, the choice measured
    kernels as no decode step runs them (SmolLM2's matrices, 0.4-3.5 MiB, fit the 32 MiB L3 of a Zen 3), and it
    flipped between F.linear and oneDNN from process to process (tests/test_fast_decode.py::
    test_kernel_choice_streams_distinct_weights). In whole decode steps on that machine the two were within its
    noise of each other at batch 1 (interleaved A/Bs: 78.4 vs 78.5 ms, 64.0 vs 67.8 ms). "plain" when the model
    has no such matrix."""
    shapes = _shapes(model, dtype)
    if not shapes or candidates == ["plain"]:
        return "plain"
    kernels = {
        "plain": lambda x, w, pk: F.linear(x, w),
        "packed": lambda x, w, pk: torch.ops.mkldnn._linear_pointwise(x, pk["packed"], None, "none", [], ""),
        "mkl": lambda x, w, pk: torch.ops.mkl._mkl_linear(x, pk["mkl"], w, None, rows),
        "compiled": lambda x, w, pk: one_row_matvec(x.reshape(-1), w, None),
        "cmatvec": lambda x, w, pk: matvec.linear(x, w, None),
    }
    kernels = {k: v for k, v in kernels.items() if k in candidates}
    rounds: list[dict[str, float]] = [dict.fromkeys(kernels, 0.0) for _ in range(6)]
    gen = torch.Generator().manual_seed(0)
    size = dtype.itemsize
    model_bytes = sum(o * i * c * size for (o, i), c in shapes.items())
    for (out_f, in_f), count in shapes.items():
        n = stream_copies((out_f, in_f), count, size, model_bytes)
        ws = [(torch.randn(out_f, in_f, generator=gen) * 0.02).to(dtype) for _ in range(n)]
        packs = [
            {
                "packed": torch.ops.mkldnn._reorder_linear_weight(w) if "packed" in kernels else None,
                "mkl": torch.ops.mkl._mkl_reorder_linear_weight(w, rows) if "mkl" in kernels else None,
            }
            for w in ws
        ]
        x = torch.randn(rows, in_f, generator=gen).to(dtype)
        for r, totals in enumerate(rounds):
            for name in kernels if r % 2 == 0 else list(kernels)[::-1]:
                t0 = time.perf_counter()
                for w, packed in zip(ws, packs, strict=True):
                    kernels[name](x, w, packed)
                totals[name] += (time.perf_counter() - t0) * count / n
        del ws, packs
    medians = {k: sorted(t[k] for t in rounds[1:])[2] for k in kernels}  # round 0 warms up
    return min(medians, key=medians.get)


def one_row_kernel(model: nn.Module, dtype: torch.dtype, with_compiled: bool = False) -> str:
    """The fastest kernel for one row on this CPU, "packed", "plain" or "cmatvec" (kvlib's C kernel, where it
    could be built), or "compiled" when `with_compiled` (the torch.compile'd `one_row_matvec`, compiled by then),
    for `model`'s matrices in `dtype`.

    ONE_ROW_KERNEL when set; else measured once per process and dtype (`_fastest`). (Measured on a 2-core Intel
    Xeon with AVX-512, 2026-11-30: the compiled kernel made SmolLM2's batch-1 step 64 ms against 42 ms with
    F.linear, so "compiled" is a candidate, not a given. MKL's packed kernel is not one for a single row: packed
    for one row it held 1.31x the weights' bytes on smollm2, for 2-20% off the step, README "Speed".)"""
    if ONE_ROW_KERNEL in ("packed", "plain") or (ONE_ROW_KERNEL == "compiled" and with_compiled):
        return ONE_ROW_KERNEL
    if ONE_ROW_KERNEL == "cmatvec" and matvec.available(dtype):
        return ONE_ROW_KERNEL
    _check_switch("ONE_ROW_KERNEL", ONE_ROW_KERNEL, ("auto", "plain", "packed", "compiled", "cmatvec"))
    choices = _COMPILED_CHOICE if with_compiled else _ONE_ROW_CHOICE
    if dtype not in choices:
        candidates = ["plain"] + (["packed"] if _onednn(dtype) else [])
        candidates += ["cmatvec"] if matvec.available(dtype) else []
        linears = (m for m in model.modules() if isinstance(m, Linear) and m.weight.is_cpu and m.weight.dtype == dtype)
        first = next(linears, None) if with_compiled else None
        if first is not None:  # compiled by then (prepare_for_inference): this only checks it
            w = first.weight.detach()
            if one_row_matvec(torch.zeros(w.shape[1], dtype=dtype), w, None) is not None:
                candidates.append("compiled")
        choices[dtype] = _fastest(model, dtype, 1, candidates)
    return choices[dtype]


def batch_kernel(model: nn.Module, dtype: torch.dtype, rows: int) -> str:
    """The fastest kernel for `rows` > 1 rows (batch > 1 decoding) on this CPU: "packed" (oneDNN), "mkl" (MKL's
    packed sgemm, packed for exactly `rows` rows; float32), "cmatvec" (kvlib's C kernel, up to `matvec.MAX_ROWS`
    rows, where it could be built) or "plain" (F.linear), for `model`'s matrices in `dtype`.

    BATCH_KERNEL when set (a kernel this build or dtype lacks gives way to "packed", else "plain"); else measured
    once per process, dtype, row count and set of matrix shapes (`_fastest`). Raises ValueError for an unknown
    BATCH_KERNEL. Measured on a 2-core Intel Xeon with AVX-512, 2026-11-30, smollm2-135m's 121 matrices
    streamed from memory: 4 rows MKL packed 36.1 ms, oneDNN packed 40.1, F.linear 53.1; 8 rows 38.0, 43.3, 61.0
    (README "Speed")."""
    _check_switch("BATCH_KERNEL", BATCH_KERNEL, ("auto", "plain", "packed", "mkl", "cmatvec"))
    available = ["plain"] + (["packed"] if _onednn(dtype) else []) + (["mkl"] if _mkl_packable(dtype) else [])
    available += ["cmatvec"] if rows <= matvec.MAX_ROWS and matvec.available(dtype) else []
    if BATCH_KERNEL != "auto":
        return BATCH_KERNEL if BATCH_KERNEL in available else ("packed" if "packed" in available else "plain")
    key = _batch_key(model, dtype, rows)
    if key not in _BATCH_CHOICE:
        _BATCH_CHOICE[key] = _fastest(model, dtype, rows, available)
    return _BATCH_CHOICE[key]


def _batch_key(model: nn.Module, dtype: torch.dtype, rows: int) -> tuple:
    return (dtype, rows, tuple(sorted(_shapes(model, dtype).items())))


def _check_switch(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"kvlib.models.fastpath.{name} is {value!r}; choose one of {', '.join(allowed)}")


def model_kernel(model: nn.Module, rows: int) -> str:
    """What `model`'s CPU Linears use for inputs of `rows` rows now (after `prepare_for_inference`), by name:
    "F.linear", "oneDNN packed", "MKL packed", "kvlib C" or "compiled", or several joined by " + " when they differ;
    "-" when the model has no CPU Linear."""
    kernels = sorted({m.kernel_for(rows) for m in model.modules() if isinstance(m, Linear) and m.weight.is_cpu})
    return " + ".join(KERNEL_NAMES[k] for k in kernels) or "-"


def _one_row_plain(dtype: torch.dtype) -> bool:
    return ONE_ROW_KERNEL == "plain" or (ONE_ROW_KERNEL == "auto" and _ONE_ROW_CHOICE.get(dtype) == "plain")


def _one_row_cmatvec(dtype: torch.dtype, compiling: bool) -> bool:
    """Whether one-row inputs take kvlib's C kernel: forced (where it is available), or measured the fastest by
    `one_row_kernel` (with the compiled kernel among the candidates when `compiling`)."""
    if ONE_ROW_KERNEL not in ("auto", "cmatvec"):
        return False
    chosen = ONE_ROW_KERNEL == "cmatvec" or (_COMPILED_CHOICE if compiling else _ONE_ROW_CHOICE).get(dtype) == "cmatvec"
    return chosen and matvec.available(dtype)


def _one_row_compiled(dtype: torch.dtype) -> bool:
    """Whether one-row inputs take the compiled kernel (`compile_one_row` on): forced, or measured the fastest by
    `one_row_kernel(..., with_compiled=True)`, or not measured yet (then compiled, as asked)."""
    if ONE_ROW_KERNEL in ("packed", "plain", "cmatvec"):
        return False
    return ONE_ROW_KERNEL == "compiled" or _COMPILED_CHOICE.get(dtype, "compiled") == "compiled"


def release_packed(model: nn.Module) -> None:
    """Drop the packed copies of `model`'s weights (they are made again when wanted)."""
    for m in model.modules():
        if isinstance(m, Linear):
            m._packed.clear()


def _will_measure(model: nn.Module, dtype: torch.dtype, batch_size: int, compiling: bool) -> bool:
    """Whether preparing `model` for `batch_size` rows will time the kernels (no choice made yet for them)."""
    if batch_size in (0, 1):
        return ONE_ROW_KERNEL == "auto" and dtype not in (_COMPILED_CHOICE if compiling else _ONE_ROW_CHOICE)
    return BATCH_KERNEL == "auto" and _batch_key(model, dtype, batch_size) not in _BATCH_CHOICE


@torch.inference_mode()
def prepare_for_inference(model: nn.Module, batch_size: int = 1, *, compile_one_row: bool | None = None) -> float:
    """Get `model` ready to decode `batch_size` rows (0: at load time, as for 1 but without compiling) now rather
    than inside a timed prefill or decode step, holding one copy of each weight at most beside the parameter:

    - batch 1: the one-row kernel (`one_row_kernel`); when it is not the packed one (compiled, or F.linear where
      it measured faster) the packed copies are released, so that only the parameters are held; the one-row
      kernel is compiled first if batch-1 decoding will use it;
    - batch > 1: the kernel for that many rows (`batch_kernel`): oneDNN's packing, MKL's packing for exactly
      `batch_size` rows (any other row count, such as the prompt's, then goes through F.linear, measured as fast
      there), or none.

    `compile_one_row`: whether the torch.compile'd one-row kernel is a candidate for one-row inputs (compiled here
    for batch 1). The model keeps it (each Linear's `kernel_for` reads it), and None, the default, keeps what the
    model was prepared with before (so that `generate`'s own preparation and the harness's keep a caller's choice),
    else the environment's KVLIB_COMPILE (`compile_default`).

    Returns the seconds this took (about 0 when all was ready)."""
    t0 = time.perf_counter()
    linears = [m for m in model.modules() if isinstance(m, Linear) and m.weight.is_cpu]
    dtypes = {m.weight.dtype for m in linears}
    for dt in dtypes:
        note_emulated(dt)
    if compile_one_row is None:
        before = (m._packed.compile_one_row for m in linears if m._packed.compile_one_row is not None)
        compile_one_row = next(before, None)
    if compile_one_row is None:
        compile_one_row = compile_default()
    for m in linears:  # before compiling: the first call below reads it
        m._packed.compile_one_row = compile_one_row
    compiling = compile_one_row and batch_size == 1
    for m in linears:  # compile first, so that the compiled kernel can be measured against the others
        signature = (m.weight.dtype, m.out_features, m.in_features, m.bias is not None)
        if compiling and signature not in _matvec_ready and _one_row_compiled(m.weight.dtype):
            m(torch.zeros(1, m.in_features, dtype=m.weight.dtype))  # the first call of a signature compiles
            _matvec_ready.add(signature)
    # Batch 0 (at load time: the batch is not known yet) prepares for batch 1, the most common use, so that the
    # memory held does not change when the first batch-1 decode starts.
    if any(_will_measure(model, dt, batch_size, compiling) for dt in dtypes):
        release_packed(model)  # a measurement (`_fastest`) borrows memory: free the copies it may replace first
    kinds: dict[torch.dtype, str | None] = {}
    for dt in dtypes:
        if batch_size in (0, 1):
            choice = one_row_kernel(model, dt, with_compiled=compiling)
        else:
            choice = batch_kernel(model, dt, batch_size)
        kinds[dt] = {"packed": "onednn", "mkl": "mkl", "cmatvec": "cmatvec"}.get(choice)
    for m in linears:
        kind = kinds[m.weight.dtype]
        m._packed.kind, m._packed.rows = kind, max(batch_size, 1) if kind in ("mkl", "cmatvec") else 0
        if kind in (None, "cmatvec") or not PACK_CPU_WEIGHTS:  # the C kernel reads the parameter itself
            m._packed.clear()
        else:
            m.packed_weight()  # packs now (or re-packs for another row count), freeing the copy it replaces
    return time.perf_counter() - t0


def packed_bytes(model: nn.Module) -> int:
    """Bytes held by the packed copies of `model`'s weights: memory the fast path adds on top of the parameters,
    to be counted with them. A oneDNN copy counts numel x element size (oneDNN may pad a little more). An MKL copy
    counts its weight's bytes: MKL reports (and torch allocates) a pack buffer of 2-9x the weight's bytes
    depending on the shape, but packing for 2 or more rows writes about the weight's size of it and the rest is
    never touched, so never resident. Measured in a fresh process, packing for 4 and 8 rows grew the resident
    memory by 511 / 514 MiB for smollm2-135m's 513 MiB of matrices, 307 MiB for distilgpt2's 309 (a test checks
    it stays near 1x). With transparent huge pages set to "always" (not this machine's setting) up to 2 MiB more
    per matrix could become resident."""
    total = 0
    for m in model.modules():
        if isinstance(m, Linear) and m._packed.tensor is not None:
            if m._packed.packed_as is not None and m._packed.packed_as[0] == "mkl":
                total += m.weight.numel() * m.weight.element_size()
            else:
                total += m._packed.tensor.numel() * m._packed.tensor.element_size()
    return total
