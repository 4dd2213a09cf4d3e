"""Retention and space: ``volume set``, ``prune``, ``pin``/``unpin``, ``gc``, ``volume delete``,
``df``. The server does pruning and reclaiming by itself; these commands do it now, or show it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from nbdsink.cli.common import add_store_argument, open_store, store_path
from nbdsink.errors import UsageError
from nbdsink.store import StoreLocked
from nbdsink.store.retention import Policy
from nbdsink.store.serve_lock import take_serve_lock
from nbdsink.store.store import GARBAGE_GRACE_SECONDS, Store
from nbdsink.units import format_size, parse_duration

_RULES = ("last", "minutely", "hourly", "daily", "weekly", "monthly", "yearly")


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"a count cannot be negative: {text}")
    return n


def _positive_int(text: str) -> int:
    n = _count(text)
    if n == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_keep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep-within", type=_duration, metavar="DURATION",
                   help="keep every version newer than the newest one minus DURATION (2h, 3d)")
    for rule in _RULES:
        what = "versions" if rule == "last" else f"{rule} periods (the newest version of each)"
        p.add_argument(f"--keep-{rule}", type=_count, metavar="N",
                       help=f"keep the last N {what}")


def policy_from(args: argparse.Namespace) -> Policy:
    return Policy(
        keep_within=args.keep_within,
        **{f"keep_{rule}": getattr(args, f"keep_{rule}") for rule in _RULES},
    )


def _split_version(text: str) -> tuple[str, int]:
    name, sep, number = text.rpartition("@")
    if not sep or not name or not number.isascii() or not number.isdigit():
        raise UsageError(f"expected VOLUME@N (for example web01@1234), not {text!r}")
    return name, int(number)


def register(sub: Any) -> None:
    # `volume` is absent when the parser is built for another command of this module only.
    if "volume" in sub.choices:
        _register_volume_actions(_volume_parser(sub))

    p = sub.add_parser(
        "prune", help="delete the versions a retention policy does not keep",
        description="Apply VOLUME's retention policy now; --keep-* flags override its rules "
                    "for this run. The newest version, pinned versions, clone bases and "
                    "versions a client is reading are kept.",
    )
    p.add_argument("name", help="volume name")
    add_keep_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="only say what would be pruned")
    p.add_argument("--json", action="store_true",
                   help="print every version with 'kept' and the rule that kept it")
    add_store_argument(p)
    p.set_defaults(func=cmd_prune)

    pin = sub.add_parser("pin", help="protect a version from pruning",
                         description="Protect VOLUME@N from every retention policy.")
    pin.add_argument("version", metavar="VOLUME@N")
    pin.add_argument("--note", default="", help="why it is kept")
    add_store_argument(pin)
    pin.set_defaults(func=cmd_pin)

    unpin = sub.add_parser("unpin", help="let a version be pruned again")
    unpin.add_argument("version", metavar="VOLUME@N")
    add_store_argument(unpin)
    unpin.set_defaults(func=cmd_unpin)

    gc = sub.add_parser(
        "gc", help="reclaim disk space now",
        description="Finish interrupted prunes and deletions, delete unreferenced chunks and "
                    "compact segments, giving disk space back. While a server runs, chunks "
                    f"unreferenced for less than {GARBAGE_GRACE_SECONDS:g}s are left to it.",
    )
    gc.add_argument("--json", action="store_true", help="print a JSON summary")
    add_store_argument(gc)
    gc.set_defaults(func=cmd_gc)

    ver = sub.add_parser(
        "verify", help="check the store for damage (exit 0: clean, 1: damage found)",
        description="Check every map entry, index entry and version record (and with --full "
                    "re-hash every chunk). Damaged chunks are quarantined (reads give EIO) "
                    "and listed with the volumes, versions and blocks that use them; they "
                    "heal when the same content is written again (replicate --once --verify "
                    "from the source). Of the whole store it also recounts the map entries "
                    "using each chunk and sets a wrong reference count back (one too low "
                    "would let garbage collection delete a chunk in use). "
                    "Exit status 0: clean; 1: damage found; 2: usage.",
    )
    ver.add_argument("target", nargs="?", metavar="VOL[@N]",
                     help="one volume, or one version's chunks (default: the whole store)")
    ver.add_argument("--full", action="store_true",
                     help="also read every chunk and check it against its digest (blake3)")
    ver.add_argument("--json", action="store_true", help="print a JSON report")
    ver.add_argument("--jobs", type=_positive_int, metavar="N",
                     help="worker processes that walk LMDB's pages and, with --full, re-hash "
                          "the chunks (default: one per CPU, at most 8; 1: all in this "
                          "process)")
    add_store_argument(ver)
    ver.set_defaults(func=cmd_verify)

    df = sub.add_parser("df", help="space used, per volume and in total",
                        description="Logical bytes (the newest version's data), referenced "
                                    "bytes (distinct chunks), bytes in segments, bytes on disk.")
    df.add_argument("--json", action="store_true", help="print JSON")
    add_store_argument(df)
    df.set_defaults(func=cmd_df)


def _register_volume_actions(volume: Any) -> None:
    """``volume set`` and ``volume delete``, into the ``volume`` command's sub-parsers."""
    vset = volume.add_parser(
        "set", help="set a volume's retention policy",
        description="Set the retention policy the server applies to VOLUME after commits (and "
                    "'nbdsink prune' uses). Rules as borg and Proxmox Backup Server define "
                    "them; the newest, pinned and clone-base versions are always kept.",
    )
    vset.add_argument("name", help="volume name")
    add_keep_arguments(vset)
    vset.add_argument("--no-retention", action="store_true",
                      help="remove the policy: keep every version")
    add_store_argument(vset)
    vset.set_defaults(func=cmd_volume_set)

    vdel = volume.add_parser(
        "delete", help="delete a volume and all its versions",
        description="Delete VOLUME and every version of it. The space comes back with the "
                    "next gc (the server runs one by itself).",
    )
    vdel.add_argument("name", help="volume name")
    vdel.add_argument("--yes", action="store_true", help="really delete (required)")
    add_store_argument(vdel)
    vdel.set_defaults(func=cmd_volume_delete)


def _volume_parser(sub: Any) -> Any:
    """The ``volume`` command's sub-parsers (``volume create``/``list`` are registered by
    :mod:`nbdsink.cli.store_commands`, which runs first)."""
    volume = sub.choices["volume"]
    return next(a for a in volume._actions if isinstance(a, argparse._SubParsersAction))


def cmd_volume_set(args: argparse.Namespace) -> int:
    policy = policy_from(args)
    if args.no_retention and not policy.is_empty():
        raise UsageError("--no-retention takes no --keep-* flags")
    if not args.no_retention and policy.is_empty():
        raise UsageError("give at least one --keep-* rule, or --no-retention")
    with open_store(args) as store:
        store.set_retention(store.volume(args.name), None if args.no_retention else policy.to_json())
    print(f"{args.name}: {'no retention policy: every version is kept' if args.no_retention else policy.describe()}")
    return 0


def cmd_volume_delete(args: argparse.Namespace) -> int:
    if not args.yes:
        raise UsageError(f"deleting {args.name} and all its versions needs --yes")
    from nbdsink.store import reclaim  # here: pin, volume set ... do not need it

    with open_store(args) as store:
        reclaim.delete_volume(store, args.name)
    print(f"deleted volume {args.name}; its space comes back with the next gc")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from nbdsink.store import reclaim

    override = policy_from(args)
    with open_store(args) as store:
        volume = store.volume(args.name)
        times = [(v.version, v.time) for v in store.versions(volume)]
        policy = None if override.is_empty() else override
        if policy is None and not volume.retention:
            raise UsageError(f"volume {args.name} has no retention policy: give --keep-* rules "
                             "or set one with 'nbdsink volume set'")
        report = reclaim.prune(store, volume, policy, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.to_json(times), indent=2))
        return 0
    verb = "would prune" if args.dry_run else "pruned"
    print(f"{args.name}: {report.policy}: {verb} {len(report.pruned)} of {len(times)} versions, "
          f"kept {len(report.kept)}")
    for version, rule in sorted(report.kept.items()):
        print(f"  keep  {version:>8}  {rule}")
    for version in report.pruned:
        print(f"  {'prune' if args.dry_run else 'gone '} {version:>8}")
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    name, number = _split_version(args.version)
    with open_store(args) as store:
        store.pin(store.volume(name), number, args.note)
    print(f"pinned {name}@{number}")
    return 0


def cmd_unpin(args: argparse.Namespace) -> int:
    name, number = _split_version(args.version)
    with open_store(args) as store:
        if not store.unpin(store.volume(name), number):
            print(f"{name}@{number} was not pinned")
            return 0
    print(f"unpinned {name}@{number}")
    return 0


@contextlib.contextmanager
def _server_absent(path: str) -> Iterator[bool]:
    """True (holding the serve lock meanwhile) when no server serves the store."""
    try:
        fd = take_serve_lock(path)
    except StoreLocked:
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)


def cmd_gc(args: argparse.Namespace) -> int:
    from nbdsink.store import reclaim

    path = store_path(args)
    with _server_absent(path) as alone, Store(path) as store:
        before = reclaim.usage(store, per_volume=False)["total"]["disk_bytes"]
        reclaim.finish_pruning(store)
        reclaim.finish_deletions(store)
        # Without a server nobody can hold a chunk it took as stored: no grace needed.
        swept = reclaim.sweep(store, grace=0.0 if alone else GARBAGE_GRACE_SECONDS)
        reclaim.seal_dirty(store, min_dead=0.1)
        punched = reclaim.punch_holes(store)
        retired = reclaim.compact(store, min_dead=0.1)
        after = reclaim.usage(store, per_volume=False)["total"]["disk_bytes"]
    summary = {"chunks_deleted": swept.chunks, "bytes_deleted": swept.bytes,
               "chunks_punched": punched.chunks, "bytes_punched": punched.bytes,
               "segments_compacted": retired, "disk_bytes_before": before,
               "disk_bytes_after": after, "server_running": not alone}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"deleted {swept.chunks} unreferenced chunks ({format_size(swept.bytes)}), compacted "
          f"{len(retired)} segment(s); on disk {format_size(before)} -> {format_size(after)}")
    if not alone:
        print(f"(a server is running: chunks unreferenced for less than "
              f"{GARBAGE_GRACE_SECONDS:g}s are left for its own gc)")
    return 0


def cmd_df(args: argparse.Namespace) -> int:
    from nbdsink.store import reclaim

    with open_store(args) as store:
        report = reclaim.usage(store)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'VOLUME':<24} {'VERSIONS':>8} {'LOGICAL':>12} {'REFERENCED':>12}")
    for v in report["volumes"]:
        print(f"{v['name']:<24} {v['versions']:>8} {format_size(v['logical_bytes']):>12} "
              f"{format_size(v['referenced_bytes']):>12}")
    t = report["total"]
    print(f"total: logical {format_size(t['logical_bytes'])}, referenced "
          f"{format_size(t['referenced_bytes'])}, in segments {format_size(t['stored_bytes'])}, "
          f"on disk {format_size(t['disk_bytes'])}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from nbdsink.store import check  # here: only verify walks the store's pages

    volume, version = None, None
    if args.target:
        if "@" in args.target:
            volume, version = _split_version(args.target)
        else:
            volume = args.target
    show = sys.stderr.isatty() and not args.json
    started = time.monotonic()

    def progress(done: int, total: int) -> None:
        if show and total:
            rate = done / max(1e-6, time.monotonic() - started)
            what = (f"{format_size(done)} of {format_size(total)}, {format_size(rate)}/s"
                    if args.full else f"{done} of {total} chunks")
            print(f"\rverify: {100 * done // total:3d}% ({what})   ", end="", file=sys.stderr,
                  flush=True)

    # The walk of LMDB's pages comes before the store is opened: opening a damaged store
    # could crash where the walk reports.
    report = check.verify_store(store_path(args), volume, version, full=args.full,
                                progress=progress, jobs=args.jobs)
    if show:
        print(file=sys.stderr)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(check.report_text(report))
    return 0 if report.clean else 1
