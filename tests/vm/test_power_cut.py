"""A power cut right after a FLUSH was acknowledged: the version it committed is whole.

The server runs in a real guest with its store on an ext4 virtio disk. ``nbdcopy --flush``
writes a volume's worth of random data and FLUSHes; the moment it exits (the FLUSH
acknowledged), the guest is reset by ``sysrq b``, which neither syncs nor unmounts: what was
only in the guest's page cache is lost, as in a power cut, and what the guest had made
durable reached the disk image. Back on the host, as a user would check after the power came
back: the disk's journal is replayed by mounting it, a server is started on the store, and
the version reads back byte for byte, and ``verify --full`` is clean.

This is what catches a commit that is acknowledged before all it depends on is durable (a
segment's LMDB meta page, say: its data pages were synced, but not the page that makes them
reachable, so the chunks of the last save were lost with the page cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from nbdsink.store import Store
from nbdsink.testing import ServerProcess, run_cli
from vm import harness
from vm.test_boot_replica import mounted

pytestmark = pytest.mark.root

MIB = 1 << 20
SIZE = 8 * MIB

FLUSHED = r"""
host nbdcopy --flush /srv/backup/data.bin "nbd+unix:///vol?socket=/run/nbdsink.sock" \
    || fail "nbdcopy: $(cat /newroot/run/nbdsink-serve.log)"
echo "power-cut: flushed"
"""

# Version 1 holds A, version 2 holds B; the policy (keep-last 1) prunes version 1, and the
# server's upkeep sweeps A's chunks and punches their pages out of the sealed segments. The
# power goes the moment the log says so. (The upkeep commits once more between punching and
# that line, which makes the sweep durable on its own: the narrower window, a power cut
# during the punching itself, is closed by syncing before punching, see reclaim.py.)
PUNCHED = r"""
for f in a b; do
    host nbdcopy --flush /srv/backup/$f.bin "nbd+unix:///vol?socket=/run/nbdsink.sock" \
        || fail "nbdcopy: $(cat /newroot/run/nbdsink-serve.log)"
done
i=0
until grep -q "punched" /newroot/run/nbdsink-serve.log; do
    i=$((i + 1)); [ $i -lt 600 ] || fail "no punch: $(cat /newroot/run/nbdsink-serve.log)"
    sleep 0.05
done
echo "power-cut: punched"
"""


def _boot(tmp_path: Path, backup: Path, work: str) -> str:
    disk = tmp_path / "backup-disk.img"
    with disk.open("wb") as f:
        f.truncate(256 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(backup), str(disk)],
                   check=True, capture_output=True)  # fmt: skip
    # The power goes at once: sysrq b neither syncs nor unmounts.
    stage = harness.store_server_stage() + work + "echo b > /newroot/proc/sysrq-trigger\n"
    return harness.boot(stage, drives=[disk], timeout=300, console_log=tmp_path / "console.log")


def test_a_power_cut_after_flush_keeps_the_version(tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    backup.mkdir()
    data = os.urandom(SIZE)
    (backup / "data.bin").write_bytes(data)
    run_cli("volume", "create", "vol", "--size", str(SIZE), "--store", str(backup / "store"))
    console = _boot(tmp_path, backup, FLUSHED)
    # (The kernel's "sysrq: Resetting" can land inside the marker's line on the console.)
    assert "power-cut: flush" in console, console[-3000:]

    # The power is back: mounting replays the disk's journal, as a boot would.
    with mounted(tmp_path / "backup-disk.img", tmp_path / "mnt", "loop") as mnt:
        store = mnt / "store"
        assert _versions(store) == [1]
        with ServerProcess(store, tmp_path / "check.sock") as srv:
            assert _read(srv, "vol@1", tmp_path) == _sha(data)
        _verify_clean(store)


def test_a_power_cut_after_punching_loses_nothing_written_again(tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    backup.mkdir()
    a, b = os.urandom(SIZE), os.urandom(SIZE)
    (backup / "a.bin").write_bytes(a)
    (backup / "b.bin").write_bytes(b)
    # 1 MiB segments: A fills sealed segments, whose dead pages the upkeep punches.
    Store(backup / "store", create=True, segment_bytes=1 << 20).close()
    run_cli("volume", "create", "vol", "--size", str(SIZE), "--store", str(backup / "store"))
    run_cli("volume", "set", "vol", "--keep-last", "1", "--store", str(backup / "store"))
    console = _boot(tmp_path, backup, PUNCHED)
    assert "power-cut: punch" in console, console[-3000:]

    with mounted(tmp_path / "backup-disk.img", tmp_path / "mnt", "loop") as mnt:
        store = mnt / "store"
        assert _versions(store) == [2]
        with ServerProcess(store, tmp_path / "check.sock") as srv:
            assert _read(srv, "vol@2", tmp_path) == _sha(b)
            # A again, right away: the store must not take A's chunks, whose pages were
            # punched, for stored.
            (tmp_path / "a.bin").write_bytes(a)
            subprocess.run(["nbdcopy", "--flush", str(tmp_path / "a.bin"), srv.uri("vol")],
                           check=True, capture_output=True)  # fmt: skip
            assert _read(srv, "vol@3", tmp_path) == _sha(a)
        _verify_clean(store)


def _versions(store: Path) -> list[int]:
    return [int(v["version"]) for v in json.loads(
        run_cli("versions", "vol", "--json", "--store", str(store)).stdout)]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(srv: ServerProcess, export: str, tmp_path: Path) -> str:
    out = tmp_path / "out.img"
    copy = subprocess.run(["nbdcopy", srv.uri(export), str(out)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert copy.returncode == 0, copy.stderr + srv.log.read_text(errors="replace")[-2000:]
    return hashlib.sha256(out.read_bytes()).hexdigest()


def _verify_clean(store: Path) -> None:
    check = run_cli("verify", "--full", "--json", "--store", str(store), check=False)
    assert check.returncode == 0, check.stdout + check.stderr
