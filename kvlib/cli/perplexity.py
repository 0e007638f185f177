"""`python -m kvlib perplexity`: the command's parser and entry point (its work is kvlib.measure.perplexity)."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import torch

from kvlib.caches.base import CACHE_LAYOUTS, REFERENCE, make_cache
from kvlib.cli.common import add_model_args, default_of, flag, non_negative_int, positive_int, rotate_flag
from kvlib.core.config import PRESETS, get_preset
from kvlib.core.errors import KvlibError
from kvlib.measure.divergence import BLOCK, Divergence, divergence
from kvlib.measure.llamacpp import BASELINE, FLOOR, CacheSetting, compare, score, token_ids
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
from kvlib.models import llamacpp
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
        default=None,
        help=f"none, any layout ({', '.join(CACHE_LAYOUTS)}), {RECOMPUTE} or {HF_QUANTIZED} [static]",
    )
    p.add_argument("--method", choices=METHODS, default=None, help="token by token, or one masked pass [token]")
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
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="kvlib",
        help="kvlib: this study's decoder on the dequantized weights; llamacpp: llama.cpp on the GGUF itself [kvlib]",
    )
    flag(p, "cache_type_k", default=None, help=f"llamacpp: key cache type ({', '.join(llamacpp.CACHE_TYPES)}) [f16]")
    flag(p, "cache_type_v", default=None, help="llamacpp: value cache type (quantized needs flash attention) [f16]")
    flag(p, "flash_attn", choices=("on", "off"), default=None, help="llamacpp: flash attention [on]")
    flag(
        p,
        "no_rotate",
        action="store_true",
        default=None,
        help="llamacpp: turn off llama.cpp's Hadamard rotation of a quantized cache (LLAMA_ATTN_ROT_DISABLE=1) [on]",
    )
    p.add_argument("--csv", default=None, help="append one row with provenance to this CSV [none]")
    p.set_defaults(func=run)


ENGINES = ("kvlib", "llamacpp")
LLAMACPP_FLAGS = ("cache_type_k", "cache_type_v", "flash_attn", "no_rotate")
# kvlib's flags a llama.cpp run refuses (its cache is the cache types above); --cache and --method only when changed
KVLIB_FLAGS = (*FLAG_OPTIONS, "budget")


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
    if args.engine == "llamacpp":
        return run_llamacpp(args)
    for name in LLAMACPP_FLAGS:
        if getattr(args, name) is not None:
            raise KvlibError(f"--{name.replace('_', '-')} applies to --engine llamacpp")
    args.cache = REFERENCE if args.cache is None else args.cache
    args.method = METHODS[0] if args.method is None else args.method
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


def _llamacpp_setting(args: argparse.Namespace) -> CacheSetting:
    """The llama.cpp cache the flags ask for; KvlibError for a kvlib-only flag or a bad type, before any load."""
    given = [f"--{n.replace('_', '-')}" for n in KVLIB_FLAGS if getattr(args, n, None) is not None]
    if args.cache is not None:
        given.append("--cache")
    if args.method is not None:
        given.append("--method")
    if args.weights == "random":
        given.append("--weights random")
    if given:
        raise KvlibError(f"{', '.join(given)} do not apply to --engine llamacpp (use --cache-type-k/--cache-type-v)")
    if args.device != "cpu" or args.dtype not in ("float32", "fp32"):
        raise KvlibError("--engine llamacpp runs the GGUF as stored on the CPU; --device and --dtype do not apply")
    setting = CacheSetting(
        args.cache_type_k or llamacpp.REFERENCE,
        args.cache_type_v or args.cache_type_k or llamacpp.REFERENCE,
        args.flash_attn != "off",
        not args.no_rotate,
    )
    setting.check()
    return setting


def run_llamacpp(args: argparse.Namespace) -> int:
    """`perplexity --engine llamacpp`: the text through llama.cpp's cache types on the GGUF itself; with --baseline
    f16, KL divergence, top-1 agreement and perplexity ratio against llama.cpp's f16 cache, and the floor (f16
    with flash attention off against on)."""
    setting = _llamacpp_setting(args)
    if args.baseline not in (None, llamacpp.REFERENCE):
        raise KvlibError(f"--engine llamacpp compares with its own f16 cache: --baseline f16, not {args.baseline!r}")
    if args.tokens < 2:
        raise KvlibError(f"--tokens must be at least 2 (the first token is never scored), got {args.tokens}")
    text, name = read_text(args.text)
    check_outputs({"--csv": (args.csv, CSV_COLUMNS)})
    path = llamacpp.gguf_file(args.model)
    shape = llamacpp.read_shape(path)
    opener = llamacpp.open_engine(path, args.tokens, logits_all=False)
    try:
        ids = token_ids(opener, text, args.tokens, name)
    finally:
        opener.close()
    keep = args.baseline is not None
    result = score(str(path), ids, setting, keep_logprobs=keep)
    print(
        f"{args.model} ({path.name}, {shape.file_type} weights as stored) on {llamacpp.build_info().split(' (')[0]}: "
        f"{name}, first {args.tokens} tokens, cache {setting.label}: perplexity {result.perplexity:.4f} (mean NLL "
        f"{result.nll_mean:.5f} nats over {result.scored} tokens scored), KV held {result.kv_bytes_held:,} bytes "
        f"({result.kv_bytes_held / args.tokens:,.0f} per token), {result.time_s:.1f} s"
    )
    compared = None
    if keep:
        base = score(str(path), ids, BASELINE)
        compared = compare(base, result)
        print(comparison_text(compared, f"llama.cpp {BASELINE.label}"))
        floor = compare(base, score(str(path), ids, FLOOR))
        print("floor: " + comparison_text(floor, f"llama.cpp {BASELINE.label} (the same cache, {FLOOR.label})"))
    if args.csv:
        row = {
            "model": args.model,
            "weights": "pretrained",
            "weights_source": f"{path.name} ({shape.file_type}, as stored)",
            "text": name,
            "tokens": args.tokens,
            "scored": result.scored,
            "cache": f"llama.cpp {setting.label}",
            "options": f"type_k={setting.type_k} type_v={setting.type_v} flash_attn={int(setting.flash_attn)} "
            f"rotate={int(setting.rotate)}",
            "method": "llamacpp",
            "nll_mean": result.nll_mean,
            "perplexity": result.perplexity,
            "baseline": f"llama.cpp {BASELINE.label}" if keep else "",
            **_comparison_columns(compared),
            "kv_bytes_held": result.kv_bytes_held,
            "bytes_per_token": result.kv_bytes_held / args.tokens,
            "time_s": result.time_s,
            "device": "cpu",
            **{k: v for k, v in provenance(torch.device("cpu"), shape.file_type).items() if k in PROVENANCE},
            "dtype": shape.file_type,
        }
        append_rows(args.csv, [row], CSV_COLUMNS)
        print(f"1 row appended to {args.csv}")
    return 0
