"""Notebook 10, "The engine you would run": llama.cpp's KV cache types beside kvlib's quantized layouts and Hugging
Face, on the same GGUF weights.

- `quality`: llama.cpp's cache types on the study's text against llama.cpp's own f16 cache (KL divergence with its
  interval, top-1 agreement, perplexity change), with the floor (f16 with flash attention off against on) and the
  quantized types without llama.cpp's Hadamard rotation; kvlib's int8/int4 layouts (with and without rotation) on
  the dequantized weights against kvlib's exact cache; and the engines against each other (llama.cpp f16 against
  kvlib's exact cache on the same token ids: the weights' precision differs, so they agree closely, not exactly).
- `speed`: llama.cpp's decode step at growing contexts per cache type (one prefill per type, extended context by
  context; steps interleaved across types), beside kvlib's and Hugging Face's steps at batch 1 (kvlib.measure.bench
  .long, where the model has no sliding window).
- `published`: llama.cpp's own published figures (kvlib/data/published.yaml), marked as theirs.
Every sentence is computed from the tables.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from matplotlib.figure import Figure

from kvlib.core import checks
from kvlib.core.config import PRESETS
from kvlib.core.errors import KvlibError
from kvlib.core.stats import Spread
from kvlib.measure.bench.long import LongRow, measure_long
from kvlib.measure.divergence import Divergence, divergence, within_floor
from kvlib.measure.harness import ModelPool
from kvlib.measure.llamacpp import BASELINE, FLOOR, CacheSetting, compare, score, token_ids
from kvlib.measure.perplexity import fast_applies, perplexity
from kvlib.models import llamacpp
from kvlib.models.gguf_cache import cache_root
from kvlib.models.loading import LoadedModel
from kvlib.models.prompts import corpus_text, synthetic_prompts
from kvlib.study import plotting, published
from kvlib.study.long_context import PATHS

QUALITY_COLUMNS = ["model", "engine", "variant", "kind", "bits_per_value", "bytes_per_token", "vs_16bit_pct",
                   "kld_mean", "kld_lo", "kld_hi", "top1_pct", "perplexity", "ppl_change_pct", "tokens",
                   "time_s"]  # fmt: skip
SPEED_COLUMNS = ["model", "engine", "variant", "context", "round", "step_ms"]
KVLIB_VARIANTS = {  # kvlib's quantized layout on the dequantized weights: variant -> options
    "int8": {"bits": 8},
    "int4": {"bits": 4},
    "int4 rotated": {"bits": 4, "rotate": True},
}


@dataclass(frozen=True)
class EnginePage:
    """The page's checked parameters."""

    models: list[str]
    weights: str
    tokens: int
    cache_types: list[str]
    unrotated: list[str]
    speed_models: list[str]
    contexts: list[int]
    speed_types: list[str]
    rounds: int
    seed: int


def check_parameters(
    *, model: str, more_models: Any, weights: str, device: str, dtype: str, seed: int, tokens: Any,
    cache_types: Any, unrotated: Any, speed_models: Any, contexts: Any, speed_types: Any, rounds: Any,
) -> EnginePage:  # fmt: skip
    """Every parameter checked before anything runs; KvlibError (one line) naming the first bad one. llama.cpp runs
    on the CPU with the GGUF's own weights: device must be cpu and dtype float32 (kvlib's side of the page)."""
    where = "notebook 10:"
    if device != "cpu" or dtype != "float32":
        raise KvlibError(f"{where} llama.cpp runs on the CPU beside kvlib's float32 path: device cpu, dtype float32")
    if not isinstance(more_models, list):
        raise KvlibError(f"{where} more_models must be a list of presets, got {more_models!r}")
    models = list(dict.fromkeys([model, *more_models]))
    if not isinstance(speed_models, list) or any(m not in models for m in speed_models):
        raise KvlibError(f"{where} speed_models must be a list of the page's models ({', '.join(models)}), got "
                         f"{speed_models!r}")  # fmt: skip
    if weights not in ("pretrained", "random"):
        raise KvlibError(f"{where} weights must be pretrained or random, got {weights!r}")
    llamacpp.binding()  # llama.cpp missing: one line before anything runs
    for name, types in (("cache_types", cache_types), ("unrotated", unrotated), ("speed_types", speed_types)):
        if not isinstance(types, list):
            raise KvlibError(f"{where} {name} must be a list of llama.cpp cache types, got {types!r}")
        for t in types:
            llamacpp.check_cache_type(t)
    quantized = [t for t in [*cache_types, *unrotated, *speed_types] if llamacpp.is_quantized(t)]
    for m in models:
        if m not in PRESETS or PRESETS[m].arch == "gpt2":
            raise KvlibError(f"{where} model {m!r} must be a Llama or Gemma 3 preset (llama.cpp runs its GGUF)")
        if weights == "pretrained" and not PRESETS[m].gguf_requirement:
            raise KvlibError(f"{where} {m} has no pretrained GGUF; use weights random (exported to a GGUF)")
        for t in quantized:
            if PRESETS[m].head_dim % llamacpp.block_values(t):
                raise KvlibError(f"{where} llama.cpp's {t} cache needs heads of a multiple of "
                                 f"{llamacpp.block_values(t)} values; {m}'s have {PRESETS[m].head_dim}")  # fmt: skip
    tokens = checks.whole("tokens", tokens, where=where)
    rounds = checks.whole("rounds", rounds, where=where)
    contexts = checks.whole_list("contexts", contexts, where=where) if contexts else []
    if tokens < 16:
        raise KvlibError(f"{where} tokens must be at least 16, got {tokens}")
    for m in models:
        if tokens > PRESETS[m].n_positions or (contexts and max(contexts) + rounds + 1 > PRESETS[m].n_positions):
            raise KvlibError(f"{where} tokens and contexts must fit {m}'s {PRESETS[m].n_positions} positions")
    return EnginePage(list(models), weights, tokens, list(cache_types), list(unrotated), list(speed_models),
                      sorted(set(contexts)), list(speed_types), rounds, seed)  # fmt: skip


# ---- the model on both engines -------------------------------------------------------------------------------------


def gguf_for(lm: LoadedModel, seed: int) -> str:
    """The GGUF llama.cpp runs for `lm`: its package's file for pretrained weights; for random weights, the same
    weights exported once to a float32 GGUF in the study's cache folder (llamacpp.export_gguf)."""
    if lm.weights == "pretrained":
        return str(llamacpp.gguf_file(lm.cfg.name))
    if lm.hf is None or lm.cfg.arch != "llama":
        raise KvlibError(f"{lm.cfg.name} with random weights: only a Llama-architecture model exports to a GGUF")
    path = cache_root() / "gguf" / f"{lm.cfg.name}-random-seed{seed}-f32.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
        tmp = Path(f.name)  # written whole, then renamed into place: a reader never sees half a file
    llamacpp.export_gguf(lm.hf, tmp)
    tmp.replace(path)
    return str(path)


def shared_ids(lm: LoadedModel, gguf: str, n_tokens: int, seed: int) -> list[int]:
    """`n_tokens` ids both engines score: the novel by llama.cpp's tokenizer (pretrained weights), else seeded
    synthetic ids (random weights: there is no text to read)."""
    if lm.weights != "pretrained":
        return synthetic_prompts(lm.cfg.vocab_size, 1, n_tokens, seed, torch.device("cpu"))[0].tolist()
    engine = llamacpp.open_engine(gguf, n_tokens)
    try:
        return token_ids(engine, corpus_text(), n_tokens, "the novel")
    finally:
        engine.close()


def _row(model: str, engine: str, variant: str, kind: str, bits: float, held: int, tokens: int, d: Divergence | None,
         ppl: float, time_s: float) -> dict[str, Any]:  # fmt: skip
    s = d.summary() if d is not None else {}
    return {
        "model": model, "engine": engine, "variant": variant, "kind": kind, "bits_per_value": bits,
        "bytes_per_token": held / tokens, "vs_16bit_pct": bits / 16 * 100,
        "kld_mean": s.get("kld_mean", 0.0 if kind == "baseline" else math.nan),
        "kld_lo": s.get("kld_lo", math.nan), "kld_hi": s.get("kld_hi", math.nan),
        "top1_pct": s.get("top1_pct", 100.0 if kind == "baseline" else math.nan), "perplexity": ppl,
        "ppl_change_pct": (s["ppl_ratio"] - 1) * 100 if s else 0.0, "tokens": tokens, "time_s": time_s,
    }  # fmt: skip


def _bits(setting: CacheSetting) -> float:
    return 8 * (llamacpp.element_bytes(setting.type_k) + llamacpp.element_bytes(setting.type_v)) / 2


def model_key(model: str, page: EnginePage) -> tuple:
    """The ModelPool key of a page model (kvlib and Hugging Face both loaded: the speed section times both)."""
    return (model, page.weights, "cpu", "float32", page.seed, None)


def quality(lm: LoadedModel, page: EnginePage) -> pd.DataFrame:
    """One model's rows (QUALITY_COLUMNS): llama.cpp's baseline, floor and cache types (and the `unrotated` types
    without rotation) against its f16 cache; kvlib's exact cache and KVLIB_VARIANTS against it; the cross-engine
    row (kind "cross": llama.cpp f16 against kvlib's exact cache, the same ids)."""
    model = lm.cfg.name
    gguf = gguf_for(lm, page.seed)
    ids = shared_ids(lm, gguf, page.tokens, page.seed)
    n = len(ids)
    rows = []
    base = score(gguf, ids, BASELINE)
    rows.append(_row(model, "llama.cpp", BASELINE.label, "baseline", _bits(BASELINE), base.kv_bytes_held, n, None,
                     base.perplexity, base.time_s))  # fmt: skip
    settings = [(FLOOR, "floor")] + [(CacheSetting(t, t), "lossy") for t in page.cache_types]
    settings += [(CacheSetting(t, t, rotate=False), "lossy") for t in page.unrotated]
    for setting, kind in settings:
        got = score(gguf, ids, setting)
        rows.append(_row(model, "llama.cpp", setting.label, kind, _bits(setting), got.kv_bytes_held, n,
                         compare(base, got), got.perplexity, got.time_s))  # fmt: skip
    tensor = torch.tensor([ids])
    exact = perplexity(lm.model, tensor, "static", {}, "fast", keep_logprobs=True)
    elem = 4  # kvlib's exact cache: float32
    rows.append(_row(model, "kvlib", "exact (float32)", "baseline", 8 * elem, exact.kv_bytes_held, n, None,
                     exact.perplexity, exact.time_s))  # fmt: skip
    for variant, options in KVLIB_VARIANTS.items():
        if not fast_applies(lm.cfg, "quantized", options):  # Gemma 3: not with its sliding-window layers
            continue
        got = perplexity(lm.model, tensor, "quantized", options, "fast", keep_logprobs=True)
        bits = 8 * got.kv_bytes_held / (n * 2 * lm.cfg.n_layer * lm.cfg.n_kv_head * lm.cfg.head_dim)
        d = divergence(exact.logprobs, got.logprobs, exact.nll, got.nll)
        rows.append(_row(model, "kvlib", variant, "lossy", bits, got.kv_bytes_held, n, d, got.perplexity, got.time_s))
    cross = divergence(exact.logprobs, base.logprobs, exact.nll, base.nll)
    rows.append(_row(model, "llama.cpp vs kvlib", "llama.cpp f16 against kvlib exact", "cross", 16,
                     base.kv_bytes_held, n, cross, base.perplexity, base.time_s))  # fmt: skip
    return pd.DataFrame(rows, columns=QUALITY_COLUMNS)


# ---- speed against the context -------------------------------------------------------------------------------------


def speed(lm: LoadedModel, page: EnginePage, pool: ModelPool, bandwidth: float = math.nan) -> pd.DataFrame:
    """Decode steps (SPEED_COLUMNS, one row per counted round) of llama.cpp per `speed_types` at each context, from
    one prefill per type extended context by context, the passage's own next token fed each round (teacher
    forcing), types interleaved within a round; one warm-up round per context left out. kvlib's and Hugging Face's
    batch-1 steps at the same contexts beside them (kvlib.measure.bench.long) where the model has no sliding window."""
    model = lm.cfg.name
    if not page.contexts or not page.speed_types or model not in page.speed_models:
        return pd.DataFrame(columns=SPEED_COLUMNS)
    gguf = gguf_for(lm, page.seed)
    steps = page.rounds + 1
    top = page.contexts[-1]
    ids = shared_ids(lm, gguf, top + steps, page.seed)
    engines = {t: llamacpp.open_engine(gguf, top + steps, t, t) for t in page.speed_types}
    rows = []
    try:
        for c in page.contexts:
            for e in engines.values():  # extend every cache to c tokens (untimed)
                if e.llm.n_tokens < c:
                    e.llm.eval(ids[e.llm.n_tokens : c])
            for r in range(steps):
                order = list(engines.items())
                for t, e in order[::-1] if r % 2 else order:  # the order turns every round
                    tok = ids[e.llm.n_tokens]
                    t0 = time.perf_counter()
                    e.llm.eval([tok])
                    e.next_token()
                    ms = (time.perf_counter() - t0) * 1e3
                    if r:  # round 0: the warm-up
                        rows.append({"model": model, "engine": "llama.cpp", "variant": f"llama.cpp {t}",
                                     "context": c, "round": r, "step_ms": ms})  # fmt: skip
    finally:
        for e in engines.values():
            e.close()
    if "sliding_attention" not in lm.cfg.layer_types and lm.hf is not None:
        got = measure_long(LongRow(model, 1, top), pool, page.rounds, bandwidth, page.seed, "cpu", page.contexts,
                           weights=page.weights)  # fmt: skip
        for r in got.steps:
            rows.append({"model": model, "engine": "kvlib" if r["engine"].startswith("kvlib") else "hf",
                         "variant": r["engine"], "context": r["context"], "round": r["round"],
                         "step_ms": r["latency_ms"]})  # fmt: skip
    return pd.DataFrame(rows, columns=SPEED_COLUMNS)


# ---- what the page shows ---------------------------------------------------------------------------------------


def label_of(row: Any) -> str:
    """How the figures and tables name a quality row: "llama.cpp q8_0", "kvlib int4 rotated", ..."""
    if row["kind"] == "cross":
        return "llama.cpp f16 against kvlib exact"
    prefix = "llama.cpp" if row["engine"] == "llama.cpp" else "kvlib"
    return f"{prefix} {row['variant']}"


def display_table(q: pd.DataFrame) -> pd.DataFrame:
    """The quality rows for reading: label, bits per value, KLD with its interval, top-1, perplexity change."""
    t = q.assign(path=[label_of(r) for _, r in q.iterrows()])
    cols = ["model", "path", "kind", "bits_per_value", "bytes_per_token", "kld_mean", "kld_lo", "kld_hi", "top1_pct",
            "perplexity", "ppl_change_pct"]  # fmt: skip
    return t[cols]


def floor_hi(q: pd.DataFrame, model: str) -> float:
    """The upper end of llama.cpp's floor interval on `model` (f16, flash attention off against on)."""
    f = q[(q["model"] == model) & (q["kind"] == "floor")]
    return float(f["kld_hi"].iloc[0]) if len(f) else math.nan


def quality_figure(q: pd.DataFrame, condition: str) -> Figure:
    """Mean KL divergence (log axis, 95% block-bootstrap interval) of every lossy row and the floor, one panel per
    model; llama.cpp's rows against its f16 cache, kvlib's against its exact float32 cache, the cross-engine row
    against kvlib's; llama.cpp's bars in its engine colour, kvlib's in its layouts' colours (as on every page)."""
    models = list(dict.fromkeys(q["model"]))
    fig, axes = plotting.figure(nrows=len(models), width=8.5, height=3.6,
                                title=f"What each cache costs in KL divergence ({condition})")  # fmt: skip
    axes = axes if hasattr(axes, "__len__") else [axes]
    for ax, model in zip(axes, models, strict=True):
        rows = q[(q["model"] == model) & (q["kind"] != "baseline")].copy()
        rows["path"] = [label_of(r) for _, r in rows.iterrows()]
        y = range(len(rows))
        for i, (_, r) in enumerate(rows.iterrows()):
            if r["kind"] == "cross":
                colour = plotting.NEUTRAL
            elif r["engine"] == "kvlib":  # int8 orange, int4 pink, in this figure as in notebooks 06-08
                colour = plotting.color(r["path"])
            else:
                colour = plotting.colour_of("engine", "llama.cpp")
            lo, hi = r["kld_lo"], r["kld_hi"]
            ax.barh(i, r["kld_mean"], color=colour, alpha=0.55 if r["kind"] == "floor" else 1.0)
            if math.isfinite(lo) and math.isfinite(hi):
                ax.errorbar(r["kld_mean"], i, xerr=[[r["kld_mean"] - lo], [hi - r["kld_mean"]]], color="black",
                            capsize=3, lw=1)  # fmt: skip
        ax.set_yticks(list(y), list(rows["path"]))
        ax.invert_yaxis()
        ax.set_xscale("log")
        hi = floor_hi(q, model)
        if math.isfinite(hi):
            ax.axvline(hi, color=plotting.NEUTRAL, ls="--", lw=1, label="llama.cpp floor (upper 95%)")
            ax.legend(loc="lower right", fontsize=8)
        plotting.label(ax, model, "mean KL divergence (nats)", "cache (engine, type)")
    return fig


QUALITY_CAPTION = (
    "Mean KL divergence of the next-token distribution per cache, 95% block-bootstrap interval. Green bars: llama.cpp "
    "on the GGUF as stored, against its own f16 cache ('norot': llama.cpp's Hadamard rotation turned off; 'f16 "
    "no-fa', pale: the floor, the same exact cache through the other attention path). kvlib's bars, in its "
    "layouts' colours as on every page (int8, int4, int4 rotated: int4's colour): kvlib on the dequantized weights, "
    "against its own float32 cache. The grey last bar compares the engines (llama.cpp's f16 "
    "cache against kvlib's exact one, the same token ids): their weights differ in precision."
)


def _fmt_kld(r: Any) -> str:
    if math.isnan(r["kld_lo"]) or math.isnan(r["kld_hi"]):
        return f"{r['kld_mean']:.2g} nats (no interval: too few tokens)"
    return f"{r['kld_mean']:.2g} nats (95% CI {r['kld_lo']:.2g}–{r['kld_hi']:.2g})"


def _apart(a: Any, b: Any) -> bool:
    """Whether two rows' 95% KL-divergence intervals do not overlap (False when either has none)."""
    return bool(a["kld_hi"] < b["kld_lo"] or b["kld_hi"] < a["kld_lo"])


def quality_sentence(q: pd.DataFrame, model: str, meaningful: bool = True) -> str:
    """What the rows of `model` show, computed from them: each llama.cpp type against the floor, what the rotation
    changed for each type measured both ways, kvlib's rotated int4 against its plain int4, and how far the engines
    are apart next to what q8_0 costs."""
    rows = q[q["model"] == model]
    if not meaningful:
        return (f"{model} has random weights here: the table proves the pipeline (both engines score the same ids), "
                "and its divergences say nothing about a real model's quality.")  # fmt: skip
    hi = floor_hi(q, model)
    out = []
    floor = rows[rows["kind"] == "floor"]
    if len(floor):
        out.append(f"On {model}, llama.cpp's floor (its f16 cache with flash attention off against on) is "
                   f"{_fmt_kld(floor.iloc[0])}.")  # fmt: skip
    lossy = rows[(rows["engine"] == "llama.cpp") & (rows["kind"] == "lossy")]
    for _, r in lossy.iterrows():
        if math.isnan(hi):
            verdict = "no floor to judge it by (too few tokens for an interval)"
        elif within_floor(r["kld_mean"], hi):
            verdict = "within the floor: indistinguishable from f16 on this text"
        else:
            verdict = f"{r['kld_mean'] / hi:.3g}x the floor's upper end"
        out.append(f"{r['variant']}: {_fmt_kld(r)}, {verdict}; top-1 agreement {r['top1_pct']:.1f}%, perplexity "
                   f"{r['ppl_change_pct']:+.2f}%.")  # fmt: skip
    for _, r in lossy[lossy["variant"].str.endswith(" norot")].iterrows():
        rot = lossy[lossy["variant"] == r["variant"].removesuffix(" norot")]
        if len(rot):
            a = rot.iloc[0]
            apart = _apart(a, r)
            change = r["kld_mean"] / a["kld_mean"] if a["kld_mean"] > 0 else math.inf
            how = (f"the rotation divides the KL divergence by {change:.3g}" if change > 1
                   else f"the rotation multiplies the KL divergence by {1 / change:.3g}")  # fmt: skip
            judged = "intervals apart" if apart else "intervals overlap: not a finding on this text"
            out.append(f"{a['variant']} with and without llama.cpp's rotation: {how} ({judged}).")
    ours = rows[rows["engine"] == "kvlib"].set_index("variant")
    if "int8" not in ours.index:
        out.append(f"No kvlib quantized rows on {model}: kvlib reads its quantized layout in one pass on "
                   "Llama-architecture models only (not through sliding-window layers).")  # fmt: skip
    if {"int4", "int4 rotated"} <= set(ours.index):
        plain, rot = ours.loc["int4"], ours.loc["int4 rotated"]
        apart = _apart(plain, rot)
        out.append(f"kvlib's int4 cache: {_fmt_kld(plain)} plain, {_fmt_kld(rot)} rotated ("
                   f"{'intervals apart' if apart else 'intervals overlap'}).")  # fmt: skip
    cross = rows[rows["kind"] == "cross"]
    q8 = lossy[lossy["variant"] == "q8_0"]
    if len(cross):
        c = cross.iloc[0]
        line = (f"The engines on the same ids: llama.cpp's f16 cache against kvlib's exact cache, {_fmt_kld(c)}, "
                f"top-1 agreement {c['top1_pct']:.1f}% (llama.cpp multiplies with the quantized weights and 8-bit "
                "activations, kvlib with the weights dequantized to float32)")  # fmt: skip
        if len(q8):
            ratio = c["kld_mean"] / q8.iloc[0]["kld_mean"] if q8.iloc[0]["kld_mean"] > 0 else math.inf
            line += (f": {ratio:.3g}x what llama.cpp's q8_0 cache costs, so the engines differ "
                     f"{'more' if ratio > 1 else 'less'} than its 8-bit cache changes it")  # fmt: skip
        out.append(line + ".")
    return " ".join(out)


def published_table() -> tuple[str, pd.DataFrame]:
    """llama.cpp's own published figures (theirs: other models, other text) for beside the page's."""
    source, rows = published.kv_divergence()
    rot = published.llamacpp_rotation()
    table = pd.concat([rows.assign(source=source), rot], ignore_index=True)
    return "llama.cpp's published figures (theirs, not measured here)", table


def published_sentence(q: pd.DataFrame, model: str) -> str:
    """Ours beside theirs: the q8_0 divergence and the floor, measured here on `model`, against llama.cpp's
    published LLaMA 3 8B figures, with what differs."""
    _, theirs = published.kv_divergence()
    rows = q[q["model"] == model]
    q8 = rows[(rows["engine"] == "llama.cpp") & (rows["variant"] == "q8_0")]
    fl = rows[rows["kind"] == "floor"]
    t8 = theirs[theirs["cache"].str.startswith("q8_0")]
    tf = theirs[theirs["cache"].str.startswith("floor")]
    if q8.empty or fl.empty or t8.empty or tf.empty:
        return ""
    ours_ratio = q8.iloc[0]["kld_mean"] / fl.iloc[0]["kld_mean"] if fl.iloc[0]["kld_mean"] > 0 else math.inf
    their_ratio = t8.iloc[0]["kld"] / tf.iloc[0]["kld"]
    return (
        f"llama.cpp's published q8_0 divergence on LLaMA 3 8B is {t8.iloc[0]['kld']:.2g} nats against a floor of "
        f"{tf.iloc[0]['kld']:.2g} ({their_ratio:.3g}x); here, on {model}, {q8.iloc[0]['kld_mean']:.2g} against "
        f"{fl.iloc[0]['kld_mean']:.2g} ({ours_ratio:.3g}x). Theirs: an 8B model with 128-wide heads, f16 weights, "
        "WikiText, before llama.cpp rotated quantized caches; ours: a small model on the novel, quantized weights, "
        "the rotation on."
    )


def speed_table(s: pd.DataFrame) -> pd.DataFrame:
    """Median decode step (ms) with its quartiles per (model, path, context)."""
    rows = []
    for (model, variant, context), g in s.groupby(["model", "variant", "context"], sort=False):
        sp = Spread.of(g["step_ms"])
        rows.append({"model": model, "path": variant, "context": context, "step_ms": sp.median, "q25_ms": sp.q25,
                     "q75_ms": sp.q75, "rounds": sp.n})  # fmt: skip
    return pd.DataFrame(rows)


def _path_name(variant: str) -> str:
    return PATHS.get(variant, variant)


def speed_figure(s: pd.DataFrame, condition: str) -> Figure:
    """The decode step against the context (log-log), one line per path: llama.cpp's cache types (shades of its
    colour), kvlib's and Hugging Face's caches at batch 1; medians with quartile bands."""
    data = s.assign(path=[_path_name(v) for v in s["variant"]])
    models = list(dict.fromkeys(data["model"]))
    fig, axes = plotting.figure(ncols=len(models), width=7.5, height=4.6,
                                title=f"Decode step against the context ({condition})")  # fmt: skip
    axes = axes if hasattr(axes, "__len__") else [axes]
    for ax, model in zip(axes, models, strict=True):
        plotting.lines(data[data["model"] == model], "context", "step_ms", "path", ax)
        ax.set_xscale("log", base=2)
        contexts = sorted(data["context"].unique())
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.minorticks_off()
        plotting.log_axis(ax, "y")
        plotting.label(ax, model, "context (tokens)", "decode step (ms)")
        plotting.legend_below(ax, ncol=2)
    return fig


def speed_caption(rounds: int) -> str:
    return (
        f"Median decode step over {rounds} rounds after a warm-up round at each context, quartile bands; batch 1, one "
        "sequence prefilled once per cache and extended context by context, the passage's own next token fed every "
        "round (teacher forcing), the paths interleaved. llama.cpp runs the GGUF as stored (SmolLM2: Q4_1); kvlib and "
        "Hugging Face run it dequantized to float32, so llama.cpp reads about a sixth of their weight bytes."
    )


def speed_sentence(s: pd.DataFrame, model: str) -> str:
    """At the longest context: each llama.cpp type against its f16 cache, and kvlib's static cache against
    llama.cpp's f16, with whether the quartile ranges are apart."""
    t = speed_table(s)
    t = t[t["model"] == model]
    if t.empty:
        return ""
    top = int(t["context"].max())
    at = t[t["context"] == top].set_index("path")
    out = [f"At {top} tokens of context on {model}:"]
    f16 = at.loc["llama.cpp f16"] if "llama.cpp f16" in at.index else None
    for path, r in at.iterrows():
        if f16 is None or path == "llama.cpp f16":
            continue
        apart = r["q25_ms"] > f16["q75_ms"] or r["q75_ms"] < f16["q25_ms"]
        ratio = r["step_ms"] / f16["step_ms"]
        word = "slower" if ratio > 1 else "faster"
        verdict = f"{max(ratio, 1 / ratio):.3g}x {word} than" if apart else "within the spread of"
        out.append(f"{_path_name(str(path))} {r['step_ms']:.3g} ms, {verdict} llama.cpp's f16 cache "
                   f"({f16['step_ms']:.3g} ms){'' if apart else ' (quartile ranges overlap)'};")  # fmt: skip
    return " ".join(out).rstrip(";") + "."


def memory_table(page: EnginePage, model: str) -> pd.DataFrame:
    """Bytes each llama.cpp cache type holds per token and at each context of the page (MiB), from the GGUF's shape
    and the type's block size, beside the GGUF's weight bytes."""
    shape = llamacpp.read_shape(llamacpp.gguf_file(model)) if PRESETS[model].gguf_requirement else None
    if shape is None:
        return pd.DataFrame()
    types = list(dict.fromkeys([llamacpp.REFERENCE, *page.cache_types, *page.speed_types]))
    rows = []
    for t in types:
        row = {"model": model, "cache type": t, "bits per value": 8 * llamacpp.element_bytes(t),
               "bytes per token": llamacpp.kv_cache_bytes(shape, 1, t, t)}  # fmt: skip
        for c in page.contexts:
            held = llamacpp.kv_cache_bytes(shape, c, t, t, sliding_cells=llamacpp.swa_cells(shape))
            row[f"MiB at {c}"] = held / 2**20
        rows.append(row)
    return pd.DataFrame(rows)


def headlines(q: pd.DataFrame, model: str) -> list[dict[str, Any]]:
    """The index's numbers: llama.cpp's q8_0 and q4_0 KL divergence against its f16 cache, and the engines' top-1
    agreement."""
    rows = q[q["model"] == model]
    out = []
    for variant in ("q8_0", "q4_0"):
        r = rows[(rows["engine"] == "llama.cpp") & (rows["variant"] == variant)]
        if len(r):
            r = r.iloc[0]
            out.append({"metric": f"llamacpp_{variant}_kld", "label": f"llama.cpp {variant} cache: KL divergence "
                        "against its f16 cache", "value": float(r["kld_mean"]), "unit": "nats", "headline": True,
                        "layout": f"llama.cpp {variant}", "condition": model, "baseline": "llama.cpp f16"})  # fmt: skip
    c = rows[rows["kind"] == "cross"]
    if len(c):
        out.append({"metric": "engines_top1", "label": "llama.cpp f16 against kvlib exact: top-1 agreement",
                    "value": float(c.iloc[0]["top1_pct"]), "unit": "%", "condition": model,
                    "baseline": "kvlib exact"})  # fmt: skip
    return out
