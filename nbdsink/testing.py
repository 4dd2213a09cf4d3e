"""Helpers for tests and benchmarks: run a real ``nbdsink serve`` in a subprocess."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote


class ServerProcess:
    """``nbdsink serve --store STORE --socket SOCKET`` as a child process.

    ``with ServerProcess(store, sock) as srv:`` starts it and waits until it accepts
    connections; leaving the block stops it with SIGTERM (``kill()`` is the SIGKILL crash).
    """

    def __init__(self, store: Path, sock: Path, *extra_args: str,
                 log: Path | None = None) -> None:
        self.store = Path(store)
        self.socket = Path(sock)
        self.extra_args = list(extra_args)
        self.log = log or self.socket.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def create_volume(self, name: str, size: int, block_size: int = 65536) -> None:
        run_cli("volume", "create", name, "--size", str(size), "--block-size", str(block_size),
                "--store", str(self.store))

    def start(self, timeout: float = 30.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "nbdsink.cli.main", "serve", "--store", str(self.store),
               "--socket", str(self.socket), *self.extra_args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nbdsink serve exited with {self.proc.returncode}:\n"
                                   + self.log.read_text(errors="replace")[-4000:])
            if _accepts(self.socket):
                return self
            time.sleep(0.05)
        raise TimeoutError(f"nbdsink serve did not listen on {self.socket} in {timeout}s")

    def uri(self, export: str = "") -> str:
        return f"nbd+unix:///{quote(export, safe='@:;=')}?socket={self.socket}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the clean stop a service manager does."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL to the server and its nbdkit at once: the crash."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            _wait_group_gone(self.proc.pid)
        self.proc = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        if t is None:
            self.stop()
        else:
            self.kill()


def run_cli(*args: str, check: bool = True, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """Run ``nbdsink ARGS`` in a subprocess (as a user would), capturing its output."""
    return subprocess.run([sys.executable, "-m", "nbdsink.cli.main", *args], check=check,
                          capture_output=True, text=True, env=env or dict(os.environ))


def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


def _accepts(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def write_random_blocks(client: Any, rng: random.Random, model: bytearray, block_size: int,
                        count: int, shared: Sequence[bytes]) -> None:
    """``count`` writes of one whole block each, at random blocks of ``model``'s size, through
    ``client`` (anything with ``pwrite(data, offset)``: an ``nbd.NBD`` handle), and the same
    into ``model``. Three in ten write content from ``shared``, so that chunks are used by
    several blocks and versions (deduplicated, counted more than once)."""
    for _ in range(count):
        block = rng.randrange(len(model) // block_size)
        data = rng.choice(shared) if rng.random() < 0.3 else rng.randbytes(block_size)
        client.pwrite(data, block * block_size)
        model[block * block_size : (block + 1) * block_size] = data


def upkeep_server(workdir: Path, size: int, block_size: int) -> ServerProcess:
    """A server (not started) whose background upkeep works all the time: 1 MiB segments,
    sealed, falling dead and compacted away within a second of writes; 256 KiB batches; and
    volume "vol" of ``size`` bytes with the policy keep-last 3."""
    from nbdsink.store import Store

    Store(workdir / "store", create=True, segment_bytes=1 << 20).close()
    srv = ServerProcess(workdir / "store", workdir / "nbd.sock", "--batch-size", "256K")
    srv.create_volume("vol", size, block_size)
    run_cli("volume", "set", "vol", "--keep-last", "3", "--store", str(srv.store))
    return srv
