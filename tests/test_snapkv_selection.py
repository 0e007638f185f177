"""SnapKV's prompt selection on attention patterns built by hand, with the kept positions worked out on paper.

Written from the paper's rule (Li et al. 2024, Algorithm 1, and its reference code snapkv_utils.py), not from
kvlib's: the observation window is the prompt's last W queries; a prefix key's score is the softmax attention it
receives from them (causal inside the window), summed over the window's queries and averaged over the query heads of
its GQA group (kvpress's aggregation); the scores of the prefix only are pooled along the keys (kernel 3 here,
stride 1, zero padding counted in the average); the top `budget - W` prefix keys of each key-value head are kept,
plus the window. Each pattern is chosen so that the answer has no ties, and each wrong variant below (a bug one
could plausibly write) keeps another set: `test_the_check_fails_on_a_wrong_snapkv` proves the check can fail.

The layer: tiny-llama's, 4 query heads sharing 2 key-value heads (heads 0, 1 -> kv head 0; heads 2, 3 -> kv head 1),
head_dim 16. A prompt of 20 tokens, window W = 4 (positions 16..19), budget 7: 3 prefix keys per kv head + window.
Keys are zero except a few positions, each given its own basis direction; a window query aimed at a position is
C x that direction, with C x scale = 60, so its softmax puts all its mass (to within e^-57) on that key. One row
(a window query of one head) then contributes 1 to its target, and a key's pre-pooling score is, up to the common
factor 1 / (W x 2), the number of rows aimed at it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kvlib.caches  # noqa: F401  (registers the layouts)
import kvlib.caches.eviction as eviction
import kvlib.models.attention as attention_module
from kvlib.caches.base import make_cache
from kvlib.caches.eviction import SnapKVCache
from kvlib.core.config import get_preset
from kvlib.models.attention import attend

CFG = get_preset("tiny-llama")
T, W, BUDGET, KERNEL = 20, 4, 7, 3
C = 60 * math.sqrt(CFG.head_dim)  # C x 1/sqrt(head_dim) = 60

# Rows of the window (queries at positions 16, 17, 18, 19) of each query head: the key position each is aimed at.
# kv head 0 (heads 0, 1): rows at 3: 4, at 0: 3, at 14: 1. Pooled (x 24): positions 0, 1 -> 3 (zero padding on
#   the left counts in the average), 2, 3, 4 -> 4, 13, 14, 15 -> 1. Kept: 2, 3, 4.
# kv head 1 (heads 2, 3): rows at 16 (a window key): 4, at 12: 3, at 6: 1. The window's keys are not candidates
#   and pool as zeros, so position 15 gets 0; 11, 12, 13 -> 3; 5, 6, 7 -> 1. Kept: 11, 12, 13.
AIMS = {0: [3, 3, 3, 0], 1: [0, 0, 3, 14], 2: [16, 16, 16, 6], 3: [16, 12, 12, 12]}
EXPECTED = [[2, 3, 4, 16, 17, 18, 19], [11, 12, 13, 16, 17, 18, 19]]  # per kv head: 3 prefix keys + the window


def pattern(aims: dict[int, list[list[tuple[int, float]]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """q (1, 4, T, hd), k (1, 2, T, hd): each aimed-at key of a kv head gets a basis direction of its own; window row
    i of head h is the sum of weight x C x direction over its (position, weight) aims; every other query is 0."""
    group = CFG.n_head // CFG.n_kv_head
    q = torch.zeros(1, CFG.n_head, T, CFG.head_dim)
    k = torch.zeros(1, CFG.n_kv_head, T, CFG.head_dim)
    for kv_head in range(CFG.n_kv_head):
        heads = range(kv_head * group, (kv_head + 1) * group)
        targets = sorted({p for h in heads for row in aims[h] for p, _ in row})
        for d, p in enumerate(targets):
            k[0, kv_head, p, d] = 1.0
        for h in heads:
            for i, row in enumerate(aims[h]):
                for p, weight in row:
                    q[0, h, T - W + i, targets.index(p)] += weight * C
    return q, k


def kept(aims: dict[int, list[int]] | dict[int, list[list[tuple[int, float]]]], cache_cls=None, **options) -> list:
    """Positions kvlib's SnapKV keeps per kv head after a 20-token prompt of the pattern (the prefill goes through
    `attend`, which scores and evicts, as every model does)."""
    aims = {h: [r if isinstance(r, list) else [(r, 1.0)] for r in rows] for h, rows in aims.items()}
    q, k = pattern(aims)
    opts = {"budget": BUDGET, "observation": W, "kernel": KERNEL, "pooling": "avg", **options}
    if cache_cls is None:
        kv = make_cache("snapkv", CFG, 1, T + 4, "cpu", torch.float32, **opts)
    else:
        kv = cache_cls(CFG, 1, T + 4, "cpu", torch.float32, **opts)
    attend(q, k, k, kv, 0, 0, None, True)
    return kv.layer_positions(0)[0].tolist()


def test_snapkv_keeps_the_positions_worked_out_by_hand():
    assert kept(AIMS) == EXPECTED


def test_max_pooling_keeps_the_same_clusters_here():
    """Max pooling (the paper's Algorithm 1 allows either): kv head 0 -> 2, 3, 4 (4 rows at 3 beat 3 rows at 0);
    kv head 1 -> 11, 12, 13."""
    assert kept(AIMS, pooling="max") == EXPECTED


def test_causal_masking_inside_the_window():
    """Window rows at 16, 17, 18 aim at key 19 (weight 1) and key 5 (weight 1/2); the row at 19 at key 12. Key 19
    lies after those queries: with the causal mask their mass goes to 5 (6 rows), else to 19 (a window key). Kept:
    4, 5, 6 (and not 11, 12, 13, which 2 rows aim at)."""
    fallback = [[(19, 1.0), (5, 0.5)]] * 3 + [[(12, 1.0)]]
    got = kept(dict.fromkeys(range(4), fallback))
    assert got == [[4, 5, 6, 16, 17, 18, 19]] * 2


# ---- the check can fail: plausible wrong SnapKVs keep other positions -----------------------------------------------


class WindowCompetesSnapKV(SnapKVCache):
    """Wrong: the window's keys are pooled with their received attention instead of as zeros (their scores leak
    into the neighbouring prefix keys' pooled scores)."""

    def add_attention(self, layer, scores, received):
        m = self.observed_queries(layer)
        pos = self.pos[layer]
        in_window = pos >= self.lengths[layer] - self.observation
        pooled = eviction.pool_scores(received / m, self.kernel, self.pooling)
        return torch.where(in_window, pos.float() + 1.0, pooled)


def no_pooling(monkeypatch):
    monkeypatch.setattr(eviction, "pool_scores", lambda scores, kernel, pooling: scores)


def padding_not_counted(monkeypatch):
    def pool(scores, kernel, pooling):
        B, h, S = scores.shape
        y = F.avg_pool1d(scores.reshape(B * h, 1, S), kernel, 1, kernel // 2, count_include_pad=False)
        return y.reshape(B, h, S)

    monkeypatch.setattr(eviction, "pool_scores", pool)


def first_query_head_of_each_group(monkeypatch):
    real = attention_module.attention_received

    def received(q, k, mask, is_causal, scale, n_queries, *args):
        group = q.shape[1] // k.shape[1]
        return real(q[:, ::group].repeat_interleave(group, dim=1), k, mask, is_causal, scale, n_queries, *args)

    monkeypatch.setattr(attention_module, "attention_received", received)


WRONG = {
    "no pooling": (no_pooling, None),
    "zero padding not counted in the average": (padding_not_counted, None),
    "only the first query head of a GQA group": (first_query_head_of_each_group, None),
    "window keys pooled with their own scores": (None, WindowCompetesSnapKV),
}


@pytest.mark.parametrize("wrong", WRONG)
def test_the_check_fails_on_a_wrong_snapkv(monkeypatch, wrong):
    patch, cls = WRONG[wrong]
    if patch is not None:
        patch(monkeypatch)
    with pytest.raises(AssertionError):
        assert kept(AIMS, cache_cls=cls) == EXPECTED


def test_the_causal_check_fails_without_the_mask(monkeypatch):
    real = attention_module.attention_received

    def unmasked(q, k, mask, is_causal, scale, n_queries, *args):
        return real(q, k, None, False, scale, n_queries, *args)

    monkeypatch.setattr(attention_module, "attention_received", unmasked)
    fallback = [[(19, 1.0), (5, 0.5)]] * 3 + [[(12, 1.0)]]
    assert kept(dict.fromkeys(range(4), fallback)) == [[11, 12, 13, 16, 17, 18, 19]] * 2


def test_the_window_is_inside_the_budget():
    """The budget counts the window (SnapKV's max_capacity_prompt = selected + window): 7 kept, not 3 + 4 + 4."""
    got = kept(AIMS)
    assert all(len(row) == BUDGET and row[-W:] == list(range(T - W, T)) for row in got)


# ---- the ablation of kvlib.study.snapkv_check -----------------------------------------------------------------------


def test_a_shared_variant_keeps_one_set_of_positions_per_layer():
    from kvlib.core.errors import KvlibError
    from kvlib.study.snapkv_check import shared_class

    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, CFG.n_head, T, CFG.head_dim, generator=gen), torch.randn(2, 2, T, CFG.head_dim, generator=gen)
    for layout, opts in (("snapkv", {"budget": 7, "observation": 4}), ("h2o", {"budget": 7})):
        per_head = make_cache(layout, CFG, 2, T, "cpu", torch.float32, **opts)
        shared = shared_class(layout)(CFG, 2, T, "cpu", torch.float32, **opts)
        for kv in (per_head, shared):
            attend(q, k, k, kv, 0, 0, None, True)
        pos = shared.layer_positions(0)  # (B, nkv, 7)
        assert torch.equal(pos[:, 0], pos[:, 1]) and pos.shape[2] == 7
        assert not torch.equal(per_head.layer_positions(0)[:, 0], per_head.layer_positions(0)[:, 1])
    with pytest.raises(KvlibError, match="scores by attention"):
        shared_class("streaming")


def test_the_ablation_frame_and_its_sentence_on_a_tiny_random_model():
    from kvlib.models.loading import load
    from kvlib.study.snapkv_check import COLUMNS, FULL_VARIANT, VARIANTS, ablation, ablation_sentence

    lm = load("tiny-llama", weights="random", seed=0, with_hf=False)
    df = ablation(lm, depths=(0.5,), keys=1, tokens=160, new_tokens=4)  # the smoke profile's prompts
    assert list(df.columns) == list(COLUMNS)
    assert df["variant"].tolist() == [FULL_VARIANT, *[v.name for v in VARIANTS]]
    assert (df["n"] == 1).all() and df["digits_kept_frac"].between(0, 1).all()
    assert df.loc[0, "digits_kept_frac"] == 1.0  # the full cache keeps every digit token
    assert "meaningless" in ablation_sentence(df)


def test_the_sentence_warns_where_snapkv_falls_below_the_full_cache():
    import pandas as pd

    from kvlib.study.snapkv_check import COLUMNS, ablation_sentence

    def frame(snap_retrieved: int) -> pd.DataFrame:
        base = {"model": "m", "weights": "pretrained", "tokens": 1024, "budget": 256, "setting": "question-aware",
                "options": "", "shared": False, "n": 3, "digits_kept_frac": 0.5, "digit_tokens_kept_frac": 0.5,
                "continuations": "", "time_s": 1.0, "depth": 0.9}  # fmt: skip
        rows = [
            {**base, "variant": "full cache", "layout": "static", "retrieved": 3},
            {**base, "variant": "snapkv", "layout": "snapkv", "retrieved": snap_retrieved},
            {**base, "variant": "h2o", "layout": "h2o", "retrieved": 0},
        ]
        return pd.DataFrame(rows, columns=list(COLUMNS))

    low = ablation_sentence(frame(0))
    assert "⚠ snapkv 0/3 at depth 0.9 (50%)" in low and "Against the paper" in low and "h2o 0/3" in low
    assert "⚠ h2o" not in low  # the paper compared with is SnapKV's
    assert "⚠" not in ablation_sentence(frame(3))
    after = ablation_sentence(frame(0).assign(setting="question-after"))  # not the paper's setting
    assert "⚠ snapkv" not in after and "Against the paper" not in after
    assert "No ⚠ beside SnapKV's losses" in after
