"""`python -m kvlib passkey`: the command's parser and entry point (its work is kvlib.measure.passkey)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from kvlib.caches.base import CACHE_LAYOUTS, make_cache
from kvlib.cli.common import add_model_args, default_of, flag, non_negative_int, positive_int, rotate_flag
from kvlib.core.config import PRESETS, get_preset
from kvlib.core.errors import KvlibError
from kvlib.decoding.questions import NEW_TOKENS, answer
from kvlib.measure.passkey import (
    CSV_COLUMNS,
    FLAGS,
    RANDOM_NOTE,
    RULE,
    accuracy_table,
    budget_options,
    held_budget,
    retrieved,
    setting_of,
)
from kvlib.measure.perplexity import PROVENANCE, layout_options_from
from kvlib.measure.provenance import provenance
from kvlib.measure.results import append_rows, check_outputs
from kvlib.models.loading import load
from kvlib.models.prompts import FILLERS, PasskeyPrompts, WordTokenizer, passkey_keys

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
    p.add_argument(
        "--sink",
        type=non_negative_int,
        default=None,
        help=f"window / streaming: sink tokens {default_of('window', 'sink')}",
    )
    p.add_argument("--window", type=positive_int, default=None, help="window: recent tokens kept (or --budget)")
    p.add_argument("--bits", type=positive_int, default=None, help="quantized: 8, 4 or 2")
    p.add_argument("--group", type=non_negative_int, default=None, help="quantized: channels per scale")
    p.add_argument("--residual", type=non_negative_int, default=None, help="quantized: full-precision tail tokens")
    flag(p, "key_axis", default=None, help=f"quantized: token or channel (KIVI) {default_of('quantized', 'key_axis')}")
    rotate_flag(p)
    p.add_argument(
        "--positions",
        default=None,
        help=f"window: original or cache (StreamingLLM's) {default_of('window', 'positions')}",
    )
    p.add_argument("--recent", type=non_negative_int, default=None, help="h2o: recent tokens kept [budget / 2]")
    p.add_argument(
        "--observation",
        type=positive_int,
        default=None,
        help=f"snapkv: observation window {default_of('snapkv', 'observation')}",
    )
    p.add_argument(
        "--kernel",
        type=positive_int,
        default=None,
        help=f"snapkv: pooling kernel, odd {default_of('snapkv', 'kernel')}",
    )
    p.add_argument("--pooling", default=None, help=f"snapkv: avg or max {default_of('snapkv', 'pooling')}")
    flag(p, "new_tokens", type=positive_int, default=NEW_TOKENS, help=f"greedy tokens per answer [{NEW_TOKENS}]")
    flag(p, "batch", type=positive_int, default=1, help="prompts per forward pass (same depth) [1]")
    p.add_argument("--csv", default=None, help="append one row per (depth, key) with provenance to this CSV [none]")
    p.set_defaults(func=run)


def _check_cache(model: str, cache: str, options: dict[str, Any]) -> None:
    """The layout's option values, checked before any model is loaded (a preset's shape; a local folder's layout
    checks them once the model is loaded)."""
    if model in PRESETS:
        make_cache(cache, get_preset(model), 1, 2, "cpu", torch.float32, **options)


def run(args: argparse.Namespace) -> int:
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
