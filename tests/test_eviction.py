"""Eviction policies (kvlib.caches.eviction): exact while the budget covers the sequence, never over budget, and
each policy's choices equal its rule computed here by hand from the attention weights."""

from __future__ import annotations

import math

import pytest
import torch

import kvlib.caches  # noqa: F401  (registers the layouts)
import kvlib.models.attention as attention_module
import kvlib.models.gpt2 as gpt2_module
import kvlib.models.llama as llama_module
from kvlib.caches.base import CACHE_LAYOUTS, make_cache
from kvlib.caches.eviction import POLICIES, EvictionCache
from kvlib.core.errors import KvlibError
from kvlib.decoding.questions import answer_greedily, prefill_then
from kvlib.models.attention import attend
from kvlib.models.decode import decode_step, generate, greedy
from kvlib.models.loading import load
from kvlib.models.prompts import synthetic_prompts

# Small options every policy accepts with a budget of 8 (SnapKV's window must fit in the budget).
SMALL = {"snapkv": {"observation": 3}, "h2o": {"recent": 2}, "streaming": {"sink": 2}}


@pytest.fixture(scope="module", params=["tiny", "tiny-llama"])
def model(request):
    """GPT-2 tiny (4 heads, 4 key-value heads) and Llama tiny (4 query heads sharing 2 key-value heads)."""
    return load(request.param, weights="random", seed=0, with_hf=False).model


def options(policy: str, budget: int) -> dict:
    return {"budget": budget, **SMALL.get(policy, {})}


def test_the_policies_are_registered_lossy_layouts():
    assert set(POLICIES) <= set(CACHE_LAYOUTS)
    for policy in POLICIES:
        assert issubclass(CACHE_LAYOUTS[policy], EvictionCache) and not CACHE_LAYOUTS[policy].exact
    assert {p for p in POLICIES if CACHE_LAYOUTS[p].needs_attention} == {"h2o", "tova", "snapkv"}
    assert not any(CACHE_LAYOUTS[name].needs_attention for name in ("static", "dynamic", "paged", "window"))


# ---- exact while the budget covers the sequence -------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_a_budget_covering_the_sequence_equals_the_static_cache(model, policy):
    ids = synthetic_prompts(model.cfg.vocab_size, 2, 11, seed=3)
    static = generate(model, ids, 9, cache="static", keep_logits=True)
    out = generate(model, ids, 9, cache=policy, cache_options=options(policy, 11 + 9), keep_logits=True)
    assert torch.equal(out.tokens, static.tokens)
    torch.testing.assert_close(out.step_logits, static.step_logits, atol=1e-6, rtol=0)
    assert out.cache.evicted_tokens == 0


@pytest.mark.parametrize("question_aware", [False, True])
@pytest.mark.parametrize("policy", POLICIES)
def test_both_question_settings_equal_the_static_cache_while_the_budget_covers(model, policy, question_aware):
    """A question written after the context (a second prefill chunk) or with it gives the static cache's answer."""
    ids = synthetic_prompts(model.cfg.vocab_size, 2, 16, seed=4)
    static = generate(model, ids, 6, cache="static")
    kv = make_cache(policy, model.cfg, 2, 22, "cpu", torch.float32, **options(policy, 22))
    answer = answer_greedily(model, kv, ids[:, :11], ids[:, 11:], 6, question_aware=question_aware)
    assert torch.equal(answer, static.tokens)


# ---- never over budget --------------------------------------------------------------------------------------------


def held(kv: EvictionCache) -> list[int]:
    """Tokens held per layer, after checking that every head's kept positions are distinct and written (in any
    order: a decode step writes its token into the evicted token's slot)."""
    counts = []
    for layer in range(kv.cfg.n_layer):
        keys, values = kv.layer_kv(layer)
        pos = kv.layer_positions(layer)
        assert keys.shape[2] == values.shape[2] == pos.shape[2]
        pos = pos.sort(dim=-1).values
        assert bool((pos[..., 1:] > pos[..., :-1]).all()) and int(pos.max()) < kv.lengths[layer]
        counts.append(keys.shape[2])
    return counts


@pytest.mark.parametrize("question_aware", [False, True])
@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_holds_at_most_its_budget_after_every_step(model, policy, question_aware):
    budget, C, Q, N = 8, 17, 5, 7
    ids = synthetic_prompts(model.cfg.vocab_size, 2, C + Q, seed=5)
    kv = make_cache(policy, model.cfg, 2, C + Q + N, "cpu", torch.float32, **options(policy, budget))
    positions = torch.arange(C + Q + N).expand(2, -1)
    if question_aware:
        logits = prefill_then(model, kv, ids[:, :C], ids[:, C:], question_aware=True)
    else:
        model(ids[:, :C], positions[:, :C], kv, 0)  # the context alone: compressed before the question
        assert held(kv) == [budget] * model.cfg.n_layer
        logits = model(ids[:, C:], positions[:, C : C + Q], kv, C)[:, -1]  # the question: a second chunk
    assert held(kv) == [budget] * model.cfg.n_layer and kv.seq_len == C + Q
    token = greedy(logits)[:, None]
    for slot in range(C + Q, C + Q + N):
        token = greedy(decode_step(model, token, slot, positions, kv, None))[:, None]
        assert held(kv) == [budget] * model.cfg.n_layer
    assert kv.evicted_tokens == C + Q + N - budget
    assert kv.used_bytes() == budget * 2 * kv.cfg.kv_bytes_per_token(4)


# ---- the rules, computed by hand ----------------------------------------------------------------------------------


def spy_on_attend(monkeypatch, model) -> list[dict]:
    """Record, for every attention call, the queries, the new keys, what the cache held before (keys and positions)
    and the positions it kept afterwards."""
    calls: list[dict] = []
    module = gpt2_module if model.cfg.arch == "gpt2" else llama_module

    def spy(q, k, v, cache, layer, start, mask, is_causal, scale=None):
        def copy(t):  # a decode step writes into the cache's tensors in place: record what they hold now
            return None if t is None else t.clone()

        before = {"prev_k": copy(cache.k[layer]), "prev_pos": copy(cache.pos[layer])}
        y = attend(q, k, v, cache, layer, start, mask, is_causal, scale)
        calls.append({"layer": layer, "start": start, "q": q, "new_k": k, **before, "kept": copy(cache.pos[layer])})
        return y

    monkeypatch.setattr(module, "attend", spy)
    return calls


def attended_by_hand(c: dict, b: int, kv_head: int, dropped: set[int]) -> tuple[torch.Tensor, list[int]]:
    """The keys (S, hd) and positions a call attended for sequence b and one key-value head: what was held before,
    less the positions `dropped` to make room, then the new tokens."""
    T = c["new_k"].shape[2]
    prev = [] if c["prev_pos"] is None else c["prev_pos"][b, kv_head].tolist()
    idx = [i for i, j in enumerate(prev) if j not in dropped]
    old = c["prev_k"][b, kv_head][idx] if prev else c["new_k"][b, kv_head][:0]
    return torch.cat([old, c["new_k"][b, kv_head]]), [prev[i] for i in idx] + list(range(c["start"], c["start"] + T))


def probs_by_hand(q: torch.Tensor, keys: torch.Tensor, key_pos: list[int], start: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) of one head's queries q (T, hd) at positions start.. over keys (S, hd), causal by
    position: (T, S) float64, explicit matmuls."""
    scores = q.double() @ keys.double().T / math.sqrt(q.shape[-1])  # (T, S)
    q_pos = torch.arange(start, start + q.shape[0])[:, None]
    return scores.masked_fill(torch.tensor(key_pos)[None, :] > q_pos, -math.inf).softmax(-1)


def lowest(candidates: list[int], score, n: int) -> set[int]:
    """The n candidate positions of lowest score (`score[position]`: a tensor or a dict)."""
    return set(sorted(candidates, key=lambda j: float(score[j]))[:n])


def run_with_spy(monkeypatch, model, policy, opts, C=14, Q=4, N=6):
    """Context, then a question chunk, then N - 1 decode steps, all recorded."""
    calls = spy_on_attend(monkeypatch, model)
    ids = synthetic_prompts(model.cfg.vocab_size, 2, C + Q, seed=6)
    kv = make_cache(policy, model.cfg, 2, C + Q + N, "cpu", torch.float32, **opts)
    answer_greedily(model, kv, ids[:, :C], ids[:, C:], N)
    return calls


def test_h2o_keeps_the_recent_tokens_and_the_heaviest_hitters_by_accumulated_attention(monkeypatch, model):
    budget, recent = 7, 3
    calls = run_with_spy(monkeypatch, model, "h2o", {"budget": budget, "recent": recent})
    cfg = model.cfg
    group = cfg.n_head // cfg.n_kv_head
    acc = torch.zeros(cfg.n_layer, 2, cfg.n_kv_head, 64, dtype=torch.float64)  # [layer, b, kv head, position]
    dropped_before, dropped_after = 0, 0
    for c in calls:
        layer, start, T = c["layer"], c["start"], c["q"].shape[2]
        end = start + T
        for b in range(2):
            for kv_head in range(cfg.n_kv_head):
                a = acc[layer, b, kv_head]
                prev = [] if c["prev_pos"] is None else c["prev_pos"][b, kv_head].tolist()
                dropped = set()
                if T == 1 and len(prev) >= budget:  # a decode step makes room first, by the scores so far
                    dropped = lowest([j for j in prev if j < end - recent], a, len(prev) + 1 - budget)
                    dropped_before += 1
                keys, pos = attended_by_hand(c, b, kv_head, dropped)
                for h in range(kv_head * group, (kv_head + 1) * group):
                    a[pos] += probs_by_hand(c["q"][b, h], keys, pos, start).sum(0)  # every query's attention
                expected = sorted(pos)
                if len(pos) > budget:  # a multi-token write is reduced after attention
                    old = [j for j in pos if j < end - recent]
                    expected = sorted(set(pos) - lowest(old, a, len(pos) - budget))
                    dropped_after += 1
                assert sorted(c["kept"][b, kv_head].tolist()) == expected, (layer, b, kv_head, start)
    assert dropped_before and dropped_after and len(calls) == cfg.n_layer * (2 + 5)


def test_tova_drops_the_tokens_the_last_query_attends_least_averaged_over_heads(monkeypatch, model):
    budget = 6
    calls = run_with_spy(monkeypatch, model, "tova", {"budget": budget})
    cfg = model.cfg
    group = cfg.n_head // cfg.n_kv_head
    last_mean: dict[tuple[int, int], dict[int, float]] = {}  # (layer, b) -> position -> the last query's mean
    for c in calls:
        layer, start, T = c["layer"], c["start"], c["q"].shape[2]
        newest = start + T - 1
        for b in range(2):
            prev = [] if c["prev_pos"] is None else c["prev_pos"][b, 0].tolist()
            dropped = set()
            if T == 1 and len(prev) >= budget:  # a decode step: drop what the previous query attended least
                dropped = lowest(prev, last_mean[layer, b], len(prev) + 1 - budget)
            last = []
            for h in range(cfg.n_head):
                keys, pos = attended_by_hand(c, b, h // group, dropped)
                last.append(probs_by_hand(c["q"][b, h], keys, pos, start)[-1])
            mean = torch.stack(last).mean(0)  # (S,): the last query's attention, mean over every head of the layer
            last_mean[layer, b] = dict(zip(pos, mean.tolist(), strict=True))
            expected = sorted(pos)
            if len(pos) > budget:
                old = [j for j in pos if j != newest]
                expected = sorted(set(pos) - lowest(old, last_mean[layer, b], len(pos) - budget))
            for kv_head in range(cfg.n_kv_head):  # one choice for every head of the layer
                assert sorted(c["kept"][b, kv_head].tolist()) == expected, (layer, b, kv_head, start)


def pooled_by_hand(x: list[float], kernel: int, pooling: str) -> list[float]:
    """SnapKV's pooling with zero padding, written out: avg divides by the kernel width at the borders too."""
    r = kernel // 2
    padded = [0.0] * r + x + [0.0] * r
    windows = [padded[i : i + kernel] for i in range(len(x))]
    return [sum(w) / kernel if pooling == "avg" else max(w) for w in windows]


@pytest.mark.parametrize(("kernel", "pooling"), [(5, "avg"), (3, "max"), (1, "avg")])
def test_snapkv_keeps_exactly_the_top_positions_of_the_pooled_scores(kernel, pooling):
    """A prompt of 20 tokens, budget 9, window 4: the window plus the 5 prompt positions of highest pooled score
    (attention of the window's queries, mean over those queries and over the 2 query heads of each group)."""
    from kvlib.core.config import get_preset

    cfg = get_preset("tiny-llama")  # 4 query heads, 2 key-value heads
    budget, W, T, hd = 9, 4, 20, cfg.head_dim
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, cfg.n_head, T, hd, generator=gen) * 2
    k = torch.randn(1, cfg.n_kv_head, T, hd, generator=gen) * 2
    kv = make_cache(
        "snapkv", cfg, 1, 32, "cpu", torch.float32, budget=budget, observation=W, kernel=kernel, pooling=pooling
    )
    attend(q, k, k, kv, 0, 0, None, True)
    group = cfg.n_head // cfg.n_kv_head
    for kv_head in range(cfg.n_kv_head):
        heads = range(kv_head * group, (kv_head + 1) * group)
        window = torch.stack(
            [probs_by_hand(q[0, h], k[0, kv_head], list(range(T)), 0)[-W:, : T - W] for h in heads]
        )  # (g, W, T - W)
        score = pooled_by_hand(window.mean(dim=(0, 1)).tolist(), kernel, pooling)
        top = sorted(range(T - W), key=lambda j: -score[j])[: budget - W]
        assert sorted(kv.layer_positions(0)[0, kv_head].tolist()) == sorted(top) + list(range(T - W, T))


def test_snapkv_decode_drops_the_lowest_scoring_prompt_key_and_keeps_generated_tokens(model):
    ids = synthetic_prompts(model.cfg.vocab_size, 1, 12, seed=8)
    out = generate(model, ids, 6, cache="snapkv", cache_options={"budget": 8, "observation": 3})
    pos = out.cache.layer_positions(0).sort(dim=-1).values  # slots in any order (decode writes in place)
    assert pos.shape[2] == 8
    assert bool((pos[..., -5:] == torch.arange(12, 17)).all())  # the 5 tokens fed back since the prompt are kept


def test_streaming_equals_the_window_layout_at_the_same_sink_and_recent_split(model):
    ids = synthetic_prompts(model.cfg.vocab_size, 2, 10, seed=9)
    window = generate(model, ids, 30, cache="window", cache_options={"sink": 3, "window": 9}, keep_logits=True)
    stream = generate(model, ids, 30, cache="streaming", cache_options={"budget": 12, "sink": 3}, keep_logits=True)
    assert torch.equal(stream.tokens, window.tokens)
    torch.testing.assert_close(stream.step_logits, window.step_logits, atol=1e-5, rtol=0)  # keys in another order
    kept = stream.cache.layer_positions(0)
    assert kept[0, 0].tolist() == [0, 1, 2, *range(30, 39)]  # 10 + 29 positions written: the sinks and the last 9


def test_knorm_keeps_the_keys_of_smallest_norm_and_the_newest():
    from kvlib.core.config import get_preset

    cfg = get_preset("tiny")
    kv = make_cache("knorm", cfg, 1, 32, "cpu", torch.float32, budget=5)
    k = torch.randn(1, cfg.n_kv_head, 12, cfg.head_dim, generator=torch.Generator().manual_seed(1))
    kv.update(0, k, k, 0)
    norms = k[0].norm(dim=-1)  # (nkv, 12)
    for h in range(cfg.n_kv_head):
        smallest = sorted(range(11), key=lambda j: norms[h, j])[:4]
        assert kv.layer_positions(0)[0, h].tolist() == [*sorted(smallest), 11]


# ---- attention weights only for the policies that need them ---------------------------------------------------------


def test_layouts_without_the_flag_never_compute_attention_weights(monkeypatch, model):
    def refuse(*args, **kwargs):
        raise AssertionError("attention_received ran for a layout that does not need it")

    monkeypatch.setattr(attention_module, "attention_received", refuse)
    ids = synthetic_prompts(model.cfg.vocab_size, 1, 9, seed=0)
    for layout, opts in (
        ("static", {}),
        ("window", {"window": 4}),
        ("knorm", {"budget": 4}),
        ("streaming", {"budget": 6}),
    ):
        generate(model, ids, 4, cache=layout, cache_options=opts)
    with pytest.raises(AssertionError, match="attention_received"):
        generate(model, ids, 4, cache="h2o", cache_options={"budget": 4})


def test_a_policy_that_needs_attention_refuses_writes_that_bypass_attend():
    from kvlib.core.config import get_preset

    cfg = get_preset("tiny")
    kv = make_cache("tova", cfg, 1, 16, "cpu", torch.float32, budget=4)
    k = torch.zeros(1, cfg.n_kv_head, 3, cfg.head_dim)
    kv.update(0, k, k, 0)
    with pytest.raises(KvlibError, match="attend"):
        kv.update(0, k[:, :, :1], k[:, :, :1], 3)


def test_a_custom_scale_reaches_the_attention_weights():
    """Gemma scales q k^T by its own factor: the weights the policies see use attend's scale, not 1/sqrt(hd)."""
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 2, 3, 8, generator=gen), torch.randn(1, 2, 5, 8, generator=gen)
    got = attention_module.attention_received(q, k, None, False, 0.7, 1)
    expected = torch.softmax(q[:, :, -1:] @ k.transpose(-1, -2) * 0.7, dim=-1)[:, :, 0]  # (1, 2, 5)
    torch.testing.assert_close(got, expected)


def test_the_mask_is_mapped_onto_the_kept_positions():
    from kvlib.core.config import get_preset

    cfg = get_preset("tiny-llama")
    kv = make_cache("streaming", cfg, 2, 16, "cpu", torch.float32, budget=4, sink=1)
    k = torch.zeros(2, cfg.n_kv_head, 7, cfg.head_dim)
    kv.update(0, k, k, 0)  # keeps positions 0, 4, 5, 6
    kv.update(0, k[:, :, :2], k[:, :, :2], 7)  # attends over 0, 4, 5, 6, 7, 8
    slots = torch.tensor([[True] * 9, [False, False, True, True, True, False, True, True, True]])  # (B, 9)
    mask = slots[:, None, None, :] & torch.ones(2, 1, 2, 9, dtype=torch.bool).tril(7)
    got = kv.visible_mask(0, mask, cfg.n_head)
    assert got.shape == (2, cfg.n_head, 2, 6)
    assert got[1, 3].tolist() == [[False, True, False, True, True, False], [False, True, False, True, True, True]]


@pytest.mark.parametrize("policy", POLICIES)
def test_left_padding_leaves_the_other_sequences_as_if_alone(model, policy):
    """With padding, attention masks the kept keys by their positions (visible_mask) at every step once tokens are
    evicted; a sequence without padding in the batch then decodes exactly as it does alone."""
    from kvlib.models.prompts import left_padded_prompts

    ids, mask = left_padded_prompts(model.cfg.vocab_size, [5, 12], seed=2)
    opts = options(policy, 8)
    batch = generate(model, ids, 10, cache=policy, attention_mask=mask, cache_options=opts, keep_logits=True)
    alone = generate(model, ids[1:], 10, cache=policy, cache_options=opts, keep_logits=True)
    assert torch.equal(batch.tokens[1], alone.tokens[0])
    torch.testing.assert_close(batch.step_logits[:, 1], alone.step_logits[:, 0], atol=1e-5, rtol=0)
    assert bool(batch.step_logits.isfinite().all()) and batch.cache.kept_tokens() == 8


# ---- bad options ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "opts", "match"),
    [
        ("h2o", {"budget": 0}, "budget"),
        ("tova", {"budget": -3}, "budget"),
        ("knorm", {"budget": 2.0}, "budget"),
        ("h2o", {"budget": 4, "recent": 5}, "budget must be >= sink \\+ recent"),
        ("streaming", {"budget": 4, "sink": 4}, "budget must be > sink"),
        ("snapkv", {"budget": 8, "observation": 9}, "budget must be >= observation"),
        ("snapkv", {"kernel": 4}, "kernel must be an odd"),
        ("snapkv", {"pooling": "mean"}, "pooling"),
        ("tova", {"recent": 2}, "no option 'recent'"),
        ("streaming", {"window": 8}, "no option 'window'"),
    ],
)
def test_bad_options_are_refused_with_one_line(policy, opts, match):
    from kvlib.core.config import get_preset

    with pytest.raises(KvlibError, match=match) as e:
        make_cache(policy, get_preset("tiny"), 1, 8, "cpu", torch.float32, **opts)
    assert "\n" not in str(e.value)


# ---- SnapKV in the pass-key setting: the question in the window, each row of a batch on its own ---------------------


@pytest.mark.parametrize("question_aware", [True, False])
def test_snapkv_window_holds_the_question_and_rows_of_a_replayed_batch_select_as_alone(question_aware):
    """Checked when SnapKV missed keys the full cache retrieved (notebook 09): question-aware, the observation window
    is the prompt's last `observation` positions, the question's included, in every head; question-after, the
    question is written after the context's compression and kept whole. And the pass-key grid's batch (prompts of one
    length, prefilled once and replayed) keeps, in each row, exactly the positions that prompt keeps alone."""
    from kvlib.decoding.questions import question_chunk
    from kvlib.decoding.replay import record_prefill, replay

    llama = load("tiny-llama", weights="random", seed=0, with_hf=False).model
    C, Q, obs, budget = 40, 6, 8, 16
    ids = synthetic_prompts(llama.cfg.vocab_size, 3, C + Q, seed=11)
    opts = {"budget": budget, "observation": obs}

    def kept(rows: torch.Tensor) -> list[torch.Tensor]:
        rec = record_prefill(llama, rows, 4)
        kv = make_cache("snapkv", llama.cfg, rows.shape[0], C + Q + 4, "cpu", torch.float32, **opts)
        replay(rec, kv, None if question_aware else C)
        if not question_aware:
            question_chunk(llama, kv, rows, C)
        return [kv.layer_positions(layer) for layer in range(llama.cfg.n_layer)]

    batch = kept(ids)
    for row in range(3):
        alone = kept(ids[row : row + 1])
        for layer, pos in enumerate(batch):
            assert torch.equal(pos[row], alone[layer][0]), (row, layer)
    window = torch.arange(C + Q - obs, C + Q)  # the question (C .. C + Q - 1) and the context's last obs - Q tokens
    for pos in batch:
        assert pos.shape[2] == budget
        held = (pos[..., None] == torch.arange(C, C + Q)).any(dim=2)  # (B, nkv, Q): the question's positions
        assert bool(held.all())
        if question_aware:
            assert bool((pos[..., None] == window).any(dim=2).all())
