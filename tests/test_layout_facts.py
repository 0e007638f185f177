"""A layout declares its own facts, and nothing outside kvlib/caches/ tests a layout's name.

- The sweep: every comparison with a registered layout's name (==, !=, in, not in, against a string or a tuple of
  strings) in kvlib outside kvlib/caches/, and in the notebooks' code, fails the test; so does restating a layout's
  option default (`options.get("sink", 4)`). Callers ask the class (`evicts`, `with_budget`, `label`, `one_pass`,
  `option`, ...) or compare with `REFERENCE`.
- A sixth eviction policy, written here as one class (random scores) and registered, runs in the pass-key command,
  in the perplexity (token by token, since it declares no one-pass pattern), in notebook 09's page functions with
  "all" policies, and has a colour of its own in figures: nothing else was edited for it.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import matplotlib
import pytest
import torch

import kvlib.caches  # noqa: F401  (registers the layouts)
from kvlib.caches.base import CACHE_LAYOUTS, REFERENCE, KVCache, evicting_layouts, layout_options, register_layout
from kvlib.caches.eviction import EvictionCache, policies
from kvlib.models.loading import load

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parents[1]


# ---- the sweep ------------------------------------------------------------------------------------------------------


def _strings(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return []


def name_tests(source: str, where: str) -> list[str]:
    """Comparisons with a registered layout's name, and option defaults restated with `.get(option, literal)`."""
    names = set(CACHE_LAYOUTS)
    options = {k for n in CACHE_LAYOUTS for k in layout_options(n)}
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                hit = names & set(_strings(side))
                if hit:
                    found.append(f"{where}:{node.lineno} compares with {sorted(hit)}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and len(node.args) == 2
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value in options
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value is not None
            and getattr(node.func.value, "id", "") in ("options", "o", "opts", "lopts", "given")
        ):
            found.append(f"{where}:{node.lineno} restates the default of option {node.args[0].value!r}")
    return found


def _code_of_notebooks() -> list[tuple[str, str]]:
    out = []
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        for cell in cells:
            if cell["cell_type"] == "code" and "parameters" not in cell.get("metadata", {}).get("tags", []):
                src = "".join(cell["source"])
                src = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))
                out.append((f"{path.name} ({src.splitlines()[0][:40] if src else ''})", src))
    return out


def test_no_layout_name_is_tested_outside_the_caches_package():
    found = []
    for path in sorted((ROOT / "kvlib").rglob("*.py")):
        if (ROOT / "kvlib" / "caches") in path.parents:
            continue
        found += name_tests(path.read_text(), str(path.relative_to(ROOT)))
    for where, source in _code_of_notebooks():
        found += name_tests(source, where)
    assert not found, "\n".join(found)


def test_the_sweep_finds_each_kind_it_looks_for():
    src = 'if cache == "window": pass\nx = c in ("static", "paged")\ny = options.get("sink", 4)\nz = "h2o" != c\n'
    found = name_tests(src, "t")
    assert len(found) == 4, found
    assert not name_tests('if cache == REFERENCE: pass\ny = options.get("sink")\n', "t")


def test_every_layout_states_its_facts():
    for name, cls in CACHE_LAYOUTS.items():
        assert isinstance(cls.label(), str) and cls.label(), name
        assert cls.evicts == (cls.held_budget() is not None), name  # an evicting layout says what it keeps
        if cls.exact:
            assert cls.one_pass(5, None, "cpu") is not None, name  # exact: the causal pattern
        assert not (cls.exact and cls.evicts), name
    assert CACHE_LAYOUTS[REFERENCE].exact and CACHE_LAYOUTS[REFERENCE].dense
    assert set(policies()) < set(evicting_layouts())


# ---- a sixth policy: one class ------------------------------------------------------------------------------------


class RandomScoreCache(EvictionCache):
    """A policy written for this test: every token's score is a seeded random number, so the kept tokens are a random
    subset within the budget (the newest is protected, as by every policy). Option: budget (256)."""

    name = "random-score"

    def __init__(self, cfg, batch_size, max_len, device, dtype, budget: int = 256) -> None:
        super().__init__(cfg, batch_size, max_len, device, dtype, budget=budget, sink=0, recent=1)
        self.gen = torch.Generator().manual_seed(0)

    def new_scores(self, layer: int, k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return torch.rand(pos.shape, generator=self.gen).to(k.device)


@pytest.fixture
def sixth_policy():
    register_layout(RandomScoreCache)
    try:
        yield RandomScoreCache.name
    finally:
        del CACHE_LAYOUTS[RandomScoreCache.name]


def test_a_sixth_policy_is_one_class(sixth_policy, tmp_path, capsys):
    from kvlib.cli import main
    from kvlib.measure.perplexity import fast_applies, perplexity
    from kvlib.study import passkey as page
    from kvlib.study import plotting

    assert sixth_policy in policies() and sixth_policy in evicting_layouts()
    # the command
    out = tmp_path / "rows.csv"
    args = ["passkey", "--model", "tiny-llama", "--weights", "random", "--tokens", "100", "--keys", "1"]
    assert main([*args, "--depths", "0.5", "--cache", sixth_policy, "--budget", "40", "--csv", str(out)]) == 0
    assert "setting question-after" in capsys.readouterr().out
    # the perplexity: no one-pass pattern, so token by token; it evicted
    lm = load("tiny-llama", weights="random", seed=0, with_hf=False)
    ids = torch.randint(0, lm.cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    assert not fast_applies(lm.cfg, sixth_policy, {"budget": 16})
    ppl = perplexity(lm.model, ids, sixth_policy, {"budget": 16}, "token")
    full = perplexity(lm.model, ids, REFERENCE, {}, "fast")
    assert (ppl.nll - full.nll).abs().max() > 1e-4 and ppl.kv_bytes_held < full.kv_bytes_held
    # notebook 09's page: "all" policies lists it; the grid and the figure carry it
    names = page.policy_names("all")
    assert sixth_policy in names
    layouts = [(REFERENCE, {})] + [(p, {}) for p in names]
    r = page.measure_model(lm, 80, [0.5], 1, "novel", layouts, [0.5], ["question-after"], 3, 1, 0)
    assert sixth_policy in set(r.acc["policy"])
    fig = page.retention_figure([(r.model, 80, r.acc)], ["question-after"], "t")
    assert sixth_policy in [t.get_text() for t in fig.legends[0].get_texts()]
    # its own colour, apart from every other layout's
    others = {plotting.color(n) for n in CACHE_LAYOUTS if n != sixth_policy and n != "streaming"}
    assert plotting.color(sixth_policy) not in others
    assert plotting.style_key(sixth_policy) == sixth_policy


def test_policy_names_refuse_an_unknown_policy_with_one_line():
    from kvlib.core.errors import KvlibError
    from kvlib.study import passkey as page

    with pytest.raises(KvlibError, match="policies") as e:
        page.policy_names(["h2o", "nope"])
    assert "\n" not in str(e.value)
    assert page.policy_names(["h2o", "tova"]) == ["h2o", "tova"]


def test_a_layout_without_a_colour_gets_one_from_the_palette_rule():
    from kvlib.study import plotting

    class Plain(KVCache):
        name = "plain-test"

    register_layout(Plain)
    try:
        assert plotting.color("plain-test") not in {plotting.color(n) for n in CACHE_LAYOUTS if n != "plain-test"}
    finally:
        del CACHE_LAYOUTS["plain-test"]
