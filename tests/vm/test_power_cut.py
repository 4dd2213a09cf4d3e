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
import shlex
import subprocess
from pathlib import Path

import pytest

from nbdsink.testing import ServerProcess, run_cli
from vm import harness
from vm.test_boot_replica import mounted

pytestmark = pytest.mark.root

MIB = 1 << 20
SIZE = 8 * MIB

STAGE = r"""
host() {
    chroot /newroot /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 TMPDIR=/tmp "$@"
}
host modprobe -a virtio_blk crc32c_generic ext4 || fail "modprobe"
i=0
until [ -b /newroot/dev/vda ]; do
    i=$((i + 1)); [ $i -lt 100 ] || fail "no /dev/vda"; sleep 0.1
done
mkdir -p /newroot/srv/backup
host mount /dev/vda /srv/backup || fail "cannot mount the store disk"
host __NBDSINK__ serve --store /srv/backup/store --socket /run/nbdsink.sock \
    > /newroot/run/nbdsink-serve.log 2>&1 &
i=0
until [ -S /newroot/run/nbdsink.sock ]; do
    i=$((i + 1))
    [ $i -lt 1200 ] || fail "nbdsink serve did not start: $(cat /newroot/run/nbdsink-serve.log)"
    sleep 0.1
done
host nbdcopy --flush /srv/backup/data.bin "nbd+unix:///vol?socket=/run/nbdsink.sock" \
    || fail "nbdcopy: $(cat /newroot/run/nbdsink-serve.log)"
echo "power-cut: flushed"
echo b > /newroot/proc/sysrq-trigger
"""


def test_a_power_cut_after_flush_keeps_the_version(tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    backup.mkdir()
    data = os.urandom(SIZE)
    (backup / "data.bin").write_bytes(data)
    run_cli("volume", "create", "vol", "--size", str(SIZE), "--store", str(backup / "store"))
    disk = tmp_path / "backup-disk.img"
    with disk.open("wb") as f:
        f.truncate(256 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(backup), str(disk)],
                   check=True, capture_output=True)  # fmt: skip

    nbdsink = harness.REPO / ".venv" / "bin" / "nbdsink"
    console = harness.boot(STAGE.replace("__NBDSINK__", shlex.quote(str(nbdsink))),
                           drives=[disk], timeout=300,
                           console_log=tmp_path / "console.log")  # fmt: skip
    assert "power-cut: flushed" in console, console[-3000:]

    # The power is back: mounting replays the disk's journal, as a boot would.
    with mounted(disk, tmp_path / "mnt", "loop") as mnt:
        store = mnt / "store"
        versions = [int(v["version"]) for v in json.loads(
            run_cli("versions", "vol", "--json", "--store", str(store)).stdout)]
        assert versions == [1], versions
        with ServerProcess(store, tmp_path / "check.sock") as srv:
            out = tmp_path / "v1.img"
            copy = subprocess.run(["nbdcopy", srv.uri("vol@1"), str(out)],
                                  capture_output=True, text=True, check=False)  # fmt: skip
            assert copy.returncode == 0, copy.stderr + srv.log.read_text(errors="replace")[-2000:]
            assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
        check = run_cli("verify", "--full", "--json", "--store", str(store), check=False)
        assert check.returncode == 0, check.stdout + check.stderr
