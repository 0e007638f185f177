"""SnapKV and H2O examined on the pass-key probe: an ablation a page can show.

Notebook 09 finds SnapKV retrieving few keys at a 25% budget even when it sees the question, against the SnapKV
paper's near-full needle retrieval. SnapKV's selection here was checked against the paper's reference code and
kvpress (tests/test_snapkv_selection.py builds an attention pattern by hand and asserts the kept positions); this
module measures what its configuration changes: pooling (none, average, max), the observation window, one selection
per key-value head or one shared by the layer's heads, and H2O per head or shared, beside StreamingLLM and the full
cache, on the same prompts. For each variant it reports the keys retrieved and how many layer x key-value head pairs
kept the key's digit tokens when decoding began.

Every answer goes through the pass-key grid's own machinery: one prefill per batch of prompts
(`kvlib.decoding.replay.record_prefill`), replayed into a fresh cache of each variant (`replay`), the question as a
chunk in the question-after setting (`question_chunk`), greedy decoding (`decode_answer`), the probe's retrieval rule
(`kvlib.measure.passkey.retrieved`). A "shared" variant is the registered policy with its scores averaged over the
layer's key-value heads before each selection (so every head keeps the same positions, as TOVA does); it is not a
registered layout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from kvlib.caches.base import REFERENCE, KVCache, layout_class, make_cache
from kvlib.caches.eviction import EvictionCache, SnapKVCache
from kvlib.core import checks, stats
from kvlib.core.errors import KvlibError
from kvlib.decoding.questions import decode_answer, model_dtype, question_chunk
from kvlib.decoding.replay import Recorded, record_prefill, replay
from kvlib.measure.passkey import SETTINGS, budget_options, retrieved
from kvlib.models.prompts import PasskeyPrompt, PasskeyPrompts, WordTokenizer, passkey_keys

# The claim the ablation is set against (a citation, not a measurement): the SnapKV paper's abstract.
PAPER = (
    "the SnapKV paper (Li et al. 2024) reports 'only a negligible accuracy drop' in Needle-in-a-Haystack with a 7B "
    "model (LWM-Text-Chat-1M) at contexts of 16K to 380K tokens, the question inside its observation window"
)
PAPER_MODEL = "a 7B model"
PAPER_CONTEXT = "16K-380K-token contexts"
PAPER_NEEDLE = "the needle of Needle-in-a-Haystack, a sentence"


@dataclass(frozen=True)
class Variant:
    """One row group of the ablation: a registered eviction layout, its options (without the budget) and whether
    its scores are shared by the layer's key-value heads."""

    name: str
    layout: str
    options: Mapping[str, Any] = field(default_factory=dict)
    shared: bool = False


VARIANTS: tuple[Variant, ...] = (
    Variant("snapkv (avg pool 5, window 32)", "snapkv"),  # SnapKV's repository defaults, as kvpress
    Variant("snapkv, no pooling", "snapkv", {"kernel": 1}),
    Variant("snapkv, max pool 7", "snapkv", {"pooling": "max", "kernel": 7}),
    Variant("snapkv, window 16", "snapkv", {"observation": 16}),  # 16 fits the smoke profile's budget (40)
    Variant("snapkv, shared by heads", "snapkv", {}, shared=True),
    Variant("h2o", "h2o"),
    Variant("h2o, shared by heads", "h2o", {}, shared=True),
    Variant("streaming", "streaming"),
)
FULL_VARIANT = "full cache"
COLUMNS = (
    "model", "weights", "tokens", "budget", "setting", "variant", "layout", "options", "shared", "depth",
    "retrieved", "n", "digits_kept_frac", "digit_tokens_kept_frac", "continuations", "time_s",
)  # fmt: skip


class _SharedScores:
    """Mixin for an EvictionCache policy: after the policy's own scoring, every key-value head gets the mean of the
    heads' scores, so the layer keeps one set of positions (the heads' positions stay equal: they start equal and
    every selection ranks equal rows)."""

    def add_attention(self, layer: int, scores: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
        s = super().add_attention(layer, scores, received)  # type: ignore[misc]  # (B, nkv, S)
        return s.mean(dim=1, keepdim=True).expand_as(s).contiguous()


def shared_class(layout: str) -> type[EvictionCache]:
    """The named eviction policy with its scores shared by the layer's key-value heads (an unregistered subclass).
    KvlibError for a layout that is not an eviction policy scoring by attention (H2O, TOVA, SnapKV)."""
    cls = layout_class(layout)
    if not (isinstance(cls, type) and issubclass(cls, EvictionCache) and cls.needs_attention):
        raise KvlibError(f"a shared variant needs an eviction policy that scores by attention, got {layout!r}")
    return type(f"Shared{cls.__name__}", (_SharedScores, cls), {"__doc__": _SharedScores.__doc__})


def make_variant(
    variant: Variant, cfg: Any, batch: int, max_len: int, device: Any, dtype: torch.dtype, budget: int
) -> tuple[KVCache, dict[str, Any]]:
    """A fresh cache of `variant` for `batch` sequences of at most `max_len` positions, at `budget` tokens per
    sequence, and the options it was made with (the budget included). KvlibError (the layout's one line) for
    options or a budget the layout refuses."""
    options = budget_options(variant.layout, dict(variant.options), budget)
    if not variant.shared:
        return make_cache(variant.layout, cfg, batch, max_len, device, dtype, **options), options
    make_cache(variant.layout, cfg, 1, 2, "cpu", torch.float32, **options)  # the registered layout checks the options
    return shared_class(variant.layout)(cfg, batch, max_len, device, dtype, **options), options


def digit_positions(tokenizer: Any, prompt: PasskeyPrompt) -> list[int]:
    """Token positions of the key's digits in `prompt`: every token of the key sentence whose text holds a digit
    (both mentions of the key; a tokenizer that writes a digit per token gives 2 x 5)."""
    span = range(prompt.key_start, prompt.key_end)
    return [i for i in span if any(c.isdigit() for c in tokenizer.decode([prompt.ids[i]]))]


def kept_positions(cache: KVCache) -> list[torch.Tensor] | None:
    """A copy of the original positions `cache` holds now, per layer (B, nkv, n) int64; None for a layout that does
    not evict (it holds every position)."""
    if not cache.evicts:
        return None
    return [cache.layer_positions(layer).clone() for layer in range(cache.cfg.n_layer)]


def digits_kept(kept: list[torch.Tensor] | None, row: int, positions: Sequence[int]) -> tuple[float, float]:
    """For sequence `row` of `kept` (`kept_positions`): (the fraction of layer x key-value head pairs that hold every
    one of `positions`, the mean fraction of `positions` each pair holds); (1, 1) for a cache that evicts nothing."""
    if kept is None:
        return 1.0, 1.0
    whole, share, pairs = 0.0, 0.0, 0
    for pos in kept:
        want = torch.tensor(list(positions), dtype=torch.long, device=pos.device)
        held = (pos[row][:, None, :] == want[None, :, None]).any(dim=2)  # (nkv, len(positions))
        whole += float(held.all(dim=1).sum())
        share += float(held.float().mean(dim=1).sum())
        pairs += held.shape[0]
    return whole / pairs, share / pairs


@torch.inference_mode()
def _prefill(model: Any, rec: Recorded, cache: KVCache, context_len: int, question_aware: bool) -> torch.Tensor:
    """Fill `cache` with the recorded prompts in the setting asked (the question-after setting: the context
    replayed, then the question as a chunk); the last logits (B, V)."""
    if question_aware:
        replay(rec, cache)
        logits = rec.logits
    else:
        replay(rec, cache, context_len)
        logits = question_chunk(model, cache, rec.ids, context_len)
    return logits


def ablation(
    lm: Any,
    depths: Sequence[float] = (0.5, 0.9),
    keys: int = 2,
    tokens: int = 1024,
    budget_fraction: float = 0.25,
    variants: Sequence[Variant] = VARIANTS,
    question_aware: bool = True,
    filler: str = "novel",
    seed: int = 0,
    new_tokens: int = 8,
    progress: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """The ablation grid on a loaded model (kvlib.models.loading.load): one row per (variant, depth), the full
    cache's first, columns `COLUMNS`.

    `keys` seeded keys per depth in `tokens`-token prompts of `filler` (notebook 09's prompts), all prefilled once
    as one batch and replayed into every variant at a budget of round(budget_fraction x tokens) tokens.
    retrieved / n: keys retrieved by the probe's rule; digits_kept_frac: mean over the prompts of the fraction of
    layer x key-value head pairs holding all of the key's digit tokens when decoding began (after the prefill, or
    after the question in the question-after setting); digit_tokens_kept_frac: the mean fraction of the digit
    tokens those pairs hold; time_s: the variant's replay and decoding (seconds, all its prompts; the shared
    prefill is not in it). Random weights or no tokenizer: a stand-in word tokenizer, weights "random" (every
    number meaningless). KvlibError (one line) for bad arguments or a budget a variant refuses."""
    depths = [checks.fraction("depth", d) for d in depths]
    keys = checks.whole("keys", keys)
    budget_fraction = checks.fraction("budget_fraction", budget_fraction)
    new_tokens = checks.whole("new_tokens", new_tokens)
    if not depths or len(set(depths)) != len(depths):
        raise KvlibError(f"ablation: depths must be distinct fractions, at least one, got {list(depths)}")
    if not variants or not all(isinstance(v, Variant) for v in variants):
        raise KvlibError("ablation: variants must be a non-empty sequence of kvlib.study.snapkv_check.Variant")
    cfg, model = lm.cfg, lm.model
    tokenizer = lm.tokenizer or WordTokenizer(cfg.vocab_size)
    weights = lm.weights if lm.tokenizer is not None else "random"
    builder = PasskeyPrompts(tokenizer, tokens, filler)
    budget = max(1, round(budget_fraction * tokens))
    setting = SETTINGS[bool(question_aware)]
    device, dtype = next(model.parameters()).device, model_dtype(model)
    for v in variants:  # refuse before any work
        make_variant(v, cfg, 1, 2, "cpu", torch.float32, budget)
    prompts = [builder.prompt(d, k) for d in depths for k in passkey_keys(keys, seed)]
    ids = torch.tensor([p.ids for p in prompts], dtype=torch.long, device=device)
    digits = [digit_positions(tokenizer, p) for p in prompts]
    rec = record_prefill(model, ids, new_tokens)
    context_len = prompts[0].context_len
    rows: list[dict[str, Any]] = []

    def add(
        name: str, v_layout: str, options: Mapping[str, Any], shared: bool, kept: list[torch.Tensor] | None,
        out: torch.Tensor, seconds: float,
    ) -> None:  # fmt: skip
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in out.tolist()]
        held = [digits_kept(kept, i, d) for i, d in enumerate(digits)]
        for depth in depths:
            idx = [i for i, p in enumerate(prompts) if p.depth == depth]
            rows.append({
                "model": cfg.name, "weights": weights, "tokens": tokens, "budget": budget, "setting": setting,
                "variant": name, "layout": v_layout, "options": " ".join(f"{k}={o}" for k, o in options.items()),
                "shared": shared, "depth": depth,
                "retrieved": sum(int(retrieved(texts[i], prompts[i].key)) for i in idx), "n": len(idx),
                "digits_kept_frac": sum(held[i][0] for i in idx) / len(idx),
                "digit_tokens_kept_frac": sum(held[i][1] for i in idx) / len(idx),
                "continuations": " | ".join(repr(texts[i]) for i in idx), "time_s": seconds,
            })  # fmt: skip

    for v in variants:
        t0 = time.perf_counter()
        cache, options = make_variant(v, cfg, len(prompts), tokens + new_tokens, device, dtype, budget)
        logits = _prefill(model, rec, cache, context_len, question_aware)
        kept = kept_positions(cache)  # what the cache held when decoding began
        out = decode_answer(model, cache, logits, tokens, new_tokens)
        add(v.name, v.layout, options, v.shared, kept, out, time.perf_counter() - t0)
        if progress is not None:
            progress(f"{v.name}: {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    out = decode_answer(model, rec.cache, rec.logits, tokens, new_tokens)  # the recording cache is the full cache
    add(FULL_VARIANT, REFERENCE, {}, False, None, out, time.perf_counter() - t0)
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    order = [FULL_VARIANT, *[v.name for v in variants]]
    df["variant"] = pd.Categorical(df["variant"], order, ordered=True)
    return df.sort_values(["variant", "depth"]).reset_index(drop=True).astype({"variant": str})


def _count(g: pd.DataFrame) -> tuple[int, int]:
    return int(g["retrieved"].sum()), int(g["n"].sum())


def ablation_sentence(df: pd.DataFrame) -> str:
    """What `ablation`'s frame says, computed from it: each variant's keys retrieved per depth and the share of
    layer x key-value head pairs that held every digit token of the key; "⚠" before a SnapKV variant that retrieved
    fewer keys than the full cache on the same prompts in the paper's setting (question-aware), with the paper's
    claim, its setting and what differs here; question-after, a note that the paper's claim is not for that setting.
    KvlibError for a frame without the columns or the full cache's rows."""
    missing = set(COLUMNS) - set(df.columns)
    if missing or not len(df):
        raise KvlibError(
            f"ablation_sentence: a frame from kvlib.study.snapkv_check.ablation, missing {sorted(missing)}"
        )
    full = df[df["layout"] == REFERENCE]
    if not len(full):
        raise KvlibError("ablation_sentence: the frame has no full-cache rows to compare the variants with")
    first = df.iloc[0]
    fk, fn = _count(full)
    per_depth = int(df["n"].max())
    head = (
        f"{first['setting'].capitalize()}, {first['model']}, {int(first['tokens'])}-token prompts, a budget of "
        f"{int(first['budget'])} tokens ({100 * first['budget'] / first['tokens']:.0f}% of the prompt), "
        f"{per_depth} prompt{'s' if per_depth != 1 else ''} per depth; the full cache retrieved {fk}/{fn}"
    )
    parts, warned, below = [], [], False
    papers_setting = first["setting"] == SETTINGS[1]  # the paper's claim: the question inside the window
    for name, g in df[df["layout"] != REFERENCE].groupby("variant", sort=False):
        k, n = _count(g)
        depths = ", ".join(
            f"{int(r.retrieved)}/{int(r.n)} at depth {r.depth:g} ({100 * r.digits_kept_frac:.0f}%)"
            for r in g.itertuples()
        )
        snap = issubclass(layout_class(str(g["layout"].iloc[0])), SnapKVCache)
        below |= snap and k < fk
        warn = snap and k < fk and papers_setting
        if warn:
            apart = stats.counts_apart(k, n, fk, fn)
            warned.append(f"{name} {k}/{n} ({'apart from' if apart else 'not apart from'} the full cache's {fk}/{fn}, "
                          "95% Wilson intervals)")  # fmt: skip
        parts.append(f"{'⚠ ' if warn else ''}{name} {depths}")
    text = (
        head + ". Keys retrieved (in brackets: the layer × key-value head pairs that held every digit token of the "
        "key when decoding began): " + "; ".join(parts) + "."
    )
    if warned:
        text += (
            f" ⚠ Against the paper: {PAPER}; here {', '.join(warned)}. What differs: {first['model']} against "
            f"{PAPER_MODEL}, {int(first['tokens'])}-token prompts against {PAPER_CONTEXT}, a budget of "
            f"{int(first['budget'])} tokens, and a five-digit key that must be copied digit token by digit token "
            f"against {PAPER_NEEDLE}."
        )
    elif below and not papers_setting:
        text += (
            " No ⚠ beside SnapKV's losses: the paper's claim is for the question inside its observation window "
            f"(question-aware); here ({first['setting']}) the context was compressed before the question came."
        )
    if (df["weights"] != "pretrained").any():
        text += " (Random weights: every number here is meaningless.)"
    return text
