"""Throughput of the trio NBD client against nbdcopy, same server, same data, same run.

Starts ``nbdkit memory`` on a unix socket, fills it once (untimed, so every timed write
overwrites allocated memory), then times: nbdcopy writing a file from /dev/shm, the client
writing the same bytes from memory, nbdcopy reading to ``null:``, the client reading into one
buffer. nbdcopy runs twice each time: with its defaults (4 connections, as the server
advertises multi-conn) and with ``--connections=1``, like the client. Prints MiB/s and the client/nbdcopy ratio (higher is better; 1.0 = as fast as
nbdcopy). Each figure is the best of ``--repeat`` interleaved rounds.

    .venv/bin/python bench/bench_nbd_client.py [--size-mib 1024] [--window 16]
        [--request-mib 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio

from nbdsink.nbd import connect

MiB = 1024 * 1024


def timed(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--request-mib", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mib * MiB

    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        sock = Path(tmp, "nbd.sock")
        image = Path(tmp, "data.img")
        uri = f"nbd+unix:///?socket={sock}"
        # Incompressible, non-zero data, so nobody can skip or shortcut anything.
        block = os.urandom(64 * MiB)
        data = (block * (size // len(block) + 1))[:size]
        image.write_bytes(data)
        server = subprocess.Popen(
            ["nbdkit", "-f", "-U", str(sock), "memory", str(size)],
        )
        try:
            for _ in range(100):
                if sock.exists():
                    break
                time.sleep(0.05)
            subprocess.run(["nbdcopy", str(image), uri], check=True)  # allocate: untimed

            def nbdcopy_write() -> None:
                subprocess.run(["nbdcopy", str(image), uri], check=True)

            def nbdcopy_read() -> None:
                subprocess.run(["nbdcopy", uri, "null:"], check=True)

            # nbdcopy opens 4 connections (multi-conn) by default; the client uses one.
            def nbdcopy_write_1() -> None:
                subprocess.run(["nbdcopy", "--connections=1", str(image), uri], check=True)

            def nbdcopy_read_1() -> None:
                subprocess.run(["nbdcopy", "--connections=1", uri, "null:"], check=True)

            async def client_write() -> None:
                async with connect(
                    uri, window=args.window, request_size=args.request_mib * MiB
                ) as conn:
                    await conn.pwrite(data, 0)

            target = bytearray(size)

            async def client_read() -> None:
                async with connect(
                    uri, window=args.window, request_size=args.request_mib * MiB
                ) as conn:
                    await conn.pread_into(target, 0)

            # Interleaved rounds, so a busy moment on the machine hits both sides alike.
            timings: dict[str, list[float]] = {}
            runs: list[tuple[str, Callable[[], None]]] = [
                ("nbdcopy write", nbdcopy_write),
                ("nbdcopy -C1 write", nbdcopy_write_1),
                ("client write", lambda: trio.run(client_write)),
                ("nbdcopy read", nbdcopy_read),
                ("nbdcopy -C1 read", nbdcopy_read_1),
                ("client read", lambda: trio.run(client_read)),
            ]
            for _ in range(args.repeat):
                for name, run in runs:
                    timings.setdefault(name, []).append(timed(run))
            best = {name: min(times) for name, times in timings.items()}
            if target != data:
                print("read-back differs from what was written", file=sys.stderr)
                return 1
        finally:
            server.terminate()
            server.wait()

    print(
        f"{args.size_mib} MiB via nbdkit memory, window {args.window}, "
        f"requests of {args.request_mib} MiB, best of {args.repeat}"
    )
    for kind in ("write", "read"):
        ours = best[f"client {kind}"]
        for reference in (f"nbdcopy {kind}", f"nbdcopy -C1 {kind}"):
            print(
                f"{kind:5}  {reference.rsplit(' ', 1)[0]:11} {size / MiB / best[reference]:6.0f} "
                f"MiB/s   client {size / MiB / ours:6.0f} MiB/s   "
                f"ratio {best[reference] / ours:.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
