"""End to end on the host kernel: ext4 and xfs on loop devices, a workload writing, renaming
and deleting files while the sender replicates continuously with --freeze; every committed
version, attached read-only through nbdfuse and a loop device, is fsck-clean and holds
exactly the file tree the workload had at that version's freeze instant."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from .helpers import loop_device, make_image, mkfs, mounted, run
from .rig import Sender, attached, file_tree, fsck, nbdsink, ro_options, server, stop_tracker
from .workload import replay

pytestmark = pytest.mark.root

SIZE = 320 << 20  # xfs wants at least 300 MiB
WORKLOAD = Path(__file__).with_name("workload.py")
EPS = 0.005  # frozen_at has millisecond resolution


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _check_version(srv, version: dict, entries: list[dict], fstype: str, work: Path) -> None:  # type: ignore[no-untyped-def]
    assert version["consistency"] == "frozen", version
    t = _ts(version["labels"]["frozen_at"])
    # The image holds a prefix of the (sequential) operations: all that returned before the
    # freeze, none that started after it; at most the few around the instant are open.
    lo = sum(1 for e in entries if e["t1"] < t - EPS)
    hi = sum(1 for e in entries if e["t0"] < t + EPS)
    export = f"vol@{version['version']}"
    if fstype == "ext4":
        # A frozen ext4 is clean on disk (the freeze checkpoints the journal): check and
        # mount the version read-only as it is.
        with attached(srv, export, work) as dev:
            check = fsck(dev, fstype)
            assert check.returncode == 0, f"{export}: {check.stdout}{check.stderr}"
            with mounted(dev, work / "mnt", *ro_options(fstype)) as mnt:
                tree = file_tree(mnt)
    else:
        # A frozen xfs keeps a covered log and lazy superblock counters that only a mount
        # settles; xfs_repair -n on the raw image reports them. Recover it as an operator
        # would: mount it through a copy-on-write overlay (the version itself is never
        # written), unmount, then check.
        with attached(srv, export, work, overlay=True) as dev:
            with mounted(dev, work / "mnt") as mnt:
                tree = file_tree(mnt)
            check = fsck(dev, fstype)
            assert check.returncode == 0, f"{export}: {check.stdout}{check.stderr}"
    candidates = [replay(entries[:k]) for k in range(lo, hi + 1)]
    if tree not in candidates:
        want = candidates[-1]
        diff = {
            "missing": sorted(set(want) - set(tree)),
            "extra": sorted(set(tree) - set(want)),
            "changed": sorted(k for k in set(tree) & set(want) if tree[k] != want[k]),
        }
        raise AssertionError(
            f"version {version['version']} (frozen at {t}) matches no prefix {lo}..{hi} of "
            f"the workload: {diff}"
        )


def _workload(mnt: Path, log: Path, seconds: float, seed: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(WORKLOAD), str(mnt), str(log), str(seconds),
                             str(seed)])


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_frozen_versions_equal_the_tree_at_their_freeze(tmp_path: Path, fstype: str) -> None:
    img = make_image(tmp_path / "img", SIZE)
    hooks = tmp_path / "hooks.log"
    with loop_device(img) as dev, server(tmp_path, "vol", SIZE) as srv:
        mkfs(dev, fstype)
        try:
            with mounted(dev, tmp_path / "src") as src:
                sender = Sender(
                    tmp_path / "sender.log", dev, srv.uri("vol"), "--state",
                    str(tmp_path / "state"), "--interval", "700ms", "--freeze", str(src),
                    "--max-freeze", "1s", "--pre-hook", f"echo pre >> {hooks}",
                    "--post-hook", f"echo post >> {hooks}",
                )
                sender.wait_for("cycle version=1 ", 60)
                work = _workload(src, tmp_path / "ops.log", 5, seed=hash(fstype) & 0xFFFF)
                assert work.wait(60) == 0
                n = sender.text().count("cycle version=")
                sender.wait_for("cycle version=", 30, count=n + 2)
                assert sender.terminate() == 0
        finally:
            stop_tracker(dev)
        log = sender.text()
        assert "SIGTERM: stopping" in log and "freeze=" in log and "lag=" in log
        versions = srv.versions("vol")
        assert len(versions) >= 5
        entries = [json.loads(line) for line in (tmp_path / "ops.log").read_text().splitlines()]
        assert {e["op"] for e in entries} == {"write", "rename", "delete", "rewrite"}
        for version in versions:
            _check_version(srv, version, entries, fstype, tmp_path / "attach")
        lines = hooks.read_text().split()
        assert lines[:2] == ["pre", "post"] and lines.count("pre") == lines.count("post")
        assert lines.count("pre") >= len(versions) - 1


def test_kill_9_at_random_moments_then_converge(tmp_path: Path) -> None:
    img = make_image(tmp_path / "img", SIZE)
    rnd = random.Random(5)
    with loop_device(img) as dev, server(tmp_path, "vol", SIZE) as srv:
        mkfs(dev, "ext4")
        args = [dev, srv.uri("vol"), "--state", str(tmp_path / "state")]
        try:
            with mounted(dev, tmp_path / "src") as src:
                work = _workload(src, tmp_path / "ops.log", 8, seed=11)
                for i in range(4):
                    sender = Sender(tmp_path / f"sender{i}.log", *args, "--interval", "300ms",
                                    "--freeze", str(src))
                    time.sleep(rnd.uniform(0.3, 2.0))
                    sender.kill()
                # The last kill may have left the filesystem frozen: a new start thaws it.
                sender = Sender(tmp_path / "sender-last.log", *args, "--interval", "300ms",
                                "--freeze", str(src))
                assert work.wait(60) == 0
                n = sender.text().count("cycle version=")
                sender.wait_for("cycle version=", 30, count=n + 1)
                assert sender.terminate() == 0
            # Unmounted: the device no longer changes, so the final version must equal it.
            final = Sender(tmp_path / "final.log", *args, "--once")
            assert final.wait(120) == 0, final.text()
        finally:
            stop_tracker(dev)
        latest = srv.versions("vol")[-1]
        out = tmp_path / "latest.img"
        run("nbdcopy", srv.uri(f"vol@{latest['version']}"), str(out))
        assert run("cmp", str(out), dev, check=False).returncode == 0
        status = json.loads(nbdsink("status", "--state", str(tmp_path / "state"), "--json", check=False).stdout)
        assert status["last_version"] == latest["version"] and status["running"] is False
