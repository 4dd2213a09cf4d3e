"""``nbdsink serve``: run nbdkit with the nbdsink plugin over a store, in the foreground."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import nbdsink
from nbdsink.cli.common import add_store_argument, store_path
from nbdsink.errors import NbdsinkError, UsageError
from nbdsink.metrics import parse_address
from nbdsink.server.access import AccessRules
from nbdsink.store import Store, structure
from nbdsink.store.serve_lock import take_serve_lock
from nbdsink.units import parse_size

PLUGIN = Path(nbdsink.__file__).resolve().parent / "server" / "nbdkit_plugin.py"
"""The plugin nbdkit loads: part of the package, so an installed nbdsink serves too."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve", help="serve a store over NBD (foreground)",
        description="Serve every volume of a store over NBD, in the foreground, until SIGTERM "
                    "or SIGINT. Exports: VOL (writable head; FLUSH commits a version), VOL@N, "
                    "VOL@latest, VOL@<ISO-8601 UTC time> (read-only). The store is created if "
                    "it does not exist.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH",
                       help="listen on a unix socket (default: /run/nbdsink.sock)")
    where.add_argument("--listen", metavar="HOST:PORT",
                       help="listen on TCP, e.g. 0.0.0.0:10809 or [::]:10809")
    p.add_argument("--tls-certificates", metavar="DIR",
                   help="require TLS, with ca-cert.pem, server-cert.pem and server-key.pem "
                        "from DIR (X.509)")
    p.add_argument("--tls-verify-peer", action="store_true", default=True,
                   help="with --tls-certificates: require a client certificate signed by the "
                        "CA (the default)")
    p.add_argument("--tls-no-verify-peer", dest="tls_verify_peer", action="store_false",
                   help="with --tls-certificates: accept clients without a certificate (they "
                        "can then read and write every volume)")
    p.add_argument("--insecure", action="store_true",
                   help="allow --listen on an address other than loopback without TLS (anyone "
                        "who can connect can then read every version and write every head)")
    p.add_argument("--read-only", action="store_true",
                   help="serve every export read-only: an attach-only host")
    p.add_argument("--access", metavar="FILE",
                   help="a TOML file of rules: which clients (by IP address or network, or "
                        "uid:N/gid:N on a unix socket) may open which volumes, read-only or "
                        "writable; everything else is refused. Not by certificate: nbdkit "
                        "1.32 does not tell plugins which one a client used (docs/access.md)")
    p.add_argument("--max-connections", type=int, default=64, metavar="N",
                   help="refuse connections beyond N at once (default 64)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics")
    p.add_argument("--config", metavar="FILE",
                   help="a TOML file with any of these options as keys (store, listen, "
                        "tls-certificates, max-connections ...); the command line wins")
    # Python callbacks share one GIL: beyond two threads per connection they mostly
    # contend for it (measured: 16 threads ingest ~40% slower than 2).
    p.add_argument("--threads", type=int, default=2,
                   help="nbdkit threads per connection (default 2)")
    p.add_argument("--map-size", metavar="SIZE", default=None,
                   help="initial LMDB map size (it grows by itself while the disk has room)")
    p.add_argument("--batch-size", metavar="SIZE", default=None,
                   help="pending writes kept in memory per volume before they are saved to the "
                        "store (default 64M); a FLUSH always saves and commits them")
    add_store_argument(p)
    p.set_defaults(func=cmd_serve)


def nbdkit_command(args: argparse.Namespace, store: str) -> list[str]:
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise NbdsinkError("nbdkit is not installed (Debian: apt-get install nbdkit "
                           "nbdkit-plugin-python)")
    # --exit-with-parent: if `nbdsink serve` itself dies, nbdkit does not linger holding
    # the store and the socket.
    cmd = [nbdkit, "--foreground", "--exit-with-parent", "--threads", str(args.threads)]
    if args.verbose:
        cmd.append("--verbose")
    if args.listen:
        host, sep, port = args.listen.rpartition(":")
        if not sep or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"--listen wants HOST:PORT with a port from 1 to 65535, "
                             f"not {args.listen!r}")
        host = host.strip("[]") or "0.0.0.0"
        if not args.tls_certificates and not args.insecure and not _is_loopback(host):
            raise UsageError(
                f"--listen {args.listen} without TLS lets anyone who can reach it read every "
                "version and write every volume: give --tls-certificates DIR (clients need a "
                "certificate by default), or --insecure if the network is trusted")
        cmd += ["--ipaddr", host, "--port", port]
    else:
        cmd += ["--unix", args.socket or "/run/nbdsink.sock"]
    if args.tls_certificates:
        cmd += ["--tls=require", f"--tls-certificates={args.tls_certificates}"]
        if args.tls_verify_peer:
            cmd.append("--tls-verify-peer")
    if args.read_only:
        cmd.append("--readonly")
    if args.max_connections < 1:
        raise UsageError("--max-connections must be at least 1")
    cmd += ["--filter=limit", "python", str(PLUGIN), f"store={store}",
            f"limit={args.max_connections}"]
    if args.map_size:
        cmd.append(f"map_size={args.map_size}")
    if args.batch_size:
        cmd.append(f"batch_size={args.batch_size}")
    if args.metrics:
        parse_address(args.metrics)  # a clear error here, not in nbdkit's log
        cmd.append(f"metrics={args.metrics}")
    if args.access:
        AccessRules.load(args.access)  # likewise: a bad rule is one line now
        cmd.append(f"access={os.path.abspath(args.access)}")
    return cmd


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _clear_stale_socket(path: str) -> None:
    if not os.path.exists(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                os.unlink(path)  # left behind by a server that died
                return
            raise
    raise NbdsinkError(f"a server is already listening on {path}")


def cmd_serve(args: argparse.Namespace) -> int:
    store = store_path(args)
    # Checked here, so that a bad value is one line now, not a traceback in nbdkit's log.
    for flag, value in (("--batch-size", args.batch_size), ("--map-size", args.map_size)):
        if value is not None and parse_size(value) <= 0:
            raise UsageError(f"{flag} must be positive, not {value!r}")
    # The main environment's LMDB pages are walked before anything opens it (damage there
    # is then kept away from, or a store that cannot be read is refused, clearly); the
    # segments, which only chunk reads need, are walked while the server runs.
    if (Path(store) / "data.mdb").exists():
        _record(Path(store), structure.check_store(Path(store), segments=False))
    # Open (and create) the store here first so that a bad store is a clear error now, not
    # a traceback in nbdkit's log later.
    Store(store, create=True).close()
    threading.Thread(target=_check_segments, args=(Path(store),), daemon=True,
                     name="nbdsink-structure").start()
    # Fail here, clearly, if another server holds the store (nbdkit takes it for good).
    os.close(take_serve_lock(store))
    if not args.listen:
        _clear_stale_socket(args.socket or "/run/nbdsink.sock")
    cmd = nbdkit_command(args, store)
    env = dict(os.environ)
    site_dirs = [str(PLUGIN.parents[2])] + [p for p in sys.path if p.endswith("site-packages")]
    env["NBDSINK_SITE_DIRS"] = os.pathsep.join(site_dirs)
    where = args.listen or args.socket or "/run/nbdsink.sock"
    print(f"nbdsink: serving {store} on {where}", file=sys.stderr, flush=True)
    return supervise(cmd, env)


def _record(store: Path, report: structure.StructureReport) -> structure.StructureReport:
    """Record a walk's findings for the server (which cannot know them otherwise)."""
    try:
        return structure.save(store, report)
    except OSError as exc:
        print(f"nbdsink: cannot record the structural check in {store}: {exc}",
              file=sys.stderr, flush=True)
        return report


def _check_segments(store: Path) -> None:
    """Walk every segment's pages and record what was found: the server reloads the record
    and keeps reads away from any damage (see nbdsink.store.structure)."""
    report = _record(store, structure.check_store(store, main=False))
    for env in report.damaged:
        print(f"nbdsink: structural damage in {env.file}: {'; '.join(env.lines()[:3])} "
              "(see 'nbdsink verify')", file=sys.stderr, flush=True)


STOP_GRACE_SECONDS = 5.0


def supervise(cmd: list[str], env: dict[str, str]) -> int:
    """Run nbdkit until it exits or we are told to stop.

    On SIGTERM/SIGINT nbdkit is asked to stop; it saves pending writes and closes the store
    once its clients are gone. nbdkit waits for connected clients indefinitely, so after a
    grace period it is killed: committed versions are never at risk (they are durable before
    FLUSH returns), and the plugin saves idle pending writes every second on its own.
    """
    proc = subprocess.Popen(cmd, env=env)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while True:
        try:
            code = proc.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            if stopping:
                try:
                    code = proc.wait(timeout=STOP_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    code = 0
                break
    if stopping:
        print("nbdsink: server stopped", file=sys.stderr, flush=True)
        return 0
    if code != 0:
        print(f"nbdsink: error: nbdkit exited with status {code}", file=sys.stderr)
    return code
