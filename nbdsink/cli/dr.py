"""Disaster recovery: ``nbdsink clone`` and ``nbdsink restore`` (docs/dr.md has the runbook)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

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
                        "(from the store's maps) and those dirty blocks. Refused for a block "
                        "device nothing tracks, and when DEST, read at a few places, does not "
                        "hold VOL@M where nothing is to be written")
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
    progress = _ProgressLine(show=sys.stderr.isatty() and not args.json)
    if "://" in args.source:
        from nbdsink import restore_remote  # trio and the NBD client: only for this case

        plan, written = restore_remote.run(args.source, None, args.assume,
                                           lambda source: _restore(source, args, progress))
    else:
        with open_store(args) as store:
            source = restoring.LocalSource(store, args.source, args.assume)
            plan, written = restoring.run_local(_restore(source, args, progress), source)
    if progress.show:
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


class _ProgressLine:
    """The restore's progress on a terminal, one line rewritten: when the percentage changes,
    or a second after it was last written (the elapsed time goes on)."""

    def __init__(self, show: bool) -> None:
        self.show = show
        self.started = time.monotonic()
        self._last: tuple[str, int, float] = ("", -1, 0.0)

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.show or not total:
            return
        now = time.monotonic()
        percent = 100 * done // total
        last_phase, last_percent, last_time = self._last
        if (phase, percent) == (last_phase, last_percent) and now - last_time < 1:
            return
        self._last = (phase, percent, now)
        print(f"\rrestore: {phase} {percent:3d}% ({done} of {total} blocks, "
              f"{now - self.started:.0f}s)   ", end="", file=sys.stderr, flush=True)


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
