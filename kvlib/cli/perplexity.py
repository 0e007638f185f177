"""`python -m kvlib perplexity`: the command's parser and entry point (its work is kvlib.measure.perplexity)."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import torch

from kvlib.caches.base import CACHE_LAYOUTS, make_cache
from kvlib.cli.common import add_model_args, default_of, flag, non_negative_int, positive_int, rotate_flag
from kvlib.core.config import PRESETS, get_preset
from kvlib.core.errors import KvlibError
from kvlib.measure.divergence import BLOCK, Divergence, divergence
from kvlib.measure.perplexity import (
    CSV_COLUMNS,
    FLAG_OPTIONS,
    HF_QUANTIZED,
    HF_QUANTIZED_DEFAULTS,
    METHODS,
    NAIVE,
    PROVENANCE,
    RANDOM_NOTE,
    RECOMPUTE,
    Perplexity,
    check_baseline,
    check_fits,
    fast_applies,
    layout_options_from,
    perplexity,
    perplexity_hf_quantized,
    read_text,
    text_token_ids,
)
from kvlib.measure.provenance import provenance
from kvlib.measure.results import append_rows, check_outputs
from kvlib.models.loading import load
from kvlib.models.prompts import synthetic_prompts

# ---- the command ---------------------------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("perplexity", help="perplexity of real text through a cache layout (quality of lossy caches)")
    add_model_args(p, model="smollm2-135m")
    p.add_argument("--text", default=None, help="a UTF-8 text file (.gz too) [the study's novel]")
    p.add_argument("--tokens", type=int, default=2048, help="score the text's first N tokens [2048]")
    p.add_argument(
        "--cache",
        default="static",
        help=f"none, any layout ({', '.join(CACHE_LAYOUTS)}), {RECOMPUTE} or {HF_QUANTIZED} [static]",
    )
    p.add_argument("--method", choices=METHODS, default="token", help="token by token, or one masked pass [token]")
    p.add_argument(
        "--sink", type=non_negative_int, default=None, help=f"window: sink tokens kept {default_of('window', 'sink')}"
    )
    p.add_argument(
        "--window",
        type=positive_int,
        default=None,
        help=f"window, recompute: recent tokens kept {default_of('window', 'window')}",
    )
    p.add_argument(
        "--positions",
        default=None,
        help=f"window: original or cache (StreamingLLM's) {default_of('window', 'positions')}",
    )
    p.add_argument(
        "--budget",
        type=positive_int,
        default=None,
        help="an evicting layout (window, streaming, h2o, tova, snapkv, knorm, ...): tokens it keeps [its default]",
    )
    p.add_argument("--bits", type=positive_int, default=None, help="quantized: 8, 4 or 2; hf-quantized: 4 or 2")
    p.add_argument("--group", type=non_negative_int, default=None, help="quantized: channels per scale [head_dim]")
    p.add_argument("--residual", type=non_negative_int, default=None, help="quantized: full-precision tail tokens")
    flag(p, "key_axis", default=None, help=f"quantized: token or channel (KIVI) {default_of('quantized', 'key_axis')}")
    rotate_flag(p)
    p.add_argument("--backend", default=None, help="hf-quantized: quanto, hqq or fp8 [quanto]")
    p.add_argument(
        "--baseline",
        default=None,
        help="compare with this exact layout's run of the same text (as llama.cpp's --kl-divergence): KL "
        "divergence with its 95%% interval, top-1 agreement, perplexity ratio; e.g. static [no comparison]",
    )
    p.add_argument("--csv", default=None, help="append one row with provenance to this CSV [none]")
    p.set_defaults(func=run)


def _check_values(model: str, cache: str, options: dict[str, Any]) -> None:
    """The layout's option values, checked before any model is loaded by making a 2-token cache of a preset's
    shape (a local folder's shape is known only once loaded: its layout checks them then)."""
    if cache in CACHE_LAYOUTS and model in PRESETS:
        make_cache(cache, get_preset(model), 1, 2, "cpu", torch.float32, **options)


def _baseline_run(model: Any, ids: torch.Tensor, baseline: str) -> Perplexity:
    """The baseline's log probabilities: one forward pass where that is exact (any exact layout on any model),
    which is what the exact cache shows each query (tests/test_perplexity.py proves them equal)."""
    method = "fast" if fast_applies(model.cfg, baseline) else "token"
    return perplexity(model, ids, baseline, {}, method, keep_logprobs=True)


def comparison_text(d: Divergence, baseline: str) -> str:
    """The command's second line: KLD with its interval and 99th percentile, top-1 agreement, perplexity ratio."""
    s = d.summary()
    if math.isnan(s["kld_lo"]):
        ci = top1_ci = f"no interval: fewer than 2 blocks of {BLOCK} tokens"
    else:
        ci = f"95% CI {s['kld_lo']:.3g}-{s['kld_hi']:.3g}, block bootstrap"
        top1_ci = f"{s['top1_lo']:.2f}-{s['top1_hi']:.2f}"
    return (
        f"against {baseline} (perplexity {s['perplexity_base']:.4f}): mean KLD {s['kld_mean']:.6g} nats "
        f"({ci}; 99th percentile {s['kld_p99']:.3g}), top-1 agreement {s['top1_pct']:.2f}% ({top1_ci}), "
        f"perplexity ratio {s['ppl_ratio']:.5f} over {s['scored']} tokens"
    )


def run(args: argparse.Namespace) -> int:
    given = {opt: getattr(args, flag) for flag, opt in FLAG_OPTIONS.items()}
    options = layout_options_from(args.cache, given)
    if args.budget is not None:
        if args.cache not in CACHE_LAYOUTS:
            raise KvlibError(f"--budget applies to an evicting layout, not to --cache {args.cache}")
        options = CACHE_LAYOUTS[args.cache].with_budget(options, args.budget)
    baseline = check_baseline(args.baseline)
    if baseline is not None and args.cache == RECOMPUTE:
        raise KvlibError("--baseline does not apply to --cache recompute (it scores chosen tokens only)")
    if args.tokens < 2:
        raise KvlibError(f"--tokens must be at least 2 (the first token is never scored), got {args.tokens}")
    if args.method == "fast" and args.cache in (NAIVE, HF_QUANTIZED):
        raise KvlibError(f"--method fast does not apply to --cache {args.cache}; use --method token")
    _check_values(args.model, args.cache, options)
    text = name = None
    if args.text is not None or args.weights != "random":
        text, name = read_text(args.text)
    check_outputs({"--csv": (args.csv, CSV_COLUMNS)})
    lm = load(args.model, args.weights, args.device, args.dtype, args.seed, with_hf=args.cache == HF_QUANTIZED)
    check_fits(args.cache, options, args.tokens, lm.cfg.n_positions)
    if lm.tokenizer is None:
        print(f"warning: {RANDOM_NOTE}", file=sys.stderr)
        ids, name = synthetic_prompts(lm.cfg.vocab_size, 1, args.tokens, args.seed, lm.device), "synthetic token ids"
    else:
        ids = text_token_ids(lm.tokenizer, text, args.tokens, name).to(lm.device)
    keep = baseline is not None
    if args.cache == HF_QUANTIZED:
        hf_opts = {**HF_QUANTIZED_DEFAULTS, **options}
        result = perplexity_hf_quantized(lm.hf, ids, **hf_opts, keep_logprobs=keep)
    else:
        result = perplexity(lm.model, ids, args.cache, options, args.method, keep_logprobs=keep)
    compared = None
    if baseline is not None:
        base = _baseline_run(lm.model, ids, baseline)
        compared = divergence(base.logprobs, result.logprobs, base.nll, result.nll)
    opts_text = " ".join(f"{k}={v}" for k, v in options.items())
    random = f" {RANDOM_NOTE}" if lm.weights == "random" else ""
    print(
        f"{lm.cfg.name} ({lm.weights}; {lm.source}){random}: {name}, first {args.tokens} tokens, cache {args.cache}"
        f"{' ' + opts_text if opts_text else ''}, method {args.method}: perplexity {result.perplexity:.4f} "
        f"(mean NLL {result.nll_mean:.5f} nats over {result.scored} tokens scored), KV held "
        f"{result.kv_bytes_held:,} bytes ({result.kv_bytes_held / args.tokens:,.0f} per token), {result.time_s:.1f} s"
    )
    if compared is not None:
        print(comparison_text(compared, baseline))
    if args.csv:
        row = {
            "model": lm.cfg.name,
            "weights": lm.weights,
            "weights_source": lm.source,
            "text": name,
            "tokens": args.tokens,
            "scored": result.scored,
            "cache": args.cache,
            "options": opts_text,
            "method": args.method,
            "nll_mean": result.nll_mean,
            "perplexity": result.perplexity,
            "baseline": baseline or "",
            **_comparison_columns(compared),
            "kv_bytes_held": result.kv_bytes_held,
            "bytes_per_token": result.kv_bytes_held / args.tokens,
            "time_s": result.time_s,
            "device": str(lm.device),
            **{k: v for k, v in provenance(lm.device, lm.dtype_name).items() if k in PROVENANCE},
            "dtype": lm.dtype_name,
        }
        append_rows(args.csv, [row], CSV_COLUMNS)
        print(f"1 row appended to {args.csv}")
    return 0


def _comparison_columns(d: Divergence | None) -> dict[str, float]:
    """The CSV's comparison columns (NaN without a baseline)."""
    keys = ("kld_mean", "kld_lo", "kld_hi", "kld_p99", "top1_pct", "ppl_ratio")
    if d is None:
        return dict.fromkeys(keys, float("nan"))
    s = d.summary()
    return {k: s[k] for k in keys}
