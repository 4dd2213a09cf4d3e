"""A replication refuses a device that is not the one it was started with.

Device names are handed out at boot or attach time: the same ``/dev/loopN`` (or ``/dev/sdb``)
can name another device later. These tests attach another image under the very same loop
device name and check that nothing of it reaches the volume unless the user says the device
was replaced on purpose; and that the same device under another name is still accepted.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from nbdsink.sender.errors import DeviceChanged
from nbdsink.sender.identity import device_identity
from nbdsink.sender.replicator import ReplicateOptions, Replicator
from nbdsink.sender.state import SenderState, StateDir

from .helpers import loop_device, make_image, run
from .rig import export_bytes, nbdsink, random_image, replicate_once, server, stop_tracker

MiB = 1 << 20
SIZE = 32 * MiB


@pytest.mark.root
def test_identity_of_loop_devices_partitions_and_files(tmp_path: Path) -> None:
    a = make_image(tmp_path / "a.img", SIZE)
    b = make_image(tmp_path / "b.img", SIZE)
    with open(a, "r+b") as f:  # an MBR with two partitions
        f.seek(446)
        for start, sectors in ((2048, 16384), (20480, 20480)):
            f.write(struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", start, sectors))
        f.seek(510)
        f.write(b"\x55\xaa")
    dev_a = run("losetup", "-f", "--show", "-P", str(a)).stdout.strip()
    try:
        if not os.path.exists(f"{dev_a}p2"):
            run("partx", "-a", dev_a)  # kernels without the msdos partition parser
        with loop_device(b) as dev_b:
            ident_a, ident_b = device_identity(dev_a), device_identity(dev_b)
            assert ident_a is not None and str(a) in ident_a
            assert ident_b is not None and str(b) in ident_b and ident_a != ident_b
            ident_part = device_identity(f"{dev_a}p2")
            assert ident_part == f"{ident_a} partition 2 at sector 20480"
            assert device_identity(f"{dev_a}p1") != ident_part
            # The same file attached again (under another name) is the same device.
            with loop_device(a) as again:
                assert again != dev_a and device_identity(again) == ident_a
    finally:
        run("losetup", "-d", dev_a, check=False)
    # A file replaced by another one under the same path is another device.
    os.replace(b, a)
    with loop_device(a) as replaced:
        assert device_identity(replaced) not in (None, ident_a)
    assert device_identity(str(a)) is None  # a regular file says nothing
    assert device_identity(str(tmp_path / "missing")) is None


def _losetup_at(dev: str, image: Path) -> None:
    run("losetup", dev, str(image))


@pytest.mark.root
def test_another_device_under_the_same_name_is_refused_until_declared_a_replacement(
        tmp_path: Path) -> None:
    a = random_image(tmp_path / "a.img", SIZE)
    b = random_image(tmp_path / "b.img", SIZE)
    state = tmp_path / "state"
    with server(tmp_path, "vol", SIZE) as srv:
        with loop_device(a) as dev:
            try:
                first = replicate_once(dev, srv.uri("vol"), state)
                assert first.returncode == 0, first.stderr
            finally:
                stop_tracker(dev)
        recorded = StateDir(state).load()
        assert recorded is not None and recorded.device_id is not None
        assert str(a) in recorded.device_id
        # The same name now names another image (as /dev/sdb may after a reboot).
        _losetup_at(dev, b)
        try:
            refused = replicate_once(dev, srv.uri("vol"), state)
            assert refused.returncode == 5, refused.stderr
            assert "is not the device this replication was started with" in refused.stderr
            assert "--device-replaced" in refused.stderr and "Traceback" not in refused.stderr
            # Nothing of the other image reached the volume; the state still names A.
            assert [v["version"] for v in srv.versions("vol")] == [1]
            assert export_bytes(srv, "vol@1", tmp_path) == a.read_bytes()
            assert StateDir(state).load() == recorded

            accepted = replicate_once(dev, srv.uri("vol"), state, "--device-replaced")
            assert accepted.returncode == 0, accepted.stderr
            assert "replacement" in accepted.stderr
            latest = srv.versions("vol")[-1]["version"]
            assert latest == 2 and export_bytes(srv, "vol@2", tmp_path) == b.read_bytes()
            assert export_bytes(srv, "vol@1", tmp_path) == a.read_bytes()
            saved = StateDir(state).load()
            assert saved is not None and saved.device_id == device_identity(dev)
            assert saved.synced and saved.last_version == 2
            shown = nbdsink("status", "--state", str(state), check=False).stdout
            assert f"identity:      {saved.device_id}" in shown

            # Accepted once, it is the replication's device from now on.
            again = replicate_once(dev, srv.uri("vol"), state)
            assert again.returncode == 0, again.stderr
            # The option left in place is pointed out: it would let another device in.
            kept = replicate_once(dev, srv.uri("vol"), state, "--device-replaced")
            assert kept.returncode == 0 and "leave the option out" in kept.stderr
        finally:
            stop_tracker(dev)
            run("losetup", "-d", dev, check=False)


@pytest.mark.root
def test_the_same_device_under_another_name_carries_on(tmp_path: Path) -> None:
    a = random_image(tmp_path / "a.img", SIZE)
    state = tmp_path / "state"
    with server(tmp_path, "vol", SIZE) as srv, loop_device(a) as first_name:
        try:
            assert replicate_once(first_name, srv.uri("vol"), state).returncode == 0
        finally:
            stop_tracker(first_name)
        # The same image under another name (as a stable /dev/disk/by-id/... name may point
        # to another node after a reboot): the state's name is not this one, the device is.
        with loop_device(a) as second:
            assert second != first_name
            try:
                fd = os.open(second, os.O_WRONLY)
                try:
                    os.pwrite(fd, os.urandom(MiB), 5 * MiB)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                done = replicate_once(second, srv.uri("vol"), state)
                assert done.returncode == 0, done.stderr
                assert export_bytes(srv, "vol@2", tmp_path) == a.read_bytes()
                saved = StateDir(state).load()
                assert saved is not None and saved.device == second
            finally:
                stop_tracker(second)


@pytest.mark.root
def test_a_state_from_before_identities_adopts_the_device(tmp_path: Path) -> None:
    a = random_image(tmp_path / "a.img", SIZE)
    state = tmp_path / "state"
    with server(tmp_path, "vol", SIZE) as srv, loop_device(a) as dev:
        try:
            assert replicate_once(dev, srv.uri("vol"), state).returncode == 0
            path = state / "state.json"
            data = json.loads(path.read_text())
            del data["device_id"]
            path.write_text(json.dumps(data))
            assert replicate_once(dev, srv.uri("vol"), state).returncode == 0
            saved = StateDir(state).load()
            assert saved is not None and saved.device_id == device_identity(dev)
        finally:
            stop_tracker(dev)


def test_an_accepted_replacement_is_compared_in_full_until_a_cycle_commits(
        tmp_path: Path) -> None:
    """The acceptance and the need for a full comparison are one state write: a sender
    interrupted right after it still compares in full (the identity alone would not ask)."""
    def state() -> SenderState:
        return SenderState(device="/dev/x", uri="nbd://h/vol", volume="vol", size=SIZE,
                           chunk_size=65536, tracker="bpf", synced=True, device_id="serial A")

    strict = Replicator(ReplicateOptions(device="/dev/x", uri="nbd://h/vol",
                                         state_dir=str(tmp_path / "s1")))
    kept = state()
    with pytest.raises(DeviceChanged, match=r"serial A.*serial B"):
        strict._check_identity(kept, "serial B")
    assert kept == state()
    strict._check_identity(kept, None)  # a device that says nothing: nothing to compare
    assert kept == state()

    lenient = Replicator(ReplicateOptions(device="/dev/x", uri="nbd://h/vol",
                                          state_dir=str(tmp_path / "s2"), device_replaced=True))
    accepted = state()
    lenient._check_identity(accepted, "serial B")
    assert accepted.device_id == "serial B" and not accepted.synced
    same = state()
    lenient._check_identity(same, "serial A")  # nothing replaced: nothing changes
    assert same == state()


def test_identity_from_sysfs_of_each_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What each kind of device says about itself (device-mapper and md are not in the host's
    kernel here: their sysfs entries are laid out as the kernel does)."""
    from nbdsink.sender import identity

    root = tmp_path / "devices"

    def device(numbers: tuple[int, int], rel: str, files: dict[str, str]) -> None:
        d = root / rel
        for name, text in files.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_text(text + "\n")
        d.mkdir(parents=True, exist_ok=True)
        link = tmp_path / "dev-block" / f"{numbers[0]}:{numbers[1]}"
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(d)

    device((253, 0), "virtual/block/dm-0", {"dm/uuid": "LVM-abcdef", "dm/name": "vg-root"})
    device((253, 1), "virtual/block/dm-1", {"dm/uuid": "", "dm/name": "plain"})
    device((9, 0), "virtual/block/md0", {"md/uuid": "1b2c:3d4e"})
    device((8, 0), "pci/host0/block/sda", {"device/wwid": "naa.5000c500a1b2c3d4"})
    device((8, 1), "pci/host0/block/sda/sda1", {"partition": "1", "start": "2048"})
    device((252, 0), "pci/virtio1/block/vda", {"serial": "disk-7"})
    device((252, 16), "pci/virtio2/block/vdb", {"serial": ""})
    monkeypatch.setattr(identity, "SYS_DEV_BLOCK", tmp_path / "dev-block")
    monkeypatch.setattr(identity, "UDEV_DATA", tmp_path / "no-udev")
    monkeypatch.setattr(identity, "block_numbers",
                        lambda path: tuple(int(x) for x in path.split(":")))
    assert identity.device_identity("253:0") == "dm uuid LVM-abcdef"
    assert identity.device_identity("253:1") == "dm name plain"
    assert identity.device_identity("9:0") == "md uuid 1b2c:3d4e"
    assert identity.device_identity("8:0") == "wwid naa.5000c500a1b2c3d4"
    assert identity.device_identity("8:1") == ("wwid naa.5000c500a1b2c3d4 partition 1 at "
                                               "sector 2048")
    assert identity.device_identity("252:0") == "serial disk-7"
    assert identity.device_identity("252:16") is None  # a virtio disk given no serial
    assert identity.device_identity("7:99") is None  # not in sysfs


def test_identity_from_udev_when_sysfs_says_nothing(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from nbdsink.sender import identity

    monkeypatch.setattr(identity, "UDEV_DATA", tmp_path)
    (tmp_path / "b8:16").write_text("S:disk/by-id/ata-DISK_1234\nE:ID_SERIAL=DISK_1234\n"
                                    "E:ID_WWN=0x5000c500a1b2c3d4\nG:systemd\n")
    assert identity._udev_identity(8, 16) == "udev ID_WWN 0x5000c500a1b2c3d4"
    (tmp_path / "b8:32").write_text("E:ID_SERIAL=DISK_5678\n")
    assert identity._udev_identity(8, 32) == "udev ID_SERIAL DISK_5678"
    (tmp_path / "b8:48").write_text("E:ID_TYPE=disk\n")
    assert identity._udev_identity(8, 48) is None
    assert identity._udev_identity(8, 64) is None  # no record at all
