"""Which rows the bench runs: the models and their own row shapes, the three engines' specs of a row, the dtypes
this machine computes natively, and each row's repeats and time bound.

A row is one (model, device, dtype, batch size). Each row runs three engines on the same prompts (ENGINES):
kvlib's cached decode, and Hugging Face's generate with its dynamic and its static cache; a batch-1 CPU row of a
model with GGUF weights runs llama.cpp beside them (LLAMACPP), on the GGUF as stored.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvlib.core.config import PRESETS
from kvlib.core.errors import KvlibError
from kvlib.measure.bench.cpu import DtypeSupport, dtype_note, dtype_support
from kvlib.measure.harness import RunSpec, default_cache
from kvlib.models import llamacpp

ENGINES: tuple[tuple[str, str, str], ...] = (  # (label, harness engine, cache)
    ("kvlib", "kvlib", "static"),
    ("hf-dynamic", "hf", "dynamic"),
    ("hf-static", "hf", "static"),
)
LLAMACPP = ("llamacpp", "llamacpp", "f16")  # a fourth engine on batch-1 rows of GGUF models (`llamacpp_applies`)
# A row with llama.cpp takes this much more of the quick budget: its context's creation and prefill, and a step of
# about a quarter of kvlib's (SmolLM2 Q4_1 against float32), with the first repeat (measured: one repeat in 9 s
# left a 14 s bound no room for a second)
LLAMACPP_COST = 0.4


def row_has_llamacpp(specs: Sequence[RunSpec]) -> bool:
    return any(s.engine == LLAMACPP[1] for s in specs)


QUICK = {"max_new_tokens": 16, "repeats": 3, "warmup": 0}  # TPOT is a median of steps: the first run's cold start
# barely moves it, and a warm-up of batch 8 on 2 cores costs as much as a repeat. Three repeats, not two: the median
# of two is their mean, so one repeat caught in a slow spell of the machine moved a row by tens of percent.
FULL = {"max_new_tokens": 64, "repeats": 3, "warmup": 1}
QUICK_BUDGET_S = (
    110.0  # --quick: seconds of measuring for the short rows together (loading adds ~30 s, the long-context
)
# row about 35 s: kvlib.cli.bench.LONG_LIMIT_S bounds it): under 3 minutes,
# shared in proportion to each row's work (a batch-8 row prefills 8 prompts): 1 + batch / 2
QUICK_MIN_ROW_S = 5.0  # ... but no row gets less than this
FULL_ROW_LIMIT_S = 600.0
EMULATED_ROW = {"batch_size": 1, "max_new_tokens": 4, "repeats": 1, "warmup": 0}  # --emulated: one short row
DEFAULT_MODELS = ["smollm2-135m", "distilgpt2", "gemma3-270m"]
QUICK_MODELS = ["smollm2-135m"]  # --quick without --model: the model every target is set on. Gemma's rows do not fit
# 3 minutes; distilgpt2's took a third of the quick budget and the long-context row needs that time (name either
# with --model)


@dataclass(frozen=True)
class RowShape:
    """A model's own bench rows, in place of --batch-sizes / --prompt-len left at their defaults, and the dtypes
    its rows are measured in."""

    batch_sizes: tuple[int, ...]
    prompt_len: int
    dtypes: tuple[str, ...]
    why: str


MODEL_ROWS = {
    "gemma3-270m": RowShape(
        (1,),
        4096,
        ("float32",),
        "hybrid cache no slower than HF generate, at batch 1, float32, prompt 4096 (8x its window)",
    ),
}
DEFAULT_BATCH_SIZES = [1, 4, 8]
QUICK_HALF_BATCH_SIZES = [1]  # --quick on CPU, a half-precision dtype, --batch-sizes at its default: the row with a
# target (the bfloat16 batch-1 MBU) only, so that the quick run stays under 3 minutes (on CUDA every batch size)
DEFAULT_PROMPT_LEN = 256


@dataclass(frozen=True)
class PlannedRow:
    specs: list[RunSpec]
    support: DtypeSupport
    repeats: int
    warmup: int


def kvlib_cache(model: str) -> str:
    """kvlib's cache in the bench: static, or the hybrid layout on a model with sliding-window layers."""
    return default_cache("kvlib", model)


def row_specs(
    model: str, weights: str, device: str, dtype: str, batch_size: int, prompt_len: int, max_new_tokens: int, seed: int
) -> list[RunSpec]:
    """The three engines' specs of one row; kvlib's cache is `kvlib_cache(model)` (hybrid on Gemma 3). A batch-1
    row of a model with GGUF weights on the CPU gets llama.cpp too (LLAMACPP: its f16 cache, the GGUF as stored)
    when llama.cpp is installed."""
    mine = kvlib_cache(model)
    common = (model, weights, batch_size, prompt_len, max_new_tokens, device, dtype, seed)
    specs = [RunSpec(engine, mine if engine == "kvlib" else cache, *common) for _, engine, cache in ENGINES]
    if llamacpp_applies(model, weights, device, batch_size):
        specs.append(RunSpec(LLAMACPP[1], LLAMACPP[2], *common))  # the same model key: its tokenizer, loaded once
    return specs


def llamacpp_applies(model: str, weights: str, device: str, batch_size: int) -> bool:
    """Whether a row gets a llama.cpp column: batch 1, on the CPU, a preset with GGUF weights used pretrained."""
    cfg = PRESETS.get(model)
    return (
        cfg is not None
        and bool(cfg.gguf_requirement)
        and weights != "random"
        and batch_size == 1
        and str(device).startswith("cpu")
        and llamacpp.available()
    )


def plan_rows(args: argparse.Namespace, device: torch.device, dtypes: list[str]) -> tuple[list[PlannedRow], list[str]]:
    """The rows to measure (model x dtype x batch; an emulated dtype: none, or one short row with --emulated)
    and one line per dtype saying whether it runs natively."""
    mode = QUICK if args.quick else FULL
    max_new_tokens = args.max_new_tokens or mode["max_new_tokens"]
    repeats = args.repeats or mode["repeats"]
    warmup = mode["warmup"] if args.warmup is None else args.warmup
    rows, notes = [], []
    for dt in dtypes:
        support = dtype_support(dt, device)
        notes.append(dtype_note(dt, support, args.emulated))
        for model in args.model:
            batch_sizes, prompt_len, shape = model_row_shape(args, model)
            if shape is not None and dt not in shape.dtypes:
                continue  # a model with its own row shape runs in its own dtypes only
            cpu_half = device.type == "cpu" and dt != "float32"
            if args.quick and cpu_half and shape is None and list(args.batch_sizes) == DEFAULT_BATCH_SIZES:
                batch_sizes = QUICK_HALF_BATCH_SIZES
            if support.native:
                for b in batch_sizes:
                    specs = row_specs(model, args.weights, args.device, dt, b, prompt_len, max_new_tokens, args.seed)
                    rows.append(PlannedRow(specs, support, repeats, warmup))
            elif args.emulated:
                e = EMULATED_ROW
                specs = row_specs(
                    model, args.weights, args.device, dt, e["batch_size"], prompt_len,
                    min(e["max_new_tokens"], max_new_tokens), args.seed,
                )  # fmt: skip
                rows.append(PlannedRow(specs, support, e["repeats"], e["warmup"]))
    return rows, notes


def model_row_shape(args: argparse.Namespace, model: str) -> tuple[list[int], int, RowShape | None]:
    """(batch sizes, prompt length, its RowShape or None) of `model`'s rows: MODEL_ROWS' shape where the model has
    one and --batch-sizes / --prompt-len were left at their defaults, else the command line's."""
    shape = MODEL_ROWS.get(model)
    if shape is None:
        return list(args.batch_sizes), args.prompt_len, None
    default_batch = list(args.batch_sizes) == DEFAULT_BATCH_SIZES
    default_prompt = args.prompt_len == DEFAULT_PROMPT_LEN
    return (
        list(shape.batch_sizes) if default_batch else list(args.batch_sizes),
        shape.prompt_len if default_prompt else args.prompt_len,
        shape,
    )


def row_limits_s(
    args: argparse.Namespace, batch_sizes: Sequence[int], costs: Sequence[float] | None = None
) -> list[float]:
    """The time bound of each planned row (given by its batch size): --row-limit-s, or with --quick the budget
    shared in proportion to (1 + batch / 2) x the row's model cost (`costs`, 1 each by default: see
    `model_cost`), or FULL_ROW_LIMIT_S."""
    if args.row_limit_s is not None:
        if not (math.isfinite(args.row_limit_s) and args.row_limit_s > 0):
            raise KvlibError(f"--row-limit-s must be a positive number of seconds, got {args.row_limit_s}")
        return [float(args.row_limit_s)] * len(batch_sizes)
    if args.quick:
        costs = [1.0] * len(batch_sizes) if costs is None else costs
        weights = [(1 + b / 2) * c for b, c in zip(batch_sizes, costs, strict=True)]
        return [max(QUICK_MIN_ROW_S, QUICK_BUDGET_S * w / sum(weights)) for w in weights]
    return [FULL_ROW_LIMIT_S] * len(batch_sizes)


def model_cost(model: str) -> float:
    """A row's share of the quick budget grows with its model's depth: a 30-layer SmolLM2 step and prefill take
    about three times a 6-layer distilgpt2's (measured here), so it gets three times the time."""
    cfg = PRESETS.get(model)
    return 1.0 if cfg is None else max(1.0, cfg.n_layer / 10)
