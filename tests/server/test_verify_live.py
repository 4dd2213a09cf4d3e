"""``nbdsink verify`` of a store a server is writing to, pruning by policy, sweeping and
compacting meanwhile (with --full, in worker processes): every run finds nothing wrong (in particular no reference count that
disagrees with the map, which verify would otherwise set back), and afterwards every version
still listed reads back as it was flushed."""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
from pathlib import Path

import nbd

from nbdsink.store.workers import default_jobs
from nbdsink.testing import run_cli, upkeep_server, write_random_blocks

BS = 16384
SIZE = 8 << 20
RUNS = 6
SECONDS = 8.0
"""Verify runs go on at least this long: the upkeep prunes, sweeps, punches and compacts
many times meanwhile (the server's log counts them)."""


def test_verify_while_the_server_writes_prunes_and_compacts(tmp_path: Path) -> None:
    rng = random.Random(77)
    srv = upkeep_server(tmp_path, SIZE, BS)
    expected: dict[int, str] = {}
    pool = [rng.randbytes(BS) for _ in range(6)]  # repeated content: shared chunks, counts > 1
    stop = threading.Event()
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            h = nbd.NBD()
            h.connect_uri(srv.uri("vol"))
            model = bytearray(SIZE)
            version = 1
            while not stop.is_set():
                write_random_blocks(h, rng, model, BS, rng.randint(20, 80), pool)
                expected[version] = hashlib.sha256(model).hexdigest()
                h.flush()
                version += 1
            h.shutdown()
        except BaseException as exc:  # reported by the test, not lost in the thread
            failures.append(exc)

    with srv:
        t = threading.Thread(target=writer)
        t.start()
        try:
            while len(expected) < 2 and not failures:  # version 1 is flushed
                time.sleep(0.05)
            runs = 0
            started = time.monotonic()
            while runs < RUNS or time.monotonic() - started < SECONDS:
                runs += 1
                full = ["--full"] if runs % 2 else []  # every other run re-hashes the chunks
                run = run_cli("verify", *full, "--json", "--store", str(srv.store), check=False)
                assert run.returncode == 0, run.stdout + run.stderr
                report = json.loads(run.stdout)
                assert report["damaged_refs"] == [] and report["refs_repaired"] == 0
                assert report["versions"] >= 1
                # --full re-hashes in worker processes (each with its own snapshots).
                jobs = default_jobs()
                assert report["workers"] == (jobs if full and jobs > 1 else 0)
        finally:
            stop.set()
            t.join(timeout=60)
        assert not failures, failures
        assert len(expected) > 10, "the writer hardly ran"
        def listed() -> list[int]:
            return [int(v["version"]) for v in json.loads(
                run_cli("versions", "vol", "--json", "--store", str(srv.store)).stdout)]
        # The upkeep prunes by policy a little after the last commits: once it has, the
        # versions left stay.
        deadline = time.monotonic() + 30
        while len(listed()) > 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(listed()) == 3
        for v in listed():
            h = nbd.NBD()
            h.connect_uri(srv.uri(f"vol@{v}"))
            assert hashlib.sha256(h.pread(SIZE, 0)).hexdigest() == expected[v], v
            h.shutdown()
    final = run_cli("verify", "--full", "--json", "--store", str(srv.store), check=False)
    assert final.returncode == 0, final.stdout + final.stderr
    log = srv.log.read_text(errors="replace")
    steps = {kind: len(re.findall(rf"\b{kind}\b", log))
             for kind in ("pruned", "swept", "compacted")}
    assert all(n >= 3 for n in steps.values()), steps
