"""Notebook 04's page, its sliding-window sections: Gemma 3's hybrid cache (a model trained with a window: measured
bytes against the per-layer formula, the figure, the summary and the sentence) and the windows of published
architectures (computed, with which runtimes keep only the window). The rest of the page is kvlib.study.memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns

from kvlib import study
from kvlib.caches.base import REFERENCE
from kvlib.core.config import ModelConfig
from kvlib.models.loading import LoadedModel, load
from kvlib.study import costs, plotting

MIB, GIB = 2**20, 2**30
HYBRID_LAYOUTS = ["static", "hybrid"]  # the hybrid model's caches: a full cache of the same shape, and the hybrid one


# ---- a model trained with a window: Gemma 3's hybrid cache ----------------------------------------------------


def load_hybrid(
    lm: LoadedModel, hybrid_model: str, hybrid_weights: str, weights: str, device: str, dtype: str, seed: int
) -> LoadedModel:
    """The hybrid model: the page's own `lm` when it is that model with those weights, else loaded (kvlib only)."""
    if hybrid_model == lm.cfg.name and hybrid_weights == weights:
        return lm
    return load(hybrid_model, hybrid_weights, device, dtype, seed, with_hf=False)


def weights_note(hlm: LoadedModel) -> str:
    """What the hybrid model's weights mean for its bytes (random weights: nothing)."""
    if hlm.weights == "random":
        return "random weights: the bytes a cache holds do not depend on the weights' values"
    return f"{hlm.weights} weights"


def n_sliding_layers(cfg: ModelConfig) -> int:
    """How many of `cfg`'s layers are sliding-window layers."""
    return sum(t == costs.SLIDING for t in cfg.layer_types)


def hybrid_grid(hcfg: ModelConfig, max_tokens: int, ratio_at: list[int], measured_lens: list[int]) -> list[int]:
    """The lengths the hybrid curve is computed at: 48 log-spaced from 16 to `max_tokens`, the reported and the
    measured lengths, the window and one past it; sorted, each in 1..max_tokens."""
    w = hcfg.sliding_window
    grid = np.unique(
        np.concatenate([np.geomspace(16, max_tokens, 48).astype(int), ratio_at, measured_lens, [w, w + 1]])
    )
    return [int(t) for t in grid if 0 < t <= max_tokens]


def hybrid_bytes(
    hlm: LoadedModel,
    hcfg: ModelConfig,
    measured_lens: list[int],
    max_tokens: int,
    ratio_at: list[int],
    seed: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(computed, measured): `costs.hybrid_cache_bytes` of `hcfg` at batch 1 over `hybrid_grid`, one row per
    (tokens, layout); and `costs.measured_cache_bytes` of the real static and hybrid caches after a prefill of each
    of `measured_lens` tokens, batch 1, one row per (layout, tokens)."""
    grid = hybrid_grid(hcfg, max_tokens, ratio_at, measured_lens)
    computed = costs.hybrid_cache_bytes(hcfg, grid, 1, hlm.dtype)
    measured = costs.measured_cache_bytes(hlm, HYBRID_LAYOUTS, [1], measured_lens, seed)
    return computed, measured


def _hybrid_rows(computed: pd.DataFrame) -> pd.DataFrame:
    """The hybrid layout's rows of `costs.hybrid_cache_bytes` (every layout but the reference full cache)."""
    return computed[computed["layout"] != REFERENCE]


def _held(hmeasured: pd.DataFrame) -> pd.DataFrame:
    """Held bytes of the measured hybrid-model caches, one row per length, one column per layout."""
    return hmeasured.pivot(index="tokens", columns="layout", values="held_bytes")


def hybrid_figure(computed: pd.DataFrame, hmeasured: pd.DataFrame, hcfg: ModelConfig, dtype_name: str) -> Any:
    """Two panels: MiB of the full and the hybrid cache against tokens (computed lines, measured points, log
    scales), and hybrid / full bytes (computed line, measured points, the window dotted). The Figure."""
    w, n_sliding = hcfg.sliding_window, n_sliding_layers(hcfg)
    fig, axes = plotting.figure(
        ncols=2, width=6.5, title=f"{hcfg.name}: hybrid cache vs a full cache of the same shape, {dtype_name}"
    )
    colors = plotting.palette(HYBRID_LAYOUTS)
    for layout, name in zip(
        HYBRID_LAYOUTS, ("full cache (static)", f"hybrid (window {w} on {n_sliding} layers)"), strict=True
    ):
        c = computed[computed["layout"] == layout]
        axes[0].plot(c["tokens"], c["kv_mib"], color=colors[layout], label=f"{name}, computed")
        m = hmeasured[hmeasured["layout"] == layout]
        axes[0].scatter(
            m["tokens"], m["held_mib"], color=colors[layout], edgecolor="black", zorder=3, label=f"{name}, measured"
        )
    axes[0].set_xscale("log", base=2)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    plotting.label(
        axes[0], "Cache size against length", "tokens per sequence (count, log scale)", "KV cache (MiB, log scale)"
    )
    ratio, held = _hybrid_rows(computed), _held(hmeasured)
    axes[1].plot(ratio["tokens"], ratio["ratio_to_full"], color=colors["hybrid"], label="hybrid / full, computed")
    axes[1].scatter(
        held.index,
        held["hybrid"] / held["static"],
        color=colors["hybrid"],
        edgecolor="black",
        zorder=3,
        label="hybrid / full, measured",
    )
    axes[1].axvline(w, color="grey", linestyle=":", linewidth=1)
    axes[1].set_xscale("log", base=2)
    axes[1].set_ylim(0, 1.05)
    axes[1].legend(fontsize=8)
    plotting.label(
        axes[1], "Hybrid / full", "tokens per sequence (count, log scale)", "hybrid bytes / full-cache bytes (ratio)"
    )
    return fig


def hybrid_caption(hcfg: ModelConfig, hlm: LoadedModel) -> str:
    """The hybrid figure's caption: computed lines, measured points (with what the weights mean), the window."""
    return (
        f"Lines: the per-layer formula (computed). Points: bytes held by the real caches after a prefill of that many "
        f"tokens, batch 1, {weights_note(hlm)}; byte counts do not vary between runs, so there are no error bars. "
        f"Dotted line: the window ({hcfg.sliding_window} tokens)."
    )


def hybrid_summary(computed: pd.DataFrame, ratio_at: list[int]) -> pd.DataFrame:
    """One row per length of `ratio_at`: the full and the hybrid cache (MiB), the hybrid's split between full and
    sliding layers (MiB), and hybrid / full (computed)."""
    at = _hybrid_rows(computed).set_index("tokens").loc[ratio_at]
    full_at = computed[computed["layout"] == REFERENCE].set_index("tokens").loc[ratio_at]
    return pd.DataFrame(
        {
            "tokens": ratio_at,
            "full cache (MiB)": full_at["kv_mib"].to_numpy(),
            "hybrid (MiB)": at["kv_mib"].to_numpy(),
            "of which full layers (MiB)": at["bytes_full_layers"].to_numpy() / MIB,
            "of which sliding layers (MiB)": at["bytes_sliding_layers"].to_numpy() / MIB,
            "hybrid / full": at["ratio_to_full"].to_numpy(),
        }
    )


def hybrid_headlines(
    computed: pd.DataFrame, hmeasured: pd.DataFrame, hcfg: ModelConfig, ratio_at: list[int]
) -> list[dict[str, Any]]:
    """Headline rows (keyword arguments of `Outputs.headline`): hybrid / full bytes at each length of `ratio_at`
    (computed; the longest on the index), each noting in how many measured caches held == formula."""
    exact = int((hmeasured["held_bytes"] == hmeasured["formula_bytes"]).sum())
    at = _hybrid_rows(computed).set_index("tokens").loc[ratio_at]
    return [
        dict(
            metric=f"hybrid_over_full_{t}",
            label=f"{hcfg.name} hybrid cache / full cache at {t:,} tokens",
            value=r,
            unit="ratio",
            headline=t == max(ratio_at),
            note=f"computed from the per-layer formula; measured == formula in {exact} of {len(hmeasured)} caches",
        )
        for t, r in zip(ratio_at, at["ratio_to_full"], strict=True)
    ]


def hybrid_sentence(computed: pd.DataFrame, hmeasured: pd.DataFrame, hcfg: ModelConfig, ratio_at: list[int]) -> str:
    """Markdown: the model's sliding and full layers, in how many measured caches held == formula, the measured
    hybrid / full at the longest measured length, the computed ratio at each length of `ratio_at`, and the limit
    the ratio tends to (the full layers' share)."""
    w, n_sliding = hcfg.sliding_window, n_sliding_layers(hcfg)
    exact = int((hmeasured["held_bytes"] == hmeasured["formula_bytes"]).sum())
    held = _held(hmeasured)
    largest = held.index.max()
    m_ratio = held.loc[largest, "hybrid"] / held.loc[largest, "static"]
    summary = hybrid_summary(computed, ratio_at)
    last = summary.iloc[-1]
    return (
        f"{n_sliding} of {hcfg.name}'s {hcfg.n_layer} layers slide over a window of {w} tokens; the other "
        f"{hcfg.n_layer - n_sliding} attend to every token. "
        f"In **{exact} of {len(hmeasured)}** measured caches the bytes held equal the per-layer formula exactly"
        + ("." if exact == len(hmeasured) else f" (largest ratio {hmeasured['held_over_formula'].max():.3f}).")
        + f" Measured after {largest:,} tokens, the hybrid cache holds "
        f"{study.fmt(held.loc[largest, 'hybrid'] / MIB)} MiB against {study.fmt(held.loc[largest, 'static'] / MIB)} "
        f"MiB for a full cache ({m_ratio:.1%}). "
        + "Computed: "
        + "; ".join(
            f"at {int(r['tokens']):,} tokens {r['hybrid / full']:.1%} of the full cache "
            f"({study.fmt(r['hybrid (MiB)'])} vs {study.fmt(r['full cache (MiB)'])} MiB)"
            for _, r in summary.iterrows()
        )
        + f". Past the window only the {hcfg.n_layer - n_sliding} full-attention layers grow, so the ratio tends to "
        f"{(hcfg.n_layer - n_sliding) / hcfg.n_layer:.1%} (their share of the layers); at {int(last['tokens']):,} "
        f"tokens the full layers hold {last['of which full layers (MiB)'] / last['hybrid (MiB)']:.0%} of the hybrid "
        "cache."
    )


# ---- windows in published architectures ----------------------------------------------------------------------

WINDOWED_COLUMNS = ["architecture", "sliding_window", "n_sliding_layers", "n_global_layers", "context_len",
                    "kv_bytes_full_cache", "kv_bytes_windowed", "windowed_over_full", "config_source"]  # fmt: skip
FULL_BARS, WINDOWED_BARS = "full cache (every layer every token)", "hybrid: window on sliding layers"


def _sliding(windowed: pd.DataFrame) -> pd.DataFrame:
    """The rows of `costs.kv_bytes_table` with sliding-window layers."""
    return windowed[windowed["n_sliding_layers"] > 0]


def windowed_figure(windowed: pd.DataFrame, window_context: int) -> Any:
    """Two bars per architecture with sliding layers (`costs.kv_bytes_table` at `window_context` tokens): the full
    cache and the windowed one, GiB per sequence. The Figure."""
    slide = _sliding(windowed)
    bars = pd.concat(
        [
            slide.assign(cache=FULL_BARS, gib=slide["kv_bytes_full_cache"] / GIB),
            slide.assign(cache=WINDOWED_BARS, gib=slide["kv_bytes_windowed"] / GIB),
        ]
    )
    fig, ax = plotting.figure(width=8, height=4.5, title=f"KV cache at {window_context:,} tokens, 16-bit, batch 1")
    palette = {FULL_BARS: plotting.color("static"), WINDOWED_BARS: plotting.color("hybrid")}
    sns.barplot(data=bars, y="architecture", x="gib", hue="cache", ax=ax, palette=palette, saturation=1)
    for b in ax.containers:
        ax.bar_label(b, fmt="%.2f", padding=2, fontsize=8)
    plotting.label(ax, "", "KV cache per sequence (GiB)", "architecture (name)")
    plotting.legend_below(ax)
    return fig


def windowed_caption(window_context: int) -> str:
    """The windowed figure's caption."""
    return (
        f"Computed from published configs (2 bytes per element) at {window_context:,} tokens, not measured; the "
        "study's own gemma3-270m preset included. No error bars."
    )


def windowed_table(windowed: pd.DataFrame) -> pd.DataFrame:
    """The architectures with sliding layers: their windows and layers, full and windowed cache (GiB), the ratio
    and where the shapes come from; rounded to 3 decimals, as the page shows it."""
    slide = _sliding(windowed)
    return (
        slide[WINDOWED_COLUMNS]
        .assign(
            kv_bytes_full_cache=slide["kv_bytes_full_cache"] / GIB, kv_bytes_windowed=slide["kv_bytes_windowed"] / GIB
        )
        .rename(columns={"kv_bytes_full_cache": "full cache (GiB)", "kv_bytes_windowed": "windowed (GiB)"})
        .round(3)
    )


def sliding_runtimes() -> pd.DataFrame:
    """`costs.SLIDING_RUNTIMES` as a table: one row per runtime, what it holds on a sliding layer, and the source."""
    return pd.DataFrame(costs.SLIDING_RUNTIMES)


def windowed_sentence(windowed: pd.DataFrame, window_context: int) -> str:
    """Markdown: which architecture the window saves most on, Mistral-7B-v0.1's ratio (when it is not that one),
    and Gemma 2's ratios; each with its own shorter context where that limits it."""
    slide = _sliding(windowed)
    best = slide.sort_values("windowed_over_full").iloc[0]
    mistral = windowed.set_index("architecture").loc["Mistral-7B-v0.1"]
    gemma2 = slide[slide["family"].str.startswith("Gemma 2")]

    def at(r: pd.Series) -> str:
        """A row's ratio, with the context it was computed at when the model's own context is shorter."""
        short = r["context_tokens"] < window_context
        ratio = f"{r['windowed_over_full']:.1%}"
        return ratio + (f" (at its {int(r['context_tokens']):,}-token context)" if short else "")

    return (
        f"At {window_context:,} tokens (or a model's own shorter context) the window saves most on "
        f"**{best['architecture']}**: its cache is {at(best)} of a full one. "
        + (
            ""
            if best["architecture"] == "Mistral-7B-v0.1"
            else f"Mistral-7B-v0.1, with its window on every layer, keeps {at(mistral)}. "
        )
        + "Gemma 2's global layers (half of them) keep every token: "
        + ", ".join(f"{r['architecture']} {at(r)}" for _, r in gemma2.iterrows())
        + ". These figures hold where the runtime keeps only the window on sliding layers (table above)."
    )
