"""Was the machine quiet while we measured? Other processes' CPU use over a measurement, from the kernel's counters.

On a small machine a second busy process ruins every timing (measured here: kvlib's batch-1 decode step went
from 13 ms to 650 ms with another process keeping both cores busy), so careful benchmark tools measure the load
and say so. `LoadMonitor` reads, at the start and at the end of a stretch of work:

- the whole machine's busy CPU time (`psutil.cpu_times()`: everything but idle and I/O wait), and
- this process's own CPU time (user + system, all threads),

and reports the difference as the CPU time *other processes* took, in cores (CPU seconds per wall second),
with the load averages before and after. Above `BUSY_CORES` the figures were taken on a busy machine.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import psutil

BUSY_CORES = 0.25  # other processes using more than a quarter of a core on average: the machine was not quiet


def _machine_busy_s() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _own_cpu_s() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not on every platform
        return float("nan")


def _load(value: float) -> str:
    """A load average as text: "n/a" where none was read (not every platform has one; nothing measured yet)."""
    return "n/a" if math.isnan(value) else f"{value:.1f}"


@dataclass
class LoadReading:
    """Other processes' CPU use over `wall_s` seconds of measuring."""

    wall_s: float = 0.0
    other_cpu_s: float = 0.0  # CPU seconds taken by every process but this one
    cores: int = psutil.cpu_count() or 1
    loadavg_before: float = float("nan")  # 1-minute load average
    loadavg_after: float = float("nan")

    @property
    def other_cores(self) -> float:
        """Average number of cores other processes kept busy (0 on a quiet machine)."""
        return max(self.other_cpu_s, 0.0) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def busy(self) -> bool:
        return self.other_cores > BUSY_CORES

    def add(self, other: LoadReading) -> LoadReading:
        """The two stretches together (the first one's load average before, the second's after)."""
        return LoadReading(
            self.wall_s + other.wall_s,
            self.other_cpu_s + other.other_cpu_s,
            self.cores,
            self.loadavg_before if self.wall_s else other.loadavg_before,
            other.loadavg_after,
        )

    def text(self) -> str:
        """'quiet machine: other processes used 0.02 of 2 cores (load average 0.4 -> 1.1)', or a BUSY warning."""
        figures = (
            f"other processes used {self.other_cores:.2f} of {self.cores} cores on average while measuring "
            f"(1-minute load average {_load(self.loadavg_before)} before, {_load(self.loadavg_after)} after)"
        )
        if self.busy:
            return (
                f"BUSY MACHINE: {figures}; these timings were taken on a busy machine and are slower than this "
                "machine can do: rerun on a quiet one"
            )
        return f"quiet machine: {figures}"


class LoadMonitor:
    """`with LoadMonitor() as m: ...` then `m.reading`: other processes' CPU use during the block."""

    def __enter__(self) -> LoadMonitor:
        self._load0 = _loadavg()
        self._t0 = time.perf_counter()
        self._busy0 = _machine_busy_s()
        self._own0 = _own_cpu_s()
        return self

    def __exit__(self, *exc: object) -> None:
        own = _own_cpu_s() - self._own0
        busy = _machine_busy_s() - self._busy0
        wall = time.perf_counter() - self._t0
        self.reading = LoadReading(wall, busy - own, psutil.cpu_count() or 1, self._load0, _loadavg())
