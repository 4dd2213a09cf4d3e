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
import tomllib
from collections.abc import Sequence

from nbdsink import __version__
from nbdsink.errors import NbdsinkError, UsageError

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


CONFIG_COMMANDS = ("serve", "replicate")


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """``serve --config FILE`` and ``replicate --config FILE``: every long option of the command
    as a TOML key (``max-freeze = "2s"``, ``device = "/dev/sdb"``); the command line wins."""
    command = next((a for a in argv if not a.startswith("-")), None)
    path = None
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
    if path is None or command not in CONFIG_COMMANDS:
        return
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise UsageError(f"--config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--config {path}: not valid TOML: {exc}") from None
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cmd_parser = sub.choices[command]
    actions = {a.dest: a for a in cmd_parser._actions}
    defaults = {}
    for key, value in data.items():
        dest = key.replace("-", "_")
        action = actions.get(dest)
        if action is None or dest in ("help", "config"):
            raise UsageError(f"--config {path}: {command} has no option {key!r}")
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            if not isinstance(value, bool):
                raise UsageError(f"--config {path}: {key} must be true or false")
        elif action.type is not None and not isinstance(value, str):
            value = str(value)  # through the option's own parser, as on the command line
        defaults[dest] = value
    cmd_parser.set_defaults(**defaults)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        apply_config_file(parser, list(sys.argv[1:] if argv is None else argv))
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
