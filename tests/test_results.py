"""The results CSV: header once, a different header refused, rows appended whole, nothing lost on interruption."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from kvlib.core.errors import KvlibError
from kvlib.measure.results import append_rows, check_writable, read_header

COLS = ["model", "batch_size", "total_time_s", "note"]


def row(i: int, **kw) -> dict:
    return {"model": "tiny", "batch_size": i, "total_time_s": 0.5 * i, "note": f"run {i}", **kw}


def test_header_once_then_rows(tmp_path):
    path = tmp_path / "logs.csv"
    assert append_rows(path, [row(1), row(2)], COLS) == 2
    assert append_rows(path, [row(3)], COLS) == 1
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(COLS) and len(lines) == 4
    assert sum(line.startswith("model,") for line in lines) == 1
    df = pd.read_csv(path)
    assert df.batch_size.tolist() == [1, 2, 3] and df.total_time_s.tolist() == [0.5, 1.0, 1.5]


def test_an_empty_existing_file_gets_the_header(tmp_path):
    path = tmp_path / "logs.csv"
    path.touch()
    append_rows(path, [row(1)], COLS)
    assert read_header(path) == COLS


def test_awkward_values_round_trip(tmp_path):
    path = tmp_path / "logs.csv"
    append_rows(path, [row(1, note='a, "quoted"\nvalue'), row(2, total_time_s=math.nan, note=None)], COLS)
    df = pd.read_csv(path)
    assert df.note[0] == 'a, "quoted"\nvalue'
    assert math.isnan(df.total_time_s[1]) and pd.isna(df.note[1])


def test_a_different_header_is_refused_and_the_file_kept(tmp_path):
    path = tmp_path / "logs.csv"
    path.write_text("model,dtype,total_time_s\ngpt2,float32,1.0\n")
    before = path.read_bytes()
    with pytest.raises(KvlibError, match="different header") as e:
        append_rows(path, [row(1)], COLS)
    assert "\n" not in str(e.value) and "column 2" in str(e.value)
    assert path.read_bytes() == before


def test_an_incomplete_last_line_is_refused(tmp_path):
    path = tmp_path / "logs.csv"
    path.write_text(",".join(COLS) + "\ntiny,1,0.5,run")
    before = path.read_bytes()
    with pytest.raises(KvlibError, match="incomplete line"):
        append_rows(path, [row(1)], COLS)
    assert path.read_bytes() == before


def test_a_row_that_does_not_match_the_columns_is_refused(tmp_path):
    path = tmp_path / "logs.csv"
    append_rows(path, [row(1)], COLS)
    before = path.read_bytes()
    with pytest.raises(KvlibError, match="missing"):
        append_rows(path, [{"model": "tiny"}], COLS)
    with pytest.raises(KvlibError, match="unexpected"):
        append_rows(path, [row(2, extra=1)], COLS)
    assert path.read_bytes() == before


@pytest.mark.parametrize("where", ["missing_folder", "a_folder"])
def test_unwritable_paths_fail_before_anything_is_written(tmp_path, where):
    path = tmp_path / "nope" / "logs.csv" if where == "missing_folder" else tmp_path
    with pytest.raises(KvlibError, match="cannot write"):
        check_writable(path, COLS)
    with pytest.raises(KvlibError, match="cannot write"):
        append_rows(path, [row(1)], COLS)
    assert not (tmp_path / "nope").exists()


def test_check_writable_does_not_create_the_file(tmp_path):
    check_writable(tmp_path / "logs.csv", COLS)
    assert not (tmp_path / "logs.csv").exists()


def test_interruption_keeps_every_complete_row(tmp_path):
    path = tmp_path / "logs.csv"

    def rows():
        yield row(1)
        yield row(2)
        raise KeyboardInterrupt  # Ctrl-C while the third run is being measured

    with pytest.raises(KeyboardInterrupt):
        append_rows(path, rows(), COLS)
    df = pd.read_csv(path)
    assert df.batch_size.tolist() == [1, 2]
    assert path.read_text().endswith("\n")
