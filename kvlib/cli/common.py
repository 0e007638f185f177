"""What every command shares: argparse types checked by kvlib.core.checks, the one-line parser, the model arguments,
flags with both spellings, and warnings shown as one line each."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Iterator
from typing import Any

from kvlib.caches.base import layout_options
from kvlib.core import checks
from kvlib.core.config import PRESETS
from kvlib.core.errors import KvlibError


def whole_arg(text: str, minimum: int, allowed: str) -> int:
    """argparse type: a whole number >= minimum, checked by kvlib.core.checks.whole (argparse names the flag)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    try:
        return checks.whole("value", value, minimum)
    except KvlibError:
        too_big = value > checks.WHOLE_MAX
        raise argparse.ArgumentTypeError(f"{text!r} must be {'at most 2^63 - 1' if too_big else allowed}") from None


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    return whole_arg(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    return whole_arg(text, 0, ">= 0")


class Parser(argparse.ArgumentParser):
    """argparse, with the error shortened to one line (no usage block) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_model_args(p: argparse.ArgumentParser, model: str = "distilgpt2", weights: str = "auto") -> None:
    """The arguments every command that loads a model shares; underscores and hyphens both work."""
    p.add_argument(
        "--model",
        default=model,
        help=f"preset ({', '.join(PRESETS)}) or a local folder [{model}]",
    )
    p.add_argument("--weights", default=weights, choices=("pretrained", "random", "auto"), help=f"[{weights}]")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto [cpu]")
    p.add_argument("--dtype", default="float32", help="float32/fp32, bfloat16/bf16, float16/fp16 [float32]")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of random weights and prompts [0]")


def flag(p: argparse.ArgumentParser, name: str, **kwargs: object) -> None:
    """Add --name with both spellings, --batch_size and --batch-size."""
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    p.add_argument(*sorted(spellings), dest=name, **kwargs)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Warnings (RANDOM WEIGHTS, ...) as one `warning: ...` line on stderr, not Python's two-line format."""
    shown = warnings.showwarning

    def show(message: Any, *args: Any, **kwargs: Any) -> None:
        print(f"warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def rotate_flag(p: argparse.ArgumentParser) -> None:
    """--rotate: the quantized layout's `rotate` option (None when not given, so that only layouts taking it get it)."""
    p.add_argument(
        "--rotate",
        action="store_true",
        default=None,
        help="quantized: quantize after a Hadamard rotation over head_dim, rotated back when read (QuaRot, "
        "llama.cpp) [off]",
    )


def default_of(layout: str, option: str) -> str:
    """ "[value]": a layout option's default as the help texts show it, read from the layout (its constructor is the one
    place a default is written)."""
    return f"[{layout_options(layout)[option]}]"
