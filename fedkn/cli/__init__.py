"""The ``fedkn`` command line: the only place in fedkn that reads argv.

Each subcommand lives in its own module of this package and exposes
``register(subparsers) -> None``, which adds its parser and sets ``func`` (a callable taking the
parsed namespace and returning an exit code). Bad input surfaces as :class:`fedkn.errors.FedknError`
and is printed as one line with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from fedkn import __version__
from fedkn.errors import FedknError

#: Subcommand modules, in the order ``fedkn --help`` lists them.
COMMANDS: tuple[str, ...] = ("partition", "run", "compare", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedkn",
        description="Federated learning with KernelNorm and other normalization layers, on Flower.",
    )
    parser.add_argument("--version", action="version", version=f"fedkn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"fedkn.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FedknError as err:
        print(f"fedkn: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedkn: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` or the like, which stopped reading: not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
