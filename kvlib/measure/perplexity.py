"""`python -m kvlib perplexity`: what a cache layout costs in quality, as the perplexity of real text through it.

Perplexity is exp(mean negative log-likelihood of tokens 1..N-1), each token given all earlier ones *as the cache
keeps them* (the study's counterpart of llama.cpp's perplexity tool). The text is tokenized without special tokens
and cut to its first N tokens; random weights have no tokenizer and score seeded synthetic token ids instead
(their perplexity is meaningless, and every output says so).

Two methods, proven equal by tests/test_perplexity.py on short texts:

- "token" (the reference): teacher forcing through the named layout itself, one token per step (cache slot i at
  position i), so the number is what that cache really does. "none" is the model without a cache: one causal
  forward pass over the whole text, which is what naive decoding recomputes at every step.
- "fast" (for long sweeps; Llama-architecture models, and the exact layouts of any model): one forward pass over
  the whole text that reproduces, per
  query, exactly what the cache would have shown it: the window/sink pattern as an attention mask (and the sinks'
  shifted positions for positions="cache"), and quantization as fake quantization of keys and values (quantized
  then dequantized with the cache's own functions) used only where the cache would have held codes, never where
  it would have held the full-precision tail.

"recompute" (StreamingLLM's "sliding window with re-computation" baseline, Xiao et al. 2023): token t is scored
given only the last `window` tokens, re-run from scratch (no cache) at positions 0..W-1 each time, O(W^2) attention
per token. "token" runs each window alone; "fast" runs the same windows in batches (any architecture). There is no
one-pass equivalent: positions are not what makes it differ from the window cache (with RoPE a query's scores depend
only on i - j, so re-numbering is invisible; tested), the keys are: re-computation re-encodes every token of the
window with the window alone as its context, so a window's first token sees only itself at every layer (it acts as
a fresh sink), and each window needs its own forward pass.

Hugging Face's QuantizedCache ("hf-quantized", backend quanto by default) runs token by token through HF's model.

One concept in one file (over 400 lines): perplexity through a cache, by its three methods, proven equal by tests.
"""

from __future__ import annotations

import gzip
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kvlib.caches.base import CACHE_LAYOUTS, check_layout, make_cache
from kvlib.caches.window import SinkWindowCache
from kvlib.core import checks
from kvlib.core.errors import KvlibError
from kvlib.core.rope import rope_cos_sin, rotate
from kvlib.measure.divergence import log_probs
from kvlib.models.fastpath import prepare_for_inference
from kvlib.models.hf_quantized import hf_cache_bytes, make_hf_quantized_cache
from kvlib.models.prompts import CORPUS_NAME, bos_ids, corpus_text

NAIVE = "none"
RECOMPUTE = "recompute"
HF_QUANTIZED = "hf-quantized"
METHODS = ("token", "fast")
# command-line flag -> layout option, for every layout option a flag can set
FLAG_OPTIONS = {
    "sink": "sink",
    "window": "window",
    "positions": "positions",
    "bits": "bits",
    "group": "group",
    "residual": "residual_len",
    "key_axis": "key_axis",
    "rotate": "rotate",
    "backend": "backend",
}
HF_QUANTIZED_DEFAULTS = {"bits": 4, "residual_len": 128, "backend": "quanto"}  # hf-quantized's options
HF_OPTIONS = tuple(HF_QUANTIZED_DEFAULTS)
RANDOM_NOTE = "RANDOM WEIGHTS: synthetic token ids through a random model; this perplexity is meaningless"
PROVENANCE = (
    "git_commit",
    "python_version",
    "torch_version",
    "transformers_version",
    "platform",
    "device_name",
    "threads",
    "timestamp",
)
CSV_COLUMNS = (
    "model",
    "weights",
    "weights_source",
    "text",
    "tokens",
    "scored",
    "cache",
    "options",
    "method",
    "nll_mean",
    "perplexity",
    "baseline",
    "kld_mean",
    "kld_lo",
    "kld_hi",
    "kld_p99",
    "top1_pct",
    "ppl_ratio",
    "kv_bytes_held",
    "bytes_per_token",
    "time_s",
    "device",
    "dtype",
    *PROVENANCE,
)


@dataclass
class Perplexity:
    nll: torch.Tensor  # (N - 1,) float64: -log p(token i | tokens < i as the cache keeps them), i = 1 .. N-1
    kv_bytes_held: int  # bytes the cache holds after the whole text (0 for "none"); per passage for several
    time_s: float
    # (N - 1, V) float32 on the host: log p(. | tokens < i) at every scored position, kept when asked for
    # (keep_logprobs=True): what kvlib.measure.divergence compares with a baseline's
    logprobs: torch.Tensor | None = None

    @property
    def nll_mean(self) -> float:
        return float(self.nll.mean())

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_mean)

    @property
    def scored(self) -> int:
        return self.nll.numel()


# ---- inputs --------------------------------------------------------------------------------------------------------


def read_text(path: str | Path | None) -> tuple[str, str]:
    """(text, its name): the file's text (UTF-8, .gz unpacked), or the study's shipped novel when `path` is None."""
    if path is None:
        return corpus_text(), CORPUS_NAME
    p = Path(path)
    if not p.is_file():
        raise KvlibError(f"text file {p} does not exist" if not p.exists() else f"text {p} is not a regular file")
    try:
        data = p.read_bytes()
        text = (gzip.decompress(data) if p.suffix == ".gz" else data).decode("utf-8")
    except (OSError, UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise KvlibError(f"cannot read text {p}: {getattr(e, 'strerror', None) or e}") from None
    return text, p.name


def text_token_ids(tokenizer: Any, text: str, n_tokens: int, name: str = "the text") -> torch.Tensor:
    """`n_tokens` token ids, (1, n_tokens) long: the tokenizer's leading special tokens where it adds them by
    default (Gemma's <bos>, which the model was trained to see first; never scored, being token 0), then the
    first tokens of `text`, no other special tokens. SmolLM2's and GPT-2's tokenizers add none."""
    bos = bos_ids(tokenizer)
    n_tokens -= len(bos)
    chars = 8 * n_tokens + 64
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens or chars >= len(text):
            break
        chars *= 2
    if len(ids) < n_tokens:
        raise KvlibError(f"{name} has only {len(ids)} tokens; --tokens {n_tokens + len(bos)} were asked for")
    return torch.tensor(bos + ids[:n_tokens], dtype=torch.long)[None]


def layout_options_from(cache: str, given: dict[str, Any]) -> dict[str, Any]:
    """Check the layout and that every option given belongs to it; returns the options."""
    given = {k: v for k, v in given.items() if v is not None}
    if cache == HF_QUANTIZED:
        extra = sorted(set(given) - set(HF_OPTIONS))
        if extra:
            raise KvlibError(f"cache {cache!r} takes only {', '.join(HF_OPTIONS)}; not {', '.join(extra)}")
        return given
    if cache == NAIVE:
        if given:
            raise KvlibError(f"cache 'none' (no cache) takes no options; got {', '.join(sorted(given))}")
        return {}
    if cache == RECOMPUTE:
        extra = sorted(set(given) - {"window"})
        if extra:
            raise KvlibError(f"cache {cache!r} takes only window; not {', '.join(extra)}")
        # re-computation is compared with the window layout of the same size: the window layout's default
        window = SinkWindowCache.option(given, "window")
        return {"window": checks.whole("window", window, minimum=1)}
    if cache not in CACHE_LAYOUTS:
        names = ", ".join([NAIVE, *CACHE_LAYOUTS, RECOMPUTE, HF_QUANTIZED])
        raise KvlibError(f"unknown cache layout {cache!r}; choose one of {names}")
    return check_layout(cache, given)


def check_fits(cache: str, options: dict[str, Any], n_tokens: int, n_positions: int) -> None:
    """Refuse texts the model or the layout cannot take: < 2 tokens, beyond the context, sinks holding it all."""
    checks.whole("tokens", n_tokens, minimum=2)
    if n_tokens > n_positions:
        raise KvlibError(f"--tokens {n_tokens} exceeds the model's context of {n_positions} positions")
    sinks = CACHE_LAYOUTS[cache].protected_sinks(options) if cache in CACHE_LAYOUTS else 0
    if sinks >= n_tokens:
        raise KvlibError(
            f"{cache} cache: sink {sinks} does not fit a text of {n_tokens} tokens "
            "(the sinks alone would hold all of it); use fewer sinks"
        )


# ---- the reference: token by token through the cache -------------------------------------------------------------


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target], float64: logits (T, V), targets (T,)."""
    return F.cross_entropy(logits.double(), targets, reduction="none")


@torch.inference_mode()
def perplexity_token_by_token(
    model: Any, ids: torch.Tensor, cache: str, options: dict[str, Any] | None = None, keep_logprobs: bool = False
) -> Perplexity:
    """Teacher forcing of `ids` (B, N) through the named layout, one token per step, the B passages side by side
    (each row its own sequence in the batch); "none": one causal pass. NLL (and log probabilities) passage after
    passage: (B * (N - 1),); bytes held per passage."""
    options = options or {}
    B, N = ids.shape
    positions = torch.arange(N, device=ids.device)[None].expand(B, N)  # (B, N)
    t0 = time.perf_counter()
    lp = None
    if cache == NAIVE:
        logits = model(ids, positions, None, 0, None, last_only=False)[:, :-1]  # (B, N - 1, V)
        flat = logits.reshape(B * (N - 1), -1)
        lp = log_probs(flat) if keep_logprobs else None
        return Perplexity(_nll(flat, ids[:, 1:].reshape(-1)), 0, time.perf_counter() - t0, lp)
    prepare_for_inference(model, B)
    kv = make_cache(cache, model.cfg, B, N, ids.device, model.wte.weight.dtype, **options)
    nll = torch.empty(B, N - 1, dtype=torch.float64)
    if keep_logprobs:
        lp = torch.empty(B, N - 1, model.cfg.vocab_size, dtype=torch.float32)
    for i in range(N):  # every token goes in, so that the bytes held are those of the whole text
        logits = model(ids[:, i : i + 1], positions[:, i : i + 1], kv, i)[:, -1]  # (B, V)
        if i < N - 1:
            nll[:, i] = _nll(logits, ids[:, i + 1]).cpu()
            if lp is not None:
                lp[:, i] = log_probs(logits)
    if lp is not None:
        lp = lp.view(B * (N - 1), -1)
    return Perplexity(nll.view(-1), kv.used_bytes() // B, time.perf_counter() - t0, lp)


@torch.inference_mode()
def perplexity_hf_quantized(
    hf_model: Any,
    ids: torch.Tensor,
    bits: int = 4,
    residual_len: int = 128,
    backend: str = "quanto",
    keep_logprobs: bool = False,
) -> Perplexity:
    """Teacher forcing through Hugging Face's model with its QuantizedCache, one token per call."""
    if hf_model is None:
        raise KvlibError("hf-quantized needs the Hugging Face model (this configuration has none)")
    try:
        kv = make_hf_quantized_cache(hf_model, backend, bits, residual_len)
    except (ImportError, ValueError) as e:
        raise KvlibError(f"Hugging Face QuantizedCache ({backend}, {bits} bits) unavailable: {e}") from None
    N = ids.shape[1]
    nll = torch.empty(N - 1, dtype=torch.float64)
    lp = torch.empty(N - 1, hf_model.config.vocab_size) if keep_logprobs else None
    t0 = time.perf_counter()
    for i in range(N):
        out = hf_model(input_ids=ids[:, i : i + 1], past_key_values=kv, use_cache=True)
        if i < N - 1:
            nll[i] = _nll(out.logits[0, -1:], ids[0, i + 1 : i + 2])[0]
            if lp is not None:
                lp[i] = log_probs(out.logits[0, -1])
    return Perplexity(nll, hf_cache_bytes(kv), time.perf_counter() - t0, lp)


@torch.inference_mode()
def perplexity_hf(hf_model: Any, ids: torch.Tensor) -> Perplexity:
    """Hugging Face's model, one causal pass, no cache: the external reference for the full cache."""
    t0 = time.perf_counter()
    logits = hf_model(input_ids=ids, use_cache=False).logits[0]
    return Perplexity(_nll(logits[:-1], ids[0, 1:]), 0, time.perf_counter() - t0)


# ---- sliding window with re-computation ----------------------------------------------------------------------------


def recompute_targets(n_tokens: int, window: int, every: int = 1) -> torch.Tensor:
    """Scored tokens t (1..N-1) where re-computation differs from the full cache, every `every`-th: t > window (for
    t <= window the window holds the whole prefix, at its own positions: the full cache exactly)."""
    return torch.arange(window + 1, n_tokens, every)


@torch.inference_mode()
def recompute_nll(
    model: Any,
    ids: torch.Tensor,
    window: int,
    targets: torch.Tensor | None = None,
    method: str = "fast",
    batch_tokens: int = 4096,
) -> torch.Tensor:
    """-log p(token t | tokens max(0, t-W) .. t-1 re-run from scratch at positions 0..), float64, for each scored
    token t in `targets` (default: every t = 1..N-1). ids (1, N). "token": one forward pass per t (the definition);
    "fast": the same windows stacked (b, W) in batches of about `batch_tokens` tokens, and all t <= W from one causal
    pass over the first W + 1 tokens (their windows are prefixes). Raises KvlibError for targets outside 1..N-1."""
    N = ids.shape[1]
    window = checks.whole("window", window, minimum=1)
    method = checks.one_of("method", method, METHODS)
    targets = torch.arange(1, N) if targets is None else torch.as_tensor(targets, dtype=torch.long).flatten()
    if len(targets) and (int(targets.min()) < 1 or int(targets.max()) > N - 1):
        raise KvlibError(f"recompute: scored tokens must lie in 1..{N - 1}, got {targets.min()}..{targets.max()}")
    nll = torch.empty(len(targets), dtype=torch.float64)
    device = ids.device
    if method == "token":
        for n, t in enumerate(targets.tolist()):
            s = max(0, t - window)
            x = ids[:, s:t]  # (1, <= W)
            logits = model(x, torch.arange(t - s, device=device)[None], None, 0, None, last_only=True)[0, -1]
            nll[n] = _nll(logits[None], ids[0, t : t + 1])[0]
        return nll
    short = targets <= window  # their windows start at token 0: prefixes of one causal pass
    if short.any():
        T = int(targets[short].max())
        logits = model(ids[:, :T], torch.arange(T, device=device)[None], None, 0, None, last_only=False)[0]
        idx = targets[short] - 1
        nll[short] = _nll(logits[idx.to(device)], ids[0, targets[short].to(device)]).cpu()
    long_at = short.logical_not().nonzero().flatten()
    rows = max(1, batch_tokens // window)
    pos = torch.arange(window, device=device)
    for a in range(0, len(long_at), rows):
        chunk = long_at[a : a + rows]
        t = targets[chunk].to(device)
        x = ids[0, (t[:, None] - window) + pos[None]]  # (b, W): tokens t-W .. t-1
        logits = model(x, pos[None].expand(len(t), window), None, 0, None, last_only=True)[:, -1]  # (b, V)
        nll[chunk] = _nll(logits, ids[0, t]).cpu()
    return nll


def perplexity_recompute(model: Any, ids: torch.Tensor, window: int, method: str = "fast") -> Perplexity:
    """Sliding window with re-computation over every token of `ids` (1, N); bytes held: the W-token cache each
    window's pass builds and drops (the batched method holds several at once, as working memory)."""
    t0 = time.perf_counter()
    nll = recompute_nll(model, ids, window, None, method)
    held = min(ids.shape[1], window) * model.cfg.kv_bytes_per_token(model.wte.weight.element_size())
    return Perplexity(nll, held, time.perf_counter() - t0)


# ---- the shortcut: one pass with a mask and fake quantization ------------------------------------------------------


def _rope(model: Any, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_cos_sin(positions[None], model.inv_freq.to(positions.device), dtype)


def _attention(q, k, v, allowed, q_sink=None, sink=0, k_codes=None, v_codes=None, codes_where=None):
    """Attention of q (B, nh, T, hd) over k, v (B, nkv, T, hd) where `allowed` (T, T); with `q_sink`, the first
    `sink` keys are scored against q_sink instead (their positions moved); with `k_codes`, keys and values are
    taken from k_codes / v_codes where `codes_where` (T, T)."""
    gqa = k.shape[1] != q.shape[1]
    if q_sink is None or not sink:  # a mask over the keys: PyTorch's fused attention
        if k_codes is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=gqa)
        # Each query sees every key either as codes or at full precision: attention over both copies of the keys
        # (2T), each masked to where that copy is the one seen, is the same softmax over the same T scores.
        both = torch.cat([allowed & codes_where, allowed & ~codes_where], dim=-1)  # (T, 2T)
        kk, vv = torch.cat([k_codes, k], dim=2), torch.cat([v_codes, v], dim=2)  # (B, nkv, 2T, hd)
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=both, enable_gqa=gqa)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # (B, nh, T, hd)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = q @ k.transpose(-1, -2)  # (B, nh, T, T)
    if q_sink is not None and sink:
        scores[..., :sink] = q_sink @ k[:, :, :sink].transpose(-1, -2)
    if k_codes is not None:
        kc, vc = k_codes.repeat_interleave(rep, 1), v_codes.repeat_interleave(rep, 1)
        scores = torch.where(codes_where, q @ kc.transpose(-1, -2), scores)
    p = torch.softmax((scores * scale).masked_fill(~allowed, float("-inf")), dim=-1)
    if k_codes is None:
        return p @ v
    return (p * codes_where) @ vc + (p * ~codes_where) @ v


@torch.inference_mode()
def perplexity_fast(
    model: Any, ids: torch.Tensor, cache: str, options: dict[str, Any] | None = None, keep_logprobs: bool = False
) -> Perplexity:
    """One forward pass equal to `perplexity_token_by_token`: on a Llama-architecture model for the exact layouts,
    window and quantized; on any other architecture for the exact layouts only (the model's own forward pass over
    the whole text, without a cache: what an exact cache shows each query). Bytes held are computed by
    `held_bytes`. Raises KvlibError for a layout it has no mask for."""
    options = options or {}
    if cache in (NAIVE, HF_QUANTIZED) or cache not in CACHE_LAYOUTS:
        raise KvlibError(f"method fast does not apply to cache {cache!r}; use method token")
    N = ids.shape[1]
    t0 = time.perf_counter()
    device, dtype = ids.device, model.wte.weight.dtype
    if model.cfg.arch != "llama":
        if not CACHE_LAYOUTS[cache].exact:
            raise KvlibError(
                f"method fast on {model.cfg.name} ({model.cfg.arch}) covers the exact layouts only, not {cache!r}; "
                "use method token"
            )
        positions = torch.arange(N, device=device)[None]
        logits = model(ids, positions, None, 0, last_only=False)[0]  # (N, V)
        nll = _nll(logits[:-1], ids[0, 1:])
        lp = log_probs(logits[:-1]) if keep_logprobs else None
        return Perplexity(nll, held_bytes(model.cfg, cache, options, N, dtype), time.perf_counter() - t0, lp)
    plan = CACHE_LAYOUTS[cache].one_pass(N, options, device)
    if plan is None:
        raise KvlibError(f"method fast has no mask for the lossy layout {cache!r}; use method token")
    allowed, codes_where, sink, q_sink_pos = plan.allowed, plan.codes_where, plan.sinks, plan.sink_positions
    positions = torch.arange(N, device=device)
    cos, sin = _rope(model, positions, dtype)
    if q_sink_pos is not None:
        cos_s, sin_s = _rope(model, q_sink_pos, dtype)
    x = model.wte(ids)  # (1, N, C)
    for block in model.h:
        a = block.self_attn
        q, k, v = a.qkv_proj(block.input_layernorm(x)).split(a.split_sizes, dim=-1)
        q = q.view(1, N, a.n_head, a.head_dim).transpose(1, 2)  # (1, nh, N, hd)
        k = k.view(1, N, a.n_kv_head, a.head_dim).transpose(1, 2)  # (1, nkv, N, hd)
        v = v.view(1, N, a.n_kv_head, a.head_dim).transpose(1, 2)
        qr, kr = rotate(q, cos, sin), rotate(k, cos, sin)
        qs = rotate(q, cos_s, sin_s) if q_sink_pos is not None else None
        kq = vq = None
        if plan.fake_quantized is not None:
            kq, vq = plan.fake_quantized(kr, v)
        y = _attention(qr, kr, v, allowed, qs, sink, kq, vq, codes_where)  # (1, nh, N, hd)
        x = x + a.o_proj(y.transpose(1, 2).reshape(1, N, a.n_head * a.head_dim))
        x = x + block.mlp(block.post_attention_layernorm(x))
    logits = model.lm_head(model.norm(x))[0]  # (N, V)
    nll = _nll(logits[:-1], ids[0, 1:])
    lp = log_probs(logits[:-1]) if keep_logprobs else None
    return Perplexity(nll, held_bytes(model.cfg, cache, options, N, dtype), time.perf_counter() - t0, lp)


def check_baseline(baseline: str | None) -> str | None:
    """The baseline a lossy layout is compared with: an exact layout (or "none": no cache); None for no
    comparison. Raises KvlibError for a lossy or unknown one."""
    if baseline is None or baseline == NAIVE:
        return baseline
    if baseline not in CACHE_LAYOUTS:
        exact = ", ".join([NAIVE, *(n for n, c in CACHE_LAYOUTS.items() if c.exact)])
        raise KvlibError(f"unknown baseline {baseline!r}; choose an exact layout: {exact}")
    if not CACHE_LAYOUTS[baseline].exact:
        exact = ", ".join(n for n, c in CACHE_LAYOUTS.items() if c.exact)
        raise KvlibError(f"baseline {baseline!r} is itself lossy; a baseline must be exact: {exact}")
    return baseline


def fast_applies(cfg: Any, cache: str, options: dict[str, Any] | None = None) -> bool:
    """Whether method "fast" (one pass) covers this layout on this model: an exact layout on any model; a lossy
    layout with a one-pass pattern (KVCache.one_pass: the window, StreamingLLM, SnapKV read token by token, the
    quantized layout) on a Llama-architecture model."""
    if cache not in CACHE_LAYOUTS:
        return False
    cls = CACHE_LAYOUTS[cache]
    return cls.exact or (cfg.arch == "llama" and cls.one_pass(2, options, "cpu") is not None)


def held_bytes(cfg: Any, cache: str, options: dict[str, Any], n_tokens: int, dtype: torch.dtype) -> int:
    """Bytes a layout holds after `n_tokens` tokens of one sequence: the layout's own formula (its
    `used_bytes_after`, equal to what its used_bytes() reports after the token-by-token method; tests check)."""
    return CACHE_LAYOUTS[cache].used_bytes_after(cfg, n_tokens, dtype, **options)


def perplexity(
    model: Any,
    ids: torch.Tensor,
    cache: str,
    options: dict[str, Any] | None = None,
    method: str = "token",
    keep_logprobs: bool = False,
) -> Perplexity:
    """The perplexity of `ids` (1, N) through `cache` (a layout, "none" or "recompute") by `method` ("token" or
    "fast"); with keep_logprobs, every scored position's log probabilities too (not for "recompute")."""
    method = checks.one_of("method", method, METHODS)
    if cache == RECOMPUTE:
        if keep_logprobs:
            raise KvlibError("re-computation keeps no log probabilities (it scores chosen tokens only)")
        return perplexity_recompute(model, ids, layout_options_from(cache, options or {})["window"], method)
    if method == "fast":
        return perplexity_fast(model, ids, cache, options, keep_logprobs)
    return perplexity_token_by_token(model, ids, cache, options, keep_logprobs)


def perplexity_passages(
    model: Any,
    passages: torch.Tensor,
    cache: str,
    options: dict[str, Any] | None = None,
    method: str = "fast",
    keep_logprobs: bool = False,
) -> Perplexity:
    """Perplexity over several passages (S, L), each read as its own text from position 0: by one pass per passage
    where `method` is "fast" and it applies (`fast_applies`), else token by token with the S passages side by side
    in one batch (a decode step of batch S costs about what one of batch 1 costs: memory-bound). NLL and log
    probabilities passage after passage ((S * (L - 1),)); bytes held per passage; the method used is the one that
    applies, so callers report `method_used(...)`."""
    if passages.dim() != 2:
        raise KvlibError(f"passages must be (S, L) token ids, got shape {tuple(passages.shape)}")
    if method_used(model.cfg, cache, options, method) == "fast":
        parts = [perplexity_fast(model, row[None], cache, options, keep_logprobs) for row in passages]
        lp = torch.cat([p.logprobs for p in parts]) if keep_logprobs else None
        return Perplexity(torch.cat([p.nll for p in parts]), parts[0].kv_bytes_held, sum(p.time_s for p in parts), lp)
    return perplexity_token_by_token(model, passages, cache, options, keep_logprobs)


def method_used(cfg: Any, cache: str, options: dict[str, Any] | None, method: str) -> str:
    """The method `perplexity_passages` runs: "fast" when asked for and it applies to this layout on this model,
    else "token"."""
    fast = checks.one_of("method", method, METHODS) == "fast" and fast_applies(cfg, cache, options)
    return "fast" if fast else "token"
