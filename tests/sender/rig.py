"""End-to-end rig: a real server (nbdsink serve over a store), senders as processes,
versions attached read-only through nbdfuse and a loop device."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .helpers import make_image, run

NBDSINK = [sys.executable, "-m", "nbdsink.cli.main"]
REPO = Path(__file__).resolve().parents[2]


def nbdsink(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NBDSINK, *args], capture_output=True, text=True, check=check,
                          cwd=REPO)


@dataclass
class Server:
    store: Path
    socket: Path
    process: subprocess.Popen[bytes] | None = None

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.socket}"

    def start(self) -> None:
        with open(self.store.parent / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                [*NBDSINK, "serve", "--store", str(self.store), "--socket", str(self.socket)],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.socket.exists() and run("nbdinfo", "--list", self.uri(""),
                                            check=False).returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(20)
            self.process = None

    def versions(self, volume: str) -> list[dict[str, Any]]:
        out = nbdsink("versions", volume, "--json", "--store", str(self.store)).stdout
        data: list[dict[str, Any]] = json.loads(out)
        return data


@contextlib.contextmanager
def server(tmp: Path, volume: str, size: int) -> Iterator[Server]:
    srv = Server(tmp / "store", tmp / "nbd.sock")
    nbdsink("volume", "create", volume, "--size", str(size), "--store", str(srv.store))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


class Sender:
    """``nbdsink replicate`` as a process, its log in a file off the frozen filesystem."""

    def __init__(self, log: Path, *args: str) -> None:
        self.log = log
        self._out = open(log, "ab")  # noqa: SIM115 - closed in wait()/kill()
        self.process = subprocess.Popen([*NBDSINK, "replicate", *args], cwd=REPO,
                                        stdout=self._out, stderr=subprocess.STDOUT)

    @staticmethod
    def command() -> list[str]:
        return [*NBDSINK, "replicate"]

    @staticmethod
    def cwd() -> Path:
        return REPO

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, needle: str, timeout: float, *, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.text().count(needle) >= count:
                return
            if self.process.poll() is not None:
                raise AssertionError(f"sender exited ({self.process.returncode}):\n{self.text()}")
            time.sleep(0.05)
        raise AssertionError(f"no {needle!r} x{count} in time:\n{self.text()}")

    def terminate(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        rc = self.process.wait(timeout)
        self._out.close()
        return rc

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._out.close()

    def wait(self, timeout: float) -> int:
        rc = self.process.wait(timeout)
        self._out.close()
        return rc


def stop_tracker(device: str) -> None:
    from nbdsink.tracker import TrackerError, open_tracker

    with contextlib.suppress(TrackerError):
        open_tracker(device, consumer=None).stop()


@contextlib.contextmanager
def attached(srv: Server, export: str, workdir: Path, *, overlay: bool = False,
             writable: bool = False) -> Iterator[str]:
    """A committed version as a loop device: nbdfuse exposes the export as a file.

    Read-only by default. With ``overlay`` the version is writable through a copy-on-write
    layer (nbdkit's cow filter, in memory, discarded on detach): what a recovery does when
    the filesystem needs its log replayed by a normal mount.
    """
    fuse_dir = workdir / "fuse"
    fuse_dir.mkdir(parents=True, exist_ok=True)
    pidfile = workdir / "nbdfuse.pid"
    pidfile.unlink(missing_ok=True)
    if overlay:
        source = ["--command", "nbdkit", "-s", "--exit-with-parent", "--filter=cow", "nbd",
                  f"socket={srv.socket}", f"export={export}"]
    else:
        source = [srv.uri(export)]
    fuse = subprocess.Popen(["nbdfuse", *([] if overlay or writable else ["-r"]), "-P", str(pidfile),
                             str(fuse_dir), *source],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not pidfile.exists() or not (fuse_dir / "nbd").exists():
            if fuse.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nbdfuse failed: {fuse.stderr.read() if fuse.stderr else ''}")
            time.sleep(0.05)
        ro = [] if overlay or writable else ["-r"]
        dev = run("losetup", *ro, "-f", "--show", str(fuse_dir / "nbd")).stdout.strip()
        try:
            yield dev
        finally:
            if writable:
                # Flush the loop device into the file, and the file (a FLUSH) into a version.
                run("blockdev", "--flushbufs", dev, check=False)
                fd = os.open(fuse_dir / "nbd", os.O_RDWR)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            run("losetup", "-d", dev, check=False)
    finally:
        for _ in range(100):
            if run("umount", str(fuse_dir), check=False).returncode == 0:
                break
            time.sleep(0.05)
        fuse.wait(20)


def fsck(dev: str, fstype: str) -> subprocess.CompletedProcess[str]:
    if fstype == "ext4":
        return run("e2fsck", "-f", "-n", dev, check=False)
    return run("xfs_repair", "-n", dev, check=False)


def ro_options(fstype: str) -> tuple[str, ...]:
    # A read-only device: no journal replay (there is nothing to replay after a freeze).
    return ("ro", "noload") if fstype == "ext4" else ("ro", "norecovery")


def file_tree(root: Path) -> dict[str, str]:
    tree = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if rel.startswith(("lost+found", ".tmp")):
                continue
            tree[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return tree


def same_bytes(a: str, b: str, size: int) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        pos = 0
        while pos < size:
            n = min(8 << 20, size - pos)
            if fa.read(n) != fb.read(n):
                return False
            pos += n
    return True


def random_image(path: Path, size: int) -> Path:
    """An image file of ``size`` random bytes (a device's content)."""
    make_image(path, size)
    with open(path, "r+b") as f:
        f.write(os.urandom(size))
    return path


def replicate_once(dev: str, uri: str, state: Path, *extra: str
                   ) -> subprocess.CompletedProcess[str]:
    """``nbdsink replicate DEV URI --state STATE --once ...``, its output captured."""
    return subprocess.run([*NBDSINK, "replicate", dev, uri, "--state", str(state), "--once",
                           *extra], capture_output=True, text=True, cwd=REPO)


def export_bytes(srv: Server, export: str, tmp: Path) -> bytes:
    """The whole content of ``export`` (a version), copied out with nbdcopy."""
    out = tmp / "export.img"
    run("nbdcopy", srv.uri(export), str(out))
    data = out.read_bytes()
    out.unlink()
    return data
