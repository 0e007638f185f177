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


def test_own_work_is_not_counted_as_load():
    with LoadMonitor() as m:
        end = time.perf_counter() + 0.5
        while time.perf_counter() < end:  # this process keeps one core busy
            pass
    # other processes may run during the test; our own busy core must not add a whole core to their share
    assert m.reading.other_cores < 0.9


def test_readings_add_up_and_quiet_text():
    a = LoadReading(1.0, 0.0, 2, 0.1, 0.2)
    b = LoadReading(3.0, 0.4, 2, 0.2, 0.3)
    total = a.add(b)
    assert total.wall_s == 4.0 and total.other_cores == 0.1 and not total.busy
    assert total.loadavg_before == 0.1 and total.loadavg_after == 0.3
    assert total.text().startswith("quiet machine") and BUSY_CORES > 0.1
