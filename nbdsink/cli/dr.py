"""Disaster recovery: ``nbdsink clone`` and ``nbdsink restore`` (docs/dr.md has the runbook)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import trio

from nbdsink import restore as restoring
from nbdsink.cli.common import add_store_argument, open_store
from nbdsink.units import format_size


def register(sub: Any) -> None:
    c = sub.add_parser(
        "clone", help="a new volume whose version 1 is an existing version (instant)",
        description="Make NEWVOL, whose version 1 is VOL@N: no data is copied, every chunk is "
                    "shared. Its head is writable like any volume's (attach it, replicate into "
                    "it, clone it again); VOL@N is kept from pruning while the clone exists. "
                    "Deleting the clone releases it.",
    )
    c.add_argument("source", metavar="VOL@N", help="the version to clone (N or latest)")
    c.add_argument("name", metavar="NEWVOL")
    add_store_argument(c)
    c.set_defaults(func=cmd_clone)

    r = sub.add_parser(
        "restore", help="make a device hold a version, writing only what differs",
        description="Restore SOURCE (VOL@N from --store, or nbd[s]://HOST/VOL@N from a server) "
                    "onto DEST (a block device or an image file). DEST's chunks are hashed and "
                    "compared with the version's digests, and only the blocks that differ are "
                    "read and written; an interrupted restore run again continues. Refuses a "
                    "mounted DEST, a DEST smaller than the version, and a DEST a running sender "
                    "replicates.",
    )
    r.add_argument("source", metavar="SOURCE")
    r.add_argument("dest", metavar="DEST")
    r.add_argument("--assume", metavar="VOL@M",
                   help="trust that DEST holds VOL@M plus what the tracker on DEST recorded "
                        "since: write exactly the blocks that differ between VOL@M and SOURCE "
                        "(from the store's maps, DEST is not read) and those dirty blocks")
    r.add_argument("--dry-run", action="store_true", help="only say what would be written")
    r.add_argument("--json", action="store_true", help="print a JSON summary")
    add_store_argument(r)
    r.set_defaults(func=cmd_restore)


def cmd_clone(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        source, version = restoring.resolve_version(store, args.source)
        info = store.clone(source, version, args.name)
    name = source.name
    print(f"cloned {name}@{version} as {info.name} (its version 1); {name}@{version} is kept "
          f"while the clone exists")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    show = sys.stderr.isatty() and not args.json
    started = time.monotonic()

    def progress(phase: str, done: int, total: int) -> None:
        if show and total:
            print(f"\rrestore: {phase} {100 * done // total:3d}% ({done} of {total} blocks, "
                  f"{time.monotonic() - started:.0f}s)   ", end="", file=sys.stderr, flush=True)

    async def run() -> tuple[restoring.RestorePlan, int]:
        if "://" in args.source:
            remote = restoring.RemoteSource(args.source, None, args.assume)
            async with remote.opened() as source:
                return await _restore(source, args, progress)
        with open_store(args) as store:
            return await _restore(restoring.LocalSource(store, args.source, args.assume), args,
                                  progress)

    plan, written = trio.run(run)
    if show:
        print(file=sys.stderr)
    summary = {**plan.to_json(), "dry_run": args.dry_run, "bytes_written": written}
    if args.json:
        print(json.dumps(summary, indent=2))
    elif args.dry_run:
        print(f"would write {len(plan.blocks)} of {plan.compared} blocks "
              f"({format_size(plan.bytes)}) of {plan.version} to {args.dest}")
    else:
        print(f"restored {plan.version} to {args.dest}: wrote {len(plan.blocks)} of "
              f"{plan.compared} blocks ({format_size(written)})")
    return 0


async def _restore(source: restoring.Source, args: argparse.Namespace,
                   progress: restoring.Progress) -> tuple[restoring.RestorePlan, int]:
    dest = restoring.Destination(args.dest)
    try:
        restoring.check_destination(dest, source.size)
        plan = await restoring.plan(source, dest, args.assume, progress)
        written = 0 if args.dry_run else await restoring.execute(source, dest, plan, progress)
    finally:
        dest.close()
    return plan, written
