"""Hugging Face `generate`, timed honestly: one call, a timestamp for every token from a streamer.

Cache modes: "none" (use_cache=False: every step recomputes the whole sequence), "dynamic" (DynamicCache, grows
by concatenation) and "static" (cache_implementation="static", preallocated). Greedy, and never an early stop:
the loader clears the end-of-sequence id, and the token count is checked.

The time to first token includes `generate`'s own set-up (validation, cache creation) before the prefill,
because that is what a user of `generate` waits for.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from transformers import DynamicCache, StaticCache
from transformers.generation.streamers import BaseStreamer

from kvlib.core import checks
from kvlib.core.errors import KvlibError
from kvlib.models.decode import Clock, Generation

# Hugging Face's cache modes, by Hugging Face's names (two of them read like kvlib's layouts; they are HF's caches)
HF_CACHE_MODES = ("none", "dynamic", "static")
HF_NONE, HF_DYNAMIC, HF_STATIC = HF_CACHE_MODES


class TokenClock(BaseStreamer):
    """A streamer that records when each new token reaches the host (the prompt, put first, is skipped)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(self.clock.now())

    def end(self) -> None:
        pass


def context_length(hf_config: Any) -> int:
    """Positions a Hugging Face model can take: GPT-2's n_positions, Llama's max_position_embeddings."""
    n = getattr(hf_config, "n_positions", None) or getattr(hf_config, "max_position_embeddings", None)
    if not n:
        raise KvlibError(f"cannot tell the context length of a {type(hf_config).__name__}")
    return int(n)


def generation_config(hf_model: Any, max_new_tokens: int, cache: str, keep_logits: bool) -> Any:
    if cache not in HF_CACHE_MODES:
        raise KvlibError(f"unknown Hugging Face cache mode {cache!r}; choose one of {', '.join(HF_CACHE_MODES)}")
    cfg = copy.deepcopy(hf_model.generation_config)
    cfg.do_sample = False
    cfg.num_beams = 1
    cfg.max_new_tokens = max_new_tokens
    cfg.min_new_tokens = None
    cfg.eos_token_id = None
    cfg.pad_token_id = 0  # never used (no sequence finishes early), but generate wants one
    cfg.use_cache = cache != HF_NONE
    cfg.cache_implementation = "static" if cache == HF_STATIC else None
    cfg.return_dict_in_generate = True
    cfg.output_logits = keep_logits
    return cfg


def hf_cache(hf_model: Any, mode: str, max_len: int) -> Any:
    """An empty Hugging Face cache for `hf_model` to be filled with `update(k, v, layer)`: its DynamicCache (mode
    HF_DYNAMIC; sliding layers where the config has them) or a StaticCache of `max_len` slots (HF_STATIC). Raises
    KvlibError for another mode."""
    if mode == HF_DYNAMIC:
        return DynamicCache(config=hf_model.config)
    if mode == HF_STATIC:
        return StaticCache(config=hf_model.config, max_cache_len=max_len)
    raise KvlibError(f"hf_cache: mode must be {HF_DYNAMIC} or {HF_STATIC}, got {mode!r}")


@torch.inference_mode()
def hf_generate(
    hf_model: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    cache: str = "dynamic",
    attention_mask: torch.Tensor | None = None,
    keep_logits: bool = False,
) -> Generation:
    """Greedy `generate` of exactly `max_new_tokens` tokens, with prefill and each decode step timed."""
    if hf_model.generation_config.eos_token_id is not None:
        raise KvlibError("the Hugging Face model still has an eos_token_id; load it with kvlib.models.loading.load")
    checks.whole("max_new_tokens", max_new_tokens, where="hf_generate:")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise checks.fail("input_ids", input_ids, "a non-empty (batch, prompt_len) tensor of token ids", "hf_generate:")
    lo, hi, vocab = int(input_ids.min()), int(input_ids.max()), hf_model.config.vocab_size
    if lo < 0 or hi >= vocab:
        raise checks.fail("input_ids (token ids)", (lo, hi), f"within [0, {vocab - 1}]", "hf_generate:")
    P = input_ids.shape[1]
    context = context_length(hf_model.config)
    if P + max_new_tokens > context:
        raise KvlibError(f"prompt_len {P} + max_new_tokens {max_new_tokens} exceeds the context of {context}")
    gen_cfg = generation_config(hf_model, max_new_tokens, cache, keep_logits)
    if cache == HF_STATIC:
        # generate sizes a new static cache by max(this call, every earlier call) to spare torch.compile a
        # recompile: after a longer run, the cache (and the attention over it) would be larger than this run's.
        hf_model.__dict__.pop("_previous_max_cache_length", None)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    clock = Clock(input_ids.device)
    streamer = TokenClock(clock)
    t0 = clock.now()
    out = hf_model.generate(input_ids, attention_mask=attention_mask, generation_config=gen_cfg, streamer=streamer)
    tokens = out.sequences[:, P:]
    if tokens.shape[1] != max_new_tokens or len(streamer.times) != max_new_tokens:
        raise KvlibError(f"Hugging Face generate made {tokens.shape[1]} tokens, not {max_new_tokens}")
    times = [t0, *streamer.times]
    steps = [b - a for a, b in itertools.pairwise(times)]
    logits = torch.stack(out.logits).float() if keep_logits else None  # (N, B, V)
    return Generation(tokens, steps[0], steps[1:], logits, getattr(out, "past_key_values", None))
