"""Notebook 01's page: what a KV cache is. One attention head with toy sizes, decoded with and without a cache (the
same outputs, fewer projections), the same proof on the whole model (the same tokens with and without the cache),
and the work each way does as the text grows, counted from the model's shapes (kvlib.study.costs.decode_work).

The concept: keys and values of earlier tokens never change, so a cache stores each once and a decode step does one
token's work instead of the whole sequence's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import seaborn as sns
import torch

from kvlib import study
from kvlib.core.config import ModelConfig
from kvlib.models.decode import Generation, generate
from kvlib.models.loading import LoadedModel
from kvlib.models.prompts import prompt_source, prompts_for
from kvlib.study import plotting

# ---- parameters -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parameters:
    """Notebook 01's own parameters, checked, and the model's configuration (read before any model is loaded)."""

    toy_len: int  # tokens in the one-head toy example
    toy_dim: int  # the toy head's size
    prompt_len: int  # tokens of the prompt, for the model check and the counted generation
    max_new_tokens: int  # new tokens of the counted generation
    check_new_tokens: int  # new tokens the model check generates with and without a cache
    cfg: ModelConfig  # the configuration of the notebook's `model`


def check_parameters(
    model: str, toy_len: Any, toy_dim: Any, prompt_len: Any, max_new_tokens: Any, check_new_tokens: Any
) -> Parameters:
    """The notebook's parameters checked (papermill's text included), in the order the notebook names them; a
    one-line KvlibError naming the first bad one, or a run that would not fit the model's context."""
    toy_len = study.positive_int("toy_len", toy_len)
    toy_dim = study.positive_int("toy_dim", toy_dim)
    prompt_len = study.positive_int("prompt_len", prompt_len)
    max_new_tokens = study.positive_int("max_new_tokens", max_new_tokens)
    check_new_tokens = study.positive_int("check_new_tokens", check_new_tokens)
    cfg = study.model_config(model)
    study.check_context(cfg, prompt_len, max_new_tokens)
    study.check_context(cfg, prompt_len, check_new_tokens, "prompt_len + check_new_tokens")
    return Parameters(toy_len, toy_dim, prompt_len, max_new_tokens, check_new_tokens, cfg)


# ---- one head, toy sizes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Toy:
    """The toy head decoded both ways: `steps` has one row per (mode, step) with the key/value vectors projected and
    stored at that step (counts); `naive` and `cached` are the head's outputs, (toy_len, toy_dim) float64 each."""

    steps: pd.DataFrame
    naive: torch.Tensor
    cached: torch.Tensor


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One query (d,) over keys and values (t, d): softmax(keys q / sqrt(d)) averages the values; returns (d,)."""
    weights_t = torch.softmax(keys @ q / q.shape[0] ** 0.5, dim=0)  # (t,)
    return weights_t @ values  # (d,)


def toy_attention(seed: int, toy_len: int, toy_dim: int) -> Toy:
    """One attention head on `toy_len` seeded random token vectors of size `toy_dim` (float64), decoded step by step
    without a cache (at step t the keys and values of tokens 0..t are projected again) and with one (only the new
    token's key and value are projected and appended)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(toy_len, toy_dim, generator=gen, dtype=torch.float64)  # (T, d): one row per token
    w_q, w_k, w_v = (torch.randn(toy_dim, toy_dim, generator=gen, dtype=torch.float64) for _ in range(3))

    # Without a cache: at step t, the keys and values of tokens 0..t are projected again.
    naive_out, log = [], []
    for t in range(toy_len):
        keys, values = x[: t + 1] @ w_k, x[: t + 1] @ w_v  # (t+1, d) each, all recomputed
        naive_out.append(attend(x[t] @ w_q, keys, values))
        log.append({"mode": "naive", "step": t, "kv_projected": 2 * (t + 1), "kv_stored": 0})

    # With a cache: project only the new token's key and value, append them, attend over everything stored.
    k_cache, v_cache, cached_out = [], [], []
    for t in range(toy_len):
        k_cache.append(x[t] @ w_k)
        v_cache.append(x[t] @ w_v)
        cached_out.append(attend(x[t] @ w_q, torch.stack(k_cache), torch.stack(v_cache)))
        log.append({"mode": "cached", "step": t, "kv_projected": 2, "kv_stored": 2 * len(k_cache)})

    return Toy(pd.DataFrame(log), torch.stack(naive_out), torch.stack(cached_out))


def toy_table(toy: Toy) -> pd.DataFrame:
    """Key/value vectors projected and stored per step, one column per (count, mode): the table the page shows."""
    return toy.steps.pivot(index="step", columns="mode", values=["kv_projected", "kv_stored"])


def toy_sentence(toy: Toy) -> str:
    """Markdown: how many key/value vectors each loop projected, and whether both gave the same outputs (to float64
    rounding, 1e-12) or, loudly, by how much they differ."""
    toy_len = len(toy.naive)
    toy_diff = (toy.naive - toy.cached).abs().max().item()
    naive_kv, cached_kv = toy.steps.groupby("mode")["kv_projected"].sum()[["naive", "cached"]]
    same = torch.allclose(toy.naive, toy.cached, rtol=0, atol=1e-12)
    return (
        f"Over {toy_len} steps the naive loop projected **{naive_kv}** key/value vectors, the cached loop "
        f"**{cached_kv}** (and stored {cached_kv}). "
        + (
            f"Both produced the same outputs: the largest difference is {toy_diff:.1e} (float64 rounding)."
            if same
            else f"**The outputs differ** by up to {toy_diff:.3e}: the cached loop is wrong."
        )
    )


# ---- the same proof on the whole model ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCheck:
    """One prompt decoded greedily without a cache and with the static cache. `ids`: the prompt, (1, prompt_len);
    `tokens`: one row per new token (step, both token ids, and its text when the model has a tokenizer);
    `continuations`: the two decoded continuations, one row per decoding, or None when the text means nothing
    (no tokenizer, or random weights)."""

    ids: torch.Tensor
    naive: Generation
    cached: Generation
    tokens: pd.DataFrame
    continuations: pd.DataFrame | None


def real_text(lm: LoadedModel) -> bool:
    """Whether the model's tokens are text worth showing: a tokenizer and pretrained weights (random weights: the
    tokens mean nothing)."""
    return lm.tokenizer is not None and lm.weights == "pretrained"


def model_check(lm: LoadedModel, prompt_len: int, new_tokens: int, seed: int) -> ModelCheck:
    """Decode one prompt of `prompt_len` tokens (a passage of the novel with a tokenizer, else synthetic ids) for
    `new_tokens` steps with cache="none" (the whole sequence every step) and cache="static", keeping the logits."""
    ids = prompts_for(lm.cfg.vocab_size, lm.tokenizer, 1, prompt_len, seed, lm.device)
    g_naive = generate(lm.model, ids, new_tokens, cache="none", keep_logits=True)
    g_cached = generate(lm.model, ids, new_tokens, cache="static", keep_logits=True)
    tokens = pd.DataFrame(
        {
            "step": range(new_tokens),
            "naive token": g_naive.tokens[0].tolist(),
            "cached token": g_cached.tokens[0].tolist(),
        }
    )
    if lm.tokenizer is not None:
        tokens["text"] = [lm.tokenizer.decode([t]) for t in tokens["cached token"]]
    continuations = None
    if real_text(lm):
        continuations = pd.DataFrame(
            {
                "decoding": ["naive (no cache)", "static cache"],
                "continuation": [lm.tokenizer.decode(g.tokens[0].tolist()) for g in (g_naive, g_cached)],
            }
        )
    return ModelCheck(ids, g_naive, g_cached, tokens, continuations)


def _quoted(tokenizer: Any, token_ids: torch.Tensor) -> str:
    """One line of text, as a Markdown quote (newlines of the novel shown as ⏎)."""
    text = tokenizer.decode(token_ids.tolist()).replace("\n", " ⏎ ")
    return "> " + text.replace("*", "\\*").replace("_", "\\_")


def model_check_sentence(lm: LoadedModel, check: ModelCheck) -> str:
    """Markdown: the model and run, whether the tokens are identical (loudly when they differ), the largest logit
    difference against the logits' scale; with real text, the prompt and both continuations quoted."""
    prompt_len, new_tokens = check.ids.shape[1], len(check.tokens)
    tokens_equal = bool(torch.equal(check.naive.tokens, check.cached.tokens))
    logit_diff = (check.naive.step_logits - check.cached.step_logits).abs().max().item()
    logit_scale = check.naive.step_logits.abs().max().item()
    summary = (
        f"{lm.cfg.name} ({lm.weights} weights, {lm.dtype_name}, {lm.device}), a prompt of {prompt_len} tokens "
        f"({prompt_source(lm.tokenizer)}), {new_tokens} new tokens: "
        + ("**the tokens are identical**" if tokens_equal else "**the tokens DIFFER**")
        + f"; the largest logit difference is {logit_diff:.2e} (logits reach {logit_scale:.1f})."
    )
    if real_text(lm):
        summary += (
            f"\n\nThe prompt, {prompt_len} tokens of the novel:\n\n{_quoted(lm.tokenizer, check.ids[0])}\n\n"
            "Continued without a cache (every step recomputes all keys and values):\n\n"
            f"{_quoted(lm.tokenizer, check.naive.tokens[0])}\n\n"
            f"Continued with the static cache:\n\n{_quoted(lm.tokenizer, check.cached.tokens[0])}\n\n"
            + (
                "The same text, token for token (the table below lists the token ids)."
                if tokens_equal
                else "**The two continuations differ**: the cached path is wrong."
            )
        )
    return summary


# ---- counting the work ----------------------------------------------------------------------------------------

WORK_CAPTION = (
    "Counted from the model's shapes, not measured: no error bars. Linear axes, so that the shapes of growth show: "
    "the cached curves sit near zero beside the naive ones. Steps after the prefill; the right panel includes "
    "the prefill."
)


def work_figure(work: pd.DataFrame, model: str) -> Any:
    """Three panels from `costs.decode_work` rows: K/V vectors projected per step and attention FLOPs per step (steps
    after the prefill), and the cumulative total FLOPs; one line per mode, linear axes. Returns the Figure."""
    prompt_len = int(work.loc[work["step"] == 0, "position"].iloc[0])
    title = f"Work per decode step and in total, {model}, prompt {prompt_len}"
    fig, axes = plotting.figure(ncols=3, width=5, title=title)
    later = work[work["step"] > 0]  # step 0 (the prefill) is the same in both modes and would dwarf the rest
    modes = {"palette": plotting.palette(work["mode"]), "hue_order": plotting.order(work["mode"])}
    sns.lineplot(data=later, x="position", y="kv_projections", hue="mode", ax=axes[0], **modes)
    plotting.label(axes[0], "K/V vectors projected per step", "tokens in the sequence (count)", "K/V vectors (count)")
    div, unit = plotting.scaled(later["attention_flops"], "FLOP")
    f = later.assign(f=later["attention_flops"] / div)
    sns.lineplot(data=f, x="position", y="f", hue="mode", ax=axes[1], **modes)
    plotting.label(axes[1], "Attention FLOPs per step", "tokens in the sequence (count)", f"attention ({unit})")
    div, unit = plotting.scaled(work["cumulative_total_flops"], "FLOP")
    totals = work.assign(f=work["cumulative_total_flops"] / div, new_tokens=work["step"] + 1)
    sns.lineplot(data=totals, x="new_tokens", y="f", hue="mode", ax=axes[2], **modes)
    plotting.label(axes[2], "Total FLOPs so far", "new tokens generated (count)", f"cumulative work ({unit})")
    for ax in axes:  # the point is the shape of growth (linear against constant), which a log scale would flatten
        plotting.keep_linear(ax)
    return fig


def _steps(work: pd.DataFrame) -> tuple[int, int]:
    """(prompt_len, max_new_tokens) of `costs.decode_work` rows."""
    return int(work.loc[work["step"] == 0, "position"].iloc[0]), int(work["step"].max()) + 1


def work_headlines(work: pd.DataFrame, model: str) -> list[dict[str, Any]]:
    """The page's headline rows (keyword arguments of `Outputs.headline`): K/V projections and total FLOPs of the
    whole generation, naive over cached (ratios, counted); none with fewer than 2 new tokens (nothing to compare)."""
    prompt_len, max_new_tokens = _steps(work)
    if max_new_tokens < 2:
        return []
    last = work[work["step"] == max_new_tokens - 1].set_index("mode")
    note = f"{model}, prompt {prompt_len}, {max_new_tokens} new tokens"
    kv_ratio = last.loc["naive", "cumulative_kv_projections"] / last.loc["cached", "cumulative_kv_projections"]
    flop_ratio = last.loc["naive", "cumulative_total_flops"] / last.loc["cached", "cumulative_total_flops"]
    return [
        dict(metric="kv_projection_ratio", label="K/V projections, naive / cached (counted)", value=kv_ratio,
             unit="x", note=note),
        dict(metric="flop_ratio", label="Total FLOPs, naive / cached (counted)", value=flop_ratio, unit="x",
             note=note),
    ]  # fmt: skip


def work_sentence(work: pd.DataFrame) -> str:
    """Markdown from `costs.decode_work` rows: how many K/V projections and FLOPs the naive decoder does against the
    cached one, and how each total grows from half the new tokens to all of them; with fewer than 2 new tokens,
    that there is no decode step to compare."""
    prompt_len, max_new_tokens = _steps(work)
    last = work[work["step"] == max_new_tokens - 1].set_index("mode")
    half = work[work["step"] == max_new_tokens // 2 - 1].set_index("mode")
    if max_new_tokens < 2:  # no decode step: both decoders only prefill, so a ratio would compare a value with itself
        return (
            f"With max_new_tokens = {max_new_tokens} there is no decode step: both decoders only prefill the "
            f"{prompt_len}-token prompt and project the same {last.loc['naive', 'cumulative_kv_projections']:,} "
            "key/value vectors, so there is nothing to compare. Generate at least 2 new tokens to see the difference."
        )
    half_n, grow = max_new_tokens // 2, max_new_tokens / (max_new_tokens // 2)
    kv_ratio = last.loc["naive", "cumulative_kv_projections"] / last.loc["cached", "cumulative_kv_projections"]
    flop_ratio = last.loc["naive", "cumulative_total_flops"] / last.loc["cached", "cumulative_total_flops"]
    step_ratio = last.loc["naive", "total_flops"] / last.loc["cached", "total_flops"]
    return (
        f"Generating {max_new_tokens} tokens after a {prompt_len}-token prompt, the naive decoder projects "
        f"{last.loc['naive', 'cumulative_kv_projections']:,} key/value vectors, the cached one "
        f"{last.loc['cached', 'cumulative_kv_projections']:,}: **{kv_ratio:.0f}x** fewer with the cache. "
        f"In all it does **{flop_ratio:.1f}x** the FLOPs, and its last step alone costs {step_ratio:.0f}x a cached "
        f"step. Going from {half_n} to {max_new_tokens} new tokens ({grow:.3g}x) multiplies the naive total "
        f"by {last.loc['naive', 'cumulative_total_flops'] / half.loc['naive', 'cumulative_total_flops']:.2f} "
        f"and the cached total by "
        f"{last.loc['cached', 'cumulative_total_flops'] / half.loc['cached', 'cumulative_total_flops']:.2f} "
        f"(growth with the square of the length would give {grow**2:.3g}, linear growth {grow:.3g}; the "
        "prompt's fixed share pulls both down). The naive total grows quadratically because each step redoes "
        "every earlier token; the cached total grows about linearly because each step does one token's work "
        "plus attention over the cache."
    )
