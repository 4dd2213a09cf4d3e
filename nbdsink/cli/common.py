"""Arguments shared by the server-side subcommands."""

from __future__ import annotations

import argparse
import os

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
    return Store(store_path(args), create=create)
