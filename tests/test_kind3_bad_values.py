"""Kind 3 (issue 14): a documented form of a parameter is accepted, and a bad value is refused with a KvlibError
that names the parameter, never a raw TypeError, ZeroDivisionError, IndexError or KeyError.

The sweeps are generic where they can be: every registered cache layout with every option its constructor takes
(kvlib.caches.base.layout_options), and every size, count and fraction argument of the public functions, found from the
arguments' kinds, with zero, negative, fractional and wrong-type values. YAML null and None mean the same for every
notebook parameter documented as optional (papermill's `-p x null` injects the *text* "null", `-p x None` injects
None, `x: null` in a -f file injects None). The command lines answer a bad flag with exit code 2 and one line.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import kvlib.caches  # noqa: F401  (registers every layout)
import kvlib.cli.verify as verify_cli
import kvlib.measure.harness as harness
from kvlib import study
from kvlib.caches.base import CACHE_LAYOUTS, layout_options, make_cache
from kvlib.caches.paged import BlockPool, PagedCache
from kvlib.cli import main
from kvlib.core.config import ModelConfig, get_preset
from kvlib.core.errors import KvlibError
from kvlib.decoding.prefix import generate_with_shared_prefix
from kvlib.measure import memory
from kvlib.measure.harness import RunSpec, measure_grid
from kvlib.measure.verify import verify
from kvlib.models.decode import generate
from kvlib.models.hf import hf_generate
from kvlib.models.loading import load
from kvlib.models.prompts import left_padded_prompts, synthetic_prompts
from kvlib.study import costs, strategies

ROOT = Path(__file__).resolve().parent.parent
CFG = get_preset("tiny")
RAW = (TypeError, ZeroDivisionError, IndexError, KeyError, ValueError, AttributeError, RuntimeError)

# Values no size, count or fraction accepts; each must be refused with the parameter's name in the message.
SIZE_BAD = [-1, 2.5, "4", None, True, [4], 2**70]
SIZES_BAD = [[-1], [2.5], ["4"], [], None, "4", [True], [2**70]]
FRACTION_BAD = [-0.5, 1.5, "0.5", None, True, math.nan]
FRACTIONS_BAD = [[-0.5], [1.5], ["0.5"], [], None, "0.5", [True], [math.nan]]
NUMBER_BAD = [-1.0, "4", None, True, math.nan, math.inf]
FRACTIONS = {"spread"}  # float parameters that are fractions; other floats are non-negative numbers
ZERO = {"size": 0, "sizes": [0], "fraction": None, "fractions": None, "number": 0.0}


def kind(name: str, value: Any) -> str | None:
    """What a parameter is, from its (valid) value: size, sizes, fraction, fractions, number; None: not swept."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return "size"
    if isinstance(value, float):
        return "fraction" if name in FRACTIONS else "number"
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return "sizes"
    if isinstance(value, list) and value and all(isinstance(v, float) for v in value):
        return "fractions"
    return None


BAD = {"size": SIZE_BAD, "sizes": SIZES_BAD, "fraction": FRACTION_BAD, "fractions": FRACTIONS_BAD, "number": NUMBER_BAD}


def sweep(call, name: str, valid: Any, optional: bool = False, text_ok: bool = False) -> list[str]:
    """Call `call(value)` with every bad value of `name`'s kind (and zero); return what went wrong, [] if nothing.
    `optional`: None is allowed; `text_ok`: text is read as YAML (kvlib.study), so "4" is a valid 4."""
    k = kind(name, valid)
    assert k is not None, f"{name}={valid!r} is not a size, count, fraction or number"
    problems = []
    zero = ZERO[k]
    for value in [*BAD[k], *([] if zero is None else [zero])]:
        if (optional and value is None) or (text_ok and isinstance(value, str)):
            continue
        try:
            call(value)
        except KvlibError as e:
            if name not in str(e) or "\n" in str(e):
                problems.append(f"{name}={value!r}: the message does not name {name} on one line: {e}")
            continue
        except Exception as e:
            problems.append(f"{name}={value!r}: raw {type(e).__name__}: {e}")
            continue
        if value is not zero:  # zero may be allowed (warmup, seed, sink); nothing else in the lists is
            problems.append(f"{name}={value!r} was accepted")
    return problems


@pytest.fixture(scope="module")
def env(tiny):
    return {"model": tiny.model, "lm": tiny, "cfg": tiny.cfg, "hf": tiny.hf}


# ---- cache layouts: every registered layout, every option it takes ----------------------------------------------

LAYOUT_OPTIONS = [(layout, option) for layout in CACHE_LAYOUTS for option in layout_options(layout)]


@pytest.mark.parametrize("layout", list(CACHE_LAYOUTS))
@pytest.mark.parametrize("name", ["batch_size", "max_len"])
def test_every_layout_refuses_bad_sizes(layout, name):
    args = {"cfg": CFG, "batch_size": 2, "max_len": 8, "device": "cpu", "dtype": torch.float32}

    def call(value):
        make_cache(layout, **{**args, name: value})

    assert sweep(call, name, 2) == []


@pytest.mark.parametrize(("layout", "option"), LAYOUT_OPTIONS, ids=[f"{la}-{op}" for la, op in LAYOUT_OPTIONS])
def test_every_layout_option_refuses_bad_values(layout, option):
    """Zero is accepted or refused by name; negative, fractional, text, bool, list and (unless the default is None)
    None are refused by name, whatever the option."""
    default = layout_options(layout)[option]
    values = [0, -1, 2.5, "4", [4]]
    values += ([] if isinstance(default, bool) else [True]) + ([] if default is None else [None])
    problems = []
    for value in values:
        try:
            make_cache(layout, CFG, 2, 8, "cpu", torch.float32, **{option: value})
        except KvlibError as e:
            if option not in str(e):
                problems.append(f"{option}={value!r}: message does not name it: {e}")
        except RAW as e:
            problems.append(f"{option}={value!r}: raw {type(e).__name__}: {e}")
        else:
            if value != 0:
                problems.append(f"{option}={value!r} was accepted")
    assert problems == []


@pytest.mark.parametrize("layout", [*CACHE_LAYOUTS, "none"])
def test_an_unknown_option_names_the_layouts_options(tiny, layout):
    """`generate(..., cache="quantized", cache_options={"group_size": 32})` was a bare TypeError."""
    ids = synthetic_prompts(CFG.vocab_size, 1, 4)
    with pytest.raises(KvlibError, match="group_size") as e:
        generate(tiny.model, ids, 2, cache=layout, cache_options={"group_size": 32})
    message = str(e.value)
    assert "cache_options" in message and "32" in message and repr(layout) in message
    for option in layout_options(layout) if layout != "none" else []:
        assert option in message, f"{option} not listed in: {message}"
    if layout != "none":
        with pytest.raises(KvlibError, match="group_size"):
            make_cache(layout, CFG, 1, 8, "cpu", torch.float32, group_size=32)


@pytest.mark.parametrize(("layout", "option"), [(a, o) for a in CACHE_LAYOUTS for o in {o for _, o in LAYOUT_OPTIONS}])
def test_another_layouts_option_is_refused(layout, option):
    if option in layout_options(layout):
        return
    with pytest.raises(KvlibError, match=f"no option '{option}'"):
        make_cache(layout, CFG, 1, 8, "cpu", torch.float32, **{option: 4})


@pytest.mark.parametrize("bad", [[("bits", 8)], "bits=8", 8, {8: "bits"}])
def test_cache_options_must_be_a_mapping_of_names(tiny, bad):
    ids = synthetic_prompts(CFG.vocab_size, 1, 4)
    with pytest.raises(KvlibError, match="cache_options"):
        generate(tiny.model, ids, 2, cache="quantized", cache_options=bad)


@pytest.mark.parametrize("bad", [None, 5, ["static"], "bogus", ""])
def test_an_unknown_cache_is_refused(tiny, bad):
    ids = synthetic_prompts(CFG.vocab_size, 1, 4)
    with pytest.raises(KvlibError, match="cache layout"):
        generate(tiny.model, ids, 2, cache=bad)
    with pytest.raises(KvlibError, match="cache layout"):
        layout_options(bad) if isinstance(bad, str) else make_cache(bad, CFG, 1, 8, "cpu", torch.float32)


def test_whole_floats_and_bools_are_not_option_values():
    for layout, name, value in (
        ("quantized", "bits", 8.0),
        ("quantized", "residual_len", True),
        ("window", "window", 4.0),
    ):
        with pytest.raises(KvlibError, match=name):
            make_cache(layout, CFG, 1, 8, "cpu", torch.float32, **{name: value})
    with pytest.raises(KvlibError, match="dtype"):
        make_cache("static", CFG, 1, 8, "cpu", "float32")
    with pytest.raises(KvlibError, match="device"):
        make_cache("static", CFG, 1, 8, "quantum", torch.float32)
    with pytest.raises(KvlibError, match="cfg"):
        make_cache("static", "tiny", 1, 8, "cpu", torch.float32)


def test_paged_methods_and_pool_refuse_bad_sizes():
    cache = make_cache("paged", CFG, 2, 8, "cpu", torch.float32, block_size=4)
    assert sweep(lambda v: cache.release(v), "row", 1) == []
    with pytest.raises(KvlibError, match="row"):
        cache.release(2)  # one past the last row
    one = make_cache("paged", CFG, 1, 8, "cpu", torch.float32, block_size=4)
    assert sweep(lambda v: one.fork(v, 8), "batch_size", 2) == []
    assert sweep(lambda v: one.fork(2, v), "max_len", 8) == []
    assert sweep(lambda v: BlockPool(CFG, v, 4, "cpu", torch.float32), "num_blocks", 4) == []
    assert sweep(lambda v: BlockPool(CFG, 4, v, "cpu", torch.float32), "block_size", 4) == []
    assert isinstance(cache, PagedCache)


# ---- decoding entry points ---------------------------------------------------------------------------------------


def test_generate_and_prefix_sharing_refuse_bad_sizes(env):
    model = env["model"]
    ids = synthetic_prompts(CFG.vocab_size, 2, 4)
    assert sweep(lambda v: generate(model, ids, v), "max_new_tokens", 2) == []
    assert sweep(lambda v: generate(model, ids, v, cache="none"), "max_new_tokens", 2) == []
    prefix, suffix = synthetic_prompts(CFG.vocab_size, 1, 4), synthetic_prompts(CFG.vocab_size, 2, 2, seed=1)
    assert sweep(lambda v: generate_with_shared_prefix(model, prefix, suffix, v), "max_new_tokens", 2) == []
    assert sweep(lambda v: generate_with_shared_prefix(model, prefix, suffix, 2, v), "block_size", 4) == []
    assert sweep(lambda v: hf_generate(env["hf"], ids, v), "max_new_tokens", 2) == []


@pytest.mark.parametrize(
    "ids",
    [
        torch.tensor([[1, 2, CFG.vocab_size]]),  # one past the vocabulary: an IndexError in the embedding before
        torch.tensor([[-1, 2]]),
        torch.tensor([1, 2, 3]),  # 1-D
        torch.tensor([[1.0, 2.0]]),
        torch.zeros(1, 0, dtype=torch.long),
        [[1, 2]],
    ],
    ids=["out-of-vocab", "negative", "1-d", "float", "empty", "list"],
)
def test_generate_refuses_prompts_it_cannot_run(env, ids):
    with pytest.raises(KvlibError, match="input_ids"):
        generate(env["model"], ids, 2)
    with pytest.raises(KvlibError, match="input_ids"):
        strategies.teacher_forced_logits(env["model"], ids, torch.ones(1, 2, dtype=torch.long), "static")


def test_hf_generate_refuses_token_ids_outside_the_vocabulary(env):
    for ids in (torch.tensor([[1, CFG.vocab_size]]), torch.tensor([[-1, 2]]), torch.tensor([1, 2])):
        with pytest.raises(KvlibError, match="input_ids"):
            hf_generate(env["hf"], ids, 2)


def test_generate_refuses_a_mask_of_another_shape(env):
    ids = synthetic_prompts(CFG.vocab_size, 2, 4)
    for mask in (torch.ones(2, 3, dtype=torch.long), [[1, 1, 1, 1]] * 2):
        with pytest.raises(KvlibError, match="attention_mask"):
            generate(env["model"], ids, 2, attention_mask=mask)


# ---- public functions: every size, count and fraction argument ---------------------------------------------------

# (function, valid arguments); "$model", "$lm", "$cfg" are filled in from the tiny model. Every argument whose value
# is a size, count, fraction or number (kind()) is swept; a new one is covered as soon as it is listed here.
CALLS: list[tuple[str, Any, dict[str, Any]]] = [
    ("mixed_batch", strategies.mixed_batch, dict(batch_size=2, max_prompt_len=4, max_new_tokens=2, spread=0.5)),
    (
        "run_mixed_batch",
        strategies.run_mixed_batch,
        dict(model="$model", prompt_lens=[2, 3], new_tokens=[2, 1], layout="paged", block_size=4, seed=0),
    ),
    (
        "paged_waste",
        strategies.paged_waste,
        dict(model="$model", batch_size=2, max_prompt_len=4, max_new_tokens=2, spreads=[0.0, 1.0], block_sizes=[4]),
    ),
    (
        "paged_latency",
        strategies.paged_latency,
        dict(model="$model", batch_size=1, prompt_len=4, new_tokens=2, block_sizes=[4], repeats=1, warmup=0, seed=0),
    ),
    (
        "quantized_error",
        strategies.quantized_error,
        dict(
            model="$model",
            batch_size=1,
            prompt_len=4,
            new_tokens=2,
            variants={"int8": ("quantized", {"bits": 8})},
            hf_backends=[("fp8", None)],
            hf_residual_len=4,
            repeats=1,
            warmup=0,
            seed=0,
        ),
    ),
    (
        "comparison_table",
        strategies.comparison_table,
        dict(
            model="$model",
            batch_size=1,
            prompt_len=4,
            new_tokens=2,
            variants={"static": ("static", {})},
            repeats=1,
            warmup=0,
            seed=0,
        ),
    ),
    ("default_variants", strategies.default_variants, dict(block_size=16, sink=4, window=64)),
    (
        "memory_by_length",
        strategies.memory_by_length,
        dict(model="$model", lengths=[8], prompt_len=4, batch_size=1, variants={"static": ("static", {})}, seed=0),
    ),
    (
        "window_memory",
        strategies.window_memory,
        dict(model="$model", lengths=[8], prompt_len=4, sink=1, window=2, batch_size=1, seed=0),
    ),
    ("default_kv_heads", strategies.default_kv_heads, dict(n_head=4, n_kv_head=2)),
    ("check_kv_heads", strategies.check_kv_heads, dict(n_head=4, kv_heads=[4, 1])),
    (
        "gqa_reduction",
        strategies.gqa_reduction,
        dict(model_name="tiny", kv_heads=[4, 1], batch_size=1, prompt_len=4, new_tokens=2, repeats=1, warmup=0, seed=0),
    ),
    (
        "prefix_sharing",
        strategies.prefix_sharing,
        dict(
            model="$model",
            batch_size=2,
            prefix_len=4,
            suffix_len=2,
            new_tokens=2,
            block_size=4,
            repeats=1,
            warmup=0,
            seed=0,
        ),
    ),
    ("interleaved_runs", strategies.interleaved_runs, dict(runs={}, repeats=1, warmup=0)),
    ("kv_cache_bytes_formula", memory.kv_cache_bytes_formula, dict(cfg="$cfg", batch_size=1, tokens=4, dtype="fp32")),
    ("cache_tokens", memory.cache_tokens, dict(engine="kvlib", cache="static", prompt_len=4, max_new_tokens=2)),
    ("PeakTracker", memory.PeakTracker, dict(device="cpu", sample_interval_s=0.001)),
    ("attention_flops", costs.attention_flops, dict(cfg="$cfg", n_queries=2, start=1)),
    ("decode_work", costs.decode_work, dict(cfg="$cfg", prompt_len=4, max_new_tokens=2)),
    ("kv_bytes_table", costs.kv_bytes_table, dict(bytes_per_element=2)),
    (
        "max_context_tokens",
        costs.max_context_tokens,
        dict(budget_bytes=1e9, weight_bytes=1e6, kv_bytes_per_token=1000.0, batch_size=1),
    ),
    (
        "context_budget",
        costs.context_budget,
        dict(
            budget_bytes=1e9,
            batch_sizes=[1, 2],
            model="tiny",
            weight_bytes=1e6,
            kv_bytes_per_token=1000.0,
            context_limit=256,
        ),
    ),
    (
        "measured_cache_bytes",
        costs.measured_cache_bytes,
        dict(lm="$lm", layouts=["static"], batch_sizes=[1], seq_lens=[4], seed=0),
    ),
    (
        "memory_breakdown",
        costs.memory_breakdown,
        dict(lm="$lm", layout="static", batch_size=1, prompt_len=4, new_tokens=2, seed=0),
    ),
    ("synthetic_prompts", synthetic_prompts, dict(vocab_size=16, batch_size=1, prompt_len=4, seed=0)),
    ("left_padded_prompts", left_padded_prompts, dict(vocab_size=16, lengths=[2, 3], seed=0, pad_id=0)),
    ("verify", verify, dict(lm="$lm", batch_size=1, prompt_len=4, max_new_tokens=2, seed=0)),
    ("load", load, dict(model="tiny", weights="random", seed=0, n_kv_head=2, with_hf=False)),
]
OPTIONAL = {
    ("default_kv_heads", "n_kv_head"),
    ("check_kv_heads", "kv_heads"),
    ("gqa_reduction", "kv_heads"),
    ("load", "n_kv_head"),
}
SWEPT = [(label, name) for label, _, kw in CALLS for name, v in kw.items() if kind(name, v) is not None]


@pytest.mark.parametrize(("label", "name"), SWEPT, ids=[f"{a}-{b}" for a, b in SWEPT])
def test_every_size_count_and_fraction_argument_refuses_bad_values(env, label, name):
    fn, kwargs = next((f, kw) for lab, f, kw in CALLS if lab == label)
    kwargs = {k: env[v[1:]] if isinstance(v, str) and v.startswith("$") else v for k, v in kwargs.items()}
    assert sweep(lambda v: fn(**{**kwargs, name: v}), name, kwargs[name], (label, name) in OPTIONAL) == []


def test_every_public_strategy_function_is_swept():
    """A new measurement function in kvlib.study.strategies with a size argument must join CALLS."""
    import inspect

    swept = {label for label, _, _ in CALLS}
    for name in strategies.__all__:
        fn = getattr(strategies, name)
        if not inspect.isfunction(fn):
            continue
        sized = [p for p in inspect.signature(fn).parameters.values() if kind(p.name, p.default) is not None]
        assert not sized or name in swept, f"strategies.{name} has size arguments but is not in CALLS"


def test_run_spec_and_measure_grid_refuse_bad_values_before_loading(monkeypatch):
    def loading(*args, **kwargs):
        raise LookupError("loaded")

    monkeypatch.setattr(harness, "load", loading)
    for name in ("batch_size", "prompt_len", "max_new_tokens", "seed"):
        assert sweep(lambda v, name=name: RunSpec(**{name: v}).validate(), name, 1) == []
    assert sweep(lambda v: RunSpec(n_kv_head=v).validate(), "n_kv_head", 2, optional=True) == []

    def grid(**kw):
        with contextlib.suppress(LookupError):  # got as far as loading: the arguments were accepted
            measure_grid(**{"specs": [RunSpec()], "repeats": 1, "warmup": 0, **kw})

    assert sweep(lambda v: grid(repeats=v), "repeats", 1) == []
    assert sweep(lambda v: grid(warmup=v), "warmup", 1) == []
    for bad in ([RunSpec(), "tiny"], "tiny", None, RunSpec()):
        with pytest.raises(KvlibError, match="specs"):
            measure_grid(bad, 1, 0)
    for field, bad in (("model", None), ("model", ["tiny"]), ("cache", ["static"]), ("dtype", ["float32"])):
        with pytest.raises(KvlibError, match=field):
            RunSpec(**{field: bad}).validate()


def test_config_refuses_bools_and_bad_sizes():
    for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_kv_head"):
        for bad in (-1, 2.5, "4", None, True):
            with pytest.raises(KvlibError, match=name):
                ModelConfig(**{"name": "x", "n_embd": 64, "n_head": 4, name: bad})
    for bad in (0, -1e-5, "1e-5", math.nan):
        with pytest.raises(KvlibError, match="norm_eps"):
            ModelConfig(name="x", norm_eps=bad)
    with pytest.raises(KvlibError, match="unknown model preset"):
        get_preset(["tiny"])


@pytest.mark.parametrize("bad", [None, 5, ["tiny"], ""])
def test_a_model_that_is_not_a_name_is_refused(bad):
    with pytest.raises(KvlibError, match="model"):
        load(bad, "random")
    with pytest.raises(KvlibError, match="model"):
        study.model_config(bad)


@pytest.mark.parametrize(("arg", "bad"), [("device", None), ("device", 0), ("dtype", ["float32"]), ("weights", [])])
def test_device_dtype_and_weights_of_another_type_are_refused(arg, bad):
    with pytest.raises(KvlibError, match=arg):
        load(**{"model": "tiny", "weights": "random", arg: bad})


def test_bytes_per_element_refuses_what_is_not_a_dtype():
    for bad in ("int3", 5, None, [torch.float32]):
        with pytest.raises(KvlibError, match="dtype"):
            memory.bytes_per_element(bad)


# ---- notebook parameters: the checkers, and YAML null == None ----------------------------------------------------

NULLS = [None, "None", "null", "Null", "NULL", "~", ""]  # what -f/-p/-y/-r can inject for a null


@pytest.mark.parametrize("null", NULLS)
def test_null_and_none_are_the_same_for_an_optional_parameter(null):
    assert study.optional(study.int_list, "gqa_kv_heads", null) is None
    assert study.optional(study.positive_int, "n", null) is None
    assert study.optional(study.int_list, "gqa_kv_heads", "[4, 1]") == [1, 4]
    for check in (study.positive_int, study.int_list, study.fraction_list, study.str_list, study.positive_number):
        with pytest.raises(KvlibError, match="parameter x must be"):
            check("x", null)  # a required parameter refuses null, by name


def test_study_checkers_sweep():
    for check, name, valid in (
        (study.positive_int, "batch_size", 2),
        (study.int_list, "batch_sizes", [1, 2]),
        (study.fraction_list, "spreads", [0.0, 1.0]),
        (study.positive_number, "budget_gib", 1.5),
    ):
        assert sweep(lambda v, check=check, name=name: check(name, v), name, valid, text_ok=True) == []
    for bad in (None, 4, [1], ["x", 1], [], "[a,"):
        with pytest.raises(KvlibError, match="layouts"):
            study.str_list("layouts", bad, choices=["static"])
    with pytest.raises(KvlibError, match="cache"):
        study.choice("cache", ["static"], ["static", "dynamic"])
    assert study.choice("cache", "static", ["static", "dynamic"]) == "static"


def parameters(name: str) -> dict[str, Any]:
    cells = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())["cells"]
    tree = ast.parse("".join(cells[1]["source"]))
    return {n.targets[0].id: ast.literal_eval(n.value) for n in tree.body}


NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_optional_notebook_parameter_is_read_with_study_optional(name):
    """A parameter whose default is None is documented as optional: the notebook reads it with study.optional,
    so `-p x null` (the text "null") means what `-p x None` and `x: null` in a parameter file mean."""
    cells = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells[2:] if c["cell_type"] == "code")
    for param, default in parameters(name).items():
        if default is None:
            read = re.search(rf'{param} = study\.optional\(study\.\w+, "{param}", {param}\b', code)
            assert read, f"{name}: {param} (default None) is not read with study.optional"


def test_notebook_07_takes_gqa_kv_heads_null_from_papermill(tmp_path):
    """`-p gqa_kv_heads null` (injected as the text "null") passes the parameter checks exactly as None does. To stay
    cheap, memory_prompt_len is set so that the last check of the parameters cell fails: reaching it means every
    check before it, gqa_kv_heads included, accepted the value; a bad list is refused by name."""
    base = [
        sys.executable, "-m", "papermill", "notebooks/07_cache_strategies.ipynb", str(tmp_path / "out.ipynb"),
        "-f", "params/smoke.yaml", "-f", "params/smoke/07_cache_strategies.yaml", "-p", "out_dir", str(tmp_path),
        "-p", "memory_prompt_len", "1000", "--log-level", "ERROR", "--no-progress-bar",
    ]  # fmt: skip
    proc = subprocess.run([*base, "-p", "gqa_kv_heads", "null"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "every length must exceed memory_prompt_len" in proc.stderr, proc.stderr[-2000:]
    assert "gqa_kv_heads" not in proc.stderr.split("KvlibError")[-1]


# ---- command lines: exit 2, one line, no traceback ---------------------------------------------------------------

NOT_WHOLE = ["-1", "2.5", "x", "", "null", "None", "True", "1e3", "99999999999999999999999"]
TINY_RUN = ["--engine", "kvlib", "--model", "tiny", "--weights", "random", "--prompt_len", "4", "--max_new_tokens", "2"]
COMMANDS = {
    "run": (["run", *TINY_RUN, "--repeats", "1", "--warmup", "0", "--no-roofline"], {
        "--batch_size": 1, "--prompt_len": 1, "--max_new_tokens": 1, "--repeats": 1, "--warmup": 0, "--seed": 0,
        "--n_kv_head": 1,
    }),
    "experiments": (["experiments", "--model", "tiny", "--weights", "random", "--no-roofline"], {
        "--repeats": 1, "--warmup": 0, "--seed": 0,
    }),
    "verify": (["verify", "--model", "tiny", "--weights", "random", "--prompt_len", "4", "--max_new_tokens", "2"], {
        "--batch_size": 1, "--prompt_len": 1, "--max_new_tokens": 1, "--seed": 0,
    }),
    "bench": (["bench", "--model", "tiny", "--batch-sizes", "1", "--dtypes", "float32", "--prompt-len", "4",
               "--max-new-tokens", "2", "--repeats", "1", "--warmup", "0", "--no-compile"], {
        "--batch-sizes": 1, "--prompt-len": 1, "--max-new-tokens": 1, "--repeats": 1, "--warmup": 0, "--threads": 1,
        "--seed": 0,
    }),
}  # fmt: skip
FLAGS = [(cmd, flag, minimum) for cmd, (_, flags) in COMMANDS.items() for flag, minimum in flags.items()]
EXTRA = [
    ("run", "--use_cache", "2"),
    ("run", "--cache", "null"),
    ("run", "--n_kv_head", "3"),  # does not divide tiny's 4 heads
    ("run", "--dtype", "null"),
    ("run", "--device", "None"),
    ("bench", "--batch-sizes", "1,0"),
    ("bench", "--batch-sizes", ","),
    ("bench", "--dtypes", "float32,null"),
    ("bench", "--threads", "100000"),  # torch takes it, then crashes
]


def cli(capsys, argv: list[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded for bad input")

    monkeypatch.setattr(harness, "load", refuse)
    monkeypatch.setattr(verify_cli, "load", refuse)


@pytest.mark.parametrize(("cmd", "flag", "minimum"), FLAGS, ids=[f"{c} {f}" for c, f, _ in FLAGS])
def test_every_numeric_flag_refuses_bad_values_with_one_line(tmp_path, capsys, no_loading, cmd, flag, minimum):
    argv, _ = COMMANDS[cmd]
    extra = ["--csv", str(tmp_path / "out.csv")] if cmd != "verify" else []
    values = NOT_WHOLE + (["0"] if minimum == 1 else [])
    for value in values:
        code, err = cli(capsys, [*argv, *extra, flag, value])
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, f"{cmd} {flag} {value!r}: {code} {err!r}"
        assert flag.lstrip("-").replace("-", "_") in lines[0].replace("-", "_") or "must be" in lines[0], lines[0]


@pytest.mark.parametrize(("cmd", "flag", "value"), EXTRA, ids=[f"{c} {f} {v}" for c, f, v in EXTRA])
def test_other_bad_flags_are_one_line_and_exit_2(tmp_path, capsys, no_loading, cmd, flag, value):
    argv, _ = COMMANDS[cmd]
    code, err = cli(capsys, [*argv, "--csv", str(tmp_path / "out.csv"), flag, value])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
