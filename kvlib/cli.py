"""`python -m kvlib <command>`: one entry point; each command lives in its own module.

A command module provides `add_parser(subparsers)`, which registers its arguments and sets `func`, the function
that runs it and returns the exit code. User errors (KvlibError) become one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kvlib import checks
from kvlib.errors import KvlibError
from kvlib.models.config import PRESETS

COMMAND_MODULES = (
    "kvlib.measure.verify",
    "kvlib.measure.run_cli",
    "kvlib.measure.bench",
    "kvlib.models.generate_cli",
    "kvlib.measure.perplexity",
    "kvlib.measure.passkey",
)


def whole_arg(text: str, minimum: int, allowed: str) -> int:
    """argparse type: a whole number >= minimum, checked by kvlib.checks.whole (argparse names the flag)."""
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


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = Parser(prog="python -m kvlib", description="A study of KV caching in transformer inference.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed its one-line error (or --help)
        return int(e.code or 0)
    try:
        return args.func(args)
    except KvlibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rows already written are kept", file=sys.stderr)
        return 130
