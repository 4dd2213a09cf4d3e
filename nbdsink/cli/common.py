"""Arguments shared by the server-side subcommands."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nbdsink.store import Store

DEFAULT_STORE = "/var/lib/nbdsink"


def add_store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store", metavar="DIR", default=None,
        help=f"store directory (default: $NBDSINK_STORE, else {DEFAULT_STORE})",
    )


def store_path(args: argparse.Namespace) -> str:
    path: str = args.store or os.environ.get("NBDSINK_STORE") or DEFAULT_STORE
    return path


def open_store(args: argparse.Namespace, create: bool = False) -> Store:
    # Imported here: registering a command's arguments (and its --help) needs no store.
    from nbdsink.store import Store

    return Store(store_path(args), create=create)
