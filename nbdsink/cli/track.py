"""``nbdsink track ...``: start, checkpoint, acknowledge, inspect and stop change trackers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from nbdsink.errors import UsageError
from nbdsink.tracker import registry, scan
from nbdsink.tracker.base import Tracker, TrackerError, TrackerStatus
from nbdsink.tracker.consumers import DEFAULT_CONSUMER, consumer_records, drop_consumer
from nbdsink.tracker.scan import ScanTracker
from nbdsink.units import format_size, parse_size


def register(sub: Any) -> None:
    p = sub.add_parser(
        "track", help="change tracking on block devices",
        description="Record which chunks of a block device are written, so that replication "
                    "sends only those. Tracking survives the process that started it.",
    )
    tsub = p.add_subparsers(dest="track_command", metavar="ACTION", required=True)

    s = tsub.add_parser("start", help="start tracking a device",
                        description="Start tracking DEVICE (a disk or a partition). Nothing is "
                                    "unmounted or remounted.")
    s.add_argument("device")
    s.add_argument("--chunk-size", metavar="SIZE", default="64K",
                   help="tracking granularity, a power of two from 4K to 64M (default 64K; use "
                        "the volume's block size)")
    s.add_argument("--backend", choices=registry.BACKENDS, default=None,
                   help="bpf (eBPF, default where the kernel has BTF), dm (device-mapper "
                        "target), scan (hash every chunk, no kernel help)")
    s.add_argument("--reference", metavar="FILE", type=Path,
                   help="scan backend: reference digests (32-byte blake3 per chunk); default: "
                        "the device's content now")
    s.set_defaults(func=cmd_start)

    c = tsub.add_parser("checkpoint", help="close the current generation and print what changed",
                        description="Close the current generation and print every chunk written "
                                    "since the last acknowledged generation, as byte extents.")
    c.add_argument("device")
    c.add_argument("--json", action="store_true",
                   help='print {"generation": K, "chunk_size": N, "extents": [[offset, length], ...]}')
    c.add_argument("--consumer", metavar="NAME", default=DEFAULT_CONSUMER,
                   help="whose acknowledgements count (default %(default)s); each consumer of "
                        "a device (a sender uses its state directory) gets everything since "
                        "its own last acknowledgement")
    c.set_defaults(func=cmd_checkpoint)

    a = tsub.add_parser("ack", help="forget the chunks of generations up to GENERATION",
                        description="The remote durably holds everything up to GENERATION: "
                                    "forget what those generations reported.")
    a.add_argument("device")
    a.add_argument("generation", type=int)
    a.add_argument("--consumer", metavar="NAME", default=DEFAULT_CONSUMER,
                   help="the consumer acknowledging (default %(default)s)")
    a.set_defaults(func=cmd_ack)

    f = tsub.add_parser("forget", help="unregister a consumer of a device's tracking",
                        description="Unregister CONSUMER (for example the state directory of a "
                                    "replication that was removed), so it holds nothing back.")
    f.add_argument("device")
    f.add_argument("consumer")
    f.set_defaults(func=cmd_forget)

    st = tsub.add_parser("status", help="every tracked device")
    st.add_argument("--json", action="store_true", help="one JSON list")
    st.set_defaults(func=cmd_status)

    sp = tsub.add_parser("stop", help="stop tracking a device and release its kernel objects")
    sp.add_argument("device")
    sp.set_defaults(func=cmd_stop)


def cmd_start(args: argparse.Namespace) -> int:
    chunk_size = parse_size(args.chunk_size)
    if args.reference is not None:
        if args.backend != "scan":
            raise UsageError("--reference only applies to --backend scan")
        try:
            reference = args.reference.read_bytes()
        except OSError as exc:
            raise TrackerError(f"{args.reference}: {exc.strerror}") from None
        tracker: Tracker = scan.start_scan(args.device, chunk_size, reference)
    else:
        tracker = registry.start_tracker(args.device, chunk_size, args.backend)
    print(f"tracking {args.device} with the {tracker.backend} backend, "
          f"{format_size(tracker.chunk_size)} chunks")
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    tracker = registry.open_tracker(args.device, consumer=args.consumer)
    try:
        dirty = tracker.checkpoint()
    finally:
        tracker.close()
    if args.json:
        print(json.dumps(dirty.to_json()))
        return 0
    print(f"generation {dirty.generation}: {len(dirty.extents)} extents, "
          f"{format_size(dirty.dirty_bytes)} to send")
    for off, length in dirty.extents:
        print(f"{off}\t{length}")
    return 0


def cmd_ack(args: argparse.Namespace) -> int:
    tracker = registry.open_tracker(args.device, consumer=args.consumer)
    try:
        tracker.acknowledge(args.generation)
    finally:
        tracker.close()
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    tracker = registry.open_tracker(args.device, consumer=None)
    try:
        if not isinstance(tracker, ScanTracker) and args.consumer not in consumer_records(tracker):
            raise TrackerError(f"{args.device} has no consumer {args.consumer!r}")
        if isinstance(tracker, ScanTracker):
            raise TrackerError("a scan tracking has one consumer: stop it instead")
        drop_consumer(tracker, args.consumer)
    finally:
        tracker.close()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    rows: list[tuple[TrackerStatus, dict[str, dict[str, int]]]] = []
    for t in registry.tracked():
        rows.append((t.status(), consumer_records(t)))
        t.close()
    if args.json:
        print(json.dumps([{**st.to_json(), "consumers": c} for st, c in rows]))
        return 0
    if not rows:
        print("no device is tracked")
        return 0
    print(f"{'DEVICE':<20} {'BACKEND':<8} {'CHUNK':>10} {'GENERATION':>10} {'DIRTY':>12}  CONSUMERS")
    for st, c in rows:
        print(f"{st.device:<20} {st.backend:<8} {format_size(st.chunk_size):>10} "
              f"{st.generation:>10} {format_size(st.dirty_bytes):>12}  {', '.join(c) or '-'}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    registry.stop_tracking(args.device)
    return 0
