"""What this machine's CPU offers the bench: which dtypes it computes natively, and how many torch threads.

The CPU's flags themselves are read by `kvlib.core.hardware.dtype_support`, the one check every command and the
fast path use (/proc/cpuinfo: avx512_bf16 / amx_bf16 for bfloat16, avx512_fp16 / amx_fp16 for float16; oneDNN's
own check where the flags can't be read). Here its answer becomes the bench's line per dtype, and --threads is bounded.
"""

from __future__ import annotations

import os

import torch

from kvlib.core import checks
from kvlib.core.hardware import DtypeSupport, dtype_support

__all__ = ["MAX_THREADS", "DtypeSupport", "dtype_note", "dtype_support", "set_threads"]

MAX_THREADS = 4 * (os.cpu_count() or 1)  # --threads beyond this oversubscribes the cores past any use


def dtype_note(dtype: str, support: DtypeSupport, emulated: bool) -> str:
    """The bench's line on `dtype`: native (and why), or emulated and what the bench does with its rows (skip them,
    or with --emulated, `emulated`, run one short row that is labelled and not judged)."""
    if support.native:
        return f"{dtype}: native ({support.why})"
    what = "one short batch-1 row, labelled, not judged" if emulated else "rows skipped (--emulated: one short row)"
    return f"{dtype}: {support.why}: {what}"


def set_threads(threads: int | None) -> None:
    """Use `threads` torch threads (None: torch's default), refused beyond MAX_THREADS: torch takes absurd counts
    and then crashes (100000 threads: a segmentation fault)."""
    if threads:
        checks.whole("--threads", threads, maximum=MAX_THREADS)
        torch.set_num_threads(threads)
