"""``nbdsink replicate`` and ``nbdsink status``: the sender and what it last achieved."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
from datetime import datetime
from typing import Any

from nbdsink.sender.state import LOCK_FILE, SenderState, StateDir
from nbdsink.sender.units import format_duration, format_size, parse_duration, parse_rate
from nbdsink.tracker import BACKENDS, TrackerError, open_tracker

DEFAULT_STATE = "/var/lib/nbdsink-sender"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "replicate", help="replicate a block device to a backup volume, continuously",
        description=(
            "Replicate DEVICE to the volume named by URI (nbd://HOST/VOLUME, nbds://..., "
            "nbd+unix:///VOLUME?socket=PATH). The first run copies the whole device (comparing "
            "with what the volume already holds); then every --interval a cycle sends the "
            "chunks the tracker saw written and commits them as a new version. With --freeze "
            "each version is the filesystem at one instant; without it, versions are marked "
            "as not point-in-time consistent. SIGTERM or Ctrl-C stop it cleanly: nothing that "
            "was not acknowledged is forgotten."
        ),
        epilog=("Exit status: 0 done (--once) or stopped; 1 an error (said on stderr); 2 "
                "usage; 3 the volume does not fit the device; 5 DEVICE is not the device this "
                "replication was started with (see --device-replaced); 6 another "
                "replication committed the volume's newest version (see --take-over)."),
    )
    p.add_argument("device", nargs="?", help="the block device to replicate, e.g. /dev/vg0/root")
    p.add_argument("uri", nargs="?",
                   help="the backup volume's head, e.g. nbds://backup.example/web01-root")
    p.add_argument("--config", metavar="FILE",
                   help="a TOML file with any of these options as keys (device, uri, state, "
                        "interval, freeze, max-freeze ...); the command line wins")
    p.add_argument("--state", metavar="DIR", default=DEFAULT_STATE,
                   help=f"state directory (default {DEFAULT_STATE}); one per replication")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--once", action="store_true", help="run one cycle, then exit")
    when.add_argument("--interval", type=parse_duration, default=10.0, metavar="DURATION",
                      help="time between cycle starts (default 10s)")
    p.add_argument("--freeze", metavar="MOUNTPOINT",
                   help="freeze this filesystem (on DEVICE, or on a LUKS or LVM device over it) "
                        "briefly so each version is point-in-time consistent")
    p.add_argument("--pre-hook", metavar="CMD", help="shell command run before each freeze")
    p.add_argument("--post-hook", metavar="CMD", help="shell command run after each thaw")
    p.add_argument("--frozen-hook", metavar="CMD",
                   help="shell command run while the filesystem is frozen, once the sender "
                        "has read what the version needs (for example a storage snapshot "
                        "of the same instant); it must not write to the frozen filesystem, "
                        "its time is not counted in --max-freeze, and NBDSINK_FROZEN_AT holds "
                        "the version's frozen_at label")
    p.add_argument("--hook-timeout", type=parse_duration, default=60.0, metavar="DURATION",
                   help="longest a hook may run (default 60s)")
    p.add_argument("--max-freeze", type=parse_duration, default=2.0, metavar="DURATION",
                   help="longest the filesystem may stay frozen; more than that to read and "
                        "the sender thaws and converges further (default 2s)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics")
    p.add_argument("--io-timeout", type=parse_duration, default=60.0, metavar="DURATION",
                   help="deadline of the connect, the handshake and every request; a server "
                        "that stops answering fails the cycle, which is retried (default 60s)")
    p.add_argument("--verify", action="store_true",
                   help="with --once: afterwards compare the whole device with the replica "
                        "(only digests cross the network) and send what differs in one more "
                        "version; a difference means a missed write: it is logged as a warning "
                        "and counted in 'status --json' under verify")
    p.add_argument("--verify-interval", type=parse_duration, default=0.0, metavar="DURATION",
                   help="compare the device with the replica every DURATION (e.g. 24h) while "
                        "replicating continuously")
    p.add_argument("--verify-rate", type=parse_rate, default=0, metavar="BYTES/S",
                   help="device read rate of those comparisons, e.g. 20M (default: unlimited)")
    p.add_argument("--device-replaced", action="store_true",
                   help="DEVICE replaces, on purpose, the device this replication was started "
                        "with (a restored copy, a new disk): accept its new identity and "
                        "compare it with the replica in full (without this, a device whose "
                        "identity changed is refused: a name like /dev/sdb can name another "
                        "disk after a reboot)")
    p.add_argument("--take-over", action="store_true",
                   help="replicate into the volume even though another replication (another "
                        "host or device) committed its newest version: the device moved to "
                        "another host, say (without this, such a volume is refused: two "
                        "replications into one volume would mix their devices)")
    p.add_argument("--tracker", choices=BACKENDS, default=None,
                   help="change tracker backend (default: the one already tracking DEVICE, "
                        "else bpf where the kernel has BTF, else dm)")
    p.add_argument("--rate", type=parse_rate, default=0, metavar="BYTES/S",
                   help="bandwidth limit, e.g. 50M (default: unlimited)")
    p.add_argument("--window", type=int, default=16,
                   help="requests in flight (default 16)")
    p.set_defaults(func=cmd_replicate)

    s = sub.add_parser(
        "status", help="what the sender last committed and how far behind it is",
        description="Show what a sender's state directory says: the last acknowledged version, "
                    "how old the data in it is, what is pending, the last cycle and error.",
    )
    s.add_argument("--state", metavar="DIR", default=DEFAULT_STATE,
                   help=f"state directory (default {DEFAULT_STATE})")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--max-lag", type=parse_duration, default=None, metavar="DURATION",
                   help="exit 3 when the newest replicated data is older than DURATION")
    s.set_defaults(func=cmd_status)
    s.epilog = ("Exit status, for monitors: 0 healthy; 1 the sender is not running; 3 it is "
                "behind by more than --max-lag; 4 its last comparison with the replica found "
                "differences (missed writes); 2 usage.")


def cmd_replicate(args: argparse.Namespace) -> int:
    if not args.device or not args.uri:
        from nbdsink.errors import UsageError

        raise UsageError("replicate needs DEVICE and URI (on the command line or in --config)")
    if args.verify and not args.once:
        from nbdsink.errors import UsageError

        raise UsageError("--verify goes with --once; continuous replication takes "
                         "--verify-interval DURATION")
    if (args.pre_hook or args.post_hook or args.frozen_hook) and not args.freeze:
        from nbdsink.errors import UsageError

        raise UsageError("--pre-hook, --post-hook and --frozen-hook run around a freeze: "
                         "give --freeze too")
    # The sender (trio, the NBD client, the pipeline) is imported here, not for `status`.
    import trio

    from nbdsink.sender.replicator import ReplicateOptions, replicate

    options = ReplicateOptions(
        device=args.device, uri=args.uri, state_dir=args.state, once=args.once,
        interval=args.interval, freeze=args.freeze, pre_hook=args.pre_hook,
        post_hook=args.post_hook, frozen_hook=args.frozen_hook, hook_timeout=args.hook_timeout,
        tracker=args.tracker, verify=args.verify, verify_interval=args.verify_interval,
        verify_rate=args.verify_rate, io_timeout=args.io_timeout,
        rate=args.rate, max_freeze=args.max_freeze, window=args.window,
        device_replaced=args.device_replaced, take_over=args.take_over,
    )
    if args.metrics:
        from nbdsink.metrics import serve_metrics

        serve_metrics(args.metrics)
    trio.run(replicate, options)
    return 0


# -- status ----------------------------------------------------------------------------------


def _holder(state_dir: StateDir) -> int | None:
    """The pid of the running sender, or None when nobody holds the lock."""
    path = state_dir.path / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        return None
    finally:
        os.close(fd)


def _age(iso_time: str | None) -> float | None:
    if iso_time is None:
        return None
    then = datetime.fromisoformat(iso_time.replace("Z", "+00:00"))
    return (datetime.now().astimezone() - then).total_seconds()


def status_report(state_dir: StateDir) -> dict[str, Any]:
    """Everything ``nbdsink status`` shows, as a JSON-able dict."""
    state: SenderState | None = state_dir.load()
    if state is None:
        from nbdsink.sender.errors import StateError

        raise StateError(f"{state_dir.path} holds no sender state (has replicate run there?)")
    report: dict[str, Any] = state.to_json()
    pid = _holder(state_dir)
    report["running"] = pid is not None
    report["pid"] = pid if pid and pid > 0 else None
    report["behind_seconds"] = _age(state.last_captured_at)
    report["pending_bytes"] = sum(n for _, n in state.pending)
    report["frozen_left_behind"] = state_dir.frozen_mountpoint() if pid is None else None
    try:
        tracker = open_tracker(state.device, state.tracker, consumer=None)
        report["tracker_status"] = tracker.status().to_json()
        tracker.close()
    except (TrackerError, OSError) as exc:
        report["tracker_status"] = None
        report["tracker_error"] = str(exc)
    return report


def health(report: dict[str, Any], max_lag: float | None) -> int:
    """The exit status ``status`` gives a monitor (see its epilog)."""
    if not report["running"]:
        return 1
    behind = report.get("behind_seconds")
    if max_lag is not None and (behind is None or behind > max_lag):
        return 3
    verify = report.get("verify") or {}
    if verify.get("chunks_differed"):
        return 4
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    report = status_report(StateDir(args.state))
    code = health(report, args.max_lag)
    if args.json:
        json.dump({**report, "health": code}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return code
    out = sys.stdout
    running = f"running (pid {report['pid']})" if report["running"] else "not running"
    out.write(f"sender:        {running}\n")
    out.write(f"device:        {report['device']} ({format_size(report['size'])})\n")
    if report.get("device_id"):
        out.write(f"identity:      {report['device_id']}\n")
    out.write(f"volume:        {report['volume']} at {report['uri']}\n")
    tracker = report.get("tracker_status")
    if tracker:
        out.write(f"tracker:       {tracker['backend']}, chunks of {format_size(tracker['chunk_size'])}, "
                  f"{format_size(tracker['dirty_bytes'])} marked dirty since the last acknowledge\n")
    else:
        out.write(f"tracker:       {report['tracker']}: {report.get('tracker_error', 'not running')}\n")
    if report["last_version"] is None:
        out.write("last version:  none yet (first sync not finished)\n")
    else:
        out.write(f"last version:  {report['last_version']} ({report['last_consistency']}), "
                  f"data as of {report['last_captured_at']}, committed {report['last_commit_at']}\n")
        behind = report["behind_seconds"]
        out.write(f"behind:        {format_duration(behind)} (the newest replicated data is "
                  f"that old)\n")
    if report["pending_bytes"]:
        out.write(f"pending:       {format_size(report['pending_bytes'])} sent, not yet committed\n")
    cycle = report.get("last_cycle")
    if cycle:
        freeze = (f", frozen {cycle['freeze_seconds'] * 1000:.0f}ms"
                  if cycle.get("freeze_seconds") is not None else "")
        out.write(f"last cycle:    {cycle['finished_at']}: {format_size(cycle['bytes_sent'])} sent "
                  f"in {format_duration(cycle['duration'])}{freeze}\n")
    if report.get("last_error"):
        out.write(f"last error:    {report['last_error']}\n")
    if report.get("frozen_left_behind"):
        out.write(f"warning:       {report['frozen_left_behind']} may still be frozen; the next "
                  "replicate start thaws it\n")
    verify = report.get("verify")
    if verify:
        out.write(f"verify:        {verify['chunks_compared']} chunks compared with version "
                  f"{verify.get('version')} at {verify['at']}, {verify['chunks_differed']} "
                  f"differed{' (MISSED WRITES: sent again)' if verify['chunks_differed'] else ''}\n")
    if not report["running"] and tracker:
        out.write(f"note:          {report['device']} is still tracked (so replication can "
                  f"resume); 'nbdsink track stop {report['device']}' releases it\n")
    return code
