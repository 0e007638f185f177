"""`python -m kvlib passkey`: does the model still remember a fact stated earlier, through a given cache?

The pass-key probe (Mohtashami & Jaggi 2023): an instruction line, filler text, the sentence "The pass key is
NNNNN. Remember it. NNNNN is the pass key." hidden at a depth of the filler, and the question "What is the pass
key? The pass key is" (kvlib.models.prompts.PasskeyPrompts builds them, exactly --tokens tokens each). The model
continues greedily for --new-tokens tokens (8) through the named cache layout.

Retrieval rule: a key is retrieved when its five digits appear, in order and together, in the decoded continuation
(`str(key) in text`, the rule of the pass-key evaluations of LongLoRA and kvpress). Accuracy is reported per depth
and overall with a 95% Wilson score interval.

Question settings (layouts that evict: "window" and the eviction policies of kvlib.caches.eviction):
- question-after (the default; kvpress's setting, the multi-turn case): the context (instruction, filler, key) is
  prefilled and compressed to the budget before the question arrives as a second chunk. The "window" layout takes
  no multi-token write after the prompt, so it reads the question one token per step (what a window does anyway).
- question-aware (the papers' setting): context and question are one prefill, so the policy's scores see the
  question.
In both, the prefill itself attends to the whole of its chunk (the layouts' contract), so the first answer token of
question-aware is computed with the full context; the later ones through what the cache kept. Layouts that do not
evict (static, dynamic, paged, quantized) ignore the setting (one prefill; recorded as "no eviction").
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvlib import checks
from kvlib.caches.base import CACHE_LAYOUTS, KVCache, evicts, layout_class, make_cache
from kvlib.errors import KvlibError
from kvlib.measure.perplexity import FLAG_OPTIONS, PROVENANCE, layout_options_from
from kvlib.measure.provenance import provenance
from kvlib.measure.results import append_rows, check_outputs
from kvlib.stats import wilson

SETTINGS = ("question-after", "question-aware")
NO_SETTING = "no eviction"  # layouts that do not evict: one prefill, the setting changes nothing
NEW_TOKENS = 8
RULE = "retrieved: the key's five digits appear together in the greedy continuation"
# command-line flag -> layout option: the perplexity command's, and the eviction policies'
FLAGS = {**FLAG_OPTIONS, "recent": "recent", "observation": "observation", "kernel": "kernel", "pooling": "pooling"}
RANDOM_NOTE = "RANDOM WEIGHTS: a stand-in word tokenizer and a random model; this accuracy is meaningless"
CSV_COLUMNS = (
    "model",
    "weights",
    "weights_source",
    "filler",
    "tokens",
    "depth",
    "actual_depth",
    "key",
    "key_start",
    "cache",
    "options",
    "budget",
    "setting",
    "new_tokens",
    "continuation",
    "retrieved",
    "kv_bytes_held",
    "time_s",
    "seed",
    "device",
    "dtype",
    *PROVENANCE,
)


# ---- scoring -------------------------------------------------------------------------------------------------------


def retrieved(continuation: str, key: int) -> bool:
    """The retrieval rule: the key's digits appear together in the decoded continuation."""
    return str(key) in continuation


# ---- layouts, budgets and settings ---------------------------------------------------------------------------------


def budget_options(cache: str, options: dict[str, Any], budget: int | None) -> dict[str, Any]:
    """The layout's options with --budget applied, as the layout maps a budget onto its options
    (KVCache.with_budget: an eviction policy's `budget`; the window's sink + window). Raises KvlibError for a budget
    on a layout that does not evict, or one the layout refuses (given twice, filled by its sinks alone)."""
    if budget is None:
        return options
    checks.whole("budget", budget)
    return layout_class(cache).with_budget(options, budget)


def held_budget(cache: str, options: dict[str, Any]) -> int | None:
    """Tokens per sequence the layout keeps at most (None: it does not evict)."""
    return layout_class(cache).held_budget(options)


def setting_of(cache: str, question_aware: bool) -> str:
    """The question setting as recorded: "no eviction" for a layout that does not evict."""
    return SETTINGS[question_aware] if evicts(cache) else NO_SETTING


# ---- running prompts through a layout ------------------------------------------------------------------------------


@dataclass
class Answers:
    tokens: torch.Tensor  # (B, new_tokens) greedy continuations
    kv_bytes_held: int  # bytes of keys and values the cache holds at the end (all B sequences)
    time_s: float  # prefill(s) and decoding, cache creation included
    cache: KVCache | None = field(default=None, repr=False)  # the cache after the last token


def _dtype(model: Any) -> torch.dtype:
    """The dtype the model computes in (its parameters'), for the caches made for it."""
    return next(model.parameters()).dtype


def kv_bytes(cache: KVCache) -> int:
    """Bytes of kept keys and values: the layout's own count (KVCache.used_bytes)."""
    return cache.used_bytes()


@torch.inference_mode()
def answer(
    model: Any,
    ids: torch.Tensor,
    context_len: int,
    cache: str,
    options: dict[str, Any],
    question_aware: bool,
    new_tokens: int = NEW_TOKENS,
) -> Answers:
    """Greedy continuations of prompts `ids` (B, N) whose first `context_len` tokens are the context, through a
    fresh cache of the named layout, in the question setting asked (ignored by layouts that do not evict)."""
    from kvlib.caches.eviction import prefill_then
    from kvlib.models.fastpath import prepare_for_inference

    B, N = ids.shape
    prepare_for_inference(model, B)
    t0 = time.perf_counter()
    kv = make_cache(cache, model.cfg, B, N + new_tokens, ids.device, _dtype(model), **options)
    if not evicts(cache) or question_aware:
        logits = model(ids, torch.arange(N, device=ids.device).expand(B, N), kv, 0)[:, -1]
    elif not kv.chunked_writes:  # the question one token per step
        model(ids[:, :context_len], torch.arange(context_len, device=ids.device).expand(B, context_len), kv, 0)
        logits = question_chunk(model, kv, ids, context_len)
    else:  # kvlib.caches.eviction's two-chunk prefill
        logits = prefill_then(model, kv, ids[:, :context_len], ids[:, context_len:], question_aware=False)
    out = decode_answer(model, kv, logits, N, new_tokens)
    return Answers(out, kv_bytes(kv), time.perf_counter() - t0, kv)


def question_chunk(model: Any, cache: KVCache, ids: torch.Tensor, context_len: int) -> torch.Tensor:
    """The question (ids[:, context_len:]) after a context already in `cache`: one multi-token write, or, for a
    layout that takes none after the prompt (`chunked_writes` False: the window), one token per step. Returns the
    last logits (B, V)."""
    from kvlib.models.decode import decode_step

    B, N = ids.shape
    positions = torch.arange(N, device=ids.device).expand(B, N)
    if cache.chunked_writes:
        return model(ids[:, context_len:], positions[:, context_len:], cache, context_len)[:, -1]
    for i in range(context_len, N):
        logits = decode_step(model, ids[:, i : i + 1], i, positions, cache, None)
    return logits


@torch.inference_mode()
def decode_answer(model: Any, cache: KVCache, logits: torch.Tensor, n_prompt: int, new_tokens: int) -> torch.Tensor:
    """Greedy decoding after a prompt of `n_prompt` tokens whose last logits (B, V) are given: (B, new_tokens)."""
    from kvlib.models.decode import decode_step, greedy

    B = logits.shape[0]
    positions = torch.arange(n_prompt + new_tokens, device=logits.device).expand(B, n_prompt + new_tokens)
    out = torch.empty(B, new_tokens, dtype=torch.long, device=logits.device)
    out[:, 0] = greedy(logits)
    for i in range(1, new_tokens):
        out[:, i] = greedy(decode_step(model, out[:, i - 1 : i], n_prompt + i - 1, positions, cache, None))
    return out


def accuracy_table(rows: list[dict[str, Any]], by: str = "depth") -> list[tuple[Any, int, int, float, float]]:
    """(group, retrieved, n, wilson low, wilson high) per value of `by`, then ("all", ...) over every row."""
    groups: dict[Any, list[int]] = {}
    for r in rows:
        groups.setdefault(r[by], []).append(int(r["retrieved"]))
    table = []
    for g, hits in [*sorted(groups.items()), ("all", [int(r["retrieved"]) for r in rows])]:
        lo, hi = wilson(sum(hits), len(hits))
        table.append((g, sum(hits), len(hits), lo, hi))
    return table


# ---- the command ---------------------------------------------------------------------------------------------------


def depth_list(text: str) -> list[float]:
    """argparse type: comma-separated depths, each a fraction of the filler in [0, 1]."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers such as 0.1,0.5,0.9") from None
    if not values or any(not 0 <= v <= 1 for v in values):  # (nan fails both comparisons)
        raise argparse.ArgumentTypeError(f"depths must lie in [0, 1] (a fraction of the filler), got {text!r}")
    return list(dict.fromkeys(values))


def add_parser(sub: argparse._SubParsersAction) -> None:
    from kvlib.cli import add_model_args, flag, non_negative_int, positive_int
    from kvlib.models.prompts import FILLERS

    p = sub.add_parser("passkey", help="pass-key retrieval through a cache layout (what a cache forgets)")
    add_model_args(p, model="smollm2-135m")
    p.add_argument("--tokens", type=positive_int, default=2048, help="tokens per prompt, question included [2048]")
    p.add_argument("--depths", type=depth_list, default=[0.1, 0.5, 0.9], help="key depths in the filler [0.1,0.5,0.9]")
    p.add_argument("--keys", type=positive_int, default=10, help="keys per depth (seeded by --seed) [10]")
    p.add_argument("--filler", choices=FILLERS, default="novel", help="the study's novel or a neutral text [novel]")
    p.add_argument("--cache", default="static", help=f"any layout ({', '.join(CACHE_LAYOUTS)}) [static]")
    p.add_argument("--budget", type=positive_int, default=None, help="tokens kept by an evicting layout")
    setting = p.add_mutually_exclusive_group()
    setting.add_argument("--question-after", dest="question_aware", action="store_false", help="[default]")
    setting.add_argument("--question-aware", dest="question_aware", action="store_true")
    p.set_defaults(question_aware=False)  # (store_false alone would default to True)
    p.add_argument("--sink", type=non_negative_int, default=None, help="window / streaming: sink tokens [4]")
    p.add_argument("--window", type=positive_int, default=None, help="window: recent tokens kept (or --budget)")
    p.add_argument("--bits", type=positive_int, default=None, help="quantized: 8, 4 or 2")
    p.add_argument("--group", type=non_negative_int, default=None, help="quantized: channels per scale")
    p.add_argument("--residual", type=non_negative_int, default=None, help="quantized: full-precision tail tokens")
    flag(p, "key_axis", default=None, help="quantized: token or channel (KIVI) [token]")
    p.add_argument("--positions", default=None, help="window: original or cache (StreamingLLM's) [original]")
    p.add_argument("--recent", type=non_negative_int, default=None, help="h2o: recent tokens kept [budget / 2]")
    p.add_argument("--observation", type=positive_int, default=None, help="snapkv: observation window [32]")
    p.add_argument("--kernel", type=positive_int, default=None, help="snapkv: pooling kernel, odd [5]")
    p.add_argument("--pooling", default=None, help="snapkv: avg or max [avg]")
    flag(p, "new_tokens", type=positive_int, default=NEW_TOKENS, help=f"greedy tokens per answer [{NEW_TOKENS}]")
    flag(p, "batch", type=positive_int, default=1, help="prompts per forward pass (same depth) [1]")
    p.add_argument("--csv", default=None, help="append one row per (depth, key) with provenance to this CSV [none]")
    p.set_defaults(func=run)


def _check_cache(model: str, cache: str, options: dict[str, Any]) -> None:
    """The layout's option values, checked before any model is loaded (a preset's shape; a local folder's layout
    checks them once the model is loaded)."""
    from kvlib.models.config import PRESETS, get_preset

    if model in PRESETS:
        make_cache(cache, get_preset(model), 1, 2, "cpu", torch.float32, **options)


def run(args: argparse.Namespace) -> int:
    from kvlib.models.loading import load
    from kvlib.models.prompts import PasskeyPrompts, WordTokenizer, passkey_keys

    if args.cache in ("none", "hf-quantized"):
        raise KvlibError(f"passkey decodes through kvlib's cache layouts; {args.cache!r} is not one")
    given = {opt: getattr(args, flag, None) for flag, opt in FLAGS.items()}
    options = budget_options(args.cache, layout_options_from(args.cache, given), args.budget)
    _check_cache(args.model, args.cache, options)
    check_outputs({"--csv": (args.csv, CSV_COLUMNS)})
    lm = load(args.model, args.weights, args.device, args.dtype, args.seed)
    make_cache(args.cache, lm.cfg, 1, 2, "cpu", torch.float32, **options)  # a local folder's shape
    n_pos = lm.cfg.n_positions
    if args.tokens + args.new_tokens > n_pos:
        raise KvlibError(
            f"--tokens {args.tokens} + --new-tokens {args.new_tokens} exceed the {lm.cfg.name} context of {n_pos}"
        )
    limit = held_budget(args.cache, options)
    if limit is not None and limit > n_pos:
        raise KvlibError(f"--budget {limit} exceeds the {lm.cfg.name} context of {n_pos} positions")
    tokenizer = lm.tokenizer or WordTokenizer(lm.cfg.vocab_size)
    builder = PasskeyPrompts(tokenizer, args.tokens, args.filler)  # refuses too few tokens
    if lm.tokenizer is None:
        print(f"warning: {RANDOM_NOTE}", file=sys.stderr)
    keys = passkey_keys(args.keys, args.seed)
    setting = setting_of(args.cache, args.question_aware)
    opts_text = " ".join(f"{k}={v}" for k, v in options.items())
    random = f" {RANDOM_NOTE}" if lm.weights == "random" else ""
    kept = f", keeps at most {limit} tokens" if limit is not None else ""
    if limit is not None and limit >= args.tokens + args.new_tokens:
        kept += " (everything: nothing is evicted)"
    print(
        f"{lm.cfg.name} ({lm.weights}; {lm.source}){random}: {args.tokens}-token prompts, {args.filler} filler, "
        f"{len(keys)} keys x {len(args.depths)} depths; cache {args.cache}{' ' + opts_text if opts_text else ''}"
        f"{kept}; setting {setting}; {RULE} ({args.new_tokens} new tokens)",
        flush=True,
    )
    rows, t_all, held = [], time.perf_counter(), 0
    prov = {k: v for k, v in provenance(lm.device, lm.dtype_name).items() if k in PROVENANCE}
    for depth in args.depths:
        prompts = [builder.prompt(depth, k) for k in keys]
        for b in range(0, len(prompts), args.batch):
            chunk = prompts[b : b + args.batch]
            ids = torch.tensor([p.ids for p in chunk], dtype=torch.long, device=lm.device)
            ans = answer(lm.model, ids, chunk[0].context_len, args.cache, options, args.question_aware, args.new_tokens)
            held = max(held, ans.kv_bytes_held // len(chunk))
            for p, toks in zip(chunk, ans.tokens.tolist(), strict=True):
                text = tokenizer.decode(toks, skip_special_tokens=True)
                rows.append(
                    {
                        "model": lm.cfg.name,
                        "weights": lm.weights,
                        "weights_source": lm.source,
                        "filler": args.filler,
                        "tokens": args.tokens,
                        "depth": depth,
                        "actual_depth": round(p.actual_depth, 4),
                        "key": p.key,
                        "key_start": p.key_start,
                        "cache": args.cache,
                        "options": opts_text,
                        "budget": limit if limit is not None else "",
                        "setting": setting,
                        "new_tokens": args.new_tokens,
                        "continuation": text,
                        "retrieved": int(retrieved(text, p.key)),
                        "kv_bytes_held": ans.kv_bytes_held // len(chunk),
                        "time_s": ans.time_s / len(chunk),
                        "seed": args.seed,
                        "device": str(lm.device),
                        "dtype": lm.dtype_name,
                        **prov,
                    }
                )
    total_s = time.perf_counter() - t_all
    for group, hits, n, lo, hi in accuracy_table(rows):
        label = f"depth {group:g}" if group != "all" else "overall"
        print(f"  {label:>10}: {hits}/{n} retrieved = {hits / n:.0%} (95% Wilson interval {lo:.0%}-{hi:.0%})")
    print(
        f"KV held per prompt at the end: {held:,} bytes ({held / (args.tokens + args.new_tokens - 1):,.0f} per "
        f"position); {total_s:.1f} s for {len(rows)} prompts ({total_s / len(rows):.2f} s each)"
    )
    if args.csv:
        append_rows(args.csv, rows, CSV_COLUMNS)
        print(f"{len(rows)} rows appended to {args.csv}")
    return 0
