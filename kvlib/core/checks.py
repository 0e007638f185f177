"""Checks for the values users pass: one place, one wording, always a KvlibError.

Every public entry point (the command lines, the notebooks' parameters through `kvlib.study`, and the kvlib
functions they call) checks its sizes, counts, fractions and options with these helpers, so a bad value is refused
with one line that names the parameter, the value and what is allowed, never a bare TypeError or
ZeroDivisionError from deep inside. The rules:

- a whole number is an int (or a numpy integer), never a bool (True is not a batch size) and never a float, even
  a whole one (2.0): a size given as 2.5 or "4" is a mistake to report, not to round;
- a number is a finite int or float, never a bool;
- a fraction is a number from 0 to 1, both included;
- `None` means "not given" only where a parameter is documented as optional (`optional_whole`, ...). YAML text
  (papermill's `-p x null`) is read by `kvlib.study`, which turns YAML null, `~` and `None` into `None` first.

`where` prefixes the message with its context: ``whole("block_size", 0, where="paged cache:")`` raises
"paged cache: block_size must be a whole number >= 1, got 0".
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from kvlib.core.config import ModelConfig
from kvlib.core.errors import KvlibError

SEED_MAX = 2**64 - 1  # torch's generators take seeds up to 2^64 - 1
WHOLE_MAX = 2**63 - 1  # the largest size torch takes (int64); beyond it torch fails with a TypeError


def fail(name: str, value: Any, allowed: str, where: str = "") -> KvlibError:
    """The error for `name` = `value`, which must be `allowed` ("a whole number >= 1")."""
    head = f"{where} {name}" if where else name
    return KvlibError(f"{head} must be {allowed}, got {value!r}")


def torch_device(name: str, value: Any, where: str = "") -> Any:
    """A torch.device from a device or its name ("cpu", "cuda:0", ...)."""
    if isinstance(value, torch.device):
        return value
    try:
        if not isinstance(value, str):
            raise TypeError
        return torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise fail(name, value, "a torch.device or a device name such as cpu, cuda or cuda:0", where) from None


def config(name: str, value: Any, where: str = "") -> ModelConfig:
    """A model configuration (kvlib.core.config.ModelConfig: a preset, LoadedModel.cfg, ...)."""
    if not isinstance(value, ModelConfig):
        raise fail(name, value, "a kvlib.core.config.ModelConfig (a preset, or LoadedModel.cfg)", where)
    return value


def is_whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _range_text(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def whole(name: str, value: Any, minimum: int | None = 1, maximum: int | None = None, where: str = "") -> int:
    """`value` as an int, if it is a whole number within [minimum, maximum]; without a maximum, at most 2^63 - 1."""
    ok = is_whole(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        raise fail(name, value, "a whole number" + _range_text(minimum, maximum), where)
    if maximum is None and value > WHOLE_MAX:
        raise fail(name, value, "a whole number" + _range_text(minimum, WHOLE_MAX), where)
    return int(value)


def optional_whole(
    name: str, value: Any, minimum: int | None = 1, maximum: int | None = None, where: str = ""
) -> int | None:
    """None, or a whole number as `whole` checks it."""
    if value is None:
        return None
    try:
        return whole(name, value, minimum, maximum, where)
    except KvlibError:
        raise fail(name, value, "None or a whole number" + _range_text(minimum, maximum), where) from None


def seed(name: str, value: Any, where: str = "") -> int:
    """A random seed: a whole number from 0 to 2^64 - 1."""
    if not (is_whole(value) and 0 <= value <= SEED_MAX):
        raise fail(name, value, "a whole number from 0 to 2^64 - 1", where)
    return int(value)


def number(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    where: str = "",
    above: bool = False,
) -> float:
    """`value` as a float, if it is a finite number within [minimum, maximum]; `above`: strictly above minimum."""
    ok = is_number(value)
    if ok and minimum is not None:
        ok = value > minimum if above else value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        bound = f" > {minimum}" if above and minimum is not None and maximum is None else _range_text(minimum, maximum)
        raise fail(name, value, "a finite number" + bound, where)
    return float(value)


def positive_number(name: str, value: Any, where: str = "") -> float:
    """A finite number > 0."""
    if not (is_number(value) and value > 0):
        raise fail(name, value, "a finite number > 0", where)
    return float(value)


def fraction(name: str, value: Any, where: str = "") -> float:
    """A number from 0 to 1, both included."""
    if not (is_number(value) and 0 <= value <= 1):
        raise fail(name, value, "a number from 0 to 1", where)
    return float(value)


def one_of(name: str, value: Any, choices: Iterable[Any], where: str = "") -> Any:
    """`value`, if it is one of `choices` (compared with ==, so an unhashable value is refused, not a TypeError)."""
    allowed = list(choices)
    same = [c for c in allowed if type(value) is type(c) or (is_whole(value) and is_whole(c))]
    if isinstance(value, bool) or not any(value == c for c in same):
        raise fail(name, value, "one of " + ", ".join(repr(c) for c in allowed), where)
    return value


def _items(name: str, values: Any, what: str, where: str) -> list:
    """`values` as a non-empty list; a single item (not a string or mapping) counts as a list of one."""
    if isinstance(values, (str, bytes, Mapping)) or values is None:
        raise fail(name, values, f"a non-empty list of {what}", where)
    if not isinstance(values, Iterable):
        return [values]
    items = list(values)
    if not items:
        raise fail(name, values, f"a non-empty list of {what}", where)
    return items


def whole_list(name: str, values: Any, minimum: int | None = 1, where: str = "") -> list[int]:
    """A non-empty list of whole numbers >= minimum, order kept (a single whole number is a list of one)."""
    what = "whole numbers" + _range_text(minimum, None)
    items = _items(name, values, what, where)
    if not all(is_whole(v) and (minimum is None or v >= minimum) and v <= WHOLE_MAX for v in items):
        raise fail(name, values, f"a non-empty list of {what}", where)
    return [int(v) for v in items]


def optional_whole_list(name: str, values: Any, minimum: int | None = 1, where: str = "") -> list[int] | None:
    """None, or a list as `whole_list` checks it."""
    if values is None:
        return None
    try:
        return whole_list(name, values, minimum, where)
    except KvlibError:
        what = "whole numbers" + _range_text(minimum, None)
        raise fail(name, values, f"None or a non-empty list of {what}", where) from None


def fraction_list(name: str, values: Any, where: str = "") -> list[float]:
    """A non-empty list of numbers from 0 to 1, order kept (a single number is a list of one)."""
    items = _items(name, values, "numbers from 0 to 1", where)
    if not all(is_number(v) and 0 <= v <= 1 for v in items):
        raise fail(name, values, "a non-empty list of numbers from 0 to 1", where)
    return [float(v) for v in items]


def name_list(name: str, values: Any, choices: Iterable[str] | None = None, where: str = "") -> list[str]:
    """A non-empty list of names (strings), order kept; a single name is a list of one; each one of `choices`."""
    items = [values] if isinstance(values, str) else _items(name, values, "names", where)
    allowed = None if choices is None else list(choices)
    what = "names" if allowed is None else "names from " + ", ".join(allowed)
    if not all(isinstance(v, str) for v in items):
        raise fail(name, values, f"a non-empty list of {what}", where)
    bad = [v for v in items if allowed is not None and v not in allowed]
    if bad:
        raise fail(name, values, f"a non-empty list of {what} (unknown: {', '.join(bad)})", where)
    return items


def options(name: str, given: Any, allowed: Sequence[str], where: str = "") -> dict[str, Any]:
    """Keyword options `given` (None or a mapping) whose names are all in `allowed`; returned as a dict. `where`
    names what has the options ("cache layout 'paged'")."""
    if given is None:
        return {}
    if not isinstance(given, Mapping) or not all(isinstance(k, str) for k in given):
        raise fail(name, given, "None or a mapping of option names to values", where)
    unknown = [k for k in given if k not in allowed]
    if unknown:
        k = unknown[0]
        has = ", ".join(allowed) if allowed else "none"
        raise KvlibError(f"{where or name} has no option {k!r} (given {name}[{k!r}] = {given[k]!r}); options: {has}")
    return dict(given)
