"""Committed versions attached with the kernel's NBD client, in a real kernel.

A user's recovery path: ``nbd-client -unix SOCKET /dev/nbdX -N vol@N`` attaches version N of
a volume served by ``nbdsink serve``; the filesystem in it mounts read-only and holds exactly
the files it held when N was committed; writing to it fails cleanly (nothing changes on the
server, no kernel warning).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
from pathlib import Path

import pytest

from nbdsink.testing import ServerProcess, run_cli
from vm.conftest import attach, detach, kernel_problems, tree

pytestmark = pytest.mark.vm

MIB = 1 << 20


def versions(srv: ServerProcess) -> list[dict[str, object]]:
    out = run_cli("versions", "vol", "--json", "--store", str(srv.store)).stdout
    result: list[dict[str, object]] = json.loads(out)
    return result


def latest(srv: ServerProcess) -> int:
    return max(int(str(v["version"])) for v in versions(srv))


def test_attach_committed_versions_read_only(
    server: ServerProcess, nbd_devices: list[str], tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    # Version A: a filesystem made and filled through the writable head.
    attach(server, "/dev/nbd0", "vol", nbd_devices)
    subprocess.run(["mkfs.ext4", "-q", "-F", "/dev/nbd0"], check=True)
    subprocess.run(["mount", "/dev/nbd0", str(mnt)], check=True)
    (mnt / "docs").mkdir()
    (mnt / "docs" / "a.bin").write_bytes(os.urandom(3 * MIB + 123))
    (mnt / "b.txt").write_text("version A\n")
    subprocess.run(["umount", str(mnt)], check=True)
    detach("/dev/nbd0", nbd_devices)
    version_a = latest(server)

    # Version B: the same files changed.
    attach(server, "/dev/nbd0", "vol", nbd_devices)
    subprocess.run(["mount", "/dev/nbd0", str(mnt)], check=True)
    files_a = tree(mnt)
    assert files_a["b.txt"] == b"version A\n" and len(files_a["docs/a.bin"]) == 3 * MIB + 123
    (mnt / "b.txt").write_text("version B\n")
    (mnt / "c.bin").write_bytes(os.urandom(MIB))
    subprocess.run(["umount", str(mnt)], check=True)
    detach("/dev/nbd0", nbd_devices)
    version_b = latest(server)
    assert version_b > version_a

    # vol@A: read-only, mounts, holds exactly the files of A.
    attach(server, "/dev/nbd1", f"vol@{version_a}", nbd_devices)
    ro = subprocess.run(["blockdev", "--getro", "/dev/nbd1"], capture_output=True, text=True, check=True)
    assert ro.stdout.strip() == "1", "a historic export must attach read-only"
    subprocess.run(["mount", "-o", "ro", "/dev/nbd1", str(mnt)], check=True)
    try:
        assert tree(mnt) == files_a
    finally:
        subprocess.run(["umount", str(mnt)], check=True)

    # A write through it fails cleanly and changes nothing.
    before = Path("/dev/nbd1").read_bytes()[: 4 * MIB]
    with pytest.raises(OSError) as exc:
        fd = os.open("/dev/nbd1", os.O_WRONLY)
        try:
            os.write(fd, b"\xff" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    assert exc.value.errno in (errno.EROFS, errno.EPERM, errno.EACCES, errno.EIO)
    dd = subprocess.run(
        ["dd", "if=/dev/zero", "of=/dev/nbd1", "bs=4096", "count=1", "oflag=direct"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert dd.returncode != 0, "dd wrote to a historic version"
    subprocess.run(["blockdev", "--flushbufs", "/dev/nbd1"], check=True)
    fd = os.open("/dev/nbd1", os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 4 * MIB)
        os.preadv(fd, [buf], 0)
        assert bytes(buf) == before, "the historic version changed"
    finally:
        os.close(fd)
    detach("/dev/nbd1", nbd_devices, commit=False)
    assert latest(server) == version_b, "a write attempt on a version made a new version"

    # vol@latest: the files of B.
    attach(server, "/dev/nbd2", "vol@latest", nbd_devices)
    subprocess.run(["mount", "-o", "ro", "/dev/nbd2", str(mnt)], check=True)
    try:
        files_b = tree(mnt)
        assert files_b["b.txt"] == b"version B\n"
        assert files_b["docs/a.bin"] == files_a["docs/a.bin"]
        assert len(files_b["c.bin"]) == MIB
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    detach("/dev/nbd2", nbd_devices, commit=False)

    info = subprocess.run(["nbdinfo", server.uri(f"vol@{version_a}")], capture_output=True, text=True)
    assert info.returncode == 0, "the server must still answer after the refused write"
    problems = kernel_problems()
    assert not problems, "\n".join(problems)
