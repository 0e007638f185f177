"""What this machine computes natively: whether a dtype runs in hardware on a device, or is emulated.

One function decides, `dtype_support`, and everything that cares asks it, so that they agree: the CPU fast path
(whether oneDNN may pack a weight of that dtype: kvlib.models.fastpath), the commands and notebooks (the one-line
note `prepare_for_inference` prints when a model is made ready in an emulated dtype) and the bench (which rows it
measures and judges).

Two facts about a 16-bit dtype on a CPU, from two sources:

- Native arithmetic: the CPU computes in the dtype. On x86 that takes AVX512-BF16 or AMX-BF16 for bfloat16 and
  AVX512-FP16 or AMX-FP16 for float16 (the flags avx512_bf16 / amx_bf16 and avx512_fp16 / amx_fp16 of
  /proc/cpuinfo). Without them every kernel converts to float32, computes, and converts back: the dtype is
  *emulated*. It computes the right function (float16 on plain kernels gives the float32 tokens within rounding;
  tests/test_field_native_dtype.py), just not faster than float32, usually slower. An AVX2-only CPU (the study's
  AMD EPYC) emulates both.
- oneDNN: whether PyTorch's oneDNN kernels accept the dtype at all. PyTorch answers with
  `torch.ops.mkldnn._is_mkldnn_bf16_supported()` / `_is_mkldnn_fp16_supported()` (ideep's has_bf16_type_support:
  AVX-512 BW, VL and DQ, or AVX-NE-CONVERT; has_fp16_type_support: AVX512-FP16 or AVX-NE-CONVERT), and its oneDNN
  ops raise without it ("mkldnn_reorder_linear_weight: fp16 path needs the cpu support avx_ne_convert or
  avx512_fp16"). A CPU can pass this check and still emulate: AVX-512 without AVX512-BF16 converts.

Where the flags can't be read (not Linux), oneDNN's check stands in for native arithmetic too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# CPU flags that give a dtype native arithmetic (oneDNN then uses them); without any, it is emulated in float32.
NATIVE_CPU_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}
# What oneDNN needs to accept a dtype at all (PyTorch's own words in its error)
ONEDNN_NEEDS = {
    "bfloat16": "avx512bw, avx512vl and avx512dq, or avx_ne_convert",
    "float16": "avx512_fp16 or avx_ne_convert",
}


@dataclass(frozen=True)
class DtypeSupport:
    dtype: str  # the canonical name: float32, bfloat16, float16
    native: bool  # the device computes in this dtype (False: emulated, through float32)
    why: str  # the evidence, in words
    onednn: bool = False  # PyTorch's oneDNN kernels accept it here (CPU only; the fast path may pack its weights)

    @property
    def note(self) -> str:
        """One line for a person: "" when the dtype is native, else that it is emulated, the CPU feature missing,
        and the kernels that run it."""
        if self.native:
            return ""
        if self.dtype not in ONEDNN_NEEDS:
            return f"{self.why}: timings do not show its native speed"
        kernels = (
            "oneDNN's kernels, which convert"
            if self.onednn
            else f"plain kernels (F.linear; oneDNN's need {ONEDNN_NEEDS[self.dtype]} for {self.dtype})"
        )
        if self.dtype == "bfloat16":  # kvlib.models.matvec widens bfloat16 itself, on any CPU
            kernels += " or kvlib's C kernel for decode steps"
        return f"{self.why}: it runs on {kernels}, through float32; timings do not show its native speed"


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), None where they can't be read."""
    return _read_cpu_flags()


@functools.cache  # the flags do not change while the process runs
def _read_cpu_flags() -> frozenset[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def onednn_accepts(dtype: str) -> bool:
    """PyTorch's own answer: whether its oneDNN kernels run `dtype` on this CPU (the check its ops raise on)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == "bfloat16":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == "float16":
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return dtype == "float32"


def dtype_support(dtype: str | torch.dtype, device: torch.device | str = "cpu") -> DtypeSupport:
    """Whether `dtype` (a canonical name or a torch.dtype) runs natively on `device`, whether oneDNN accepts it
    (CPU), and why we think so. The one place that decides (module docstring)."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    device = torch.device(device)
    if dtype == "float32":
        return DtypeSupport(dtype, True, "float32", device.type == "cpu" and onednn_accepts(dtype))
    if device.type == "cuda":
        if dtype == "bfloat16":
            native = torch.cuda.is_bf16_supported(including_emulation=False)
            return DtypeSupport(dtype, native, f"CUDA bfloat16 {'native' if native else 'emulated (pre-Ampere GPU)'}")
        return DtypeSupport(dtype, True, "CUDA float16")
    if device.type != "cpu" or dtype not in NATIVE_CPU_FLAGS:
        return DtypeSupport(dtype, True, f"{device.type} {dtype}: not checked")
    onednn = onednn_accepts(dtype)
    wanted = NATIVE_CPU_FLAGS[dtype]
    flags = cpu_flags()
    if flags is not None:
        have = [f for f in wanted if f in flags]
        if have:
            return DtypeSupport(dtype, True, f"CPU flags {', '.join(have)}", onednn)
        why = f"{dtype} is emulated on this CPU (no {' or '.join(wanted)} in its flags)"
        return DtypeSupport(dtype, False, why, onednn)
    # No flags to read (not Linux): oneDNN's own check (it also says yes for AVX-512 cores that convert, not compute)
    why = f"oneDNN's check: {dtype} {'supported' if onednn else 'emulated on this CPU'}"
    return DtypeSupport(dtype, onednn, why, onednn)
