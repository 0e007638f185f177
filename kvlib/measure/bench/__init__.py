"""The bench's parts, one concept each: `plan` (which rows run), `cpu` (the dtypes this CPU computes natively, torch
threads), `runner` (timing a row within its time bound) and `table` (the results table, the CSV's columns and the
targets' verdicts, the targets read from kvlib/data/bench_targets.yaml). The command, and what it measures, is
kvlib.cli.bench. This package re-exports what other modules and the tests use.
"""

from __future__ import annotations

from kvlib.measure.bench.cpu import dtype_support
from kvlib.measure.bench.plan import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_MODELS,
    DEFAULT_PROMPT_LEN,
    EMULATED_ROW,
    FULL_ROW_LIMIT_S,
    QUICK_BUDGET_S,
    QUICK_MIN_ROW_S,
    QUICK_MODELS,
    plan_rows,
    row_limits_s,
)
from kvlib.measure.bench.runner import COLUMNS, RowTimeBound, agreement, check_targets, summarize, time_bound
from kvlib.measure.bench.table import TARGETS, Target, beyond_the_floor, csv_columns, gemma_report, target_report

__all__ = [  # what other modules and the tests use, and the command
    "COLUMNS",
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_MODELS",
    "DEFAULT_PROMPT_LEN",
    "EMULATED_ROW",
    "FULL_ROW_LIMIT_S",
    "QUICK_BUDGET_S",
    "QUICK_MIN_ROW_S",
    "QUICK_MODELS",
    "TARGETS",
    "RowTimeBound",
    "Target",
    "agreement",
    "beyond_the_floor",
    "check_targets",
    "csv_columns",
    "dtype_support",
    "gemma_report",
    "plan_rows",
    "row_limits_s",
    "summarize",
    "target_report",
    "time_bound",
]
