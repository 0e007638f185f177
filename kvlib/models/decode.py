"""Greedy decoding, naive and cached, with prefill and every decode step timed on their own.

Always exactly `max_new_tokens` new tokens: there is no end-of-sequence check, because a study that stops early
on EOS compares runs of different lengths.

- naive ("none"): every step runs the whole sequence so far through the model, recomputing every key and value
  (nanoGPT's `generate`). Step 0 is the same work as a prefill.
- cached ("dynamic", "static", "hybrid", or any registered layout): one prefill of the prompt fills the cache, then each
  decode step feeds one token at an explicit slot and attends over the cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kvlib.caches.base import KVCache, check_layout, make_cache
from kvlib.core import checks
from kvlib.core.errors import KvlibError
from kvlib.models.decoders import DECODERS, Decoder
from kvlib.models.fastpath import prepare_for_inference

NAIVE = "none"
TOKEN_DTYPES = (torch.int64, torch.int32)  # what an embedding takes


class Clock:
    """perf_counter, after waiting for the GPU on CUDA so that a time covers the work, not its launch."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


@dataclass
class Generation:
    tokens: torch.Tensor  # (B, max_new_tokens): the new tokens only
    # time to first token: the cache's creation, the prompt's forward pass and the choice of the first token
    prefill_s: float
    decode_s: list[float]  # one per decode step (max_new_tokens - 1 of them), each producing one token
    step_logits: torch.Tensor | None = None  # (max_new_tokens, B, V) float32, when asked for
    cache: KVCache | None = field(default=None, repr=False)

    @property
    def total_s(self) -> float:
        return self.prefill_s + sum(self.decode_s)


def prepare_positions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Position ids and key validity for the whole final sequence (prompt + new tokens), each (B, P + N).

    Prompts of different lengths must be left-padded (attention_mask 0 on the left). As in Hugging Face,
    a token's position counts only the real tokens before it. key_valid is None when nothing is padding.
    """
    B, P = input_ids.shape
    total = P + max_new_tokens
    if attention_mask is None or bool(attention_mask.all()):
        positions = torch.arange(total, device=input_ids.device).expand(B, total)
        return positions, None
    if attention_mask.shape != input_ids.shape:
        raise KvlibError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    mask = attention_mask.to(torch.long)
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise KvlibError("prompts must be left-padded: attention_mask may only go from 0 to 1 along a row")
    if bool((mask[:, -1] == 0).any()):
        raise KvlibError("a prompt in the batch is empty (its attention_mask is all 0)")
    full = torch.cat([mask, mask.new_ones(B, max_new_tokens)], dim=1)  # (B, P + N)
    positions = (full.cumsum(-1) - 1).clamp(min=0)
    return positions, full.bool()


def check_context(n_positions: int, model: str, prompt_len: int, max_new_tokens: int) -> None:
    """Refuse prompt + new tokens beyond the model's context (GPT-2's position embeddings end there; a RoPE model
    was trained up to it)."""
    if prompt_len + max_new_tokens > n_positions:
        raise KvlibError(
            f"prompt_len {prompt_len} + max_new_tokens {max_new_tokens} = {prompt_len + max_new_tokens} exceeds "
            f"the {model} context of {n_positions} positions"
        )


def check_lengths(model: Decoder, prompt_len: int, max_new_tokens: int) -> None:
    checks.whole("prompt_len", prompt_len)
    checks.whole("max_new_tokens", max_new_tokens)
    check_context(model.cfg.n_positions, model.cfg.name, prompt_len, max_new_tokens)


def check_inputs(
    model: Decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, name: str = "input_ids"
) -> None:
    """Refuse prompts the model cannot run: not a (batch, prompt_len) tensor of token ids, ids outside the
    vocabulary (the embedding would fail with an IndexError), or a mask of another shape."""
    if not isinstance(model, DECODERS):
        raise checks.fail("model", model, "a kvlib decoder: kvlib.models.gpt2.GPT, llama.Llama or gemma3.Gemma3")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in TOKEN_DTYPES:
        what = f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else input_ids
        raise checks.fail(name, what, "a (batch, prompt_len) tensor of token ids (torch.long or torch.int)")
    if input_ids.numel() == 0:
        raise checks.fail(name, tuple(input_ids.shape), "a tensor of at least one sequence of at least one token")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= model.cfg.vocab_size:
        raise checks.fail(f"{name} (token ids)", (lo, hi), f"within [0, {model.cfg.vocab_size - 1}]")
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape
    ):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
        raise checks.fail("attention_mask", shape, f"None or a tensor of the shape of {name}, {tuple(input_ids.shape)}")


def check_cache(cache: str, cache_options: dict | None) -> dict:
    """The cache mode ("none" or a registered layout) and its options, checked by name (values: by the layout)."""
    if cache == NAIVE:
        return checks.options("cache_options", cache_options, [], where="cache 'none' (no cache)")
    return check_layout(cache, cache_options)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The greedy choice (B, V) -> (B,). Taken in float32: the same choice (bfloat16 and float16 values are exact
    in float32, and ties go to the lowest id either way), and PyTorch's CPU argmax over bfloat16 is about twice as
    slow as over float32 (measured: the README's "Speed")."""
    return logits.float().argmax(-1)


def prefill(
    model: Decoder,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    cache: KVCache,
    key_valid: torch.Tensor | None,
) -> torch.Tensor:
    """Run the prompt (B, P) through the model, filling slots [0, P) of the cache; return last logits (B, V)."""
    P = input_ids.shape[1]
    valid = None if key_valid is None else key_valid[:, :P]
    return model(input_ids, positions[:, :P], cache, 0, valid)[:, -1]


def decode_step(
    model: Decoder,
    token: torch.Tensor,
    slot: int,
    positions: torch.Tensor,
    cache: KVCache,
    key_valid: torch.Tensor | None,
) -> torch.Tensor:
    """Feed one token per sequence (B, 1) at cache slot `slot`; return its logits (B, V)."""
    valid = None if key_valid is None else key_valid[:, : slot + 1]
    return model(token, positions[:, slot : slot + 1], cache, slot, valid)[:, -1]


@torch.inference_mode()
def generate(
    model: Decoder,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    cache: str = "static",
    attention_mask: torch.Tensor | None = None,
    keep_logits: bool = False,
    cache_options: dict | None = None,
) -> Generation:
    """Greedy decoding of exactly `max_new_tokens` tokens; `cache` is "none" (naive) or a layout name."""
    check_inputs(model, input_ids, attention_mask)
    cache_options = check_cache(cache, cache_options)
    B, P = input_ids.shape
    check_lengths(model, P, max_new_tokens)
    positions, key_valid = prepare_positions(input_ids, attention_mask, max_new_tokens)
    prepare_for_inference(model, B)  # pack weights / compile kernels now, not inside a timed step
    clock = Clock(input_ids.device)
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=input_ids.device)
    logits_log = torch.empty(max_new_tokens, B, model.cfg.vocab_size, device=input_ids.device) if keep_logits else None
    if cache == NAIVE:
        return _generate_naive(model, input_ids, positions, key_valid, out, logits_log, clock)

    # TTFT starts before the cache is created (allocated and, for the static layouts, zeroed), as Hugging Face's
    # starts before generate creates its cache: both engines are timed from the same point (README "Rows").
    t0 = clock.now()
    kv = make_cache(
        cache,
        model.cfg,
        B,
        P + max_new_tokens,
        input_ids.device,
        model.wte.weight.dtype,
        **(cache_options or {}),
    )
    logits = prefill(model, input_ids, positions, kv, key_valid)
    out[:, 0] = greedy(logits)
    if logits_log is not None:
        logits_log[0] = logits
    prev = clock.now()
    decode_s = decode_loop(model, out, P, positions, kv, key_valid, logits_log, clock, prev)
    return Generation(out, prev - t0, decode_s, logits_log, kv)


def decode_loop(
    model: Decoder,
    out: torch.Tensor,
    prompt_len: int,
    positions: torch.Tensor,
    cache: KVCache,
    key_valid: torch.Tensor | None,
    logits_log: torch.Tensor | None,
    clock: Clock,
    start_time: float,
) -> list[float]:
    """The decode steps after a prefill that chose out[:, 0]: fills out[:, 1:] greedily, one token per step at
    slot prompt_len + i - 1, and returns each step's time (measured from `start_time`, the end of the prefill)."""
    decode_s, prev = [], start_time
    for i in range(1, out.shape[1]):
        logits = decode_step(model, out[:, i - 1 : i], prompt_len + i - 1, positions, cache, key_valid)
        out[:, i] = greedy(logits)
        if logits_log is not None:
            logits_log[i] = logits
        now = clock.now()
        decode_s.append(now - prev)
        prev = now
    return decode_s


def _generate_naive(
    model: Decoder,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    key_valid: torch.Tensor | None,
    out: torch.Tensor,
    logits_log: torch.Tensor | None,
    clock: Clock,
) -> Generation:
    B, P = input_ids.shape
    N = out.shape[1]
    seq = torch.empty(B, P + N, dtype=torch.long, device=input_ids.device)
    seq[:, :P] = input_ids
    times = []
    prev = clock.now()
    for i in range(N):
        L = P + i  # the whole sequence so far, every key and value recomputed
        valid = None if key_valid is None else key_valid[:, :L]
        logits = model(seq[:, :L], positions[:, :L], None, 0, valid)[:, -1]
        seq[:, L] = out[:, i] = greedy(logits)
        if logits_log is not None:
            logits_log[i] = logits
        now = clock.now()
        times.append(now - prev)
        prev = now
    return Generation(out, times[0], times[1:], logits_log, None)
