"""``nbdsink`` entry point: builds the argument parser from the subcommand modules.

Each module in :data:`COMMAND_MODULES` has ``register(subparsers)``, which adds its
subcommands and sets ``func`` (taking the parsed arguments, returning an exit status).

Only the modules of the command being run are imported: a command's start-up is Python's and
its own, not every other command's (trio, the sender, prometheus_client ... cost more than a
quick command does). Everything else (``nbdsink --help``, a command that does not exist)
builds the whole parser, so that help and errors list every command.
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
from nbdsink.errors import NbdsinkError, UsageError

COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "nbdsink.cli.store_commands": ("volume", "versions"),
    "nbdsink.cli.space": ("volume", "prune", "pin", "unpin", "gc", "verify", "df"),
    "nbdsink.cli.dr": ("clone", "restore"),
    "nbdsink.cli.serve": ("serve",),
    "nbdsink.cli.replicate": ("replicate", "status"),
    "nbdsink.cli.track": ("track",),
}
"""Each module, in the order the full parser registers them, with the commands it registers
(``volume``'s actions come from two modules)."""

_GLOBAL_FLAGS = ("-v", "--verbose")
"""The options of ``nbdsink`` itself that may come before a command without needing the whole
parser (``-h`` or ``--version`` there print nbdsink's own help or version)."""


def command_of(argv: Sequence[str]) -> str | None:
    """The command ``argv`` runs, when the parser needs only its modules: its first word, after
    nothing but ``-v``, and a command some module registers. None otherwise."""
    for arg in argv:
        if arg in _GLOBAL_FLAGS:
            continue
        if any(arg in commands for commands in COMMAND_MODULES.values()):
            return arg
        return None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with ``command`` only of that command (the one
    :func:`command_of` found): the same parser as far as that command is concerned."""
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
    for name, commands in COMMAND_MODULES.items():
        if command is None or command in commands:
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
    import tomllib  # only here: a command without --config does not pay for it

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
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(command_of(arguments))
    try:
        apply_config_file(parser, arguments)
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
