"""The ``dm`` tracker backend and the nbdsink device-mapper target, in a real kernel.

The shared conformance suite (``tests/tracker/conformance.py``: O_DIRECT writes, discards,
write-zeroes, ext4, concurrent checkpoints, a killed tracker process) runs over a dm linear
device standing for an LVM volume, with the target interposed under it online. Then what only
this backend has: persistence through the metadata device and across table reloads, detection
of an unclean stop, removal under I/O, and rejection of bad tables, messages and ioctls
without a kernel warning.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import random
import select
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from tracker.conformance import (
    check_ack_semantics,
    check_bad_input,
    check_concurrent,
    check_direct_io,
    check_filesystem,
    check_restart,
    reported_chunks,
    write_direct,
)

from nbdsink.testing import run_cli
from nbdsink.tracker import dm
from nbdsink.tracker.base import TrackerError, TrackingLost
from vm.conftest import kernel_problems, remove_dm_stack

pytestmark = pytest.mark.vm

CS = 64 << 10
MIB = 1 << 20


def start(device: str, chunk_size: int) -> dm.DmTracker:
    return dm.start(device, chunk_size)


def table_of(name: str) -> str:
    return subprocess.run(["dmsetup", "table", name], capture_output=True, text=True, check=True).stdout


def dmsetup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dmsetup", *args], capture_output=True, text=True, check=False)


def dmesg_since(mark: int) -> str:
    return subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout[mark:]


def dmesg_len() -> int:
    return len(subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout)


def meta_state(meta: str) -> int:
    with open(meta, "rb") as f:
        head = f.read(16)
    magic, _version, state = struct.unpack("<QII", head)
    assert magic == dm._META_MAGIC, "no nbdsink metadata header"
    return state


# -- the conformance suite ---------------------------------------------------------------------


def test_conformance_direct_io(linear: Callable[..., str]) -> None:
    dev = linear("cf-direct", 32 * MIB)
    report = check_direct_io(start, dev, CS, rounds=3)
    assert report.changed > 0
    # The target marks exactly the chunks written: no over-reporting beyond chunk rounding.
    assert report.over_reporting < 1.5, report
    assert "linear" in table_of("cf-direct"), "stop() did not restore the original table"


def test_conformance_ext4(linear: Callable[..., str], tmp_path: Path) -> None:
    dev = linear("cf-ext4", 64 * MIB)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    report = check_filesystem(start, dev, CS, "ext4", mnt, rounds=2)
    assert report.changed > 0


def test_conformance_concurrent(linear: Callable[..., str]) -> None:
    dev = linear("cf-conc")
    check_concurrent(start, dev, CS)


def test_conformance_restart(linear: Callable[..., str]) -> None:
    dev = linear("cf-restart")
    check_restart("dm", dm.attach, dev, CS)


def test_conformance_ack_and_bad_input(linear: Callable[..., str]) -> None:
    dev = linear("cf-ack")
    check_ack_semantics(start, dev, CS)
    check_bad_input(start, dev, CS)


def test_non_dm_device_is_refused(make_loop: Callable[[int], str]) -> None:
    loop = make_loop(8 * MIB)
    with pytest.raises(TrackerError, match="not a device-mapper device"):
        dm.start(loop, CS)


def test_interposed_online_under_a_mounted_filesystem(linear: Callable[..., str], tmp_path: Path) -> None:
    """Start and stop while ext4 is mounted and written: the files and fsck stay clean."""
    dev = linear("online")
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", dev, str(mnt)], check=True)
    try:
        (mnt / "before").write_bytes(os.urandom(3 * MIB))
        tracker = dm.start(dev, CS)
        (mnt / "during").write_bytes(os.urandom(2 * MIB))
        os.sync()
        got = tracker.checkpoint()
        assert got.dirty_bytes >= 2 * MIB
        tracker.stop()
        (mnt / "after").write_bytes(b"x" * 4096)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    fsck = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    assert "linear" in table_of("online")


def test_tracks_a_dm_crypt_device(make_loop: Callable[[int], str], make_dm: Callable[[str, str], str]) -> None:
    """Interposing copies the table with its key (through stdin) and restores it exactly."""
    subprocess.run(["modprobe", "dm-crypt"], check=True)
    loop = make_loop(16 * MIB)
    key = os.urandom(64).hex()
    dev = make_dm("secret", f"0 {16 * MIB // 512} crypt aes-xts-plain64 {key} 0 {loop} 0")
    before = subprocess.run(["dmsetup", "table", "--showkeys", "secret"], capture_output=True, text=True).stdout
    tracker = dm.start(dev, CS)
    payload = os.urandom(4096)
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    try:
        write_direct(fd, 9 * CS, payload)
    finally:
        os.close(fd)
    assert reported_chunks(tracker.checkpoint()) == {9}
    tracker.stop()
    after = subprocess.run(["dmsetup", "table", "--showkeys", "secret"], capture_output=True, text=True).stdout
    assert after == before
    with open(dev, "rb") as f:
        f.seek(9 * CS)
        assert f.read(4096) == payload


def test_track_cli_with_the_dm_backend(linear: Callable[..., str]) -> None:
    """``nbdsink track`` drives the dm backend like the others (found through the registry)."""
    dev = linear("cli")
    start_out = run_cli("track", "start", dev, "--backend", "dm", "--chunk-size", "64K").stdout
    assert "dm backend" in start_out
    _write_chunks(dev, [7])
    got = json.loads(run_cli("track", "checkpoint", dev, "--json").stdout)
    assert [7 * CS, CS] in got["extents"]
    listed = json.loads(run_cli("track", "status", "--json").stdout)
    assert [s["backend"] for s in listed] == ["dm"] and listed[0]["chunk_size"] == CS
    twice = run_cli("track", "start", dev, "--backend", "dm", check=False)
    assert twice.returncode != 0 and "nbdsink: error:" in twice.stderr and "already tracked" in twice.stderr
    run_cli("track", "stop", dev)
    assert "linear" in table_of("cli")


# -- persistence ---------------------------------------------------------------------------------


def _write_chunks(dev: str, chunks: list[int]) -> None:
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    try:
        for c in chunks:
            write_direct(fd, c * CS, os.urandom(4096))
    finally:
        os.close(fd)


def test_table_reload_hands_generations_over(linear: Callable[..., str]) -> None:
    """A reload (suspend, new table, resume) without metadata keeps every generation."""
    dev = linear("reload")
    tracker = dm.start(dev, CS)
    _write_chunks(dev, [1, 2])
    g1 = tracker.checkpoint()
    _write_chunks(dev, [7])
    table = table_of("reload").strip()
    assert dmsetup("reload", "reload", "--table", table).returncode == 0
    assert dmsetup("resume", "reload").returncode == 0
    again = dm.attach(dev)
    got = again.checkpoint()
    assert {1, 2, 7} <= reported_chunks(got)
    assert got.generation > g1.generation
    again.stop()


def test_metadata_persists_across_a_clean_removal(
    make_loop: Callable[[int], str], make_dm: Callable[[str, str], str]
) -> None:
    """Remove the whole stack cleanly, re-create it from the same table: nothing forgotten."""
    data = make_loop(64 * MIB)
    meta = make_loop(4 * MIB)
    line = f"0 {64 * MIB // 512} nbdsink {data} {CS // 512} {meta}"
    dev = make_dm("persist", line)
    tracker = dm.attach(dev)
    _write_chunks(dev, [0, 3])
    g1 = tracker.checkpoint()
    tracker.acknowledge(g1.generation)
    _write_chunks(dev, [5, 6])
    g2 = tracker.checkpoint()  # read, never acknowledged
    _write_chunks(dev, [9, 1023])  # not even checkpointed
    epoch = tracker.info().epoch
    assert meta_state(meta) == 2, "the header must say ACTIVE while the target runs"
    assert dmsetup("remove", "persist").returncode == 0
    assert meta_state(meta) == 1, "a clean removal must leave the header CLEAN"

    dev = make_dm("persist", line)
    again = dm.attach(dev)
    assert again.info().epoch == epoch, "the tracking history continues"
    got = again.checkpoint()
    assert got.generation > g2.generation
    assert reported_chunks(got) == {5, 6, 9, 1023}
    again.acknowledge(got.generation)
    assert reported_chunks(again.checkpoint()) == set()


def test_unclean_stop_is_reported_as_lost(
    make_loop: Callable[[int], str], make_dm: Callable[[str, str], str], tmp_path: Path
) -> None:
    """The metadata as a crash would leave it (header ACTIVE) loads as "tracking lost"."""
    data = make_loop(64 * MIB)
    meta = make_loop(4 * MIB)
    line = f"0 {64 * MIB // 512} nbdsink {data} {CS // 512} {meta}"
    dev = make_dm("unclean", line)
    tracker = dm.attach(dev)
    _write_chunks(dev, [2])
    tracker.checkpoint()
    # Power lost now: keep the metadata device exactly as it is while the target runs.
    crash = tmp_path / "meta-at-crash"
    subprocess.run(["dd", f"if={meta}", f"of={crash}", "bs=1M", "iflag=direct", "status=none"], check=True)
    _write_chunks(dev, [4])
    assert dmsetup("remove", "unclean").returncode == 0
    subprocess.run(["dd", f"if={crash}", f"of={meta}", "bs=1M", "oflag=direct", "status=none"], check=True)

    mark = dmesg_len()
    dev = make_dm("unclean", line)
    again = dm.attach(dev)
    assert again.info().lost
    status = dmsetup("status", "unclean").stdout.split()
    assert status[9] == "lost", status
    with pytest.raises(TrackingLost, match="rescan needed"):
        again.checkpoint()
    assert "unclean stop" in dmesg_since(mark)
    # What the sender does next: restart tracking, then resynchronise everything.
    remove_dm_stack("unclean")
    dev = make_dm("unclean", f"0 {64 * MIB // 512} linear {data} 0")
    fresh = dm.start(dev, CS, metadata=meta)
    assert not fresh.info().lost
    _write_chunks(dev, [8])
    assert reported_chunks(fresh.checkpoint()) == {8}
    fresh.stop()
    assert not kernel_problems()


def test_corrupt_metadata_is_lost_not_trusted(
    make_loop: Callable[[int], str], make_dm: Callable[[str, str], str]
) -> None:
    data = make_loop(16 * MIB)
    meta = make_loop(1 * MIB)
    line = f"0 {16 * MIB // 512} nbdsink {data} {CS // 512} {meta}"
    make_dm("corrupt", line)
    _write_chunks("/dev/mapper/corrupt", [1])
    assert dmsetup("remove", "corrupt").returncode == 0
    # Flip one bit of the open generation's bitmap slot (after the 4 KiB header).
    fd = os.open(meta, os.O_RDWR)
    try:
        b = os.pread(fd, 1, 4096)
        os.pwrite(fd, bytes([b[0] ^ 0x80]), 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
    subprocess.run(["blockdev", "--flushbufs", meta], check=True)
    make_dm("corrupt", line)
    assert dm.attach("/dev/mapper/corrupt").info().lost


def test_removal_while_io_runs(make_loop: Callable[[int], str], make_dm: Callable[[str, str], str]) -> None:
    """Forced removal under a writer: the writer gets errors, the kernel stays clean, the
    metadata is closed cleanly, and every write that succeeded is reported afterwards."""
    data = make_loop(64 * MIB)
    meta = make_loop(4 * MIB)
    line = f"0 {64 * MIB // 512} nbdsink {data} {CS // 512} {meta}"
    dev = make_dm("busy", line)
    done: list[int] = []
    errors: list[int] = []
    started = threading.Event()

    def writer() -> None:
        rng = random.Random(5)
        fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
        try:
            while len(errors) < 3:
                c = rng.randrange(1024)
                try:
                    write_direct(fd, c * CS, os.urandom(4096))
                    done.append(c)
                except OSError as exc:
                    errors.append(exc.errno or 0)
                started.set()
        finally:
            os.close(fd)

    mark = dmesg_len()
    t = threading.Thread(target=writer)
    t.start()
    started.wait(30)
    busy = dmsetup("remove", "busy")
    assert busy.returncode != 0 and "busy" in busy.stderr.lower(), busy.stderr
    forced = dmsetup("remove", "--force", "busy")
    t.join(60)
    assert not t.is_alive()
    assert errors and set(errors) <= {errno.EIO}, errors
    assert len(done) > 10
    # --force replaced the table with "error"; the device goes once the writer closed it.
    if forced.returncode != 0:
        assert dmsetup("remove", "busy").returncode == 0
    else:
        dmsetup("remove", "busy")
    assert meta_state(meta) == 1
    dev = make_dm("busy", line)
    got = reported_chunks(dm.attach(dev).checkpoint())
    assert set(done) <= got
    assert not kernel_problems(), dmesg_since(mark)


# -- a failing metadata device ---------------------------------------------------------------------


def _load_table(name: str, table: str) -> None:
    """Swap dm device ``name``'s table for ``table`` (lines through stdin) and resume it."""
    for args in (["load", name], ["resume", name]):
        r = subprocess.run(["dmsetup", *args], input=table, capture_output=True, text=True, check=False)
        assert r.returncode == 0, f"dmsetup {' '.join(args)}: {r.stderr}"


def _meta_state_direct(meta: str) -> int:
    """:func:`meta_state`, read past the page cache (the target writes through a dm device)."""
    fd = os.open(meta, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    try:
        assert os.preadv(fd, [buf], 0) == 4096
        magic, _version, state = struct.unpack_from("<QII", buf)
    finally:
        buf.close()
        os.close(fd)
    assert magic == dm._META_MAGIC, "no nbdsink metadata header"
    return int(state)


def _info_of(dev: str) -> dm.TargetInfo:
    st = os.stat(dev)
    return dm.read_info(os.major(st.st_rdev), os.minor(st.st_rdev))


def test_failing_metadata_device(make_loop: Callable[[int], str], make_dm: Callable[[str, str], str]) -> None:
    """The metadata device fails under the target: its reads during a resume (dm-error past
    the second bitmap, so the load fails half-way), then its writes during a suspend, a
    checkpoint and a removal (dm-flakey, always down, error_writes). Each failure is reported
    (a failed resume, "error" in the status, "lost" after the failed removal), nothing is
    half-loaded, a retry once the device works continues the same history, every chunk
    written is reported, and the kernel logs no warning."""
    subprocess.run(["modprobe", "dm-flakey"], check=True)
    data = make_loop(64 * MIB)
    meta_loop = make_loop(4 * MIB)
    msectors = 4 * MIB // 512
    healthy = f"0 {msectors} linear {meta_loop} 0\n"
    writes_fail = f"0 {msectors} flakey {meta_loop} 0 0 1 1 error_writes\n"
    # 1024 chunks: each bitmap slot is one 4 KiB block after the 4 KiB header.
    readable = (1 + 2) * 8
    reads_fail_halfway = f"0 {readable} linear {meta_loop} 0\n{readable} {msectors - readable} error\n"
    meta = make_dm("mfail-meta", healthy)
    line = f"0 {64 * MIB // 512} nbdsink {data} {CS // 512} {meta}"
    dev = make_dm("mfail", line)
    mark = dmesg_len()
    pending: set[int] = set()  # written since the last acknowledged checkpoint

    def write(*chunks: int) -> None:
        _write_chunks(dev, list(chunks))
        pending.update(chunks)

    # Six closed generations of a chunk each, and one chunk in the open one: 7 bitmaps.
    tracker = dm.attach(dev)
    for c in range(10, 16):
        write(c)
        tracker.checkpoint()
    write(100)
    before = tracker.info()
    assert before.nr_closed == 6
    assert dmsetup("remove", "mfail").returncode == 0
    assert _meta_state_direct(meta_loop) == 1

    # Reads fail past the second bitmap: the constructor (header only) works, every resume
    # fails half-way through the load, and each one leaves the target as it found it.
    _load_table("mfail-meta", reads_fail_halfway)
    assert dmsetup("create", "mfail", "--notable").returncode == 0
    assert dmsetup("mknodes", "mfail").returncode == 0  # without udev, made at the first resume
    r = dmsetup("load", "mfail", "--table", line)
    assert r.returncode == 0, r.stderr
    for _ in range(4):
        assert dmsetup("resume", "mfail").returncode != 0, "resumed with unreadable metadata"
    assert "reading metadata failed" in dmesg_since(mark)
    failed = _info_of(dev)
    assert (failed.nr_closed, failed.open_gen) == (0, 1), f"half-loaded state kept: {failed}"
    assert failed.flags & dm.INFO_META_ERROR and failed.flags & dm.INFO_SUSPENDED, failed
    assert dmsetup("status", "mfail").stdout.split()[10] == "error"
    for msg in (["checkpoint"], ["release", "1"]):
        assert dmsetup("message", "mfail", "0", *msg).returncode != 0, f"{msg} without a state"
    assert _meta_state_direct(meta_loop) == 1, "a failed load must leave the metadata alone"

    _load_table("mfail-meta", healthy)
    r = dmsetup("resume", "mfail")
    assert r.returncode == 0, r.stderr
    again = dm.attach(dev)
    info = again.info()
    assert not info.lost and not info.flags & dm.INFO_META_ERROR, info
    assert (info.nr_closed, info.oldest_gen, info.open_gen, info.epoch) == (
        before.nr_closed, before.oldest_gen, before.open_gen, before.epoch
    ), f"the retried load is not the stored state: {info} vs {before}"
    got = again.checkpoint()
    assert pending <= reported_chunks(got)
    again.acknowledge(got.generation)
    pending.clear()

    # Writes fail: the suspend's clean close and a checkpoint while suspended cannot write
    # the metadata; the resume, which must mark it ACTIVE first, fails until they can.
    _load_table("mfail-meta", writes_fail)
    write(200, 201)
    assert dmsetup("suspend", "mfail").returncode == 0
    assert dmsetup("status", "mfail").stdout.split()[10] == "error"
    r = dmsetup("message", "mfail", "0", "checkpoint")
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == got.generation + 1
    assert dmsetup("resume", "mfail").returncode != 0, "resumed without marking the metadata ACTIVE"
    assert "writing metadata failed" in dmesg_since(mark)
    assert _info_of(dev).flags & dm.INFO_META_ERROR
    _load_table("mfail-meta", healthy)
    r = dmsetup("resume", "mfail")
    assert r.returncode == 0, r.stderr
    assert not again.info().flags & dm.INFO_META_ERROR
    assert dmsetup("status", "mfail").stdout.split()[9:11] == ["ok", "ok"]
    write(300)
    got = again.checkpoint()
    assert pending <= reported_chunks(got), f"missing {sorted(pending - reported_chunks(got))}"

    # A removal whose clean close fails leaves the metadata ACTIVE: the next load reports
    # tracking lost, never stale bitmaps.
    write(400)
    _load_table("mfail-meta", writes_fail)
    assert dmsetup("remove", "mfail").returncode == 0
    _load_table("mfail-meta", healthy)
    assert _meta_state_direct(meta_loop) == 2
    dev = make_dm("mfail", line)
    lost = dm.attach(dev)
    assert lost.info().lost
    assert dmsetup("status", "mfail").stdout.split()[9] == "lost"
    with pytest.raises(TrackingLost, match="rescan needed"):
        lost.checkpoint()

    problems = kernel_problems()
    assert not problems, dmesg_since(mark)


class _StalledPage:
    """One anonymous page whose first touch, even by the kernel's copy_to_user, waits until
    :meth:`resolve` (userfaultfd, missing-page mode): a copy that stalls like a fault on a
    file of a suspended device would, but for as long as the test wants and no longer."""

    _NR_USERFAULTFD = 323  # x86_64: the guest's architecture
    # _IOWR(0xAA, nr, size) of UFFDIO_API, UFFDIO_REGISTER, UFFDIO_COPY (linux/userfaultfd.h)
    _API = (3 << 30) | (24 << 16) | (0xAA << 8) | 0x3F
    _REGISTER = (3 << 30) | (32 << 16) | (0xAA << 8) | 0x00
    _COPY = (3 << 30) | (40 << 16) | (0xAA << 8) | 0x03
    _MODE_MISSING = 1
    _EVENT_PAGEFAULT = 0x12

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.uffd = libc.syscall(self._NR_USERFAULTFD, os.O_CLOEXEC)
        if self.uffd < 0:
            raise OSError(ctypes.get_errno(), "userfaultfd")
        fcntl.ioctl(self.uffd, self._API, bytearray(struct.pack("=QQQ", 0xAA, 0, 0)))
        self.map = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._view = ctypes.c_char.from_buffer(self.map)
        self.address = ctypes.addressof(self._view)
        register = struct.pack("=QQQQ", self.address, mmap.PAGESIZE, self._MODE_MISSING, 0)
        fcntl.ioctl(self.uffd, self._REGISTER, bytearray(register))
        self._zeros = ctypes.create_string_buffer(mmap.PAGESIZE)

    def wait_fault(self, timeout: float) -> None:
        assert select.select([self.uffd], [], [], timeout)[0], "nothing touched the page"
        msg = os.read(self.uffd, 32)  # struct uffd_msg: event, then pagefault.flags, .address
        assert msg[0] == self._EVENT_PAGEFAULT
        assert struct.unpack_from("=Q", msg, 16)[0] & ~(mmap.PAGESIZE - 1) == self.address

    def resolve(self) -> None:
        """Map the page (zeros): the stalled access goes on."""
        copy = struct.pack("=QQQQq", self.address, ctypes.addressof(self._zeros), mmap.PAGESIZE, 0, 0)
        fcntl.ioctl(self.uffd, self._COPY, bytearray(copy))

    def close(self) -> None:
        del self._view
        self.map.close()
        os.close(self.uffd)


def test_bitmap_copy_to_user_holds_no_lock(make_loop: Callable[[int], str], make_dm: Callable[[str, str], str]) -> None:
    """The bitmap ioctl copies to user memory with no lock held: while its copy waits for a
    page (userfaultfd keeps it waiting), a checkpoint, a suspend with its metadata write, a
    resume and another ioctl of the same device all go through; then the copy completes."""
    data = make_loop(64 * MIB)
    meta = make_loop(4 * MIB)
    dev = make_dm("stall", f"0 {64 * MIB // 512} nbdsink {data} {CS // 512} {meta}")
    tracker = dm.attach(dev)
    _write_chunks(dev, [3, 700])
    gen = tracker.checkpoint().generation
    st = os.stat(dev)
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    page = _StalledPage()
    req = bytearray(dm._BITMAP.pack(major, minor, 0, 0, gen, 0, 1024, page.address, 0, 0, 0))
    errors: list[OSError] = []

    def read_bitmap() -> None:
        try:
            dm._ioctl(dm.IOC_BITMAP, req)
        except OSError as exc:
            errors.append(exc)

    reader = threading.Thread(target=read_bitmap)
    procs: list[subprocess.Popen[str]] = []
    blocked: list[str] = []
    try:
        reader.start()
        page.wait_fault(60)
        # In a child process, so that the test can end even when it waits for the stall.
        info = f"from nbdsink.tracker import dm; print(dm.read_info({major}, {minor}).open_gen)"
        for cmd in (
            ["dmsetup", "message", "stall", "0", "checkpoint"],
            ["dmsetup", "suspend", "stall"],
            ["dmsetup", "resume", "stall"],
            [sys.executable, "-c", info],
        ):
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(proc)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                blocked.append(" ".join(cmd))
                break
    finally:
        page.resolve()
        reader.join(60)
        outputs = [proc.communicate(timeout=60) for proc in procs]
    assert not blocked, f"waited for the stalled ioctl's copy: {blocked}"
    for proc, (_out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, f"{proc.args!r}: {err}"
    assert int(outputs[-1][0]) == gen + 2
    assert not reader.is_alive() and not errors, errors
    fields = dm._BITMAP.unpack(req)
    assert (fields[6], fields[8]) == (1024, 2), fields
    bits = int.from_bytes(page.map[:128], "little")
    page.close()
    assert bits == (1 << 3) | (1 << 700)
    assert not kernel_problems()


# -- bad input -----------------------------------------------------------------------------------


def test_invalid_tables_messages_and_ioctls(
    make_loop: Callable[[int], str], make_dm: Callable[[str, str], str]
) -> None:
    data = make_loop(16 * MIB)
    small_meta = make_loop(64 << 10)
    junk_meta = make_loop(4 * MIB)
    with open(junk_meta, "r+b") as f:
        f.write(b"not nbdsink metadata, maybe someone's data" * 10)
    subprocess.run(["blockdev", "--flushbufs", junk_meta], check=True)
    sectors = 16 * MIB // 512
    mark = dmesg_len()
    bad_tables = {
        f"0 {sectors} nbdsink {data}": "Invalid argument count",
        f"0 {sectors} nbdsink {data} 128 {small_meta} extra": "Invalid argument count",
        f"0 {sectors} nbdsink {data} 100": "Invalid chunk size",
        f"0 {sectors} nbdsink {data} 4": "Invalid chunk size",
        f"0 {sectors} nbdsink {data} 12x": "Invalid chunk size",
        f"0 {sectors} nbdsink /dev/nbdsink-missing 128": "Data device lookup failed",
        f"0 {sectors * 2} nbdsink {data} 128": "Data device is smaller than the target",
        f"0 {sectors} nbdsink {data} 128 {small_meta}": "Metadata device too small",
        f"0 {sectors} nbdsink {data} 128 {data}": "must differ from the data device",
        f"0 {sectors} nbdsink {data} 128 {junk_meta}": "Metadata device holds unknown data",
        f"0 {sectors} nbdsink {data} 128 /dev/nbdsink-missing": "Metadata device lookup failed",
    }
    for i, (table, words) in enumerate(bad_tables.items()):
        r = dmsetup("create", f"bad{i}", "--table", table)
        assert r.returncode != 0, f"accepted: {table}"
        dmsetup("remove", f"bad{i}")
        if words:
            assert words in dmesg_since(mark), f"{table}: no '{words}' in the kernel log"

    dev = make_dm("msgs", f"0 {sectors} nbdsink {data} 128")
    for msg in (["bogus"], ["release"], ["release", "abc"], ["release", "99"], ["checkpoint", "x"],
                ["release", "1", "2"]):
        r = dmsetup("message", "msgs", "0", *msg)
        assert r.returncode != 0, f"accepted message {msg}"
    assert dmsetup("message", "msgs", "0", "checkpoint").stdout.strip() == "1"

    st = os.stat(dev)
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    with pytest.raises(OSError) as exc:
        dm.read_info(major, minor + 100)
    assert exc.value.errno == errno.ENODEV
    with pytest.raises(OSError) as exc:
        dm.read_runs(major, minor, 2, 256)  # generation 2 is open
    assert exc.value.errno == errno.ENOENT
    req = bytearray(dm._BITMAP.pack(major, minor, 0, 0, 1, 3, 64, 0, 0, 0, 0))  # unaligned
    with pytest.raises(OSError) as exc:
        dm._ioctl(dm.IOC_BITMAP, req)
    assert exc.value.errno == errno.EINVAL
    req = bytearray(dm._BITMAP.pack(major, minor, 0, 0, 1, 0, 64, 8, 0, 0, 0))  # bad pointer
    with pytest.raises(OSError) as exc:
        dm._ioctl(dm.IOC_BITMAP, req)
    assert exc.value.errno == errno.EFAULT
    fd = os.open(dm.CONTROL, os.O_RDWR)
    try:
        with pytest.raises(OSError) as exc:
            fcntl.ioctl(fd, 0x1234, b"\0" * 8)
        assert exc.value.errno == errno.ENOTTY
    finally:
        os.close(fd)

    problems = kernel_problems()
    assert not problems, "\n".join(problems)


def test_large_device_bitmap_in_pieces(make_dm: Callable[[str, str], str], guest_kernel: None) -> None:
    """Over a zero target (no memory needed): 16 TiB at 4 KiB chunks (4 Gi chunks) is refused;
    2 TiB at 64 KiB (32 Mi chunks) is read back exactly, in several ioctl pieces."""
    tib = 1 << 40
    make_dm("zero16t", f"0 {16 * tib // 512} zero")
    r = dmsetup("create", "huge-bad", "--table", f"0 {16 * tib // 512} nbdsink /dev/mapper/zero16t 8")
    assert r.returncode != 0
    dev = make_dm("huge", f"0 {2 * tib // 512} nbdsink /dev/mapper/zero16t {CS // 512}")
    tracker = dm.attach(dev)
    chunks = tracker.info().nr_chunks
    assert chunks == 2 * tib // CS
    wanted = [0, 63, 64, (8 << 20) - 1, 8 << 20, chunks // 2, chunks - 1]
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        for c in wanted:
            write_direct(fd, c * CS, bytes(4096))
    finally:
        os.close(fd)
    got = tracker.checkpoint()
    assert reported_chunks(got) == set(wanted)
    assert got.extents[-1] == ((chunks - 1) * CS, CS)
