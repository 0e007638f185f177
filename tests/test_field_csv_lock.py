"""Issue 22, kind 2: two writers, two headers. Every results file is appended under an exclusive lock on the file
(kvlib.measure.results), the header check inside it; a file holding its header twice is refused like a foreign
one; notebook outputs are replaced whole through a temporary file of a unique name (study.Outputs).

The races are real: processes forked behind a barrier append to the same new file at the same moment.
"""

from __future__ import annotations

import csv
import fcntl
import multiprocessing
import threading
import time
import traceback

import pandas as pd
import pytest
from test_kind1_results_files import OUTPUTS, _refused, no_model  # noqa: F401  (no_model: a fixture used below)

from kvlib import study
from kvlib.cli import run as run_cli
from kvlib.core.errors import KvlibError
from kvlib.measure import bench, passkey, perplexity
from kvlib.measure.bench import long
from kvlib.measure.results import append_rows, check_outputs, check_writable

COLS = ["model", "batch_size", "total_time_s", "note"]
HEADER = ",".join(COLS) + "\n"
ROWS = 2  # rows each writer appends to each file


def row(writer: int, trial: int, i: int) -> dict:
    return {"model": f"w{writer}", "batch_size": trial, "total_time_s": i, "note": f"writer {writer} row {i}"}


def _run(ctx, target, args_of, n):
    """Start n forked processes target(*args_of(k)) and wait; fail the test with any process's traceback."""
    errors = ctx.Queue()

    def guarded(*args):
        try:
            target(*args)
        except BaseException:
            errors.put(traceback.format_exc())
            raise SystemExit(1) from None

    procs = [ctx.Process(target=guarded, args=args_of(k)) for k in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)  # generous: a loaded 2-core machine fsyncs slowly; a hang still ends the test
    stuck = [p for p in procs if p.is_alive()]
    for p in stuck:
        p.terminate()
        p.join(10)
    assert not stuck, f"{len(stuck)} of {n} writers still running after 600 s"
    failures = [errors.get(timeout=5) for p in procs if p.exitcode != 0]
    assert not failures, failures[0]


def _append_behind_barrier(folder, barrier, writer, trials):
    for trial in range(trials):
        barrier.wait(timeout=120)  # every writer starts the trial's new file at once
        append_rows(folder / f"trial{trial}.csv", [row(writer, trial, i) for i in range(ROWS)], COLS)


@pytest.mark.parametrize(("writers", "trials"), [(2, 300), (8, 40)])
def test_writers_starting_one_new_file_at_once_write_one_header(tmp_path, writers, trials):
    """`writers` processes start each of `trials` new files at the same moment: one header, every row whole.
    Without the lock, on 2 cores, two writers both wrote the header in 1 to 274 of 300 trials (depending on what
    else ran), eight in 0 to 5 of 40 (the barrier wakes them one after another, and only two run at a time)."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(writers)
    _run(ctx, _append_behind_barrier, lambda k: (tmp_path, barrier, k, trials), writers)
    repeated = [t for t in range(trials) if (tmp_path / f"trial{t}.csv").read_text().count(HEADER) != 1]
    assert not repeated, f"{len(repeated)} of {trials} files hold the header more than once"
    for trial in range(trials):
        with (tmp_path / f"trial{trial}.csv").open(newline="") as f:
            header, *rows = csv.reader(f)
        expected = [[f"w{w}", str(trial), str(i), f"writer {w} row {i}"] for w in range(writers) for i in range(ROWS)]
        assert header == COLS and sorted(rows) == sorted(expected), f"trial {trial}"
    check_writable(tmp_path / "trial0.csv", COLS)  # and the file takes more rows


@pytest.mark.parametrize(
    "text",
    [
        HEADER + HEADER + "tiny,1,0.5,a\n",  # the second writer's header right after the first
        HEADER + "tiny,1,0.5,a\n" + HEADER + "tiny,2,1.0,b\n",  # as the race left files: header and row, twice
        HEADER + "tiny,1,0.5,a\n" + '"model","batch_size","total_time_s","note"\n',  # the header again, quoted
    ],
    ids=["line 2", "after a row", "quoted, last"],
)
def test_a_file_holding_its_header_again_is_refused_untouched(tmp_path, text):
    path = tmp_path / "logs.csv"
    path.write_text(text)
    before = path.read_bytes()
    for attempt in (lambda: check_writable(path, COLS), lambda: append_rows(path, [row(0, 0, 0)], COLS)):
        with pytest.raises(KvlibError, match="holds its header line again") as e:
            attempt()
        assert "\n" not in str(e.value) and str(path) in str(e.value) and "write to a new file" in str(e.value)
    with pytest.raises(KvlibError, match="header line again"):
        check_outputs({"--csv": (path, COLS)})
    assert path.read_bytes() == before


COLUMNS = {
    "run": {"--csv": run_cli.CSV_COLUMNS, "--steps-csv": run_cli.STEPS_CSV_COLUMNS},
    "experiments": {"--csv": run_cli.CSV_COLUMNS, "--steps-csv": run_cli.STEPS_CSV_COLUMNS},
    "bench": {"--csv": bench.csv_columns(), "--long-csv": long.COLUMNS},
    "perplexity": {"--csv": perplexity.CSV_COLUMNS},
    "passkey": {"--csv": passkey.CSV_COLUMNS},
}


@pytest.mark.parametrize(("command", "option"), list(OUTPUTS))
def test_every_command_refuses_a_file_holding_its_header_twice(tmp_path, capsys, no_model, command, option):  # noqa: F811
    cols = COLUMNS[command][option]
    header, values = ",".join(cols) + "\n", ",".join("1" for _ in cols) + "\n"
    target = tmp_path / "logs.csv"
    target.write_text(header + values + header + values)
    before = target.read_bytes()
    line = _refused(capsys, [*OUTPUTS[command, option], option, str(target)])
    assert "holds its header line again" in line and str(target) in line
    assert target.read_bytes() == before


def test_a_file_that_turns_foreign_between_two_rows_is_refused_at_the_second(tmp_path):
    """The check runs again inside the lock, before each row: whatever another program did to the file since the
    last row (a new header, its header again, a line cut short) stops the writer, and the file is left as is."""
    path = tmp_path / "logs.csv"
    changes = {
        "different header": "model,dtype,total_time_s\ngpt2,float32,1.0\n",
        "header line again": None,  # appended below: the header again, as a writer without the lock would
        "incomplete line": None,
    }
    for why in changes:
        path.unlink(missing_ok=True)

        def rows(why=why):
            yield row(0, 0, 0)
            if why == "different header":
                path.write_text(changes[why])
            elif why == "header line again":
                with path.open("a") as f:
                    f.write(HEADER + "tiny,9,9.0,x\n")
            else:
                with path.open("a") as f:
                    f.write("tiny,9,9")
            yield row(0, 0, 1)

        with pytest.raises(KvlibError, match=why):
            append_rows(path, rows(), COLS)
        after = path.read_text()
        assert "writer 0 row 1" not in after, why


def test_a_writer_waits_for_the_lock(tmp_path):
    """While another process holds the file's lock, a row is not written; it is, once the lock is let go."""
    path = tmp_path / "logs.csv"
    path.write_text(HEADER)
    holder = path.open("a")
    fcntl.flock(holder, fcntl.LOCK_EX)  # as another writer in the middle of its row would
    writer = threading.Thread(target=append_rows, args=(path, [row(1, 0, 0)], COLS))
    writer.start()
    time.sleep(0.5)
    assert writer.is_alive() and path.read_text() == HEADER
    holder.close()  # lets go of the lock
    writer.join(10)
    assert not writer.is_alive() and path.read_text() == HEADER + "w1,0,0,writer 1 row 0\n"


def _replace_behind_barrier(out_dir, barrier, writer):
    out = study.Outputs("09_race", out_dir)
    for i in range(25):
        df = pd.DataFrame({"writer": writer, "i": i, "x": range(2000)})
        barrier.wait(timeout=120)
        out.csv(df, "rows")


def test_writers_of_one_notebook_folder_replace_its_files_whole(tmp_path):
    """4 processes replace one notebook output 25 times each, at the same moments: no writer fails or writes into
    another's temporary file; the file left is one writer's whole table, and no temporary file is left behind."""
    ctx = multiprocessing.get_context("fork")
    n = 4
    barrier = ctx.Barrier(n)
    _run(ctx, _replace_behind_barrier, lambda k: (tmp_path, barrier, k), n)
    df = pd.read_csv(tmp_path / "data" / "09_rows.csv")
    assert len(df) == 2000 and df.writer.nunique() == 1 and df.i.nunique() == 1 and df.x.tolist() == list(range(2000))
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["09_rows.csv"]
