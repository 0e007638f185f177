"""`python -m kvlib verify`: the command's parser and entry point (its work is kvlib.measure.verify)."""

from __future__ import annotations

import argparse

from kvlib.cli.common import add_model_args, flag, positive_int
from kvlib.measure.verify import (
    check_sizes,
    format_table,
    formula_line,
    make_prompts,
    padded_lengths,
    padding_label,
    verify_prompts,
)
from kvlib.models.decode import check_lengths
from kvlib.models.loading import LoadedModel, load
from kvlib.models.prompts import prompt_source


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="prove every decoding path computes the same tokens and logits as HF")
    add_model_args(p)
    flag(p, "batch_size", type=positive_int, default=3, help="[3]")
    flag(p, "prompt_len", type=positive_int, default=100, help="[100]")
    flag(p, "max_new_tokens", type=positive_int, default=20, help="[20]")
    p.add_argument("--padded", action="store_true", help="left-pad the prompts to different lengths")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_sizes(args.batch_size, args.prompt_len, args.max_new_tokens, args.seed)  # before loading anything
    if args.padded:
        padded_lengths(args.batch_size, args.prompt_len)  # refuses, before loading, a batch nothing would pad
    lm = load(args.model, args.weights, args.device, args.dtype, args.seed)
    if lm.hf is not None:  # context overflow is checked before any work
        check_lengths(lm.model, args.prompt_len, args.max_new_tokens)
    banner = "  ** RANDOM WEIGHTS **" if lm.weights == "random" else ""
    print(
        f"{lm.cfg.name} ({lm.weights}: {lm.source}){banner}, {lm.device}, {lm.dtype_name}, batch {args.batch_size}, "
        f"prompt {args.prompt_len}, {args.max_new_tokens} new tokens; prompts: {prompt_source(lm.tokenizer)}"
    )
    failed = []
    passes = [args.padded] if args.padded or not lm.cfg.is_hybrid else [False, True]
    if passes == [False, True] and (args.batch_size < 2 or args.prompt_len < 2):
        passes = [False]
        print("(a hybrid model's left-padded pass is skipped: one prompt, or one-token prompts, leave nothing to pad)")
    for padded in passes:
        failed += verify_and_report(lm, args, padded, heading=len(passes) > 1)
    print("all paths agree" if not failed else f"MISMATCH: {', '.join(failed)}")
    return 0 if not failed else 1


def verify_and_report(lm: LoadedModel, args: argparse.Namespace, padded: bool, heading: bool = False) -> list[str]:
    """One batch of prompts through every path, its table printed under what its mask says the padding was (never
    under what was asked for); returns the paths that failed."""
    ids, mask = make_prompts(lm, args.batch_size, args.prompt_len, args.seed, padded)
    label = padding_label(mask)
    print(f"-- {label} --" if heading else f"padding: {label}")
    results, ref = verify_prompts(lm, ids, mask, args.max_new_tokens)
    print(format_table(results))
    N = args.max_new_tokens
    slots = ids.shape[1] + N
    print(f"KV formula of kvlib's static cache (P + N slots): {formula_line(lm, args.batch_size, slots)}")
    print("(dynamic caches and HF's static one hold P + N - 1 slots; * paged: its pool of whole blocks holds more)")
    if lm.cfg.is_hybrid:
        w = lm.cfg.sliding_window
        print(
            f"(sliding layers: kvlib's hybrid and HF's static cache hold min(slots, {w}), HF's dynamic cache "
            f"min(slots, {w - 1}): the per-layer formula, kvlib.measure.memory)"
        )
    if lm.tokenizer is not None:
        tail = lm.tokenizer.decode(ids[0][-12:] if mask is None else ids[0][mask[0].bool()][-12:])
        print(f"row 0: ...{tail!r} -> {lm.tokenizer.decode(ref.tokens[0])!r}")
    return [r.path for r in results if not r.ok]
