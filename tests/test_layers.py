"""kvlib's layers point only down, and every dependency is visible at the top of its module.

The layers, bottom to top (a module may import its own layer and those below it, never one above):

    core      config, errors, argument checks, statistics, hardware, RoPE
    caches    the KV-cache layouts and their facts
    models    the decoders, loading, the fast path, Hugging Face's engine
    decoding  procedures that use a model and a cache: a question after a context, prefix sharing
    measure   measurements: harness, memory, perplexity, pass-key scoring, bench parts, results files
    study     the notebooks' pages: tidy frames, figures, sentences
    report    the report: findings, index, pipeline, browser check
    cli       every command's parser and entry point

A function-local import of a kvlib module fails the test (it hides a dependency, or a cycle); a function-local import
of another package must say why on its line (a comment: an optional or heavy dependency).

Run as a script (`.venv/bin/python tests/test_layers.py`) it prints the package's picture: each layer's files and
lines, and the arrows between layers with how many imports each carries.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "caches", "models", "decoding", "measure", "study", "report", "cli")
TOP = len(LAYERS)  # kvlib/__init__.py (registers the layouts) and kvlib/__main__.py


def layer_of(module: str) -> int:
    """The layer index of a dotted kvlib module name (kvlib itself and kvlib.__main__: the top)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] in ("__init__", "__main__"):
        return TOP
    if parts[1] not in LAYERS:
        raise AssertionError(f"{module} is in no layer: a top-level module of kvlib belongs in one of {LAYERS}")
    return LAYERS.index(parts[1])


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, int, bool, str]]:
    """(imported module, line, inside a function, the statement's text) for every import in `path`."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif node.module == "kvlib":
            targets = [f"kvlib.{a.name}" for a in node.names]
        else:
            targets = [node.module or ""]
        inside, up = False, node
        while up in parents:
            up = parents[up]
            inside = inside or isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef))
        text = "\n".join(lines[node.lineno - 1 : node.end_lineno])
        found += [(t, node.lineno, inside, text) for t in targets]
    return found


def kvlib_files() -> list[Path]:
    return sorted((ROOT / "kvlib").rglob("*.py"))


def test_every_import_points_down():
    up = []
    for path in kvlib_files():
        here = module_name(path)
        for target, line, _, _ in imports(path):
            if target.startswith("kvlib") and layer_of(target) > layer_of(here):
                name = LAYERS[layer_of(here)] if layer_of(here) < TOP else "kvlib"
                up.append(f"{path.relative_to(ROOT)}:{line} ({name}) imports {target} ({LAYERS[layer_of(target)]})")
    assert not up, "\n".join(up)


def test_no_function_local_import_of_kvlib_and_every_other_says_why():
    hidden = []
    for path in kvlib_files():
        for target, line, inside, text in imports(path):
            if inside and (target.startswith("kvlib") or "#" not in text):
                hidden.append(f"{path.relative_to(ROOT)}:{line} {text.strip().splitlines()[0]}")
    assert not hidden, (
        "function-local imports (kvlib ones move to the top; others say why in a comment):\n" + "\n".join(hidden)
    )


ISSUE_NUMBER = re.compile(r"\b[Ii]ssues? #?\d+|\(#\d+\)")


def test_no_issue_numbers_in_code_or_data():
    """Code and data say what a rule is, not which ticket asked for it (the project's history is in git and docs/)."""
    found = []
    paths = [*kvlib_files(), *(ROOT / "kvlib" / "data").glob("*.yaml"), *(ROOT / "params").rglob("*.yaml")]
    paths += sorted((ROOT / "notebooks").glob("*.ipynb"))
    for path in paths:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if ISSUE_NUMBER.search(line) and "SnapKV's repository" not in line:
                found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not found, "\n".join(found)


def test_the_layer_test_can_fail(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("import os\n\ndef f():\n    from kvlib.study import plotting\n    import json\n")
    found = imports(bad)
    assert [(t, inside) for t, _, inside, _ in found] == [("os", False), ("kvlib.study", True), ("json", True)]
    assert layer_of("kvlib.study.plotting") > layer_of("kvlib.caches.base") > layer_of("kvlib.core.config")


def picture() -> str:
    """Each layer's files and lines, and the arrows between layers (how many imports each carries)."""
    files: Counter[int] = Counter()
    lines: Counter[int] = Counter()
    arrows: Counter[tuple[int, int]] = Counter()
    for path in kvlib_files():
        here = layer_of(module_name(path))
        files[here] += 1
        lines[here] += len(path.read_text().splitlines())
        for target, _, _, _ in imports(path):
            if target.startswith("kvlib") and layer_of(target) != here:
                arrows[(here, layer_of(target))] += 1
    names = (*LAYERS, "kvlib")
    out = ["layer      files  lines  imports from (count)"]
    for i in reversed(range(TOP + 1)):
        if not files[i]:
            continue
        to = ", ".join(f"{names[j]} {n}" for (k, j), n in sorted(arrows.items()) if k == i)
        out.append(f"{names[i]:<10} {files[i]:>5} {lines[i]:>6}  {to or '-'}")
    largest = sorted(kvlib_files(), key=lambda p: -len(p.read_text().splitlines()))[:8]
    out.append(
        "largest files: " + ", ".join(f"{p.relative_to(ROOT)} {len(p.read_text().splitlines())}" for p in largest)
    )
    return "\n".join(out)


if __name__ == "__main__":
    print(picture())
