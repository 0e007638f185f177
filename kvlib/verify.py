"""`python -m kvlib verify`: every decoding path on the same prompts, checked against Hugging Face.

The reference is Hugging Face `generate(use_cache=False)`: the textbook computation, every key and value
recomputed at every step. Each other path must produce the same tokens and, at every step, logits within a
tolerance. Exit 0 only when all of them do.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from kvlib import checks
from kvlib.config import KvlibError
from kvlib.decode import generate
from kvlib.hf import hf_generate
from kvlib.inputs import left_padded_prompts, synthetic_prompts
from kvlib.loading import LoadedModel, load

# Largest |logit difference| accepted, relative to the reference's largest |logit| (at least 1).
# fp32 paths differ only by the order of floating-point sums; half precision rounds every activation.
RELATIVE_LOGIT_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
KVLIB_PATHS = ("none", "dynamic", "static")
HF_PATHS = ("dynamic", "static")  # "none" is the reference


@dataclass
class PathResult:
    path: str
    tokens_equal: bool
    first_mismatch_step: int | None
    max_abs_logit_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.tokens_equal and self.max_abs_logit_diff <= self.tolerance


def compare(
    path: str,
    tokens: torch.Tensor,
    logits: torch.Tensor,
    ref_tokens: torch.Tensor,
    ref_logits: torch.Tensor,
    tolerance: float,
) -> PathResult:
    """Tokens (B, N) and step logits (N, B, V) of one path against the reference."""
    same = (tokens == ref_tokens).all(dim=0)  # (N,)
    first = None if bool(same.all()) else int((~same).nonzero()[0])
    # After the first different token the sequences differ, so logits are compared up to that step only.
    upto = logits.shape[0] if first is None else first + 1
    diff = (logits[:upto] - ref_logits[:upto]).abs().max().item()
    return PathResult(path, first is None, first, diff, tolerance)


def check_sizes(batch_size: int, prompt_len: int, max_new_tokens: int, seed: int) -> None:
    for name, value in (("batch_size", batch_size), ("prompt_len", prompt_len), ("max_new_tokens", max_new_tokens)):
        checks.whole(name, value, where="verify:")
    checks.seed("seed", seed, where="verify:")


def verify(
    lm: LoadedModel,
    batch_size: int,
    prompt_len: int,
    max_new_tokens: int,
    seed: int = 0,
    padded: bool = False,
) -> list[PathResult]:
    """Run every path; return one result per path (the reference first, compared with itself)."""
    check_sizes(batch_size, prompt_len, max_new_tokens, seed)
    if not isinstance(lm, LoadedModel):
        raise checks.fail("lm", lm, "a kvlib.loading.LoadedModel (from kvlib.loading.load)", "verify:")
    if lm.hf is None:
        raise KvlibError(f"{lm.cfg.name} has no Hugging Face counterpart to verify against")
    vocab = lm.cfg.vocab_size
    if padded:
        lengths = [max(1, prompt_len - (i * prompt_len) // (2 * batch_size)) for i in range(batch_size)]
        ids, mask = left_padded_prompts(vocab, lengths, seed, lm.device)
    else:
        ids, mask = synthetic_prompts(vocab, batch_size, prompt_len, seed, lm.device), None
    ref = hf_generate(lm.hf, ids, max_new_tokens, cache="none", attention_mask=mask, keep_logits=True)
    tol = RELATIVE_LOGIT_TOL[lm.dtype] * max(1.0, ref.step_logits.abs().max().item())
    results = [compare("hf use_cache=False (reference)", ref.tokens, ref.step_logits, ref.tokens, ref.step_logits, tol)]
    for cache in KVLIB_PATHS:
        g = generate(lm.model, ids, max_new_tokens, cache=cache, attention_mask=mask, keep_logits=True)
        name = "kvlib naive (no cache)" if cache == "none" else f"kvlib {cache} cache"
        results.append(compare(name, g.tokens, g.step_logits, ref.tokens, ref.step_logits, tol))
    for cache in HF_PATHS:
        g = hf_generate(lm.hf, ids, max_new_tokens, cache=cache, attention_mask=mask, keep_logits=True)
        results.append(compare(f"hf {cache} cache", g.tokens, g.step_logits, ref.tokens, ref.step_logits, tol))
    return results


def format_table(results: list[PathResult]) -> str:
    lines = [f"{'path':<32} {'tokens equal':>12} {'max |logit diff|':>17} {'tolerance':>10}  ok"]
    for r in results:
        eq = "yes" if r.tokens_equal else f"no (step {r.first_mismatch_step})"
        lines.append(
            f"{r.path:<32} {eq:>12} {r.max_abs_logit_diff:>17.3e} {r.tolerance:>10.1e}  {'ok' if r.ok else 'FAIL'}"
        )
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from kvlib.cli import add_model_args, flag, positive_int

    p = sub.add_parser("verify", help="prove every decoding path computes the same tokens and logits as HF")
    add_model_args(p)
    flag(p, "batch_size", type=positive_int, default=3, help="[3]")
    flag(p, "prompt_len", type=positive_int, default=100, help="[100]")
    flag(p, "max_new_tokens", type=positive_int, default=20, help="[20]")
    p.add_argument("--padded", action="store_true", help="left-pad the prompts to different lengths")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_sizes(args.batch_size, args.prompt_len, args.max_new_tokens, args.seed)  # before loading anything
    lm = load(args.model, args.weights, args.device, args.dtype, args.seed)
    if lm.hf is not None:  # context overflow is checked before any work
        from kvlib.decode import check_lengths

        check_lengths(lm.model, args.prompt_len, args.max_new_tokens)
    banner = "  ** RANDOM WEIGHTS **" if lm.weights == "random" else ""
    print(
        f"{lm.cfg.name} ({lm.weights}: {lm.source}){banner}, {lm.device}, {lm.dtype_name}, batch {args.batch_size}, "
        f"prompt {args.prompt_len}{' (left-padded)' if args.padded else ''}, {args.max_new_tokens} new tokens"
    )
    results = verify(lm, args.batch_size, args.prompt_len, args.max_new_tokens, args.seed, args.padded)
    print(format_table(results))
    failed = [r.path for r in results if not r.ok]
    print("all paths agree" if not failed else f"MISMATCH: {', '.join(failed)}")
    return 0 if not failed else 1
