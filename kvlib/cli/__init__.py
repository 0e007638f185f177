"""`python -m kvlib <command>`: one entry point, and every command's parser and entry point in this package.

A command module provides `add_parser(subparsers)`, which registers its arguments and sets `func`, the function
that runs it and returns the exit code (its work lives in the layers below: kvlib.measure, kvlib.models, ...).
User errors (KvlibError) become one line on stderr and exit 2. The report's commands too: `python -m kvlib report
run|index|check` and `python -m kvlib check-report` (kvlib.cli.report).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kvlib.cli import bench, generate, passkey, perplexity, report, run, verify
from kvlib.cli.common import Parser
from kvlib.core.errors import KvlibError

COMMANDS = (verify, run, bench, generate, perplexity, passkey, report)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m kvlib", description="A study of KV caching in transformer inference.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(sub)
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
