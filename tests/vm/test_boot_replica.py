"""Disaster recovery, all the way: boot a machine from a clone of its replica.

A small Linux system (busybox in an ext4 root) is replicated with ``nbdsink replicate`` into
volume ``web01`` (a full sync, then a cycle after a change on the source), and
``nbdsink clone web01@latest web01-dr`` makes the volume the DR machine runs on. Then a
real Debian 6.1 kernel boots under qemu, and its PID 1 does what a DR boot does:

1. the backup host's side: ``nbdsink serve`` (nbdkit and the plugin, the store on a virtio
   disk that holds the store as ``clone`` left it);
2. the initramfs's side: ``nbd-client -unix SOCKET /dev/nbd0 -N web01-dr`` attaches the
   clone's writable head, ext4 on ``/dev/nbd0`` is mounted read-write, and ``switch_root``
   makes it ``/`` and executes its ``/sbin/init`` as PID 1;
3. the replica's own ``/sbin/init`` (a script in the replicated image, not in the test's
   initramfs) writes a marker saying which PID, root device, kernel and boot (a nonce on the
   kernel command line) it ran in, remounts ``/`` read-only, ``sync``s the root device (an
   fsync of a block device is a FLUSH, which commits the head as a version: the remount's
   last writes are FUA writes, durable but no version) and powers off.

Back on the host, as a user would check it: the store disk is mounted, a server is started
on it, and every version is copied out with ``nbdcopy`` and mounted: the marker is in a new
version of ``web01-dr`` (fsck-clean, otherwise identical to the source), and in no version of
``web01``, whose versions are untouched. ``nbdsink verify`` finds the store intact although
the guest powered off with the server still running.

Real: the kernel and its nbd driver, ``nbd-client`` (3.24, netlink), nbdkit with the nbdsink
plugin and store, ext4 on the NBD device as the root filesystem, busybox ``switch_root`` as
PID 1, the replica's init executed from the NBD device, FLUSH committing a version,
``replicate``, ``clone``, ``serve``, ``verify``, ``nbdcopy``.
Stand-ins: the backup host is the same guest (its server runs in a chroot of the host's root
over 9p, reached over a unix socket, where a real DR boot reaches it over TCP/TLS); the
initramfs is the test harness's busybox one with a DR stage instead of initramfs-tools' nbd
hook, and takes ``nbd-client`` from that chroot rather than from a copy inside it; the
replicated system is a busybox root, not a distribution; the source machine is an image on
a loop device of the host. One kernel boot serves both stages (no second kernel).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdsink.testing import ServerProcess, run_cli
from vm import harness

pytestmark = pytest.mark.root

MIB = 1 << 20
SIZE = 32 * MIB
MARKER = "var/lib/replica-booted"

# The replicated system's /sbin/init. It runs as PID 1 once switch_root has made the NBD
# device its root, and shuts down as a system must for its last state to be a version:
# remount / read-only (ext4 writes its journal and a clean superblock), then fsync the
# device (the FLUSH that commits them).
REPLICA_INIT = r"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
root=$(awk '$2 == "/" { dev = $1 } END { print dev }' /proc/mounts)
nonce=$(sed -n 's/.*replica\.nonce=\([^ ]*\).*/\1/p' /proc/cmdline)
echo "booted pid=$$ root=$root kernel=$(uname -r) nonce=$nonce" > /__MARKER__
echo "replica: $(cat /__MARKER__)"
mount -o remount,ro / || echo "replica: cannot remount / read-only"
sync "$root" || echo "replica: cannot sync $root"
echo "replica: powering off"
poweroff -f
""".replace("__MARKER__", MARKER)

# Sourced by the harness's initramfs as PID 1, with the host root at /newroot (see
# harness.boot), after harness.store_server_stage() has started the backup host's server
# inside /newroot; this, the initramfs's part, runs in the initramfs itself, as PID 1 must
# for switch_root.
DR_STAGE = r"""
# Progress on the console, with the guest's uptime (where a slow boot spends its time).
say() { echo "dr-stage: $* ($(cut -d ' ' -f 1 /newroot/proc/uptime)s)"; }
say "the backup server listens"

# -- the initramfs: the clone's head becomes the root device
mount -t devtmpfs devtmpfs /dev
i=0
until host nbd-client -unix /run/nbdsink.sock /dev/nbd0 -N __VOLUME__ -b 4096; do
    i=$((i + 1)); [ $i -lt 20 ] || fail "nbd-client cannot attach __VOLUME__"; sleep 0.5
done
mkdir -p /sysroot
mount -t ext4 /dev/nbd0 /sysroot || fail "cannot mount /dev/nbd0"
[ -x /sysroot/sbin/init ] || fail "the replica has no /sbin/init"
mount --move /dev /sysroot/dev
say "switch_root into __VOLUME__"
exec switch_root /sysroot /sbin/init
"""


@contextlib.contextmanager
def loop_device(image: Path) -> Iterator[str]:
    """``image`` on a free loop device of the host, detached afterwards."""
    dev = subprocess.run(["losetup", "-f", "--show", str(image)],
                         capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


@contextlib.contextmanager
def mounted(source: str | Path, mountpoint: Path, *options: str) -> Iterator[Path]:
    """``mount [-o OPTIONS] SOURCE MOUNTPOINT`` on the host, unmounted afterwards."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    opts = ["-o", ",".join(options)] if options else []
    run = subprocess.run(["mount", *opts, str(source), str(mountpoint)],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert run.returncode == 0, f"mount {source}: {run.stderr}"
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], capture_output=True, check=True)


def build_rootfs(root: Path) -> None:
    """A bootable busybox system: the binary, one symlink per applet, and /sbin/init."""
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "root", "etc", "var/lib"):
        (root / d).mkdir(parents=True)
    shutil.copy2(harness.BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run(
        [str(harness.BUSYBOX), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    (root / "sbin" / "init").write_text(REPLICA_INIT)
    (root / "sbin" / "init").chmod(0o755)
    (root / "etc" / "hostname").write_text("web01\n")


def files(root: Path) -> dict[str, str]:
    """Every file, symlink and directory under ``root`` (lost+found aside): a content hash,
    a link target or ``dir``."""
    out: dict[str, str] = {}
    for dirpath, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if rel.startswith("lost+found"):
                continue
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def replicate(dev: str, srv: ServerProcess, state: Path, scan_state: Path) -> None:
    """One ``replicate --once`` with the scan tracker, its reference kept in ``scan_state``
    (not the host's /var/lib: a loop device's name is reused by other tests)."""
    env = {**os.environ, "NBDSINK_SCAN_STATE": str(scan_state)}
    run = run_cli("replicate", dev, srv.uri("web01"), "--state", str(state), "--once",
                  "--tracker", "scan", check=False, env=env)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


def versions(store: Path, volume: str) -> list[int]:
    out = run_cli("versions", volume, "--json", "--store", str(store)).stdout
    return [int(v["version"]) for v in json.loads(out)]


def copy_out(srv: ServerProcess, export: str, dest: Path) -> Path:
    """``nbdcopy`` a version into an image file (replacing ``dest``)."""
    dest.unlink(missing_ok=True)
    subprocess.run(["nbdcopy", srv.uri(export), str(dest)], check=True, capture_output=True)
    return dest


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_boot_a_clone_of_the_replica(tmp_path: Path) -> None:
    started = time.monotonic()
    release = harness.kernel().release

    # The source machine: its root filesystem on a loop device, replicated twice (a full
    # sync, then a cycle after a change made on the mounted filesystem).
    rootfs = tmp_path / "rootfs"
    build_rootfs(rootfs)
    image = tmp_path / "web01.img"
    with image.open("wb") as f:
        f.truncate(SIZE)
    # 4 KiB blocks: nbd-client attaches with a 4 KiB logical block size.
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(rootfs), str(image)],
                   check=True, capture_output=True)  # fmt: skip
    backup = tmp_path / "backup"
    store = backup / "store"
    run_cli("volume", "create", "web01", "--size", str(SIZE), "--store", str(store))
    with ServerProcess(store, tmp_path / "nbd.sock") as srv, loop_device(image) as dev:
        replicate(dev, srv, tmp_path / "state", tmp_path / "scan")
        with mounted(dev, tmp_path / "src") as src:
            (src / "etc" / "motd").write_text("replicated by nbdsink\n")
        replicate(dev, srv, tmp_path / "state", tmp_path / "scan")
        original_versions = versions(store, "web01")
        assert len(original_versions) == 2, original_versions
        original = {v: digest(copy_out(srv, f"web01@{v}", tmp_path / "v.img"))
                    for v in original_versions}  # fmt: skip
    with mounted(image, tmp_path / "src", "ro", "loop") as src:
        source_files = files(src)
    assert "etc/motd" in source_files and MARKER not in source_files
    source_image = image.read_bytes()
    assert original[original_versions[-1]] == digest(image)
    run_cli("clone", "web01@latest", "web01-dr", "--store", str(store))
    assert versions(store, "web01-dr") == [1]

    # The backup host's disk: the store as clone left it, on ext4.
    disk = tmp_path / "backup-disk.img"
    with disk.open("wb") as f:
        f.truncate(256 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(backup), str(disk)],
                   check=True, capture_output=True)  # fmt: skip

    # The DR boot.
    nonce = secrets.token_hex(8)
    stage = harness.store_server_stage() + DR_STAGE.replace("__VOLUME__", "web01-dr")
    boot_started = time.monotonic()
    console = harness.boot(stage, drives=[disk], append=f"replica.nonce={nonce}", timeout=300,
                           console_log=tmp_path / "console.log")  # fmt: skip
    boot_time = time.monotonic() - boot_started
    booted = f"booted pid=1 root=/dev/nbd0 kernel={release} nonce={nonce}"
    assert f"replica: {booted}" in console, console[-3000:]
    assert "replica: cannot" not in console, console[-3000:]
    assert "replica: powering off" in console, console[-3000:]
    assert "Kernel panic" not in console, console[-3000:]

    # What the boot left, read back on the host as a user would.
    with mounted(disk, tmp_path / "backup-mnt", "loop") as mnt:
        disk_store = mnt / "store"
        with ServerProcess(disk_store, tmp_path / "check.sock") as srv:
            dr_versions = versions(disk_store, "web01-dr")
            assert dr_versions[0] == 1 and len(dr_versions) >= 2, dr_versions
            newest = dr_versions[-1]
            replica = copy_out(srv, f"web01-dr@{newest}", tmp_path / "replica.img")
            fsck = subprocess.run(["e2fsck", "-f", "-n", str(replica)],
                                  capture_output=True, text=True, check=False)  # fmt: skip
            assert fsck.returncode == 0, fsck.stdout + fsck.stderr
            # e2fsck -n skips a journal that needs replaying: a clean shutdown left none.
            super_block = subprocess.run(["dumpe2fs", "-h", str(replica)],
                                         capture_output=True, text=True, check=True).stdout  # fmt: skip
            assert "needs_recovery" not in super_block, super_block
            assert re.search(r"^Filesystem state:\s+clean$", super_block, re.M), super_block
            with mounted(replica, tmp_path / "replica", "ro", "loop") as root:
                after = files(root)
                marker = (root / MARKER).read_text()
            assert marker == booted + "\n"
            # The boot changed nothing else: the replica is the source plus the marker.
            assert {k: v for k, v in after.items() if k != MARKER} == source_files

            # The clone's first version is the source; the original volume has no new
            # version, each of its versions is byte for byte what it was before the boot,
            # and none has the marker.
            base = copy_out(srv, "web01-dr@1", tmp_path / "v.img")
            assert base.read_bytes() == source_image
            assert versions(disk_store, "web01") == original_versions
            for v in original_versions:
                img = copy_out(srv, f"web01@{v}", tmp_path / "v.img")
                assert digest(img) == original[v], f"web01@{v} changed"
                with mounted(img, tmp_path / f"web01-{v}", "ro", "loop") as root:
                    assert not (root / MARKER).exists(), f"web01@{v} has the replica's marker"
        # Every chunk of every version reads back intact, although the guest powered off
        # with its server running.
        verify = run_cli("verify", "--full", "--store", str(disk_store), check=False)
        assert verify.returncode == 0, verify.stdout + verify.stderr
    print(f"replica boot: {boot_time:.0f}s in the guest, {time.monotonic() - started:.0f}s in all; "
          f"web01-dr versions {dr_versions}")
