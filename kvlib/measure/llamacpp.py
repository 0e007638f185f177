"""What llama.cpp's cache types cost in quality, measured as kvlib measures its own layouts: the same text, teacher
forcing, perplexity, and KL divergence with top-1 agreement against llama.cpp's own f16 cache (llama.cpp's
`perplexity --kl-divergence` compares the same way), with the floor: f16 with flash attention off against f16 with
it on, two exact paths that differ only by the order of floating-point sums.

A score is one forward pass over the text with every position's logits kept (llama.cpp evaluates it in batches of
512 through the cache, so token i sees tokens < i as the cache holds them: its quantized codes included).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvlib.measure.divergence import Divergence, divergence
from kvlib.measure.perplexity import Perplexity, text_token_ids
from kvlib.models import llamacpp
from kvlib.models.llamacpp import REFERENCE, Engine, Tokenizer, open_engine


@dataclass(frozen=True)
class CacheSetting:
    """One llama.cpp cache configuration: key and value types, flash attention, rotation (of a quantized type)."""

    type_k: str = REFERENCE
    type_v: str = REFERENCE
    flash_attn: bool = True
    rotate: bool = True

    @property
    def label(self) -> str:
        """e.g. "q8_0" (both types, flash attention, llama.cpp's default rotation), "q4_0 norot", "f16 no-fa"."""
        types = self.type_k if self.type_k == self.type_v else f"{self.type_k}/{self.type_v}"
        quantized = llamacpp.is_quantized(self.type_k) or llamacpp.is_quantized(self.type_v)
        return types + ("" if self.flash_attn else " no-fa") + (" norot" if quantized and not self.rotate else "")

    def check(self) -> None:
        llamacpp.check_types(self.type_k, self.type_v, self.flash_attn)


BASELINE = CacheSetting()  # f16 keys and values, flash attention: llama.cpp's default cache
FLOOR = CacheSetting(flash_attn=False)  # the same exact cache through the other attention path


def open_for(model: str, n_ctx: int, setting: CacheSetting, logits_all: bool = True) -> Engine:
    return open_engine(
        model, n_ctx, setting.type_k, setting.type_v, setting.flash_attn, setting.rotate, logits_all=logits_all
    )


def token_ids(engine: Engine, text: str, n_tokens: int, name: str = "the text") -> list[int]:
    """The text's first `n_tokens` ids by llama.cpp's own tokenizer (Gemma's <bos> first, as the GGUF says)."""
    return text_token_ids(Tokenizer(engine), text, n_tokens, name)[0].tolist()


def score(model: str, ids: Sequence[int], setting: CacheSetting, keep_logprobs: bool = True) -> Perplexity:
    """Perplexity of `ids` (teacher forcing) through llama.cpp with `setting`'s cache, a fresh context of exactly
    len(ids) positions; the cache's bytes for the whole text; every position's log probabilities when kept."""
    setting.check()
    engine = open_for(model, len(ids), setting)
    try:
        lp, seconds = engine.logprobs(ids)
        held = engine.cache_bytes(len(ids))
    finally:
        engine.close()
    nll = llamacpp.mean_nll(lp, ids)
    return Perplexity(nll, held, seconds, lp if keep_logprobs else None)


def compare(base: Perplexity, other: Perplexity) -> Divergence:
    """KL divergence (base || other), top-1 agreement and perplexity ratio over the same scored positions."""
    return divergence(base.logprobs, other.logprobs, base.nll, other.nll)
