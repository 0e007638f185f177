"""The measurement harness: every figure of the study comes from `measure_grid`.

One configuration is a `RunSpec` (engine, cache mode, model, weights, sizes, device, dtype). For a grid of them:

1. Every spec is checked before any model is loaded; each distinct model is loaded once. Prompts are passages of
   Pride and Prejudice for pretrained models and seeded synthetic token ids for random weights (kvlib.models.prompts).
2. The machine's roofline (read bandwidth, matmul throughput) comes from one machine probe: the report's when
   KVLIB_MACHINE_PROBE names it, else measured once per process (kvlib.measure.roofline.machine_probe).
3. Each spec runs `warmup` unrecorded times, then `repeats` measured times, interleaved: repeat r runs every spec
   in turn, in reverse order on odd repeats (A B, B A, ...), so drift and order effects hit all specs alike.
4. A run is one `kvlib.models.decode.generate` or one Hugging Face `generate` call (`kvlib.models.hf.hf_generate`),
   which time the prefill (time to first token) and every decode step apart and return exactly `max_new_tokens`
   tokens per sequence (checked again here). Python's garbage collector is off during a run.

Definitions (per run, one row of `Measurement.runs`):
    ttft_s              prefill: the prompt's forward pass and the first new token
    decode_time_s       the sum of the N - 1 decode steps (each makes one token per sequence)
    total_time_s        ttft_s + decode_time_s
    tokens_generated    batch_size x max_new_tokens
    tokens_per_s        tokens_generated / total_time_s (end to end, prefill included)
    decode_tokens_per_s batch_size x (max_new_tokens - 1) / decode_time_s
    tpot_p50/p90/p99_s  percentiles of the per-step decode latency (time per output token of each sequence);
                        p50_latency_s / p95_latency_s are the same kind of figure, under the assignment's names
    kv_cache_*          held bytes (counted from the cache's tensors) and the formula, for kv_cache_tokens slots
    peak_mem_*          peak of the run: CUDA allocated memory, or the process's resident set on CPU
    mbu                 decode_step_bytes / (tpot_p50_s x measured bandwidth), kvlib.measure.roofline
`Measurement.steps` has one row per decode step: position = tokens already in the sequence (prompt_len + step),
whose keys the step attends to along with its own, and latency_s.

One concept in one file (over 400 lines): the measurement harness (a run's specification, its timed repeats, its
rows).
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from kvlib.caches.base import CACHE_LAYOUTS, REFERENCE
from kvlib.core import checks
from kvlib.core.config import PRESETS, ModelConfig
from kvlib.core.errors import KvlibError
from kvlib.measure.memory import (
    PeakTracker,
    cache_tokens,
    held_cache_bytes,
    kv_cache_bytes_formula,
    mb,
    mib,
    module_weight_bytes,
)
from kvlib.measure.provenance import provenance
from kvlib.measure.roofline import decode_step_bytes, floor_s, machine_roofline, mbu
from kvlib.models import llamacpp
from kvlib.models.decode import Generation, check_context, generate
from kvlib.models.fastpath import prepare_for_inference
from kvlib.models.hf import HF_CACHE_MODES, HF_DYNAMIC, hf_generate
from kvlib.models.loading import (
    DTYPES,
    WEIGHT_CHOICES,
    LoadedModel,
    check_model_name,
    load,
    model_config,
    resolve_device,
)
from kvlib.models.prompts import prompts_for

ENGINES = ("kvlib", "hf", "llamacpp")  # llamacpp: llama.cpp on the GGUF as stored (kvlib.models.llamacpp)

# Every column of Measurement.runs (and of the CLI's CSV), in order, with its type. The assignment's first.
RUN_COLUMNS: dict[str, type] = {
    "model": str,
    "dtype": str,
    "device": str,
    "use_cache": int,
    "batch_size": int,
    "prompt_len": int,
    "max_new_tokens": int,
    "total_time_s": float,
    "tokens_generated": int,
    "tokens_per_s": float,
    "p50_latency_s": float,
    "p95_latency_s": float,
    "peak_mem_mb": float,  # 10^6 bytes
    "engine": str,
    "cache": str,
    "weights": str,  # actually used: pretrained or random
    "ttft_s": float,
    "decode_time_s": float,
    "tpot_p50_s": float,
    "tpot_p90_s": float,
    "tpot_p99_s": float,
    "tpot_mean_s": float,
    "decode_tokens_per_s": float,
    "kv_cache_tokens": int,
    "kv_cache_bytes": int,
    "kv_cache_bytes_formula": int,
    "peak_mem_bytes": int,
    "peak_mem_mib": float,  # 2^20 bytes
    "peak_mem_kind": str,  # cuda_allocated or rss
    "peak_mem_delta_bytes": int,  # peak - (allocated or resident) just before the run
    "peak_mem_reserved_mib": float,  # CUDA caching allocator; empty on CPU
    "weights_bytes": int,  # this engine's model
    "resident_weights_bytes": int,  # every model the harness holds on this device
    "other_mem_bytes": int,  # peak - resident weights - KV cache: activations, runtime, allocator slack
    "decode_step_bytes": int,
    "floor_step_s": float,
    "bandwidth_bytes_per_s": float,
    "matmul_flops_per_s": float,
    "mbu": float,
    "repeat": int,
    "spec_id": int,
    "seed": int,
    "n_kv_head": int,
    "weights_source": str,
    "git_commit": str,
    "python_version": str,
    "torch_version": str,
    "transformers_version": str,
    "platform": str,
    "device_name": str,
    "threads": int,
    "timestamp": str,
}
STEP_COLUMNS: dict[str, type] = {
    "spec_id": int,
    "engine": str,
    "cache": str,
    "model": str,
    "weights": str,
    "batch_size": int,
    "prompt_len": int,
    "max_new_tokens": int,
    "device": str,
    "dtype": str,
    "seed": int,
    "n_kv_head": int,
    "repeat": int,
    "step": int,
    "position": int,
    "latency_s": float,
    "floor_s": float,
}


@dataclass(frozen=True)
class RunSpec:
    """One configuration to measure. `cache` is "none" (no cache: recompute everything) or a cache layout."""

    engine: str = "kvlib"
    cache: str = "static"
    model: str = "tiny"
    weights: str = "random"
    batch_size: int = 1
    prompt_len: int = 32
    max_new_tokens: int = 16
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    n_kv_head: int | None = None

    @property
    def use_cache(self) -> int:
        return 0 if self.cache == "none" else 1

    def label(self) -> str:
        kv = "" if self.n_kv_head is None else f" n_kv_head={self.n_kv_head}"
        return (
            f"{self.engine} {self.cache} {self.model}{kv} ({self.weights}) {self.device} {self.dtype} "
            f"batch={self.batch_size} prompt={self.prompt_len} new={self.max_new_tokens}"
        )

    def model_key(self) -> tuple:
        return (self.model, self.weights, self.device, self.dtype, self.seed, self.n_kv_head)

    def validate(self) -> None:
        """Raise KvlibError for anything that cannot run, before any model is loaded."""
        for name in ("batch_size", "prompt_len", "max_new_tokens"):
            v = getattr(self, name)
            if not checks.is_whole(v) or not 1 <= v <= checks.WHOLE_MAX:
                raise KvlibError(f"{name} must be a positive integer, got {v!r}")
        checks.seed("seed", self.seed)
        if self.n_kv_head is not None and (not checks.is_whole(self.n_kv_head) or self.n_kv_head < 1):
            raise KvlibError(f"n_kv_head must be a positive integer or None, got {self.n_kv_head!r}")
        if not isinstance(self.engine, str) or self.engine not in ENGINES:
            raise KvlibError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        modes = {"hf": HF_CACHE_MODES, "llamacpp": llamacpp.CACHE_TYPES}.get(self.engine, ("none", *CACHE_LAYOUTS))
        if not isinstance(self.cache, str) or self.cache not in modes:
            raise KvlibError(f"unknown cache {self.cache!r} for engine {self.engine}; choose one of {', '.join(modes)}")
        if not isinstance(self.weights, str) or self.weights not in WEIGHT_CHOICES:
            raise KvlibError(f"unknown weights {self.weights!r}; choose one of {', '.join(WEIGHT_CHOICES)}")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise KvlibError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        resolve_device(self.device)
        check_model_name(self.model)
        if self.model in PRESETS:
            cfg = PRESETS[self.model]
            if self.n_kv_head is not None and cfg.n_head % self.n_kv_head:
                raise KvlibError(f"n_kv_head must divide {self.model}'s n_head ({cfg.n_head}), got {self.n_kv_head}")
            if self.n_kv_head not in (None, cfg.n_kv_head):
                if self.weights == "pretrained":
                    raise KvlibError(
                        f"{self.model} has no pretrained weights with n_kv_head={self.n_kv_head} (its own: "
                        f"{cfg.n_kv_head}); use weights random"
                    )
                if self.engine == "hf" and not cfg.with_kv_heads(self.n_kv_head).has_hf_counterpart:
                    raise KvlibError(
                        f"engine hf has no grouped-query attention for GPT-2 (n_kv_head={self.n_kv_head}); use kvlib"
                    )
            check_context(cfg.n_positions, self.model, self.prompt_len, self.max_new_tokens)
            if self.engine == "llamacpp":
                self._validate_llamacpp(cfg)
        elif self.engine == "llamacpp":
            models = ", ".join(llamacpp_models())
            raise KvlibError(f"engine llamacpp runs a preset's GGUF ({models}), not {self.model!r}")
        elif not (Path(self.model).is_dir() and (Path(self.model) / "config.json").exists()):
            raise KvlibError(f"unknown model {self.model!r}; choose one of {', '.join(PRESETS)} or a local folder")

    def _validate_llamacpp(self, cfg: ModelConfig) -> None:
        """llama.cpp here: one sequence, on the CPU, the GGUF its package ships (its weights as stored)."""
        if not cfg.gguf_requirement:
            raise KvlibError(f"engine llamacpp runs a GGUF; {self.model} has none ({', '.join(llamacpp_models())} do)")
        if self.weights == "random" or self.n_kv_head is not None:
            raise KvlibError("engine llamacpp runs the GGUF's own weights: not weights random or another n_kv_head")
        if self.batch_size != 1:
            raise KvlibError(f"engine llamacpp decodes one sequence here (batch_size 1), got {self.batch_size}")
        if resolve_device(self.device).type != "cpu":
            raise KvlibError("engine llamacpp runs on the CPU here (llama-cpp-python is built for it by make setup)")
        llamacpp.binding()


def llamacpp_models() -> list[str]:
    """The presets whose GGUF llama.cpp can run."""
    return [n for n, c in PRESETS.items() if c.gguf_requirement]


class ModelPool:
    """Loaded models, each distinct (model, weights, device, dtype, seed, n_kv_head) loaded once; pass one pool
    to several `measure_grid` calls to share models between them."""

    def __init__(self) -> None:
        self._models: dict[tuple, LoadedModel] = {}
        self._engines: dict[tuple, llamacpp.Engine] = {}

    def llamacpp(self, spec: RunSpec) -> llamacpp.Engine:
        """The llama.cpp context of `spec` (its model's GGUF, cache type for keys and values, prompt + new tokens
        of context), created once per pool and reused by every repeat."""
        key = (spec.model, spec.cache, spec.prompt_len + spec.max_new_tokens)
        if key not in self._engines:
            self._engines[key] = llamacpp.open_engine(spec.model, key[2], spec.cache, spec.cache)
        return self._engines[key]

    def get(self, key: tuple, need_kvlib: bool, need_hf: bool) -> LoadedModel:
        lm = self._models.get(key)
        if lm is None or (need_kvlib and lm.model is None) or (need_hf and lm.hf is None):
            if lm is not None:  # a model without the engine now needed: load both afresh
                need_kvlib, need_hf = need_kvlib or lm.model is not None, need_hf or lm.hf is not None
                del self._models[key], lm
                gc.collect()
            model, weights, device, dtype, seed, n_kv_head = key
            lm = load(model, weights, device, dtype, seed, n_kv_head, with_hf=need_hf)
            if need_hf and lm.hf is None:
                raise KvlibError(f"{model}: no Hugging Face model for this configuration (grouped-query attention?)")
            if not need_kvlib:
                lm.model = None  # only HF runs: don't let kvlib's copy of the weights inflate their memory
                gc.collect()
            self._models[key] = lm
        return lm

    def resident_weight_bytes(self, device: torch.device) -> int:
        return sum(
            module_weight_bytes(lm.model) + module_weight_bytes(lm.hf)
            for lm in self._models.values()
            if lm.device == device
        )


@dataclass
class Measurement:
    runs: pd.DataFrame  # one row per (spec, repeat): RUN_COLUMNS
    steps: pd.DataFrame  # one row per decode step: STEP_COLUMNS
    specs: list[RunSpec] = field(default_factory=list)  # spec_id indexes this list

    def summary(
        self, metrics: Sequence[str] = ("ttft_s", "tpot_p50_s", "tokens_per_s", "peak_mem_mib", "mbu")
    ) -> pd.DataFrame:
        """One row per spec: the median of each metric over repeats and its spread (max - min, `_range`)."""
        keys = ["spec_id", "engine", "cache", "model", "batch_size", "prompt_len", "max_new_tokens"]
        g = self.runs.groupby(keys, sort=True)[list(metrics)]
        med = g.median()
        spread = (g.max() - g.min()).add_suffix("_range")
        return pd.concat([med, spread], axis=1).reset_index().assign(repeats=g.size().to_numpy())


def _typed(rows: list[dict[str, Any]], columns: dict[str, type]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(columns))
    kinds = {int: "int64", float: "float64", str: "str"}
    return df.astype({c: kinds[t] for c, t in columns.items()}) if len(df) else df


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("out of memory", "can't allocate memory", "not enough memory")
    )


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No garbage-collection pauses inside a timed region: collect first, then pause the collector until the block
    ends (every timed region of the harness and the bench's long rows)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _one_run(spec: RunSpec, lm: LoadedModel, ids: torch.Tensor, engine: Any = None) -> tuple[Any, Any]:
    """One generation, with the process's peak memory tracked; returns (Generation, PeakMemory). `engine`: the
    llama.cpp context of a llamacpp spec (ModelPool.llamacpp)."""
    if spec.engine == "kvlib":  # measuring and packing kernels (first call) borrows memory: not inside the peak
        prepare_for_inference(lm.model, spec.batch_size)
    try:
        with paused_gc(), PeakTracker(lm.device) as tracker:
            if spec.engine == "kvlib":
                g = generate(lm.model, ids, spec.max_new_tokens, cache=spec.cache)
            elif spec.engine == "llamacpp":
                tokens, prefill_s, decode_s = engine.greedy(ids[0].tolist(), spec.max_new_tokens)
                g = Generation(torch.tensor([tokens]), prefill_s, decode_s)
            else:
                g = hf_generate(lm.hf, ids, spec.max_new_tokens, cache=spec.cache)
    except Exception as e:
        if not _is_oom(e):
            raise
        why = (str(e).splitlines() or [type(e).__name__])[0][:200]
        if lm.device.type == "cuda":
            torch.cuda.empty_cache()
        raise KvlibError(f"out of memory measuring {spec.label()} ({why})") from None
    B, N = spec.batch_size, spec.max_new_tokens
    if tuple(g.tokens.shape) != (B, N) or len(g.decode_s) != N - 1:
        raise KvlibError(
            f"{spec.label()}: got {tuple(g.tokens.shape)} tokens and {len(g.decode_s)} decode steps, "
            f"expected ({B}, {N}) and {N - 1}"
        )
    return g, tracker.result


def step_cache_bytes(
    spec: RunSpec,
    cfg: ModelConfig,
    batch_size: int,
    tokens: int,
    dtype: torch.dtype,
    options: Mapping[str, Any] | None = None,
) -> int:
    """Bytes of keys and values a decode step reads from `spec`'s cache holding `tokens` positions of each of
    `batch_size` sequences: what the layout holds then with its `options` (None: its defaults; kvlib: its
    `used_bytes_after`, so int8 codes count one byte an element with their scales, an eviction budget or a window
    bounds the tokens), and never more than the dense cache with each sliding layer cut to its window ("hybrid": on
    a model trained with sliding windows a sliding layer reads at most its window whatever the layout, kvlib and HF
    alike). Regression: the bytes of every layout were once the dense float cache's, which overstated a quantized or
    evicting cache's MBU (int8 at batch 4 x 4096 on SmolLM2: 1.7x;
    tests/test_harness.py::test_step_cache_bytes_follow_the_layout)."""
    if spec.engine == "llamacpp":
        shape = llamacpp.read_shape(llamacpp.gguf_file(spec.model))
        return batch_size * llamacpp.kv_cache_bytes(shape, tokens, spec.cache, spec.cache, read=True)
    dense = kv_cache_bytes_formula(cfg, batch_size, tokens, dtype, "hybrid")
    if spec.engine != "kvlib" or spec.cache not in CACHE_LAYOUTS:
        return dense
    return min(dense, CACHE_LAYOUTS[spec.cache].used_bytes_after(cfg, tokens, dtype, batch_size, **(options or {})))


def _records(
    spec: RunSpec,
    spec_id: int,
    repeat: int,
    lm: LoadedModel,
    g: Any,
    peak: Any,
    roof: dict[str, float],
    resident_weights: int,
    engine: Any = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    cfg, B, P, N = lm.cfg, spec.batch_size, spec.prompt_len, spec.max_new_tokens
    dtype = lm.dtype_name
    weights_read = decode_step_bytes(cfg, B, 0, dtype)
    weights_bytes = module_weight_bytes(lm.model if spec.engine == "kvlib" else lm.hf)
    if engine is not None:  # llama.cpp: the GGUF's bytes as stored, its cache's bytes by type
        dtype, weights_read = engine.shape.file_type, engine.shape.step_weight_bytes
        weights_bytes = resident_weights = engine.shape.weight_bytes
    decode = list(g.decode_s)
    decode_time = float(sum(decode))
    total = g.prefill_s + decode_time
    tpot50 = _percentile(decode, 50)
    bw = roof["bandwidth_bytes_per_s"]
    kv_tokens = cache_tokens(spec.engine, spec.cache, P, N)
    held = held_cache_bytes(g.cache) if engine is None else engine.cache_bytes()
    cached = spec.cache != "none"

    # Decode step s (1 .. N - 1) reads the cache as it holds P + s tokens (`step_cache_bytes`), averaged over the
    # steps. Without a cache nothing is read from one (the step recomputes every key and value instead).
    # Computed once per run, for the row's mean and each step's floor (a kvlib layout builds a one-slot cache to
    # count its bytes; llama.cpp's come from its context's shape, not from the GGUF read again).
    def read(tokens: int) -> int:
        if engine is not None:
            return engine.read_bytes(tokens)
        return step_cache_bytes(spec, cfg, B, tokens, lm.dtype)

    kv_read = [read(P + s) for s in range(1, N)] if cached else []
    step_bytes = round(weights_read + (sum(kv_read) / len(kv_read) if kv_read else 0))
    shared = {
        "spec_id": spec_id,
        "engine": spec.engine,
        "cache": spec.cache,
        "model": spec.model,
        "weights": lm.weights,
        "batch_size": B,
        "prompt_len": P,
        "max_new_tokens": N,
        "device": str(lm.device),
        "dtype": dtype,
        "seed": spec.seed,
        "n_kv_head": cfg.n_kv_head,
        "repeat": repeat,
    }
    row = {
        **shared,
        "use_cache": spec.use_cache,
        "total_time_s": total,
        "tokens_generated": int(g.tokens.numel()),
        "tokens_per_s": g.tokens.numel() / total,
        "p50_latency_s": tpot50,
        "p95_latency_s": _percentile(decode, 95),
        "peak_mem_mb": mb(peak.peak_bytes),
        "ttft_s": g.prefill_s,
        "decode_time_s": decode_time,
        "tpot_p50_s": tpot50,
        "tpot_p90_s": _percentile(decode, 90),
        "tpot_p99_s": _percentile(decode, 99),
        "tpot_mean_s": decode_time / len(decode) if decode else math.nan,
        "decode_tokens_per_s": B * len(decode) / decode_time if decode else math.nan,
        "kv_cache_tokens": kv_tokens,
        "kv_cache_bytes": held,
        "kv_cache_bytes_formula": kv_cache_bytes_formula(cfg, B, kv_tokens, lm.dtype, spec.cache, spec.engine)
        if engine is None
        else engine.cache_bytes(kv_tokens),
        "peak_mem_bytes": peak.peak_bytes,
        "peak_mem_mib": mib(peak.peak_bytes),
        "peak_mem_kind": peak.kind,
        "peak_mem_delta_bytes": peak.delta_bytes,
        "peak_mem_reserved_mib": math.nan if peak.reserved_peak_bytes is None else mib(peak.reserved_peak_bytes),
        "weights_bytes": weights_bytes,
        "resident_weights_bytes": resident_weights,
        "other_mem_bytes": peak.peak_bytes - resident_weights - held,
        "decode_step_bytes": step_bytes,
        "floor_step_s": floor_s(step_bytes, bw),
        "bandwidth_bytes_per_s": bw,
        "matmul_flops_per_s": roof["matmul_flops_per_s"],
        "mbu": mbu(step_bytes, tpot50, bw),
        "weights_source": lm.source,
        **provenance(lm.device),
    }
    steps = []
    for s, latency in enumerate(decode):  # step s attends over P + s + 1 positions: kv_read[s]
        steps.append(
            {
                **shared,
                "step": s,
                "position": P + s,
                "latency_s": latency,
                "floor_s": floor_s(weights_read + (kv_read[s] if cached else 0), bw),
            }
        )
    return row, steps


def measure_grid(
    specs: Sequence[RunSpec],
    repeats: int = 3,
    warmup: int = 1,
    progress: bool = False,
    roofline: bool = True,
    on_run: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None,
    pool: ModelPool | None = None,
) -> Measurement:
    """Measure every spec `repeats` times after `warmup` unrecorded runs, interleaved (see the module docstring).

    `on_run(row, step_rows)` is called with each measured run's row and its decode steps' rows as soon as the run
    is complete (the CLI appends them to its CSVs there). `progress` shows a bar on stderr once the grid has run
    for 2 s. `roofline=False` (or KVLIB_NO_ROOFLINE=1) skips the bandwidth and matmul measurements (mbu is NaN).
    `pool` shares loaded models between calls.
    """
    items = list(specs) if isinstance(specs, Iterable) and not isinstance(specs, (str, bytes, RunSpec)) else None
    if items is None or not all(isinstance(s, RunSpec) for s in items):
        raise checks.fail("specs", specs, "a list of kvlib.measure.harness.RunSpec")
    specs = items
    if not specs:
        raise KvlibError("nothing to measure: the grid is empty")
    repeats = checks.whole("repeats", repeats, minimum=1)
    warmup = checks.whole("warmup", warmup, minimum=0)
    for spec in specs:
        spec.validate()
    pool = ModelPool() if pool is None else pool
    loaded: list[LoadedModel] = []
    for spec in specs:
        key = spec.model_key()
        engines = {s.engine for s in specs if s.model_key() == key}
        lm = pool.get(key, need_kvlib="kvlib" in engines, need_hf="hf" in engines)  # llamacpp: the tokenizer
        check_context(lm.cfg.n_positions, spec.model, spec.prompt_len, spec.max_new_tokens)  # local folders
        loaded.append(lm)
    # Passages of the novel for pretrained models (they have a tokenizer), synthetic ids for random weights.
    prompts = [
        prompts_for(lm.cfg.vocab_size, lm.tokenizer, s.batch_size, s.prompt_len, s.seed, lm.device)
        for s, lm in zip(specs, loaded, strict=True)
    ]
    roofs = {(str(lm.device), lm.dtype_name): machine_roofline(lm.device, lm.dtype, roofline) for lm in loaded}

    bar = tqdm(
        total=len(specs) * (warmup + repeats), desc="measuring", unit="run", file=sys.stderr, delay=2.0,
        disable=not progress, leave=False,
    )  # fmt: skip
    runs: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    # A full collection over torch's and transformers' objects takes ~0.3 s: do it once, then freeze what exists
    # so that the collection before each run only walks objects created since (the previous run's garbage).
    gc.collect()
    gc.freeze()
    try:
        for i, (spec, lm, ids) in enumerate(zip(specs, loaded, prompts, strict=True)):
            for _ in range(warmup):
                bar.set_postfix_str(f"warm-up {i + 1}/{len(specs)}", refresh=False)
                _one_run(spec, lm, ids, pool.llamacpp(spec) if spec.engine == "llamacpp" else None)
                bar.update()
        for r in range(repeats):
            order = range(len(specs)) if r % 2 == 0 else range(len(specs) - 1, -1, -1)
            for i in order:
                spec, lm = specs[i], loaded[i]
                bar.set_postfix_str(f"repeat {r + 1}/{repeats}, spec {i + 1}/{len(specs)}", refresh=False)
                engine = pool.llamacpp(spec) if spec.engine == "llamacpp" else None
                g, peak = _one_run(spec, lm, prompts[i], engine)
                resident = pool.resident_weight_bytes(lm.device)
                roof = roofs[(str(lm.device), lm.dtype_name)]
                row, step_rows = _records(spec, i, r, lm, g, peak, roof, resident, engine)
                del g
                row = {c: row[c] for c in RUN_COLUMNS}
                step_rows = [{c: st[c] for c in STEP_COLUMNS} for st in step_rows]
                runs.append(row)
                steps.extend(step_rows)
                if on_run is not None:
                    on_run(row, step_rows)
                bar.update()
    finally:
        gc.unfreeze()
        bar.close()
    return Measurement(_typed(runs, RUN_COLUMNS), _typed(steps, STEP_COLUMNS), specs)


def measure(
    spec: RunSpec,
    repeats: int = 3,
    warmup: int = 1,
    progress: bool = False,
    roofline: bool = True,
    on_run: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None,
    pool: ModelPool | None = None,
) -> Measurement:
    """`measure_grid` of one spec."""
    return measure_grid([spec], repeats, warmup, progress, roofline, on_run, pool)


# ---- what --use_cache 1 means ---------------------------------------------------------------------------------------

# what --use_cache 1 means for each engine (but see below)
DEFAULT_CACHE = {"hf": HF_DYNAMIC, "kvlib": REFERENCE, "llamacpp": llamacpp.REFERENCE}


def default_cache(engine: str, model: str | None = None) -> str:
    """What --use_cache 1 means: HF's DynamicCache; kvlib's static cache, or on a model with sliding-window
    layers (a preset or saved folder whose config has them: Gemma 3) kvlib's hybrid cache, which keeps only the
    window there. A model that cannot be read here gets the plain default (its error comes from validation)."""
    if engine == "kvlib" and model is not None:
        sliding_default = next(n for n, c in CACHE_LAYOUTS.items() if c.for_sliding_models)
        try:
            if model_config(model).is_hybrid:
                return sliding_default
        except KvlibError:
            pass
    return DEFAULT_CACHE[engine]


def resolve_cache(engine: str, use_cache: int | None, cache: str | None, model: str | None = None) -> str:
    """The cache mode from --use_cache and --cache (and the model, for kvlib's default: `default_cache`); an error
    when they contradict each other."""
    if cache is None:
        return "none" if use_cache == 0 else default_cache(engine, model)
    if use_cache == 0 and cache != "none":
        raise KvlibError(f"--use_cache 0 contradicts --cache {cache}")
    if use_cache == 1 and cache == "none":
        raise KvlibError("--use_cache 1 contradicts --cache none")
    return cache
