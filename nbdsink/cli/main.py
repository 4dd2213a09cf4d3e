"""``nbdsink`` entry point: builds the argument parser from the subcommand modules.

Each module in :data:`COMMAND_MODULES` has ``register(subparsers)``, which adds its
subcommands and sets ``func`` (taking the parsed arguments, returning an exit status).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from nbdsink import __version__
from nbdsink.errors import NbdsinkError

COMMAND_MODULES = [
    "nbdsink.cli.store_commands",
    "nbdsink.cli.space",
    "nbdsink.cli.dr",
    "nbdsink.cli.serve",
    "nbdsink.cli.replicate",
    "nbdsink.cli.track",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbdsink",
        description=(
            "Continuous block-level replication over NBD. A backup host keeps every "
            "replicated point in time in a deduplicated store and serves each one as an "
            "NBD export (vol, vol@N, vol@latest, vol@<ISO time>)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"nbdsink {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except NbdsinkError as exc:
        # A value an argument's type refused (a size, a duration, a rate): one line.
        print(f"nbdsink: error: {exc}", file=sys.stderr)
        return exc.exit_code
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        status: int = args.func(args)
    except NbdsinkError as exc:
        print(f"nbdsink: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head` and the like: not an error worth a traceback.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stdout must stay valid at exit
        return 141
    return status


if __name__ == "__main__":
    sys.exit(main())
