"""``nbdsink volume ...`` and ``nbdsink versions``: managing what the store holds."""

from __future__ import annotations

import argparse
import json
from typing import Any

from nbdsink.cli.common import add_store_argument, open_store
from nbdsink.units import format_size, parse_size


def register(sub: Any) -> None:
    volume = sub.add_parser("volume", help="create and list volumes in a store",
                            description="Create and list the volumes of a store.")
    vsub = volume.add_subparsers(dest="volume_command", metavar="ACTION", required=True)

    create = vsub.add_parser(
        "create", help="create a volume",
        description="Create a volume: a fixed-size block device image that the head export "
                    "NAME accepts writes for. The store is created if it does not exist.",
    )
    create.add_argument("name", help="volume name (no '@', '/' or ';')")
    create.add_argument("--size", required=True, type=parse_size,
                        help="size in bytes or with a unit: 20G, 512M (multiple of 512)")
    create.add_argument("--block-size", type=parse_size, default=65536,
                        help="block (dedup) size, a power of two from 4K to 4M (default 64K)")
    add_store_argument(create)
    create.set_defaults(func=cmd_volume_create)

    lst = vsub.add_parser("list", help="list volumes", description="List the volumes of a store.")
    lst.add_argument("--json", action="store_true", help="print JSON")
    add_store_argument(lst)
    lst.set_defaults(func=cmd_volume_list)

    versions = sub.add_parser(
        "versions", help="list the committed versions of a volume",
        description="List the committed versions (points in time) of a volume. Each one can be "
                    "attached read-only as the export NAME@N.",
    )
    versions.add_argument("name", help="volume name")
    versions.add_argument("--json", action="store_true",
                          help="print a JSON list of {version, time, size, blocks_changed, "
                               "bytes_stored, chunks_stored, consistency, labels}")
    add_store_argument(versions)
    versions.set_defaults(func=cmd_versions)


def cmd_volume_create(args: argparse.Namespace) -> int:
    with open_store(args, create=True) as store:
        info = store.create_volume(args.name, args.size, args.block_size)
    print(f"created volume {info.name}: {format_size(info.size)}, block size "
          f"{format_size(info.block_size)}")
    return 0


def cmd_volume_list(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        rows = [(v, store.latest_version(v)) for v in store.volumes()]
    if args.json:
        print(json.dumps([dict(v.to_json(), latest_version=latest) for v, latest in rows],
                         indent=2))
        return 0
    print(f"{'NAME':<24} {'SIZE':>12} {'BLOCK':>9} {'VERSIONS':>8}")
    for v, latest in rows:
        print(f"{v.name:<24} {format_size(v.size):>12} {format_size(v.block_size):>9} {latest:>8}")
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        volume = store.volume(args.name)
        versions = store.versions(volume)
    if args.json:
        print(json.dumps([v.to_json() for v in versions], indent=2))
        return 0
    if not versions:
        print(f"volume {volume.name} has no committed version yet")
        return 0
    print(f"{'VERSION':>7}  {'TIME (UTC)':<27} {'CHANGED':>9} {'STORED':>11}  CONSISTENCY")
    for v in versions:
        print(f"{v.version:>7}  {v.time:<27} {v.blocks_changed:>9} "
              f"{format_size(v.bytes_stored):>11}  {v.consistency}")
    return 0
