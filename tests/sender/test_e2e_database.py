"""A real database on a replicated version: PostgreSQL under pgbench is replicated with
--freeze; the version, attached as a clone and as a scratch view, starts as a database and
passes its own consistency checks (pg_amcheck, and pgbench's invariant)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import loop_device, make_image, mkfs, mounted, run
from .rig import Sender, Server, attached, nbdsink, stop_tracker

pytestmark = [pytest.mark.root, pytest.mark.slow]

MiB = 1 << 20
SIZE = 512 * MiB


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        pytest.skip("PostgreSQL is not installed (scripts/setup.sh installs postgresql-15)")
    return Path(found[-1]).parent


def _as_postgres(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", "postgres", "--", *cmd], capture_output=True,
                          text=True, check=check)


@contextlib.contextmanager
def _postgres(data: Path, sockets: Path, port: int) -> Iterator[None]:
    pg = _pg_bin()
    sockets.mkdir(exist_ok=True)
    os.chown(sockets, _uid(), -1)
    start = _as_postgres(str(pg / "pg_ctl"), "-D", str(data), "-l", str(sockets / "log"), "-w",
                         "-t", "120", "-o",
                         f"-k {sockets} -p {port} -c listen_addresses='' -c fsync=on", "start",
                         check=False)
    assert start.returncode == 0, start.stdout + start.stderr + _read(sockets / "log")
    try:
        yield
    finally:
        _as_postgres(str(pg / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop", check=False)


def _uid() -> int:
    import pwd

    return pwd.getpwnam("postgres").pw_uid


def _read(path: Path) -> str:
    try:
        return path.read_text()[-3000:]
    except OSError:
        return ""


def _psql(sockets: Path, port: int, sql: str) -> str:
    out = _as_postgres(str(_pg_bin() / "psql"), "-h", str(sockets), "-p", str(port), "-At",
                       "-d", "bench", "-c", sql)
    return out.stdout.strip()


def _consistent(sockets: Path, port: int) -> None:
    check = _as_postgres(str(_pg_bin() / "pg_amcheck"), "-h", str(sockets), "-p", str(port),
                         "--heapallindexed", "--install-missing", "-d", "bench", check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    balance = _psql(sockets, port, "select sum(abalance) from pgbench_accounts")
    delta = _psql(sockets, port, "select coalesce(sum(delta), 0) from pgbench_history")
    assert int(balance) == int(delta), (balance, delta)


def test_postgres_on_a_clone_and_on_a_scratch_view(tmp_path: Path) -> None:
    pg = _pg_bin()
    img = make_image(tmp_path / "img", SIZE)
    srv = Server(tmp_path / "store", tmp_path / "nbd.sock")
    nbdsink("volume", "create", "db", "--size", str(SIZE), "--store", str(srv.store))
    srv.start()
    # PostgreSQL runs as its own user: its files and sockets need a path it can traverse
    # (pytest's temporary directories are root's alone).
    base = Path(tempfile.mkdtemp(prefix="nbdsink-pg-"))
    os.chmod(base, 0o755)
    try:
        with loop_device(img) as dev:
            mkfs(dev, "ext4")
            try:
                with mounted(dev, base / "mnt") as mnt:
                    data = mnt / "pg"
                    data.mkdir()
                    os.chown(data, _uid(), -1)
                    init = _as_postgres(str(pg / "initdb"), "-D", str(data), "-A", "trust",
                                        check=False)
                    assert init.returncode == 0, init.stderr
                    sockets = base / "sock"
                    with _postgres(data, sockets, 5499):
                        _as_postgres(str(pg / "createdb"), "-h", str(sockets), "-p", "5499",
                                     "bench")
                        _as_postgres(str(pg / "pgbench"), "-h", str(sockets), "-p", "5499",
                                     "-i", "-s", "5", "-q", "bench")
                        load = subprocess.Popen(
                            ["runuser", "-u", "postgres", "--", str(pg / "pgbench"), "-h",
                             str(sockets), "-p", "5499", "-c", "4", "-j", "2", "-T", "25",
                             "bench"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                        time.sleep(5)
                        hook = (f"runuser -u postgres -- {pg / 'psql'} -h {sockets} -p 5499 "
                                "-d bench -c CHECKPOINT")
                        for _ in range(2):
                            proc = run(*Sender.command(), dev, srv.uri("db"), "--state",
                                       str(tmp_path / "state"), "--once", "--freeze", str(mnt),
                                       "--pre-hook", hook, check=False)
                            assert proc.returncode == 0, proc.stderr
                            time.sleep(3)
                        load.wait(60)
                version = srv.versions("db")[-1]
                assert version["consistency"] == "frozen"
                number = version["version"]

                nbdsink("clone", f"db@{number}", "dbclone", "--store", str(srv.store))
                for export in ("dbclone", f"db@{number};scratch"):
                    name = export.replace("@", "-").replace(";", "-")
                    with (attached(srv, export, tmp_path / f"att-{name}", writable=True) as copy,
                          mounted(copy, base / f"m-{name}") as m):
                        # The image is of a running server: its pid file names a process of
                        # this host (a DR host would not have it), so it goes, as on any
                        # restored snapshot.
                        (m / "pg" / "postmaster.pid").unlink(missing_ok=True)
                        with _postgres(m / "pg", base / f"s-{name}", 5498):
                            _consistent(base / f"s-{name}", 5498)
            finally:
                stop_tracker(dev)
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)
