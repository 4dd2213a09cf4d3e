"""Writers racing the server's batch saves with many duplicate contents, through libnbd:
every acknowledged version reads back byte for byte, before and after a restart."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import nbd
import pytest

from nbdsink.testing import ServerProcess

BS = 65536


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def test_reported_sequence_on_one_connection(tmp_path: Path) -> None:
    """The sequence reported: A written to block 0 and overwritten in an unsaved batch; while
    that batch is being saved (a large write in flight fills it), A is written to block 5000;
    FLUSH. Block 5000 of that version must read back as A (it gave EIO for good)."""
    size = 512 << 20
    srv = ServerProcess(tmp_path / "store", tmp_path / "nbd.sock", "--batch-size", "1M")
    srv.create_volume("o", size, BS)
    rng = random.Random(12)
    with srv:
        h = connect(srv.uri("o"))
        for attempt in range(12):
            a = rng.randbytes(BS)
            h.pwrite(a, 0)
            h.pwrite(rng.randbytes(BS), 0)
            big = nbd.Buffer.from_bytearray(bytearray(rng.randbytes(2 << 20)))
            cookie = h.aio_pwrite(big, 4000 * BS)
            h.pwrite(a, 5000 * BS)  # while the 2 MiB write (and the save it starts) runs
            while not h.aio_command_completed(cookie):
                h.poll(-1)
            h.flush()
            v = connect(srv.uri("o@latest"))
            assert v.pread(BS, 5000 * BS) == a, f"attempt {attempt}"
            v.shutdown()
        h.shutdown()


@pytest.mark.parametrize("batch", ["256K", "1M", "64M"])
def test_writers_race_batch_saves_with_duplicate_contents(tmp_path: Path, batch: str) -> None:
    """Rounds of four connections writing and overwriting blocks they own, half of the time
    with a content another connection wrote a moment ago (so the digest is in an unsaved or
    saving batch, and often no longer referenced there), some rounds idle long enough for
    the idle save, then one FLUSH; every version equals the model of its round."""
    blocks = 256
    size = blocks * BS
    writers = 4
    srv = ServerProcess(tmp_path / "store", tmp_path / "nbd.sock", "--batch-size", batch)
    srv.create_volume("vol", size, BS)
    model = bytearray(size)
    expected: list[bytes] = []
    recent: list[bytes] = [bytes(BS)]
    lock = threading.Lock()
    with srv:
        handles = [connect(srv.uri("vol")) for _ in range(writers)]
        for round_no in range(14):
            errors: list[BaseException] = []
            written: list[dict[int, bytes]] = [{} for _ in range(writers)]

            def run(w: int, seed: int, written: dict[int, bytes], errors: list[BaseException]) -> None:
                rng = random.Random(seed)
                own = [b for b in range(blocks) if b % writers == w]
                try:
                    h = handles[w]
                    for i in range(60):
                        b = rng.choice(own[:16]) if i % 2 else rng.choice(own)
                        with lock:
                            if rng.random() < 0.5:
                                data = rng.choice(recent[-8:])
                            else:
                                data = rng.randbytes(BS)
                                recent.append(data)
                        if i % 3 == 0:  # a large write in flight while the next one arrives
                            cookie = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), b * BS)
                            h.pwrite(data, b * BS)
                            while not h.aio_command_completed(cookie):
                                h.poll(-1)
                        else:
                            h.pwrite(data, b * BS)
                        written[b] = data
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=run, args=(w, round_no * 100 + w, written[w], errors)) for w in range(writers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors
            for done in written:
                for b, data in done.items():
                    model[b * BS : (b + 1) * BS] = data
            if round_no % 4 == 3:
                time.sleep(1.3)  # the idle save runs
            handles[round_no % writers].flush()
            expected.append(bytes(model))
        for h in handles:
            h.shutdown()
        _check_versions(srv, expected, size)
    with srv:  # a restart reads the same
        _check_versions(srv, expected, size)


def _check_versions(srv: ServerProcess, expected: list[bytes], size: int) -> None:
    # Every round changes the image (40 random writes of 13 contents per connection), so each
    # FLUSH made exactly one version.
    assert len(set(expected)) == len(expected)
    latest = connect(srv.uri("vol@latest"))
    assert latest.pread(size, 0) == expected[-1]
    latest.shutdown()
    for version, image in enumerate(expected, start=1):
        h = connect(srv.uri(f"vol@{version}"))
        assert h.pread(size, 0) == image, f"version {version} differs from its round"
        h.shutdown()
