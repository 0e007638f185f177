"""The roofline of this machine, measured once per report, and how close each decode step comes to it.

A decode step of batch B must read every weight once and the whole KV cache once; it does little arithmetic per
byte, so its floor is memory bandwidth: floor_s = bytes read / bandwidth. Model bandwidth utilisation
MBU = bytes read per step / (step time x bandwidth): 1.0 would be a step as fast as the memory allows.

The machine's figures come from one `MachineProbe` (`measure_probe`: 4.5 s on the study's 2-core CPU while other
work ran):
- read bandwidth: row sums of a 256 MiB float32 buffer (far above any last-level cache), on all torch threads
  (each thread sums its own rows, which is how a matrix-vector product reads a weight matrix), 20 timed repeats
  after 2 warm-up ones; a copy of the same buffer into a second one (read + write, counted 2 x 256 MiB as STREAM
  does) is timed in the same loop, interleaved, as a cross-check;
- matmul throughput: a square matmul in each dtype asked for, grown until one product takes ~20 ms, 20 repeats.
Every repeat is kept (the JSON holds them), with median, nearest-rank quartiles (kvlib.core.stats), min and max.

**MBU and every floor divide by the best read repeat** (`MachineProbe.bandwidth_bytes_per_s`). A floor must be a
lower bound on a step's time, so its bandwidth must be what the memory can deliver, not what it delivered while
other work ran; the best of 20 repeats is the least disturbed one. The quartiles are printed beside it, so a
reader sees how far the typical repeat fell below it.

One probe per report: `make report` measures it once, before any notebook, into reports/<profile>/data/machine.json
(kvlib.report.pipeline) and hands its path to every notebook in the environment variable KVLIB_MACHINE_PROBE;
`machine_roofline` then returns the stored figures, so every page of the report divides by the same bandwidth. A
probe file that cannot be read, or one measured on another device or without the asked dtype, is a one-line
KvlibError. Without the variable (an interactive notebook, `python -m kvlib run`, the bench) the process measures
its own probe once and says so on stderr. Set KVLIB_NO_ROOFLINE=1 to skip both (figures become NaN).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvlib.core.config import ModelConfig
from kvlib.core.errors import KvlibError
from kvlib.core.hardware import cpu_flags
from kvlib.core.stats import quartiles
from kvlib.measure.memory import MIB, bytes_per_element
from kvlib.measure.provenance import cpu_name, device_name, timestamp
from kvlib.models.loading import DTYPES, dtype_name

BANDWIDTH_BUFFER_BYTES = 256 * MIB
PROBE_ENV = "KVLIB_MACHINE_PROBE"  # the absolute path of the report's machine.json (kvlib.report.pipeline)
PROBE_REPEATS = 20  # timed repeats of each probe kernel
PROBE_WARMUP = 2  # untimed repeats first: first touch of the pages, kernel selection
PROBE_SCHEMA = 1
READ_ROWS = 1024  # the read kernel sums each of this many rows: every thread gets whole rows
MATMUL_TARGET_S = 0.02  # a matmul probe grows until one product takes this long
# CPU flags that decide how a dtype runs (kvlib.core.hardware: native bfloat16/float16, oneDNN), kept in the probe
DTYPE_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16", "avx512_fp16",
    "avx_ne_convert", "amx_tile", "amx_bf16", "amx_fp16",
)  # fmt: skip
_bandwidth_cache: dict[str, float] = {}
_flops_cache: dict[tuple[str, str], float] = {}
_own_probes: dict[str, MachineProbe] = {}  # measured by this process, per device
_loaded_probes: dict[tuple[str, int], MachineProbe] = {}  # read from a probe file, per (path, mtime in ns)
_used: list[tuple[MachineProbe, str, str]] = []  # every probe machine_probe returned, with its origin (long, short)


def roofline_enabled() -> bool:
    return os.environ.get("KVLIB_NO_ROOFLINE", "0").lower() not in ("1", "true", "yes", "on")


def _timed(fn: Callable[[], Any], device: torch.device, iters: int) -> float:
    """Seconds for one call of fn, averaged over `iters` back-to-back calls (CUDA events on GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def _device_key(device: torch.device | str) -> str:
    """'cpu' or 'cuda:N' (a CUDA device without an index is the current one), so that probes compare by device."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        return f"cuda:{torch.cuda.current_device() if torch.cuda.is_available() else 0}"
    return str(dev)


def _dtype_key(dtype: torch.dtype | str) -> str:
    """The canonical name ('float32', 'bfloat16', 'float16') of a torch dtype or of any name kvlib accepts."""
    if isinstance(dtype, torch.dtype):
        return dtype_name(dtype)
    if dtype not in DTYPES:
        raise KvlibError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return dtype_name(DTYPES[dtype])


# ---- the probe ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rates:
    """The per-repeat rates of one probe kernel (bytes/s or FLOP/s; higher is better), in the order measured."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def best(self) -> float:
        """The fastest repeat: the one least disturbed by other work."""
        return max(self.values) if self.values else math.nan

    @property
    def median(self) -> float:
        return float(statistics.median(self.values)) if self.values else math.nan

    @property
    def q25(self) -> float:
        return quartiles(self.values)[0]

    @property
    def q75(self) -> float:
        return quartiles(self.values)[1]

    @property
    def min(self) -> float:
        return min(self.values) if self.values else math.nan

    def summary(self) -> dict[str, float | int]:
        return {"best": self.best, "median": self.median, "q25": self.q25, "q75": self.q75, "min": self.min,
                "n": self.n}  # fmt: skip

    def text(self, scale: float, unit: str) -> str:
        """'34.1 GB/s best of 20 repeats (median 33.9, IQR 33.8–34.4, min 30.2)' with values divided by `scale`."""
        return (
            f"{self.best / scale:.1f} {unit} best of {self.n} repeats (median {self.median / scale:.1f}, IQR "
            f"{self.q25 / scale:.1f}–{self.q75 / scale:.1f}, min {self.min / scale:.1f})"
        )


@dataclass(frozen=True)
class MachineProbe:
    """This machine's read bandwidth and matmul throughput, measured once (`measure_probe`), with every repeat.

    `read_bytes_per_s`: row sums of a `buffer_bytes` float32 buffer on all `threads` torch threads (bytes read per
    second); `copy_bytes_per_s`: the same buffer copied (2 x buffer_bytes per copy, read + write); both in bytes/s
    (GB/s = 1e9 bytes/s). `matmul_flops_per_s[dtype]`: an n x n product (2 n^3 FLOP, n = `matmul_size[dtype]`).
    MBU and floors divide by `bandwidth_bytes_per_s`, the best read repeat (module docstring)."""

    device: str  # 'cpu' or 'cuda:N'
    device_name: str
    read_bytes_per_s: Rates
    copy_bytes_per_s: Rates
    matmul_flops_per_s: dict[str, Rates]  # by canonical dtype name
    matmul_size: dict[str, int]
    buffer_bytes: int
    threads: int  # torch threads during the probe
    cpu_model: str
    cpu_flags: tuple[str, ...]  # those of DTYPE_FLAGS the CPU has (empty where /proc/cpuinfo can't be read)
    timestamp: str  # ISO 8601, UTC
    duration_s: float  # the whole probe, allocation included
    torch_version: str = field(default=torch.__version__)

    @property
    def bandwidth_bytes_per_s(self) -> float:
        """The read bandwidth MBU and floors divide by: the best read repeat, in bytes/s."""
        return self.read_bytes_per_s.best

    @property
    def dtypes(self) -> list[str]:
        return list(self.matmul_flops_per_s)

    def matmul(self, dtype: torch.dtype | str) -> Rates:
        """The matmul rates in `dtype`; KvlibError when the probe did not measure it."""
        key = _dtype_key(dtype)
        if key not in self.matmul_flops_per_s:
            raise KvlibError(f"the machine probe has no matmul figure in {key} (it measured {', '.join(self.dtypes)})")
        return self.matmul_flops_per_s[key]

    def bandwidth_text(self) -> str:
        """'34.1 GB/s read bandwidth, best of 20 repeats (median 33.9, IQR 33.8–34.4, min 30.2) of a 256 MiB read
        on 2 threads'."""
        r = self.read_bytes_per_s
        return (
            f"{r.best / 1e9:.1f} GB/s read bandwidth, best of {r.n} repeats (median {r.median / 1e9:.1f}, IQR "
            f"{r.q25 / 1e9:.1f}–{r.q75 / 1e9:.1f} GB/s) of a {self.buffer_bytes / MIB:.0f} MiB read on "
            f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: every repeat, plus each kernel's summary for a reader (recomputed on load)."""
        d = dataclasses.asdict(self)
        d["read_bytes_per_s"] = {"values": list(self.read_bytes_per_s.values), **self.read_bytes_per_s.summary()}
        d["copy_bytes_per_s"] = {"values": list(self.copy_bytes_per_s.values), **self.copy_bytes_per_s.summary()}
        d["matmul_flops_per_s"] = {
            k: {"values": list(v.values), **v.summary()} for k, v in self.matmul_flops_per_s.items()
        }
        d["cpu_flags"] = list(self.cpu_flags)
        return {
            "schema": PROBE_SCHEMA,
            "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
            "mbu_divides_by": "the best repeat of read_bytes_per_s",
            **d,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "machine probe") -> MachineProbe:
        """Parse `to_json`'s text; a one-line KvlibError naming `where` when it is not a probe of this schema."""
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            if d.get("schema") != PROBE_SCHEMA:
                raise ValueError(f"schema {d.get('schema')!r}, expected {PROBE_SCHEMA}")

            def rates(x: Any, what: str) -> Rates:
                values = tuple(float(v) for v in x["values"])
                if not values or not all(math.isfinite(v) and v > 0 for v in values):
                    raise ValueError(f"{what}: values must be positive numbers, at least one")
                return Rates(values)

            matmul = {str(k): rates(v, f"matmul_flops_per_s.{k}") for k, v in dict(d["matmul_flops_per_s"]).items()}
            return cls(
                device=str(d["device"]),
                device_name=str(d["device_name"]),
                read_bytes_per_s=rates(d["read_bytes_per_s"], "read_bytes_per_s"),
                copy_bytes_per_s=rates(d["copy_bytes_per_s"], "copy_bytes_per_s"),
                matmul_flops_per_s=matmul,
                matmul_size={str(k): int(v) for k, v in dict(d["matmul_size"]).items()},
                buffer_bytes=int(d["buffer_bytes"]),
                threads=int(d["threads"]),
                cpu_model=str(d["cpu_model"]),
                cpu_flags=tuple(str(f) for f in d["cpu_flags"]),
                timestamp=str(d["timestamp"]),
                duration_s=float(d["duration_s"]),
                torch_version=str(d.get("torch_version", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            what = f"missing key {e}" if isinstance(e, KeyError) else (str(e).splitlines() or [type(e).__name__])[0]
            raise KvlibError(f"{where}: not a kvlib machine probe ({what})") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path, where: str = "") -> MachineProbe:
        """Read a probe file; a one-line KvlibError naming `where` (default: "machine probe <path>") when it cannot
        be read or parsed."""
        where = where or f"machine probe {path}"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise KvlibError(f"{where}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
        return cls.from_json(text, where)

    def check(self, device: torch.device | str, dtype: torch.dtype | str | None, where: str) -> None:
        """One-line KvlibError unless this probe was measured on `device` and has a matmul figure in `dtype`."""
        dev = _device_key(device)
        if dev != self.device:
            raise KvlibError(f"{where} was measured on {self.device} ({self.device_name}), not on {dev}")
        if dtype is not None and _dtype_key(dtype) not in self.matmul_flops_per_s:
            raise KvlibError(
                f"{where} has no matmul figure in {_dtype_key(dtype)} (it measured {', '.join(self.dtypes)})"
            )


def _matmul_rates(dev: torch.device, dt: torch.dtype, repeats: int) -> tuple[int, Rates]:
    """(n, rates): an n x n matmul in `dt`, n grown from 256 until one product takes MATMUL_TARGET_S, then
    `repeats` timed products."""
    n, max_n = 256, (16384 if dev.type == "cuda" else 4096)
    iters = 10 if dev.type == "cuda" else 1
    while True:
        a, b = torch.randn(n, n, device=dev).to(dt), torch.randn(n, n, device=dev).to(dt)
        fn = functools.partial(torch.matmul, a, b)
        fn()
        if _timed(fn, dev, iters) >= MATMUL_TARGET_S or n >= max_n:
            break
        n *= 2
    return n, Rates(tuple(2 * n**3 / _timed(fn, dev, iters) for _ in range(repeats)))


def _bandwidth_rates(
    dev: torch.device, n: int, repeats: int, warmup: int, with_copy: bool = True
) -> tuple[Rates, Rates]:
    """(read, copy) rates in bytes/s over n float32 elements (n a multiple of READ_ROWS): `warmup` untimed then
    `repeats` timed repeats of each, interleaved so that drift and other work hit both alike (copy left empty
    without `with_copy`). The buffers are freed on return."""
    src = torch.ones(n, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src) if with_copy else src
    rows = src.view(READ_ROWS, -1)
    iters = 10 if dev.type == "cuda" else 1  # a GPU reads 256 MiB in ~0.1 ms: time several back to back

    def read() -> None:
        rows.sum(dim=1)

    def copy() -> None:
        dst.copy_(src)

    for _ in range(warmup):
        read()
        if with_copy:
            copy()
    reads, copies = [], []
    for _ in range(repeats):
        reads.append(4 * n / _timed(read, dev, iters))
        if with_copy:
            copies.append(2 * 4 * n / _timed(copy, dev, iters))
    return Rates(tuple(reads)), Rates(tuple(copies))


def measure_probe(
    device: torch.device | str = "cpu",
    dtypes: Sequence[torch.dtype | str] = ("float32",),
    repeats: int = PROBE_REPEATS,
    warmup: int = PROBE_WARMUP,
    size_bytes: int = BANDWIDTH_BUFFER_BYTES,
) -> MachineProbe:
    """Measure this machine's probe on `device`: read and copy bandwidth over `size_bytes` (float32, rounded down
    to a multiple of READ_ROWS elements), `repeats` timed repeats after `warmup`, interleaved; matmul throughput in
    each of `dtypes`. Nothing is cached: every call measures."""
    if repeats < 1 or warmup < 0 or size_bytes < 4 * READ_ROWS:
        raise KvlibError(f"machine probe: repeats >= 1, warmup >= 0 and size_bytes >= {4 * READ_ROWS} needed")
    t0 = time.perf_counter()
    dev = torch.device(device)
    keys = list(dict.fromkeys(_dtype_key(d) for d in dtypes))
    n = size_bytes // 4 // READ_ROWS * READ_ROWS
    reads, copies = _bandwidth_rates(dev, n, repeats, warmup)
    matmul, sizes = {}, {}
    for key in keys:
        sizes[key], matmul[key] = _matmul_rates(dev, DTYPES[key], repeats)
    flags = cpu_flags()
    return MachineProbe(
        device=_device_key(dev),
        device_name=device_name(dev),
        read_bytes_per_s=reads,
        copy_bytes_per_s=copies,
        matmul_flops_per_s=matmul,
        matmul_size=sizes,
        buffer_bytes=4 * n,
        threads=torch.get_num_threads(),
        cpu_model=cpu_name(),
        cpu_flags=tuple(f for f in DTYPE_FLAGS if flags and f in flags),
        timestamp=timestamp(),
        duration_s=time.perf_counter() - t0,
    )


def machine_probe(device: torch.device | str = "cpu", dtype: torch.dtype | str = "float32") -> MachineProbe:
    """The probe MBU and floors of this process use on `device` in `dtype`.

    With KVLIB_MACHINE_PROBE set (a report run): the stored probe, read once per file version, checked (one-line
    KvlibError when it cannot be read, was measured on another device or lacks a matmul figure in `dtype`).
    Without: this process's own, measured once per device (a matmul in a new dtype is added when first asked),
    announced on stderr."""
    path = os.environ.get(PROBE_ENV, "").strip()
    if path:
        where = f"machine probe {path} ({PROBE_ENV})"
        try:
            key = (path, os.stat(path).st_mtime_ns)
        except OSError as e:
            raise KvlibError(f"{where}: cannot read it ({e.strerror or e})") from None
        if key not in _loaded_probes:
            _loaded_probes[key] = MachineProbe.load(path, where)
        probe = _loaded_probes[key]
        probe.check(device, dtype, where)
        _remember(
            probe, f"the report's machine probe ({Path(path).name}, measured {probe.timestamp})", "the report's probe"
        )
        return probe
    dev_key = _device_key(device)
    dt = _dtype_key(dtype)
    probe = _own_probes.get(dev_key)
    if probe is None:
        probe = measure_probe(device, [dt])
        print(
            f"machine probe: measured by this process, not a report's ({PROBE_ENV} is not set): "
            f"{probe.bandwidth_text()}, in {probe.duration_s:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    elif dt not in probe.matmul_flops_per_s:
        size, rates = _matmul_rates(torch.device(device), DTYPES[dt], PROBE_REPEATS)
        probe = dataclasses.replace(
            probe,
            matmul_flops_per_s={**probe.matmul_flops_per_s, dt: rates},
            matmul_size={**probe.matmul_size, dt: size},
        )
    _own_probes[dev_key] = probe
    _remember(probe, "this process's own machine probe (not a report run)", "this process's own probe")
    return probe


def _remember(probe: MachineProbe, origin: str, short: str) -> None:
    if not any(p == probe and o == origin for p, o, _ in _used):
        _used.append((probe, origin, short))


def bandwidth_source(bandwidths: Iterable[float], short: bool = False) -> str:
    """How a page names the read bandwidth its MBU or floors divided by, from the runs' `bandwidth_bytes_per_s`
    column. When a probe this process used gave that figure: "the report's machine probe (machine.json, measured
    ...): 34.1 GB/s read bandwidth, best of 20 repeats (median 33.9, IQR 33.8–34.4 GB/s) of a 256 MiB read on 2
    threads" (`short`: "34.1 GB/s, the best of the report's machine probe's 20 read repeats (IQR 33.8–34.4)");
    else the figure alone, "recorded in the runs"; "" when none was measured (NaN: KVLIB_NO_ROOFLINE)."""
    values = sorted({float(b) for b in bandwidths if b is not None and math.isfinite(float(b))})
    if not values:
        return ""
    if len(values) > 1:
        return (
            f"read bandwidths of {values[0] / 1e9:.1f} to {values[-1] / 1e9:.1f} GB/s recorded in the runs (not one "
            "probe: the runs come from different processes)"
        )
    for probe, origin, brief in reversed(_used):
        if math.isclose(probe.bandwidth_bytes_per_s, values[0], rel_tol=1e-12):
            r = probe.read_bytes_per_s
            if short:
                return (
                    f"{r.best / 1e9:.1f} GB/s, the best of {brief}'s {r.n} read repeats (IQR {r.q25 / 1e9:.1f}–"
                    f"{r.q75 / 1e9:.1f})"
                )
            return f"{origin}: {probe.bandwidth_text()}"
    return f"a read bandwidth of {values[0] / 1e9:.1f} GB/s recorded in the runs (its probe is not in this process)"


# ---- the figures the harness and the bench use ------------------------------------------------------------------


def measure_bandwidth_bytes_per_s(
    device: torch.device | str = "cpu", size_bytes: int = BANDWIDTH_BUFFER_BYTES, repeats: int = 5
) -> float:
    """Memory read bandwidth in bytes/s, measured here and now (not the report's probe: see `machine_probe`): row
    sums of a `size_bytes` float32 buffer on all threads, best of `repeats` after one warm-up; cached per
    (device, size)."""
    dev = torch.device(device)
    key = f"{dev}:{size_bytes}"
    if key not in _bandwidth_cache:
        n = max(size_bytes // 4 // READ_ROWS, 1) * READ_ROWS
        _bandwidth_cache[key] = _bandwidth_rates(dev, n, repeats, 1, with_copy=False)[0].best
    return _bandwidth_cache[key]


def measure_matmul_flops(device: torch.device | str = "cpu", dtype: torch.dtype | str = "float32") -> float:
    """Dense matmul throughput in FLOP/s (2 n^3 per n x n product), best of 3, measured here and now; cached per
    (device, dtype)."""
    dev = torch.device(device)
    key = (str(dev), _dtype_key(dtype))
    if key not in _flops_cache:
        _flops_cache[key] = _matmul_rates(dev, DTYPES[key[1]], 3)[1].best
    return _flops_cache[key]


def decode_weight_bytes(cfg: ModelConfig, batch_size: int, dtype: torch.dtype | str) -> int:
    """Weight bytes one decode step reads: every matrix, bias and norm once; the LM head (V x C) whole, a tied
    embedding once, as the LM head; the input embedding (and GPT-2's position embedding) only their B gathered
    rows."""
    d, V = cfg.n_embd, cfg.vocab_size
    params = cfg.n_params() + batch_size * d  # n_params counts a tied wte once (as the head); + the rows gathered
    if cfg.arch == "gpt2":
        params += batch_size * d - cfg.n_positions * d  # wpe: B rows, not the whole table
    elif not cfg.tie_word_embeddings:
        params -= V * d  # an untied input embedding: only its B rows (counted above)
    return params * bytes_per_element(dtype)


def decode_step_bytes(cfg: ModelConfig, batch_size: int, kv_tokens: int, dtype: torch.dtype | str) -> int:
    """Bytes a decode step must read: the weights (`decode_weight_bytes`) plus the keys and values of `kv_tokens`
    tokens per sequence (those already cached and the new one)."""
    kv = cfg.kv_bytes_per_token(bytes_per_element(dtype)) * batch_size * kv_tokens
    return decode_weight_bytes(cfg, batch_size, dtype) + kv


def floor_s(step_bytes: float, bandwidth_bytes_per_s: float) -> float:
    """The fastest a step reading `step_bytes` can be at this bandwidth (NaN when it was not measured)."""
    if not bandwidth_bytes_per_s or math.isnan(bandwidth_bytes_per_s):
        return math.nan
    return step_bytes / bandwidth_bytes_per_s


def mbu(step_bytes: float, step_s: float, bandwidth_bytes_per_s: float) -> float:
    """Model bandwidth utilisation: bytes the step must read / (its time x bandwidth); NaN when unknown."""
    if not step_s or math.isnan(step_s) or not bandwidth_bytes_per_s or math.isnan(bandwidth_bytes_per_s):
        return math.nan
    return step_bytes / (step_s * bandwidth_bytes_per_s)


def machine_roofline(device: torch.device | str, dtype: torch.dtype | str, enabled: bool = True) -> dict[str, float]:
    """{"bandwidth_bytes_per_s", "matmul_flops_per_s"} of `machine_probe(device, dtype)`: the best read repeat
    (what MBU and floors divide by) and the best matmul repeat in `dtype`; NaN when disabled (`enabled` False or
    KVLIB_NO_ROOFLINE=1). Raises KvlibError (one line) on a bad KVLIB_MACHINE_PROBE file."""
    if not (enabled and roofline_enabled()):
        return {"bandwidth_bytes_per_s": math.nan, "matmul_flops_per_s": math.nan}
    probe = machine_probe(device, dtype)
    return {"bandwidth_bytes_per_s": probe.bandwidth_bytes_per_s, "matmul_flops_per_s": probe.matmul(dtype).best}
