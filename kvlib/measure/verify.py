"""`python -m kvlib verify`: every decoding path on the same prompts, checked against Hugging Face.

The reference is Hugging Face `generate(use_cache=False)`: the textbook computation, every key and value
recomputed at every step. Each other path (kvlib naive, kvlib with every exact cache layout, HF with its dynamic
and static caches) must produce the same tokens and, at every step, logits within a tolerance; the dense caches
(kvlib's and HF's dynamic and static) must hold exactly the bytes of the formula 2 x layers x B x T x n_kv_head x
head_dim x bytes per element. Exit 0 only when all of them do. Pretrained models get passages of Pride and
Prejudice as prompts, random weights synthetic ids (kvlib.models.prompts).

Models trained with sliding-window layers (Gemma 3, `cfg.is_hybrid`) add kvlib's exact "hybrid" layout (a ring of
sliding_window slots on sliding layers) and, for every cache, the per-layer formula (kvlib.measure.memory: HF's
dynamic cache keeps window - 1 keys on a sliding layer, its static cache and kvlib's hybrid the window). With a
plain (unpadded) batch, `run` checks a left-padded batch too, so that both prompts longer than the window and
padding inside the ring are proven in one command. References: Hugging Face's `generate` given the 2D
attention_mask, from which Gemma 3 builds one mask per layer type itself (a custom 4D mask would silently drop the
sliding window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlib.caches.base import CACHE_LAYOUTS, layout_options
from kvlib.core import checks
from kvlib.core.config import ModelConfig
from kvlib.core.errors import KvlibError
from kvlib.measure.memory import bytes_per_element, cache_tokens, held_cache_bytes, kv_cache_bytes_formula
from kvlib.models.decode import Generation, generate
from kvlib.models.hf import HF_DYNAMIC, HF_STATIC, hf_generate
from kvlib.models.loading import LoadedModel
from kvlib.models.prompts import padded_prompts_for, prompts_for

# Largest |logit difference| accepted, relative to the reference's largest |logit| (at least 1).
# fp32 paths differ only by the order of floating-point sums; half precision rounds every activation.
RELATIVE_LOGIT_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
HF_PATHS = (HF_DYNAMIC, HF_STATIC)  # HF_NONE is the reference; both keep one dense slot per token


def kvlib_paths(cfg: ModelConfig | None = None) -> tuple[str, ...]:
    """kvlib's naive path and every registered exact cache layout (dynamic, static, paged, ...); "hybrid" only for
    a model with sliding-window layers (on any other it is the static cache)."""
    hybrid = cfg is not None and cfg.is_hybrid
    return ("none", *(n for n, cls in CACHE_LAYOUTS.items() if cls.exact and (hybrid or not cls.for_sliding_models)))


@dataclass
class PathResult:
    path: str
    tokens_equal: bool
    first_mismatch_step: int | None
    max_abs_logit_diff: float
    tolerance: float
    kv_bytes: int | None = None  # bytes the cache held at the end (None: no cache)
    kv_formula_bytes: int | None = None  # the formula's bytes for the slots this cache holds
    kv_must_match: bool = False  # dense caches: held == formula is part of passing

    @property
    def kv_ok(self) -> bool:
        return not self.kv_must_match or self.kv_bytes == self.kv_formula_bytes

    @property
    def ok(self) -> bool:
        return self.tokens_equal and self.max_abs_logit_diff <= self.tolerance and self.kv_ok


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
        raise checks.fail("lm", lm, "a kvlib.models.loading.LoadedModel (from kvlib.models.loading.load)", "verify:")
    return verify_prompts(lm, *make_prompts(lm, batch_size, prompt_len, seed, padded), max_new_tokens)[0]


def make_prompts(
    lm: LoadedModel, batch_size: int, prompt_len: int, seed: int, padded: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids (B, P), attention_mask or None): text for pretrained models; with `padded`, the lengths of
    `padded_lengths`, left-padded (KvlibError when no length can differ: see `padded_lengths`)."""
    if padded:
        lengths = padded_lengths(batch_size, prompt_len)
        return padded_prompts_for(lm.cfg.vocab_size, lm.tokenizer, lengths, seed, lm.device)
    return prompts_for(lm.cfg.vocab_size, lm.tokenizer, batch_size, prompt_len, seed, lm.device), None


def padded_lengths(batch_size: int, prompt_len: int) -> list[int]:
    """Prompt lengths of a left-padded batch: row 0 `prompt_len`, row i shorter by i * P // 2B tokens and by at
    least one (100, 84, 67 for batch 3 of 100), so every row but the first is padded. Raises KvlibError (one line)
    when padding is impossible: one prompt (nothing to pad against) or prompts of one token (none can be shorter)."""
    if batch_size < 2 or prompt_len < 2:
        raise KvlibError(
            f"--padded needs prompts of different lengths: at least 2 prompts of at least 2 tokens (got batch "
            f"{batch_size}, prompt {prompt_len}); nothing would be padded"
        )
    return [prompt_len - (i and max(1, i * prompt_len // (2 * batch_size))) for i in range(batch_size)]


def padding_label(mask: torch.Tensor | None) -> str:
    """What the batch's padding was, read from its attention mask (B, P): 'prompts of 100, 84, 67 tokens,
    left-padded to 100 (49 pad slots)', or 'no padding'."""
    if mask is None:
        return "no padding"
    lengths = mask.sum(dim=1).tolist()
    pads = int((mask == 0).sum())
    if pads == 0:
        return "no padding"
    return (
        f"prompts of {', '.join(str(int(n)) for n in lengths)} tokens, left-padded to {mask.shape[1]} "
        f"({pads} pad slot{'s' if pads != 1 else ''})"
    )


def _kv_fields(lm: LoadedModel, engine: str, cache: str, g: Generation, P: int, N: int) -> dict:
    if cache == "none":
        return {}
    slots = cache_tokens(engine, cache, P, N)
    B = g.tokens.shape[0]
    return {
        "kv_bytes": held_cache_bytes(g.cache),
        "kv_formula_bytes": kv_cache_bytes_formula(lm.cfg, B, slots, lm.dtype, layout=cache, engine=engine),
        # a dense cache's bytes must equal the formula (not a paged one's: whole blocks)
        "kv_must_match": cache in HF_PATHS if engine == "hf" else CACHE_LAYOUTS[cache].dense,
    }


def verify_prompts(
    lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor | None, max_new_tokens: int
) -> tuple[list[PathResult], Generation]:
    """Every path on these prompts: (one result per path, the reference first; the reference's generation)."""
    if lm.hf is None:
        raise KvlibError(f"{lm.cfg.name} has no Hugging Face counterpart to verify against")
    P, N = ids.shape[1], max_new_tokens
    ref = hf_generate(lm.hf, ids, N, cache="none", attention_mask=mask, keep_logits=True)
    tol = RELATIVE_LOGIT_TOL[lm.dtype] * max(1.0, ref.step_logits.abs().max().item())
    results = [compare("hf use_cache=False (reference)", ref.tokens, ref.step_logits, ref.tokens, ref.step_logits, tol)]
    for cache in kvlib_paths(lm.cfg):
        # The paged cache stores no pad slots when given the mask (each row's padding maps to a scratch block).
        takes_mask = cache in CACHE_LAYOUTS and "attention_mask" in layout_options(cache)
        options = {"attention_mask": mask} if takes_mask and mask is not None else None
        g = generate(lm.model, ids, N, cache=cache, attention_mask=mask, keep_logits=True, cache_options=options)
        name = "kvlib naive (no cache)" if cache == "none" else f"kvlib {cache} cache"
        r = compare(name, g.tokens, g.step_logits, ref.tokens, ref.step_logits, tol)
        results.append(PathResult(**{**r.__dict__, **_kv_fields(lm, "kvlib", cache, g, P, N)}))
    for cache in HF_PATHS:
        g = hf_generate(lm.hf, ids, N, cache=cache, attention_mask=mask, keep_logits=True)
        r = compare(f"hf {cache} cache", g.tokens, g.step_logits, ref.tokens, ref.step_logits, tol)
        results.append(PathResult(**{**r.__dict__, **_kv_fields(lm, "hf", cache, g, P, N)}))
    return results, ref


def format_table(results: list[PathResult]) -> str:
    lines = [
        f"{'path':<32} {'tokens equal':>12} {'max |logit diff|':>17} {'tolerance':>10} "
        f"{'KV bytes held':>14} {'formula':>14}  ok"
    ]
    for r in results:
        eq = "yes" if r.tokens_equal else f"no (step {r.first_mismatch_step})"
        held = "-" if r.kv_bytes is None else f"{r.kv_bytes:,}"
        formula = "-" if r.kv_formula_bytes is None else f"{r.kv_formula_bytes:,}"
        if r.kv_bytes is not None and not r.kv_must_match:
            formula += "*"
        lines.append(
            f"{r.path:<32} {eq:>12} {r.max_abs_logit_diff:>17.3e} {r.tolerance:>10.1e} {held:>14} {formula:>14}  "
            f"{'ok' if r.ok else 'FAIL'}"
        )
    return "\n".join(lines)


def formula_line(lm: LoadedModel, batch_size: int, slots: int) -> str:
    """The KV formula written out for a cache of `slots` token slots per sequence."""
    c, e = lm.cfg, bytes_per_element(lm.dtype)
    total = kv_cache_bytes_formula(c, batch_size, slots, lm.dtype)
    return (
        f"2 x {c.n_layer} layers x B {batch_size} x T {slots} x {c.n_kv_head} kv heads x {c.head_dim} head_dim x "
        f"{e} bytes = {total:,} bytes"
    )
