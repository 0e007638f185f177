"""Long-context decode rows: the step where the cache outweighs the weights (SmolLM2 float32 holds 45 KiB of keys and
values a token, so batch 4 x 4096 tokens is 720 MiB of cache against 513 MiB of weights).

Prefilling batch 4 x 4096 tokens takes about a minute an engine on 2 CPU cores, so these rows prefill once: one
passage of the novel (`context` tokens, batch 1) through kvlib with its static cache, and every engine's cache is
filled from those keys and values, repeated over the batch (a causal model's cache after a prefix is the same
whoever computes it; the rows' top1_vs_kvlib_static and max_abs_logit_diff show Hugging Face, decoding from the
cache kvlib filled, computing kvlib's logits). The engines (ENGINES), each one decode step per round at the same
context, rounds interleaved (the order turns every round), the first round a warm-up not counted:

    kvlib static     kvlib.models.decode.decode_step with its static cache (the fast path every command uses)
    kvlib int8       the same with the int8 per-token cache (`quantized`, bits 8), which attends over its codes
    hf-dynamic       the Hugging Face model's forward step with its DynamicCache, as `generate` calls it
    hf-static        the same with its StaticCache

Every engine is fed the same token each round (the passage's own next token: teacher forcing), so the int8 cache's
KL divergence and top-1 agreement against the exact cache (kvlib.measure.divergence) come from the counted steps
themselves (the warm-up round's logits are left out). Per engine: TPOT p50 and its range over the rounds, the
bytes a step reads (every weight once and the cache as it holds `context` tokens: kvlib.measure.harness.
step_cache_bytes, int8 codes with their scales), the floor (those bytes / the machine probe's read bandwidth) and
MBU (floor / TPOT). Timed with the garbage collector paused, as the harness does.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
import yaml

from kvlib.caches.base import make_cache
from kvlib.core import checks
from kvlib.core.config import PRESETS, ModelConfig
from kvlib.core.errors import KvlibError
from kvlib.measure.bench.table import TARGETS_FILE, Target, target_entry
from kvlib.measure.divergence import log_probs, per_token
from kvlib.measure.harness import ModelPool, RunSpec, paused_gc, step_cache_bytes
from kvlib.measure.provenance import provenance
from kvlib.measure.roofline import decode_step_bytes
from kvlib.models.decode import Clock, decode_step, prefill, prepare_positions
from kvlib.models.fastpath import prepare_for_inference
from kvlib.models.hf import hf_cache
from kvlib.models.prompts import prompts_for

ENGINES: tuple[tuple[str, str, str, dict[str, Any]], ...] = (  # (label, engine, cache, cache options)
    ("kvlib static", "kvlib", "static", {}),
    ("kvlib int8", "kvlib", "quantized", {"bits": 8}),
    ("hf-dynamic", "hf", "dynamic", {}),
    ("hf-static", "hf", "static", {}),
)
PROVENANCE = ("device_name", "torch_version", "transformers_version", "git_commit", "timestamp")
COLUMNS = [
    "model", "dtype", "batch_size", "context", "engine", "cache", "rounds", "tpot_p50_ms", "tpot_min_ms",
    "tpot_max_ms", "step_bytes", "cache_mib", "bandwidth_gb_per_s", "floor_ms", "mbu", "ratio_vs_kvlib_static",
    "kld_vs_kvlib_static", "top1_vs_kvlib_static", "max_abs_logit_diff", *PROVENANCE,
]  # fmt: skip


@dataclass(frozen=True)
class LongRow:
    """One long-context row: `model` at batch `batch_size`, each step attending over `context` cached tokens."""

    model: str
    batch_size: int
    context: int
    dtype: str = "float32"


LONG_ROWS = (LongRow("smollm2-135m", 4, 4096),)


@dataclass
class LongResult:
    """What `measure_long` measured: `rows`, one per (context, engine) with COLUMNS; `steps`, one per timed decode
    step (model, batch_size, context, engine, round, latency_ms), for spreads and paired ratios; `logits`, per
    (context, engine), the first sequence's logits (rounds, V) float32 of the counted rounds (positions context + 1
    .. context + rounds; the warm-up round's, at position context, left out)."""

    rows: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    logits: dict[tuple[int, str], torch.Tensor]


def check_model(cfg: ModelConfig, model: str, has_hf: bool) -> None:
    """Refuse, in one line, a model the long-context rows cannot run: sliding-window layers (the int8 cache does
    not compose with them) or no Hugging Face counterpart to compare with."""
    if "sliding_attention" in cfg.layer_types:
        raise KvlibError(f"long-context rows need a model without sliding-window layers; {model} has them")
    if not has_hf:
        raise KvlibError(f"long-context rows compare with Hugging Face; {model} has no Hugging Face counterpart")


def long_spec(row: LongRow, rounds: int, weights: str, device: str, seed: int) -> RunSpec:
    """kvlib's RunSpec of `row` (the longest context plus the rounds and the warm-up must fit the model), checked
    before anything is loaded, a preset's model checked too (`check_model`). Raises KvlibError."""
    spec = RunSpec(
        "kvlib", "static", row.model, weights, row.batch_size, row.context, rounds + 1, device, row.dtype, seed
    )
    spec.validate()
    if row.model in PRESETS:
        check_model(PRESETS[row.model], row.model, PRESETS[row.model].has_hf_counterpart)
    return spec


@torch.inference_mode()
def measure_long(
    row: LongRow,
    pool: ModelPool,
    rounds: int,
    bandwidth_bytes_per_s: float,
    seed: int = 0,
    device: str = "cpu",
    contexts: Sequence[int] | None = None,
    *,
    weights: str = "auto",
) -> LongResult:
    """Time the decode step of every engine (ENGINES) at each of `contexts` (default: `row.context`, which must be
    the longest), `rounds` counted rounds after one warm-up round, from one shared prefill of `row.context` tokens
    of the novel (a cache after a prefix of c tokens is the prefill's first c slots). The token fed at context c,
    round r, is the passage's own token c + r (teacher forcing: every engine sees the same history). Raises
    KvlibError when the model has a sliding-window layer (the int8 cache does not compose with it), a context is
    out of [1, row.context] or does not fit the model. `weights`: as every command's (auto: pretrained where
    available). On CUDA each step is timed between two synchronisations."""
    rounds = checks.whole("rounds", rounds, where="long-context rows:")
    steps = rounds + 1  # the warm-up round and the counted ones
    contexts = [row.context] if contexts is None else sorted(set(checks.whole_list("contexts", list(contexts))))
    if contexts[-1] > row.context:
        raise KvlibError(f"contexts must lie in [1, {row.context}], got {contexts}")
    spec = long_spec(row, rounds, weights, device, seed)  # refuses a model that cannot run these rows, unloaded
    lm = pool.get(spec.model_key(), need_kvlib=True, need_hf=True)
    cfg, model, B, P = lm.cfg, lm.model, row.batch_size, row.context
    check_model(cfg, row.model, lm.hf is not None)  # a local folder's config is known only now
    text = prompts_for(cfg.vocab_size, lm.tokenizer, 1, P + steps, seed, lm.device)  # (1, P + steps)
    positions, _ = prepare_positions(text.expand(B, -1), None, 0)  # (B, P + steps)
    prepare_for_inference(model, 1)
    one = make_cache("static", cfg, 1, P, lm.device, lm.dtype)
    prefill(model, text[:, :P], positions[:1, :P], one, None)
    prepare_for_inference(model, B)
    weight_bytes = decode_step_bytes(cfg, B, 0, lm.dtype)
    info = provenance(lm.device)

    clock = Clock(lm.device)  # on CUDA a step's time ends when its kernels have

    def step(kv: Any, engine: str, slot: int) -> torch.Tensor:
        """One decode step of `engine` on its cache `kv`, feeding the passage's token at `slot`; logits (B, V)."""
        token = text[:, slot : slot + 1].expand(B, 1)
        if engine == "kvlib":
            return decode_step(model, token, slot, positions, kv, None)
        out = lm.hf(
            input_ids=token,
            position_ids=positions[:, slot : slot + 1],
            cache_position=slots[slot],
            past_key_values=kv,
            use_cache=True,
        )
        return out.logits[:, -1]

    slots = torch.arange(P + steps, device=lm.device)[:, None]  # HF's cache_position of each slot, made untimed

    rows: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    kept: dict[tuple[int, str], torch.Tensor] = {}
    for c in contexts:
        caches: dict[str, Any] = {}
        for label, engine, cache, options in ENGINES:
            kv = (
                make_cache(cache, cfg, B, c + steps, lm.device, lm.dtype, **options)
                if engine == "kvlib"
                else hf_cache(lm.hf, cache, c + steps)
            )
            for layer in range(cfg.n_layer):
                k, v = (t[:, :, :c].expand(B, -1, -1, -1).contiguous() for t in one.layer_kv(layer))
                kv.update(layer, k, v, 0) if engine == "kvlib" else kv.update(k, v, layer)
            caches[label] = kv

        times: dict[str, list[float]] = {label: [] for label, *_ in ENGINES}
        logits: dict[str, list[torch.Tensor]] = {label: [] for label, *_ in ENGINES}
        with paused_gc():
            for r in range(steps):  # one step of each engine a round, the order turned every round; round 0 warms up
                for label, engine, _, _ in ENGINES if r % 2 == 0 else ENGINES[::-1]:
                    t0 = clock.now()
                    out = step(caches[label], engine, c + r)
                    elapsed = clock.now() - t0
                    if r > 0:
                        times[label].append(elapsed)
                        records.append(
                            {"model": row.model, "batch_size": B, "context": c, "engine": label, "round": r,
                             "latency_ms": 1e3 * elapsed}
                        )  # fmt: skip
                        logits[label].append(out[0].float())
        del caches
        kept.update({(c, label): torch.stack(v) for label, v in logits.items()})
        exact = kept[(c, "kvlib static")]
        base = log_probs(exact)
        static_p50 = statistics.median(times["kvlib static"])
        for label, engine, cache, options in ENGINES:
            p50 = statistics.median(times[label])
            held = step_cache_bytes(RunSpec(engine, cache, row.model), cfg, B, c, lm.dtype, options)
            step_bytes = weight_bytes + held
            kld, top1 = per_token(base, log_probs(kept[(c, label)]))
            floor = step_bytes / bandwidth_bytes_per_s if bandwidth_bytes_per_s > 0 else math.nan
            diff = (kept[(c, label)] - exact).abs().max()
            rows.append(
                {
                    "model": row.model,
                    "dtype": row.dtype,
                    "batch_size": B,
                    "context": c,
                    "engine": label,
                    "cache": cache,
                    "rounds": len(times[label]),
                    "tpot_p50_ms": 1e3 * p50,
                    "tpot_min_ms": 1e3 * min(times[label]),
                    "tpot_max_ms": 1e3 * max(times[label]),
                    "step_bytes": step_bytes,
                    "cache_mib": held / 2**20,
                    "bandwidth_gb_per_s": bandwidth_bytes_per_s / 1e9,
                    "floor_ms": 1e3 * floor,
                    "mbu": floor / p50,
                    "ratio_vs_kvlib_static": static_p50 / p50,
                    "kld_vs_kvlib_static": float(kld.mean()),
                    "top1_vs_kvlib_static": float(top1.float().mean()),
                    "max_abs_logit_diff": float(diff),
                    **{k: info.get(k) for k in PROVENANCE},
                }
            )
    return LongResult(rows, records, kept)


SUMMARY_FIGURES = ("mbu", "vs_hf_best", "int8_vs_static")  # what `summary` gives the targets to judge


def load_long_targets(text: str | None = None) -> tuple[Target, ...]:
    """The long-context targets (`long_context` in kvlib/data/bench_targets.yaml, or `text`), read as the bench's
    other targets are (kvlib.measure.bench.table), each judging one of SUMMARY_FIGURES of every long row. Raises
    ValueError on an entry it cannot read."""
    if text is None:
        text = resources.files("kvlib").joinpath("data", TARGETS_FILE).read_text(encoding="utf-8")
    every_row = {"long_context": lambda summary: True}
    return tuple(
        target_entry({"rows": "long_context", **e}, SUMMARY_FIGURES, every_row)
        for e in yaml.safe_load(text)["long_context"]
    )


LONG_TARGETS = load_long_targets()


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures the targets judge, from one long row's engine rows (`measure_long`): kvlib static's MBU, the
    faster HF cache's TPOT / kvlib static's (vs_hf_best), kvlib static's TPOT / the int8 cache's (int8_vs_static),
    and the int8 cache's KL divergence and top-1 agreement against the exact cache beside them."""
    by = {r["engine"]: r for r in rows}
    static, int8 = by["kvlib static"], by["kvlib int8"]
    hf = min(by["hf-dynamic"]["tpot_p50_ms"], by["hf-static"]["tpot_p50_ms"])
    return {
        "model": static["model"],
        "batch_size": static["batch_size"],
        "context": static["context"],
        "mbu": static["mbu"],
        "vs_hf_best": hf / static["tpot_p50_ms"],
        "int8_vs_static": static["tpot_p50_ms"] / int8["tpot_p50_ms"],
        "int8_kld": int8["kld_vs_kvlib_static"],
        "int8_top1": int8["top1_vs_kvlib_static"],
        "rounds": static["rounds"],
    }


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The long rows as a table: one line per engine, its TPOT (p50 and range), floor, MBU, cache bytes and, against
    kvlib static, the speed ratio, KL divergence and top-1 agreement."""
    head = (
        f"{'model':<13} {'batch':>5} {'context':>7} {'engine':<13} {'TPOT ms':>8} {'range ms':>13} {'floor ms':>8} "
        f"{'MBU':>5} {'cache MiB':>9} {'x static':>8} {'KLD nats':>9} {'top-1':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{str(r['model'])[:13]:<13} {r['batch_size']:>5} {r['context']:>7} {r['engine']:<13} "
            f"{r['tpot_p50_ms']:>8.1f} {r['tpot_min_ms']:>6.1f}-{r['tpot_max_ms']:<6.1f} {r['floor_ms']:>8.1f} "
            f"{r['mbu']:>5.2f} {r['cache_mib']:>9.1f} {r['ratio_vs_kvlib_static']:>7.2f}x "
            f"{r['kld_vs_kvlib_static']:>9.2e} "
            f"{r['top1_vs_kvlib_static']:>6.0%}"
        )
    return "\n".join(lines)


def target_report(summaries: list[dict[str, Any]], planned: int | None = None) -> tuple[str, bool]:
    """One line per long-context target (met / MISSED with the figure of each row, the int8 cache's KL divergence
    beside its speed), and whether all were met; "n/a" when no long row was planned. A planned row that was not
    measured (its time bound hit) fails every target, as a short row's unmeasured figure does (`planned`: the rows
    planned; None: as many as measured). Regression: with every long row past its time bound, `bench --strict`
    once counted the long targets met (tests/test_bench_long.py::test_unmeasured_long_rows_miss_the_targets)."""
    planned = len(summaries) if planned is None else planned
    lines, all_met = [], True
    missing = planned - len(summaries)
    for t in LONG_TARGETS:
        if not planned:
            lines.append(f"  n/a    {t.text} (no long-context row)")
            continue
        met = not missing and all(math.isfinite(s[t.column]) and s[t.column] >= t.minimum for s in summaries)
        all_met &= met
        figures = ", ".join(
            f"{s['model']} b{s['batch_size']} x {s['context']}: {s[t.column]:.2f}"
            + (
                f" (int8 KL divergence {s['int8_kld']:.2e} nats, top-1 {s['int8_top1']:.0%} over {s['rounds']} steps)"
                if t.column == "int8_vs_static"
                else ""
            )
            for s in summaries
        )
        if missing:
            figures += f"{', ' if figures else ''}{missing} of {planned} rows not measured (time bound)"
        lines.append(f"  {'met' if met else 'MISSED':<6} {t.text} ({figures})")
    return "\n".join(lines), all_met
