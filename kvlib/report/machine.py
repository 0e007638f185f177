"""The report's machine, as the index shows it: the one probe every page divides its MBU by.

`machine_section(out)` reads out/data/machine.json (kvlib.measure.roofline.MachineProbe, written once per report by
kvlib.report.pipeline.ensure_machine_probe) and returns an HTML section: the read bandwidth MBU and floors divide
by (the best repeat) with its spread, the copy bandwidth beside it, matmul throughput per dtype, the CPU model and
the flags that decide how bfloat16 / float16 run, the threads, when it was measured, and which of the report's run
files divided by it (a run file that divided by another bandwidth is marked ⚠).
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import pandas as pd

from kvlib.core.errors import KvlibError
from kvlib.core.hardware import NATIVE_CPU_FLAGS
from kvlib.measure.memory import MIB
from kvlib.measure.roofline import DTYPE_FLAGS, MachineProbe, Rates
from kvlib.report.pipeline import MACHINE_PROBE_FILE, machine_probe_path

BANDWIDTH_COLUMN = "bandwidth_bytes_per_s"  # the harness's run rows: the bandwidth each row's MBU divided by


def _rates(r: Rates, scale: float, unit: str) -> str:
    return (
        f"<b>{r.best / scale:.1f} {unit}</b> best; median {r.median / scale:.1f}, IQR {r.q25 / scale:.1f}–"
        f"{r.q75 / scale:.1f}, min {r.min / scale:.1f} {unit}; {r.n} repeats"
    )


def _dtype_note(probe: MachineProbe, dtype: str) -> str:
    """Whether `dtype` has native arithmetic on the probe's CPU, from the flags it recorded (kvlib.core.hardware)."""
    if not probe.device.startswith("cpu") or dtype not in NATIVE_CPU_FLAGS:
        return ""
    have = [f for f in NATIVE_CPU_FLAGS[dtype] if f in probe.cpu_flags]
    if have:
        return f"native ({', '.join(have)})"
    return f"emulated through float32 (no {' or '.join(NATIVE_CPU_FLAGS[dtype])})"


def used_by(out: str | Path, bandwidth: float) -> tuple[list[str], list[str]]:
    """(run files of out/data that divided by `bandwidth`, those that divided by another one: 'NN_runs.csv: 57.1
    GB/s'). Only files with the harness's bandwidth_bytes_per_s column and at least one measured value count."""
    same, other = [], []
    data = Path(out) / "data"
    for csv in sorted(data.glob("*.csv")) if data.is_dir() else []:
        try:
            if BANDWIDTH_COLUMN not in pd.read_csv(csv, nrows=0).columns:
                continue
            values = pd.read_csv(csv, usecols=[BANDWIDTH_COLUMN])[BANDWIDTH_COLUMN].dropna().unique()
        except (OSError, ValueError, pd.errors.ParserError):
            continue
        if len(values) == 0:
            continue
        if all(math.isclose(float(v), bandwidth, rel_tol=1e-9) for v in values):
            same.append(csv.name)
        else:
            other.append(f"{csv.name}: " + ", ".join(f"{float(v) / 1e9:.1f} GB/s" for v in sorted(values)))
    return same, other


def machine_section(out_dir: str | Path) -> str:
    """HTML (an <h2> and what follows) describing the report's machine probe in out_dir/data/machine.json, and
    where its bandwidth was used; a short paragraph when the report has none or it cannot be read."""
    path = machine_probe_path(out_dir)
    head = "<h2>The machine</h2>"
    if not path.is_file():
        return (
            f"{head}<p>This report has no machine probe (data/{MACHINE_PROBE_FILE}): its notebooks ran without one "
            "(KVLIB_NO_ROOFLINE=1, or each measured its own), so their MBU may divide by different bandwidths.</p>"
        )
    try:
        probe = MachineProbe.load(path)
    except KvlibError as e:
        return f"{head}<p>⚠ {html.escape(str(e))}</p>"
    bw = probe.bandwidth_bytes_per_s
    same, other = used_by(out_dir, bw)
    rows = [  # (label, HTML: every text from the file escaped)
        ("device", html.escape(probe.device + ("" if probe.device == "cpu" else f": {probe.device_name}"))),
        ("CPU", html.escape(probe.cpu_model)),
        ("torch threads", str(probe.threads)),
        (
            "read bandwidth (MBU and floors divide by the best)",
            _rates(probe.read_bytes_per_s, 1e9, "GB/s")
            + f" of row sums over a {probe.buffer_bytes / MIB:.0f} MiB float32 buffer on all threads",
        ),
        (
            "copy bandwidth (cross-check)",
            _rates(probe.copy_bytes_per_s, 1e9, "GB/s") + "; read + write counted (2 x the buffer per copy)",
        ),
    ]
    for dtype, rates in probe.matmul_flops_per_s.items():
        n = probe.matmul_size.get(dtype)
        note = _dtype_note(probe, dtype)
        rows.append(
            (
                f"matmul, {dtype}",
                _rates(rates, 1e9, "GFLOP/s")
                + (f"; {n} x {n} products" if n else "")
                + (f"; {html.escape(note)}" if note else ""),
            )
        )
    flags = ", ".join(f"{f} {'yes' if f in probe.cpu_flags else 'no'}" for f in DTYPE_FLAGS)
    rows.append(("CPU flags for dtypes", flags if probe.cpu_flags else "not readable there (no /proc/cpuinfo)"))
    rows.append(
        ("measured", html.escape(f"{probe.timestamp}, in {probe.duration_s:.1f} s (torch {probe.torch_version})"))
    )
    used = ", ".join(f"<a href='data/{html.escape(f)}'>{html.escape(f)}</a>" for f in same) or "no run file yet"
    if other:
        used += "<br>⚠ divided by another bandwidth: " + html.escape("; ".join(other))
    rows.append(("MBU and floors of", used))
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return (
        f"{head}<p>Every page of this report divides its MBU (model bandwidth utilisation) by one read bandwidth, "
        f"measured once before any notebook ran: <b>{bw / 1e9:.1f} GB/s</b>, the best of {probe.read_bytes_per_s.n} "
        f"repeats (<a href='data/{MACHINE_PROBE_FILE}'>data/{MACHINE_PROBE_FILE}</a>). The best, because a floor "
        "must be what the memory can deliver, not what it delivered while other work ran; the median and quartiles "
        f"show how far a typical repeat fell below it.</p><table>{table}</table>"
    )
