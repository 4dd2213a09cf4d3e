"""kill -9 of ``nbdsink serve`` (the server process and its nbdkit at once) at random moments
while its background upkeep prunes by policy, sweeps and compacts, and a client keeps writing
and committing: every version still listed reads back byte for byte as it was flushed, the
newest acknowledged version is never lost, the store always reopens, and ``nbdsink verify
--full`` finds nothing wrong.

The store's segments are small (1 MiB) and the policy keeps few versions, so segments are
sealed, fall dead and are compacted away within a second of writes: kills land inside every
step of the upkeep, not only between them (the server's own log counts the steps that ran).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
from pathlib import Path

import nbd

from nbdsink.testing import ServerProcess, run_cli, upkeep_server, write_random_blocks

BS = 16384
SIZE = 8 << 20
KILLS = 20


def _listed(srv: ServerProcess) -> list[int]:
    out = run_cli("versions", "vol", "--json", "--store", str(srv.store)).stdout
    return [int(v["version"]) for v in json.loads(out)]


def _sha_of(srv: ServerProcess, export: str) -> str:
    h = nbd.NBD()
    h.connect_uri(srv.uri(export))
    try:
        return hashlib.sha256(h.pread(SIZE, 0)).hexdigest()
    finally:
        h.shutdown()


def test_kill9_of_the_server_during_background_prune_sweep_and_compaction(tmp_path: Path) -> None:
    rng = random.Random(1414)
    srv = upkeep_server(tmp_path, SIZE, BS)
    expected: dict[int, str] = {}  # version -> sha256 of the image flushed as that version
    acknowledged: set[int] = set()
    ever_listed: set[int] = set()
    gone: set[int] = set()
    pool = [rng.randbytes(BS) for _ in range(6)]  # some content repeats: dedup and refs
    for _ in range(KILLS):
        srv.start()
        listed = _listed(srv)
        assert listed or not expected, "every version is gone"
        assert not set(listed) - set(expected), "a version nobody flushed appeared"
        if acknowledged:
            assert max(listed) >= max(acknowledged), "the newest acknowledged version was lost"
        # A version pruned once never comes back.
        assert not gone & set(listed), f"pruned versions came back: {gone & set(listed)}"
        gone |= ever_listed - set(listed)
        for v in listed:
            assert _sha_of(srv, f"vol@{v}") == expected[v], f"version {v} differs after a kill"
        ever_listed |= set(listed)
        h0 = nbd.NBD()
        h0.connect_uri(srv.uri("vol"))
        model = bytearray(h0.pread(SIZE, 0))
        h0.shutdown()
        next_version = max(listed, default=0) + 1

        def writer(model: bytearray = model, version: int = next_version) -> None:
            try:
                h = nbd.NBD()
                h.connect_uri(srv.uri("vol"))
                while True:
                    write_random_blocks(h, rng, model, BS, rng.randint(20, 120), pool)
                    expected[version] = hashlib.sha256(model).hexdigest()
                    h.flush()
                    acknowledged.add(version)
                    version += 1
            except nbd.Error:
                return  # the server was killed under us

        t = threading.Thread(target=writer)
        t.start()
        time.sleep(rng.uniform(0.3, 1.5))
        srv.kill()
        t.join(timeout=30)
        assert not t.is_alive()
        # The crashed store, as the next start finds it: structure and content are whole.
        check = run_cli("verify", "--full", "--json", "--store", str(srv.store), check=False)
        assert check.returncode == 0, check.stdout + check.stderr
    srv.start()
    final = _listed(srv)
    deadline = time.monotonic() + 30
    while len(final) > 3 and time.monotonic() < deadline:  # the first upkeep pass prunes
        time.sleep(0.5)
        final = _listed(srv)
    assert max(final) >= max(acknowledged)
    assert len(final) == 3, f"the policy keep-last 3 was not applied: {final}"
    for v in final:
        assert _sha_of(srv, f"vol@{v}") == expected[v]
    srv.stop()
    log = srv.log.read_text(errors="replace")
    steps = {kind: len(re.findall(rf"\b{kind}\b", log))
             for kind in ("pruned", "swept", "punched", "compacted")}
    # The kills fell among real upkeep work: each step ran many times across the 20 runs.
    assert all(n >= 5 for n in steps.values()), steps
    assert len(acknowledged) >= 3 * KILLS, f"only {len(acknowledged)} commits were made"
