"""Encrypted at rest, end to end: replicating a LUKS container keeps the backup ciphertext.

The source is what an encrypted server has: a LUKS2 container on a block device (here a
device-mapper linear "LV", which the dm tracker can sit under), opened with ``cryptsetup``,
ext4 on the opened mapping, mounted and live. ``nbdsink replicate`` tracks and reads the
container -- the device *under* dm-crypt, never the opened mapping -- so only ciphertext
reaches the backup host; ``--freeze`` names the filesystem on the mapping, which is stacked
on that device. Two versions are made; each is attached read-only with ``nbd-client``,
opened with ``cryptsetup open --readonly`` and the key the backup host never saw, checked
with ``e2fsck`` and mounted: its files are exactly those of the source at that version's
freeze. A plaintext marker written into a file is in the decrypted replica and nowhere in
the store's files, which do hold the container's LUKS header (so the search does see the
stored device bytes).
"""

from __future__ import annotations

import json
import mmap
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nbdsink.testing import ServerProcess, run_cli
from nbdsink.tracker import dm
from vm.conftest import attach, detach, kernel_problems, tree

pytestmark = pytest.mark.vm

MIB = 1 << 20
LUKS_MAGIC = b"LUKS\xba\xbe"
"""The first bytes of a LUKS header: proof that the store's files hold the device's bytes."""

# dm-crypt itself, XTS (LUKS2's default mode: aes-xts-plain64; AES and SHA-256 are built
# into Debian's kernel), and the userspace crypto API cryptsetup checks the cipher with.
CRYPT_MODULES = ("dm-crypt", "xts", "algif_skcipher", "algif_hash")

# A fast key derivation: PBKDF2 at its minimum instead of argon2's default second and
# 1 GiB of memory, which under TCG would cost more than the rest of the test.
FAST_PBKDF = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")


def sh(*args: str) -> str:
    """Run a command; its stdout, or an assertion with everything it printed."""
    run = subprocess.run(list(args), capture_output=True, text=True, check=False)
    assert run.returncode == 0, f"{' '.join(args)} exited {run.returncode}:\n{run.stdout}{run.stderr}"
    return run.stdout


@pytest.fixture
def crypt(guest_kernel: None) -> Iterator[Callable[..., str]]:
    """``crypt(device, name, key, *options)``: ``cryptsetup open``; the mapping is unmounted
    and closed afterwards, before the devices under it go (so request this fixture last)."""
    for m in CRYPT_MODULES:
        sh("modprobe", m)
    opened: list[str] = []

    def open_(device: str, name: str, key: Path, *options: str) -> str:
        sh("cryptsetup", "open", "--type", "luks2", "--key-file", str(key), *options, device, name)
        opened.append(name)
        return f"/dev/mapper/{name}"

    try:
        yield open_
    finally:
        for name in reversed(opened):
            subprocess.run(["umount", f"/dev/mapper/{name}"], capture_output=True, check=False)
            subprocess.run(["cryptsetup", "close", name], capture_output=True, check=False)


def replicate(dev: str, srv: ServerProcess, state: Path, mnt: Path) -> tuple[int, str]:
    """One cycle of the dm-tracked container, frozen at ``mnt``; the new version and the log."""
    run = run_cli(
        "replicate", dev, srv.uri("vol"), "--tracker", "dm", "--once", "--state", str(state),
        "--freeze", str(mnt), check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    versions = json.loads(run_cli("versions", "vol", "--json", "--store", str(srv.store)).stdout)
    assert versions[-1]["consistency"] == "frozen", versions[-1]
    return int(versions[-1]["version"]), run.stderr


def store_holds(store: Path, needles: list[bytes]) -> dict[bytes, bool]:
    """Which of ``needles`` occur anywhere in the store's files (index and segments alike)."""
    found = dict.fromkeys(needles, False)
    for path in sorted(store.rglob("*")):
        if not path.is_file() or path.stat().st_size == 0:
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            for n in needles:
                found[n] = found[n] or m.find(n) >= 0
    return found


def test_luks_container_replicates_as_ciphertext(
    linear: Callable[..., str],
    server: ServerProcess,
    nbd_devices: list[str],
    tmp_path: Path,
    crypt: Callable[..., str],
) -> None:
    part = linear("web01", 64 * MIB)  # the partition (an LV here) that holds the container
    src, dst, state = tmp_path / "src", tmp_path / "dst", tmp_path / "state"
    src.mkdir()
    dst.mkdir()
    key = tmp_path / "key"
    key.write_bytes(os.urandom(64))  # the user's key: it stays on this side
    # Unique per run, so that no other bytes anywhere can match by chance.
    markers = [f"plaintext-marker-{i}-{os.urandom(8).hex()}".encode() for i in range(2)]

    sh("cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", *FAST_PBKDF,
       "--key-file", str(key), part)  # fmt: skip
    plain = crypt(part, "web01_crypt", key)
    # 4 KiB blocks: nbd-client attaches the backup with a 4 KiB logical block size.
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", plain)
    sh("mount", plain, str(src))
    expected: list[tuple[int, dict[str, bytes]]] = []
    try:
        # Version A: text carrying the first marker (many times, in every block of the file),
        # and binary data.
        (src / "notes").mkdir()
        lines = b"".join(b"%06d %s\n" % (i, markers[0]) for i in range(400))
        (src / "notes" / "secret.txt").write_bytes(lines)
        for i in range(3):
            (src / f"data{i}.bin").write_bytes(os.urandom(2 * MIB + i))
        version_a, _ = replicate(part, server, state, src)  # full sync, tracking starts
        expected.append((version_a, tree(src)))

        # Version B: the marked file grows, a second marker arrives, a file goes, one changes.
        with open(src / "notes" / "secret.txt", "ab") as f:
            f.write(b"".join(b"%06d %s\n" % (i, markers[1]) for i in range(400, 800)))
        (src / "data0.bin").unlink()
        with open(src / "data1.bin", "r+b") as f:
            f.seek(MIB)
            f.write(os.urandom(8192))
        (src / "later.bin").write_bytes(os.urandom(MIB))
        version_b, log = replicate(part, server, state, src)
        assert version_b > version_a
        expected.append((version_b, tree(src)))
        # Incremental over ciphertext: a block's ciphertext changes only when its plaintext
        # does (XTS is keyed by the sector number), so a cycle sends what changed, not the
        # container.
        sent = [int(x) for x in re.findall(r"\bsent=(\d+)", log)]
        assert sent and 0 < sent[-1] < 16 * MIB, log
    finally:
        sh("umount", str(src))

    # The store: ciphertext only. The container's header is there (the search sees what the
    # store keeps), the plaintext is not.
    held = store_holds(server.store, [LUKS_MAGIC, *markers])
    assert held[LUKS_MAGIC], "the store's files do not hold the container's header"
    leaked = [m.decode() for m in markers if held[m]]
    assert not leaked, f"plaintext in the store: {leaked}"

    # Each version: attach, open with the key, fsck, mount, compare with the ground truth.
    for n, (version, files) in enumerate(expected):
        dev = f"/dev/nbd{n + 4}"
        attach(server, dev, f"vol@{version}", nbd_devices)
        assert sh("blockdev", "--getro", dev).strip() == "1", "a version must attach read-only"
        opened = crypt(dev, f"replica_{version}", key, "--readonly")
        fsck = subprocess.run(["e2fsck", "-fn", opened], capture_output=True, text=True, check=False)
        assert fsck.returncode == 0, f"vol@{version}: e2fsck exited {fsck.returncode}\n{fsck.stdout}{fsck.stderr}"
        sh("mount", "-o", "ro", opened, str(dst))
        try:
            assert tree(dst) == files, f"vol@{version} differs from the source at its freeze"
            secret = (dst / "notes" / "secret.txt").read_bytes()
            assert markers[0] in secret and (markers[1] in secret) == (n == 1)
        finally:
            sh("umount", str(dst))
        sh("cryptsetup", "close", f"replica_{version}")
        detach(dev, nbd_devices, commit=False)

    dm.attach(part).stop()
    problems = kernel_problems()
    assert not problems, "\n".join(problems)
