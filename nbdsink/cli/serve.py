"""``nbdsink serve``: run nbdkit with the nbdsink plugin over a store, in the foreground."""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import nbdsink
from nbdsink.cli.common import add_store_argument, store_path
from nbdsink.errors import NbdsinkError, UsageError
from nbdsink.store import Store, StoreLocked

PLUGIN = Path(nbdsink.__file__).resolve().parent.parent / "plugins" / "nbdsink_plugin.py"


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
    p.add_argument("--tls-verify-peer", action="store_true",
                   help="with --tls-certificates: require a client certificate signed by the CA")
    p.add_argument("--threads", type=int, default=16,
                   help="nbdkit threads per connection (default 16)")
    p.add_argument("--map-size", metavar="SIZE", default=None,
                   help="initial LMDB map size (it grows by itself while the disk has room)")
    add_store_argument(p)
    p.set_defaults(func=cmd_serve)


def nbdkit_command(args: argparse.Namespace, store: str) -> list[str]:
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise NbdsinkError("nbdkit is not installed (Debian: apt-get install nbdkit "
                           "nbdkit-plugin-python)")
    cmd = [nbdkit, "--foreground", "--threads", str(args.threads)]
    if args.verbose:
        cmd.append("--verbose")
    if args.listen:
        host, sep, port = args.listen.rpartition(":")
        if not sep or not port.isdigit():
            raise UsageError(f"--listen wants HOST:PORT, not {args.listen!r}")
        cmd += ["--ipaddr", host.strip("[]") or "0.0.0.0", "--port", port]
    else:
        cmd += ["--unix", args.socket or "/run/nbdsink.sock"]
    if args.tls_certificates:
        cmd += ["--tls=require", f"--tls-certificates={args.tls_certificates}"]
        if args.tls_verify_peer:
            cmd.append("--tls-verify-peer")
    elif args.tls_verify_peer:
        raise UsageError("--tls-verify-peer needs --tls-certificates")
    cmd += ["python", str(PLUGIN), f"store={store}"]
    if args.map_size:
        cmd.append(f"map_size={args.map_size}")
    return cmd


def _check_not_served(store: str) -> None:
    fd = os.open(Path(store) / "serve.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StoreLocked(f"another nbdsink server is serving {store}") from None
    finally:
        os.close(fd)


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
    # Open (and create) the store here first so that a bad store is a clear error now, not
    # a traceback in nbdkit's log later.
    Store(store, create=True).close()
    _check_not_served(store)
    if not args.listen:
        _clear_stale_socket(args.socket or "/run/nbdsink.sock")
    cmd = nbdkit_command(args, store)
    env = dict(os.environ)
    site_dirs = [str(PLUGIN.parent.parent)] + [p for p in sys.path if p.endswith("site-packages")]
    env["NBDSINK_SITE_DIRS"] = os.pathsep.join(site_dirs)
    where = args.listen or args.socket or "/run/nbdsink.sock"
    print(f"nbdsink: serving {store} on {where}", file=sys.stderr, flush=True)
    # nbdkit takes over this process: SIGTERM/SIGINT reach it directly, and it closes the
    # store cleanly (saving pending writes) before it exits.
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached
