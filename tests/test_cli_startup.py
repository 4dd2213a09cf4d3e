"""A command imports its own modules only: the parser built for one command is the full one as
far as that command goes, and a local restore (or its --help) loads no event loop, no NBD
client, no metrics."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nbdsink.cli.main import COMMAND_MODULES, build_parser, command_of


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    choices: dict[str, argparse.ArgumentParser] = action.choices
    return choices


def _helps(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, str]:
    """Every (sub)command's help text, by its words."""
    out = {}
    for name, sub in _subparsers(parser).items():
        out[prefix + name] = sub.format_help()
        if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
            out.update(_helps(sub, prefix + name + " "))
    return out


def test_the_table_names_what_each_module_registers() -> None:
    parser = argparse.ArgumentParser()
    sub: Any = parser.add_subparsers()
    for name, commands in COMMAND_MODULES.items():
        before = set(sub.choices)
        importlib.import_module(name).register(sub)
        added = set(sub.choices) - before
        assert added <= set(commands), (name, added)
        assert set(commands) - added <= before, (name, commands)  # `volume` was there already
    assert list(sub.choices) == list(_subparsers(build_parser()))


@pytest.mark.parametrize("command", sorted({c for cs in COMMAND_MODULES.values() for c in cs}))
def test_a_command_parser_is_the_full_one_for_that_command(command: str) -> None:
    def own(helps: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in helps.items() if k == command or k.startswith(command + " ")}

    mine = own(_helps(build_parser(command)))
    assert mine and mine == own(_helps(build_parser()))


def test_which_arguments_build_one_command() -> None:
    assert command_of(["restore", "a", "b"]) == "restore"
    assert command_of(["-v", "--verbose", "versions", "v"]) == "versions"
    # Everything else builds the whole parser: its help, its version, its errors.
    for argv in ([], ["--help"], ["-h", "restore"], ["--version"], ["nosuch"], ["-vv", "gc"],
                 ["--", "gc"]):
        assert command_of(argv) is None, argv


_REMOTE = ("trio", "nbdsink.nbd", "nbdsink.sender", "tomllib")
"""What only a remote restore, or another command, needs."""
_SERVER = ("prometheus_client", "nbdsink.metrics", "nbdsink.store.head")
"""The server's: a restore without --assume reads the digests view as a server does."""

_PROBE = """
import contextlib, json, sys
from nbdsink.cli.main import main
with contextlib.suppress(SystemExit), contextlib.redirect_stdout(sys.stderr):
    status = main(sys.argv[1:])
print(json.dumps(sorted(sys.modules)))
"""


def _loaded(argv: list[str], among: tuple[str, ...]) -> set[str]:
    """The modules of ``among`` (or below them) that running ``argv`` imports."""
    run = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True,
                         check=True)
    return {m for m in json.loads(run.stdout)
            if any(m == name or m.startswith(name + ".") for name in among)}


def test_restore_loads_only_what_a_local_restore_needs(tmp_path: Path) -> None:
    store = tmp_path / "store"
    subprocess.run([sys.executable, "-m", "nbdsink.cli.main", "volume", "create", "v", "--size",
                    "1M", "--store", str(store)], check=True, capture_output=True)
    from nbdsink.store import Store
    from nbdsink.store.head import Head

    with Store(store) as s:
        head = Head(s, s.volume("v"))
        head.write(memoryview(b"x" * 65536), 0)
        assert head.commit() is not None
    dest = tmp_path / "dest.img"
    dest.write_bytes(bytes(1 << 20))
    assert not _loaded(["restore", "v@1", str(dest), "--store", str(store)], _REMOTE)
    assert dest.read_bytes()[:65536] == b"x" * 65536
    for argv in (["restore", "--help"],
                 ["restore", "v@1", str(dest), "--assume", "v@1", "--store", str(store)],
                 ["versions", "v", "--store", str(store)]):
        assert not _loaded(argv, _REMOTE + _SERVER), argv
