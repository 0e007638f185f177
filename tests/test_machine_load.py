"""Regression (issue 14, "a busy machine"): the bench measured on a machine kept busy by another process and
printed its slow figures without a word about the load. kvlib.measure.machine_load measures other processes' CPU use."""

from __future__ import annotations

import subprocess
import sys
import time

from kvlib.measure.machine_load import BUSY_CORES, LoadMonitor, LoadReading


def test_a_busy_process_beside_the_measurement_is_seen():
    spin = "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass\n"
    proc = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.2)  # the spinner is running
        with LoadMonitor() as m:
            time.sleep(1.0)  # this process idles; the other one keeps a core busy
    finally:
        proc.wait()
    r = m.reading
    assert r.other_cores > 0.5 and r.busy
    assert r.text().startswith("BUSY MACHINE") and f"of {r.cores} cores" in r.text()


def test_own_work_is_not_counted_as_load(monkeypatch):
    """The machine's busy time minus this process's: 1.5 s busy of which 1.2 s ours over 1 s is 0.3 cores."""
    import kvlib.measure.machine_load as ml

    busy, own = iter([10.0, 11.5]), iter([5.0, 6.2])
    monkeypatch.setattr(ml, "_machine_busy_s", lambda: next(busy))
    monkeypatch.setattr(ml, "_own_cpu_s", lambda: next(own))
    clock = iter([100.0, 101.0])
    monkeypatch.setattr(ml.time, "perf_counter", lambda: next(clock))
    with LoadMonitor() as m:
        pass
    assert abs(m.reading.other_cores - 0.3) < 1e-9 and m.reading.busy


def test_readings_add_up_and_quiet_text():
    a = LoadReading(1.0, 0.0, 2, 0.1, 0.2)
    b = LoadReading(3.0, 0.4, 2, 0.2, 0.3)
    total = a.add(b)
    assert total.wall_s == 4.0 and total.other_cores == 0.1 and not total.busy
    assert total.loadavg_before == 0.1 and total.loadavg_after == 0.3
    assert total.text().startswith("quiet machine") and BUSY_CORES > 0.1
