"""Every lossy layout and eviction policy against the exact cache, by the field's measures, with a noise floor.

Notebook 08's quality table (and the report's decision table): the same passages of the study's text read through
the exact cache (the baseline: the static layout, one forward pass per passage) and through every lossy layout, and
compared token by token (kvlib.measure.divergence): mean KL divergence with a 95% block-bootstrap interval, top-1
agreement, and the perplexity ratio; beside them the bytes each layout holds, against a 16-bit full cache (what
engines run) and against the run's own dtype.

Passages: the first S x L tokens of the text cut into S passages of L tokens, each read from position 0 as a text of
its own (Gemma's <bos> first in each). Evicting layouts run at one absolute budget of tokens, the pass-key page's
(25% of its 1024-token prompts = 256 tokens on 1024-token passages), so that quality and retrieval are compared at
the same budget and the same context length. Layouts with a one-pass pattern run one forward pass per passage; the
others (H2O, TOVA, K-norm: their choices depend on attention step by step) token by token, the S passages side by
side in one batch.

The noise floor: the same measures between two exact paths: the static layout read token by token against the one
pass (the cached path against the forward pass), and the paged layout token by token against the one pass (another
exact layout and path), on the first `floor_tokens` tokens of every passage (a floor is a property of float
rounding, not of the text's length). A layout whose KLD interval reaches down into the floor's is indistinguishable
from exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from kvlib import study
from kvlib.caches.base import CACHE_LAYOUTS, REFERENCE, evicting_layouts, evicts, layout_class, make_cache
from kvlib.core.errors import KvlibError
from kvlib.measure.divergence import Divergence, divergence, within_floor
from kvlib.measure.perplexity import Perplexity, method_used, perplexity_passages, read_text, text_token_ids
from kvlib.models.prompts import bos_ids, synthetic_prompts
from kvlib.study import published
from kvlib.study.quality import Variant, quantized_variants, variant_label

FLOOR_PATHS: tuple[tuple[str, str, str], ...] = (
    (REFERENCE, "token", "cached path: static token by token against one pass"),
    ("paged", "token", "another exact layout: paged token by token against one pass"),
)
COLUMNS = (
    "model",
    "cache",
    "variant",
    "kind",
    "bits",
    "budget_tokens",
    "passage_tokens",
    "passages",
    "scored",
    "method",
    "kld_mean",
    "kld_lo",
    "kld_hi",
    "kld_p99",
    "top1_pct",
    "top1_lo",
    "top1_hi",
    "perplexity",
    "perplexity_base",
    "ppl_ratio",
    "ppl_change_pct",
    "kv_bytes_held",
    "bytes_per_token",
    "bits_per_element",
    "vs_16bit_pct",
    "vs_run_dtype_pct",
    "saving_pct",
    "within_floor",
    "time_s",
)


@dataclass(frozen=True)
class Passages:
    """S passages of L token ids, (S, L) on the model's device; the text they come from and which span."""

    ids: torch.Tensor
    text: str
    span: str  # e.g. "tokens 0-4095 of Pride and Prejudice (4 passages of 1024)"
    meaningful: bool  # pretrained weights on real text (else synthetic ids: every number is meaningless)


def load_passages(lm: Any, vocab_size: int, n_passages: int, passage_tokens: int, seed: int) -> Passages:
    """The first n_passages x passage_tokens text tokens of the study's novel, cut into passages (each led by the
    tokenizer's <bos> when it adds one); seeded synthetic ids for a model without a tokenizer or pretrained weights."""
    S, L = n_passages, passage_tokens
    if lm.tokenizer is None or lm.weights != "pretrained":
        ids = synthetic_prompts(vocab_size, S, L, seed, lm.device)
        return Passages(ids, "synthetic token ids", f"{S} passages of {L} synthetic tokens", False)
    text, name = read_text(None)
    bos = bos_ids(lm.tokenizer)
    body = L - len(bos)
    flat = text_token_ids(lm.tokenizer, text, S * body + len(bos), name)[0, len(bos) :]  # text tokens only
    rows = flat.view(S, body)
    if bos:
        rows = torch.cat([torch.tensor(bos, dtype=torch.long).expand(S, len(bos)), rows], dim=1)
    span = f"text tokens 0-{S * body - 1} of {name} ({S} passages of {L} tokens)"
    return Passages(rows.to(lm.device), name, span, True)


@dataclass(frozen=True)
class MoreRun:
    """A further model of notebook 08's agreement table: its preset, passages and tokens per passage."""

    model: str
    passages: int
    passage_tokens: int


MORE_KEYS = ("model", "passages", "passage_tokens")


def more_runs(more_models: Any) -> list[MoreRun]:
    """Notebook 08's further models: `more_models`, a list of {"model": preset, "passages": S, "passage_tokens": L}
    (e.g. Gemma 3 270M at 2 x 1024 tokens). Raises KvlibError (one line) for an entry that is not such a mapping, an
    unknown preset, S below 1, L below 2 or a model named twice."""
    if more_models is None:
        return []
    if not isinstance(more_models, list):
        raise KvlibError(f"parameter more_models: a list of {{model, passages, passage_tokens}} mappings, got "
                         f"{more_models!r}")  # fmt: skip
    runs = []
    for i, entry in enumerate(more_models):
        if not isinstance(entry, dict) or set(entry) != set(MORE_KEYS):
            raise KvlibError(f"parameter more_models[{i}]: a mapping with the keys {', '.join(MORE_KEYS)}, got "
                             f"{entry!r}")  # fmt: skip
        try:
            study.model_config(entry["model"])
        except KvlibError as e:
            raise KvlibError(f"parameter more_models[{i}].model: {e}") from None
        S = study.positive_int(f"more_models[{i}].passages", entry["passages"])
        L = study.positive_int(f"more_models[{i}].passage_tokens", entry["passage_tokens"], minimum=2)
        runs.append(MoreRun(entry["model"], S, L))
    names = [r.model for r in runs]
    if len(set(names)) != len(names):
        raise KvlibError(f"parameter more_models: each model once, got {names}")
    return runs


def measure_other(
    lm: Any, run: MoreRun, budget: int, kivi_group: int, residuals: list[int], floor_tokens: int, method: str, seed: int
) -> tuple[pd.DataFrame, str]:
    """A further model's table (`measure` on its own passages, every variant its layouts accept) and the sentence
    under it, naming the variants its cache refused (`applicable`)."""
    p = load_passages(lm, lm.cfg.vocab_size, run.passages, run.passage_tokens, seed)
    fits, refused = applicable(lm.cfg, variants(budget, kivi_group, residuals))
    table = measure(lm.model, p, fits, floor_tokens, method)
    return table, sentence(table, p) + "".join(f" Left out: {line}." for line in refused)


def primary(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of the table's first model (the page's own; further models' rows follow it in 08_agreement.csv)."""
    return table[table["model"] == table["model"].iloc[0]] if len(table) else table


def evicting_variants(budget: int) -> list[Variant]:
    """Each registered evicting layout (the window and the eviction policies) at `budget` tokens."""
    return [(name, layout_class(name).with_budget({}, budget)) for name in evicting_layouts()]


def timed_budget(prompt_len: int) -> int:
    """The budget evicting layouts are timed at on a prompt of `prompt_len` tokens: half of it, so that they evict
    at every step of the timed run."""
    return prompt_len // 2


def check_budget(cfg: Any, budget: int, parameter: str) -> None:
    """Every evicting layout accepts `budget` on this model (KvlibError naming `parameter` otherwise): each one's
    options at that budget make a cache of the model's shape (SnapKV's observation window must fit, and so on)."""
    for name, options in evicting_variants(budget):
        try:
            make_cache(name, cfg, 1, 2, "cpu", torch.float32, **options)
        except KvlibError as e:
            raise KvlibError(
                f"parameter {parameter} gives a budget of {budget} tokens that {name} refuses: {e}"
            ) from None


def applicable(cfg: Any, variants: list[Variant]) -> tuple[list[Variant], list[str]]:
    """The variants whose layout accepts this model (a cache of its shape can be made) and one line for each that
    refuses it (e.g. the sliding window on Gemma 3, whose own sliding layers it does not compose with)."""
    kept, refused = [], []
    for cache, options in variants:
        try:
            make_cache(cache, cfg, 1, 2, "cpu", torch.float32, **options)
        except KvlibError as e:
            refused.append(f"{variant_label(cache, options)}: {e}")
        else:
            kept.append((cache, options))
    return kept, refused


def variants(budget: int, kivi_group: int, residuals: list[int]) -> list[Variant]:
    """Every lossy layout: each evicting layout at `budget` tokens (evicting_variants), and the quantized variants
    (int8, int4 per token; KIVI int4 and int2 with each residual)."""
    out = evicting_variants(budget)
    out += [v for v in quantized_variants(kivi_group, residuals) if not layout_class(v[0]).exact]
    return out


def _bytes_columns(cfg: Any, held: int, L: int, dtype: torch.dtype) -> dict[str, float]:
    """Bytes held per passage against a 16-bit full cache of the passage and against the run's dtype's."""
    elements = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim  # K and V values per token
    full_16 = L * cfg.kv_bytes_per_token(2)
    full_run = L * cfg.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size())
    return {
        "kv_bytes_held": held,
        "bytes_per_token": held / L,
        "bits_per_element": held / L * 8 / elements,
        "vs_16bit_pct": 100 * held / full_16,
        "vs_run_dtype_pct": 100 * held / full_run,
        "saving_pct": 100 * (1 - held / full_run),
    }


def _row(model: Any, cache: str, options: dict[str, Any], d: Divergence, r: Perplexity, S: int, L: int, method: str,
         kind: str) -> dict[str, Any]:  # fmt: skip
    cls = CACHE_LAYOUTS[cache]
    return {
        "model": model.cfg.name,
        "cache": cache,
        "variant": variant_label(cache, options),
        "kind": kind,
        "bits": cls.option(options, "bits") if not cls.exact else None,
        "budget_tokens": cls.held_budget(options) if cls.evicts else None,
        "passage_tokens": L,
        "passages": S,
        "method": method,
        **d.summary(),
        "ppl_change_pct": 100 * (d.ppl_ratio - 1),
        **_bytes_columns(model.cfg, r.kv_bytes_held, L, model.wte.weight.dtype),
        "time_s": r.time_s,
    }


def measure(
    model: Any, p: Passages, variants: list[Variant], floor_tokens: int = 256, method: str = "fast"
) -> pd.DataFrame:
    """One row per layout (COLUMNS): the baseline (kind "baseline", KLD 0 by definition), the floor paths (kind
    "floor", on the first `floor_tokens` tokens of every passage) and every variant (kind "lossy"), each against
    the baseline's one pass; `within_floor` when the mean KLD is at or below the floor's highest interval end."""
    S, L = p.ids.shape
    base = perplexity_passages(model, p.ids, REFERENCE, {}, "fast", keep_logprobs=True)
    rows = [_row(model, REFERENCE, {}, divergence(base.logprobs, base.logprobs, base.nll, base.nll), base, S, L,
                 "fast", "baseline")]  # fmt: skip
    F = min(floor_tokens, L)
    keep = (torch.arange(S)[:, None] * (L - 1) + torch.arange(F - 1)[None]).reshape(-1)  # each passage's first F
    for cache, how, _ in FLOOR_PATHS:
        r = perplexity_passages(model, p.ids[:, :F], cache, {}, how, keep_logprobs=True)
        d = divergence(base.logprobs[keep], r.logprobs, base.nll[keep], r.nll)
        rows.append({**_row(model, cache, {}, d, r, S, F, how, "floor"), "variant": f"{cache} ({how} by token)"})
    for cache, options in variants:
        how = method_used(model.cfg, cache, options, method)
        r = perplexity_passages(model, p.ids, cache, options, how, keep_logprobs=True)
        rows.append(_row(model, cache, options, divergence(base.logprobs, r.logprobs, base.nll, r.nll), r, S, L, how,
                         "lossy"))  # fmt: skip
        del r
    df = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "within_floor"])
    df["budget_tokens"] = df["budget_tokens"].astype("Int64")
    df["bits"] = df["bits"].astype("Int64")
    floor = floor_bound(df)
    df["within_floor"] = [within_floor(m, floor) for m in df["kld_mean"]]
    return df[list(COLUMNS)]


def floor_bound(table: pd.DataFrame) -> float:
    """The noise floor every layout is judged against: the highest upper interval end of the floor rows (their mean
    where too few tokens gave no interval); NaN without a floor row."""
    floors = table[table["kind"] == "floor"]
    values = pd.concat([floors["kld_hi"], floors["kld_mean"]]).dropna()
    return float(values.max()) if len(values) else math.nan


def floor_of(table: pd.DataFrame) -> pd.Series:
    """The floor row that sets floor_bound (the one named beside it)."""
    floors = table[table["kind"] == "floor"]
    return floors.loc[floors[["kld_hi", "kld_mean"]].max(axis=1).idxmax()]


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The reading view: 8 columns, one row per layout (full table: the CSV)."""
    t = table.assign(
        kld=[
            f"{m:.3g} ({lo:.2g}–{hi:.2g})" for m, lo, hi in zip(table.kld_mean, table.kld_lo, table.kld_hi, strict=True)
        ]
    )
    cols = ["variant", "kind", "kld", "top1_pct", "ppl_ratio", "vs_16bit_pct", "within_floor", "method"]
    return t[cols].rename(
        columns={"kld": "KLD nats (95% CI)", "top1_pct": "top-1 %", "vs_16bit_pct": "bytes % of 16-bit"}
    )


def sentence(table: pd.DataFrame, p: Passages) -> str:
    """What the table shows, computed from it: the floor, the best and worst lossy layouts by KLD with their top-1
    agreement, which are indistinguishable from exact, and where perplexity and KLD disagree in order."""
    if not p.meaningful:
        return "Random weights on synthetic ids: these divergences only show the machinery runs; they mean nothing."
    floor = floor_of(table)
    lossy = table[table["kind"] == "lossy"].sort_values("kld_mean")
    if lossy.empty:
        return "No lossy layout was measured."
    best, worst = lossy.iloc[0], lossy.iloc[-1]
    within = lossy[lossy["within_floor"]]
    parts = [
        f"On {p.span}, the exact paths differ by a mean KLD of at most **{floor_bound(table):.2g}** nats (the floor: "
        f"{floor.variant}, top-1 agreement {floor.top1_pct:.2f}%).",
        f"Lowest KLD among the lossy layouts: **{best.variant}** ({best.kld_mean:.3g} nats, 95% CI "
        f"{best.kld_lo:.2g}–{best.kld_hi:.2g}; top-1 agreement {best.top1_pct:.1f}%; "
        f"perplexity x{best.ppl_ratio:.4f}); "
        f"highest: **{worst.variant}** ({worst.kld_mean:.3g} nats; top-1 {worst.top1_pct:.1f}%; perplexity "
        f"x{worst.ppl_ratio:.3f}).",
    ]
    if len(within):
        parts.append(f"Indistinguishable from exact (within the floor): {', '.join(within.variant)}.")
    else:
        parts.append("Every lossy layout's KLD is above the floor: each changes the model's predictions measurably.")
    parts.append(theirs_sentence(lossy))
    by_ppl = lossy.sort_values("ppl_ratio")["variant"].tolist()
    if by_ppl != lossy["variant"].tolist():
        parts.append(
            "Perplexity orders them differently from KLD (by perplexity: " + ", ".join(by_ppl) + "): perplexity "
            "averages out changes that KLD counts, which is why KLD is the measure."
        )
    return " ".join(parts)


def theirs_sentence(lossy: pd.DataFrame) -> str:
    """llama.cpp's published q8_0 cache KLD and floor beside our 8-bit layout's (the lowest-KLD one), with what
    differs; "" when no 8-bit layout was measured."""
    source, theirs = published.kv_divergence()
    ours = lossy[lossy["bits"] == 8].sort_values("kld_mean")
    if ours.empty:
        return ""
    q8, floor = theirs.iloc[0], theirs.iloc[1]
    o = ours.iloc[0]
    return (
        f"Theirs beside ours: {source}: {q8.cache} KLD {q8.kld:.2g} nats against a floor of {floor.kld:.2g} "
        f"({q8.kld / floor.kld:.1f}x); ours, {o.variant} ({o.bits_per_element:.1f} bits per element): "
        f"{o.kld_mean:.2g} nats. What differs: a 135M-parameter model against 8B, our float32 exact paths (their "
        "floor is f16 against f16, far above float32 rounding), per-token scales against q8_0's blocks of 32."
    )


def evicting(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of layouts that evict (the pass-key page's policies), for comparisons with retrieval."""
    return table[[evicts(c) for c in table["cache"]]]


def quantized_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The baseline first, then the lossy layouts that keep every token (the quantized ones), with the columns of
    the quantized-cache tables and the memory-quality figure (kvlib.study.quality_page): variant, bits_per_element,
    bytes_per_token, saving_pct, perplexity, ppl_change_pct, tokens (scored), and the KLD columns."""
    keep = (table["kind"] == "baseline") | ((table["kind"] == "lossy") & ~table["cache"].map(evicts))
    out = table[keep].reset_index(drop=True)
    return out.assign(tokens=out["scored"])
