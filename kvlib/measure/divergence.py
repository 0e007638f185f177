"""How far a lossy cache moves the model's next-token distribution from the exact cache's, token by token.

The field's measure of a lossy KV cache (llama.cpp's `perplexity --kl-divergence`, Hugging Face's quantized-cache
benchmark): read the same text through the exact cache (the baseline) and through the lossy one, and compare, at
every scored position t, the two next-token distributions P (baseline) and Q (lossy):

- KL divergence KLD_t = sum_v P_t(v) (log P_t(v) - log Q_t(v)), in nats; 0 when Q = P. Its mean over the text is
  the headline, with a 95% confidence interval from a block bootstrap (below);
- top-1 agreement: the share of positions where argmax Q_t = argmax P_t (llama.cpp's "same top p"), in %;
- the perplexity ratio PPL(Q) / PPL(P) (PPL = exp of the mean negative log-likelihood of the text's own tokens).

Perplexity alone hides changes that cancel on average; KLD sees every change of every probability, which is why it
is the measure and why a noise floor matters: two exact paths (static against paged; the cached path token by token
against one forward pass over the text) differ by float rounding only, and a lossy layout's KLD within that floor
is indistinguishable from exact, not a result.

Bootstrap: positions of one text are not independent (a hard passage is hard for many tokens in a row), so the
interval resamples blocks of `block` consecutive positions (non-overlapping, with replacement; Künsch 1989, "The
jackknife and the bootstrap for general stationary observations"), `resamples` times with a fixed seed; the
interval is the 2.5 and 97.5 percentiles of the resampled means (nearest rank, rounded outward:
kvlib.core.stats.central_interval). With fewer than 2 blocks there is no interval
(NaN: no spread can be estimated, and the outputs say so).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from kvlib.core.errors import KvlibError
from kvlib.core.stats import central_interval, nearest_rank

BLOCK = 64  # positions per bootstrap block
RESAMPLES = 2000
LEVEL = 0.95


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log softmax over the vocabulary, float32 on the host: logits (T, V) -> (T, V)."""
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def per_token(base: torch.Tensor, other: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(P_base || Q_other) per position (nats, float64) and whether the top-1 tokens agree (bool), from log
    probabilities `base`, `other` (T, V) (see `log_probs`). Computed in float64, `chunk` rows at a time. Raises
    KvlibError when the shapes differ."""
    if base.shape != other.shape or base.dim() != 2:
        shapes = f"{tuple(base.shape)} and {tuple(other.shape)}"
        raise KvlibError(f"divergence needs two (T, V) log-probability tables of one shape, got {shapes}")
    kld = torch.empty(base.shape[0], dtype=torch.float64)
    for a in range(0, base.shape[0], chunk):
        p, q = base[a : a + chunk].double(), other[a : a + chunk].double()
        kld[a : a + chunk] = (p.exp() * (p - q)).sum(-1).clamp_min(0.0)  # >= 0; rounding can dip below by 1e-17
    top1 = base.argmax(-1) == other.argmax(-1)
    return kld, top1


def bootstrap_mean_ci(
    values: torch.Tensor | np.ndarray,
    block: int = BLOCK,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> tuple[float, float]:
    """(lo, hi): a `level` confidence interval of the mean of `values` (1-D, in order along the text) by a
    non-overlapping block bootstrap with blocks of `block` consecutive values; a trailing partial block is kept as
    a block of its own. Fewer than 2 blocks: (NaN, NaN)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        return math.nan, math.nan
    starts = np.arange(0, x.size, block)
    if len(starts) < 2:
        return math.nan, math.nan
    sums = np.add.reduceat(x, starts)  # (n_blocks,)
    sizes = np.diff(np.append(starts, x.size))
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(starts), size=(resamples, len(starts)))
    means = sums[pick].sum(1) / sizes[pick].sum(1)
    return central_interval(means.tolist(), level)  # the study's one rule: measured values, rounded outward


@dataclass(frozen=True)
class Divergence:
    """One layout against its baseline on the same scored positions: kld (T,) nats float64, top1 (T,) bool,
    nll_base and nll (T,) float64 negative log-likelihoods of the text's own next tokens."""

    kld: torch.Tensor
    top1: torch.Tensor
    nll_base: torch.Tensor
    nll: torch.Tensor

    @property
    def scored(self) -> int:
        return int(self.kld.numel())

    @property
    def kld_mean(self) -> float:
        return float(self.kld.mean())

    @functools.cached_property  # a bootstrap of 2000 resamples: once per instance
    def kld_ci(self) -> tuple[float, float]:
        return bootstrap_mean_ci(self.kld.numpy())

    @property
    def kld_p99(self) -> float:
        return nearest_rank(self.kld.tolist(), 0.99)

    @property
    def top1_pct(self) -> float:
        return 100.0 * float(self.top1.double().mean())

    @functools.cached_property  # a bootstrap of 2000 resamples: once per instance
    def top1_ci(self) -> tuple[float, float]:
        lo, hi = bootstrap_mean_ci(self.top1.double().numpy())
        return 100.0 * lo, 100.0 * hi

    @property
    def perplexity(self) -> float:
        return math.exp(float(self.nll.mean()))

    @property
    def perplexity_base(self) -> float:
        return math.exp(float(self.nll_base.mean()))

    @property
    def ppl_ratio(self) -> float:
        """PPL(layout) / PPL(baseline) = exp(mean NLL - mean NLL_base)."""
        return math.exp(float(self.nll.mean() - self.nll_base.mean()))

    def summary(self) -> dict[str, float]:
        """The row every table and command prints: kld_mean / kld_lo / kld_hi / kld_p99 (nats), top1_pct (and its
        interval), perplexity, perplexity_base, ppl_ratio, scored."""
        lo, hi = self.kld_ci
        t_lo, t_hi = self.top1_ci
        return {
            "scored": self.scored,
            "kld_mean": self.kld_mean,
            "kld_lo": lo,
            "kld_hi": hi,
            "kld_p99": self.kld_p99,
            "top1_pct": self.top1_pct,
            "top1_lo": t_lo,
            "top1_hi": t_hi,
            "perplexity": self.perplexity,
            "perplexity_base": self.perplexity_base,
            "ppl_ratio": self.ppl_ratio,
        }


def divergence(
    base_logprobs: torch.Tensor, logprobs: torch.Tensor, nll_base: torch.Tensor, nll: torch.Tensor
) -> Divergence:
    """A layout's Divergence from its baseline: log probabilities (T, V) of both over the same positions and their
    NLLs (T,). Raises KvlibError when they do not cover the same positions."""
    if nll_base.shape != nll.shape or nll.numel() != logprobs.shape[0]:
        raise KvlibError(f"divergence: {nll.numel()} scored tokens against {nll_base.numel()} in the baseline")
    kld, top1 = per_token(base_logprobs, logprobs)
    return Divergence(kld, top1, nll_base.double().cpu(), nll.double().cpu())


def within_floor(kld_mean: float, floor_hi: float) -> bool:
    """Whether a layout's mean KLD is indistinguishable from exact: at or below the upper end of the floor's
    interval (the KLD two exact paths show); False when there is no floor (NaN)."""
    return bool(kld_mean <= floor_hi)
