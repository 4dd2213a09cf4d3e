"""Tests marked ``vm`` run inside a real Linux kernel (see :mod:`vm.harness`).

On the host, each ``vm`` test is replaced by a stand-in item. The first stand-in to run boots
one guest that runs every selected ``vm`` test under pytest, then each stand-in reports its
own test's outcome from the guest (passed, failed with the guest's traceback, or skipped --
which ``NBDSINK_REQUIRE_ALL=1`` turns into a failure). One boot for the whole session keeps
TCG time low (booting and starting pytest cost ~30 s under TCG); if the guest dies, every
test it had not reported fails with the console's tail.

Inside the guest (``NBDSINK_IN_VM=1``) the tests run for real: the session loads the kernel
modules they need and the ``dm-nbdsink`` module built on the host against the guest kernel.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nbdsink.testing import ServerProcess
from vm import harness

IN_GUEST = os.environ.get("NBDSINK_IN_VM") == "1"
REPORT_ENV = "NBDSINK_VM_REPORT"
KO_ENV = "NBDSINK_DM_KO"
GUEST_MODULES = ("dm-mod", "dm-zero", "loop", "crc32c_generic", "ext4", "nbd")

_RESULTS = pytest.StashKey[dict[str, dict[str, Any]]]()


# -- host side -------------------------------------------------------------------------------


class VmTestFailure(Exception):
    """A test failed in the guest; the message is the guest's report."""


class VmItem(pytest.Item):
    """Stands in on the host for a ``vm`` test that runs in the guest."""

    obj: object = None

    def runtest(self) -> None:
        results = _guest_results(self)
        res = results.get(self.nodeid)
        if res is None:
            raise VmTestFailure(results.get("<guest>", {}).get("text", "the guest did not run this test"))
        if res["outcome"] == "skipped":
            pytest.skip(res["text"])
        if res["outcome"] == "failed":
            raise VmTestFailure(res["text"])

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, VmTestFailure | harness.VmError):
            return f"[in the VM] {excinfo.value}"
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"{self.name} (in the VM)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_GUEST:
        return
    for i, item in enumerate(items):
        if item.get_closest_marker("vm") is not None and not isinstance(item, VmItem):
            stand_in = VmItem.from_parent(item.parent, name=item.name)
            stand_in.own_markers.extend(item.iter_markers())
            # Plugins that inspect test functions (pytest-trio) look at ``obj``.
            stand_in.obj = getattr(item, "obj", None)
            items[i] = stand_in
    config.stash[_RESULTS] = {}


def _guest_results(item: VmItem) -> dict[str, dict[str, Any]]:
    """Results of every selected vm test: one guest boot serves them all."""
    cache = item.config.stash[_RESULTS]
    if not cache:
        nodeids = [i.nodeid for i in item.session.items if isinstance(i, VmItem)]
        try:
            cache.update(_run_in_guest(item.config, nodeids))
        except harness.VmError as exc:
            cache["<guest>"] = {"outcome": "failed", "text": str(exc)}
    return cache


def _run_in_guest(config: pytest.Config, nodeids: list[str]) -> dict[str, dict[str, Any]]:
    k = harness.kernel()
    ko = harness.build_dm_module(k)
    report = f"{harness.GUEST_SHARE}/report.jsonl"
    env = {KO_ENV: str(ko), REPORT_ENV: report}
    for name in ("NBDSINK_REQUIRE_ALL", "CI"):
        if name in os.environ:
            env[name] = os.environ[name]
    pytest_cmd = [
        str(harness.REPO / ".venv" / "bin" / "python"), "-m", "pytest", "-p", "no:cacheprovider",
        # pytest-trio imports hypothesis: ~10 s under TCG, and no vm test is async.
        "-p", "no:trio", "-p", "no:hypothesispytest", "-W", "ignore::pytest.PytestConfigWarning",
        "-q", "-rfEs", "--basetemp=/tmp/pytest", *nodeids,
    ]  # fmt: skip
    # The report is copied into the output, after a marker, so it survives the share's teardown.
    command = f"{shlex.join(pytest_cmd)}\nstatus=$?\necho '@@report@@'\ncat {report} 2>/dev/null\nexit $status\n"
    start = time.monotonic()
    result = harness.run(command, env=env, timeout=1500)
    elapsed = time.monotonic() - start
    log, _, raw = result.output.partition("@@report@@\n")
    outcomes: dict[str, dict[str, Any]] = {}
    for line in raw.splitlines():
        rec = json.loads(line)
        prev = outcomes.get(rec["nodeid"])
        # The worst phase wins: a failed teardown fails a passed test.
        rank = {"passed": 0, "skipped": 1, "failed": 2}
        if prev is None or rank[rec["outcome"]] > rank[prev["outcome"]]:
            outcomes[rec["nodeid"]] = rec
    tail = log[-6000:]
    missing = [n for n in nodeids if n not in outcomes]
    if missing:
        outcomes["<guest>"] = {
            "outcome": "failed",
            "text": f"the guest run ended (exit {result.returncode}) without reporting this test "
            f"after {elapsed:.0f}s\n--- guest output (tail) ---\n{tail}\n"
            f"--- console (tail) ---\n{result.console[-3000:]}",
        }
    return outcomes


# -- guest side ------------------------------------------------------------------------------


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = os.environ.get(REPORT_ENV)
    if not IN_GUEST or not path:
        return
    if report.when != "call" and report.outcome == "passed":
        return
    if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        text = report.longrepr[2]
    else:
        text = f"({report.when}) {report.longreprtext}" if report.longreprtext else ""
    with open(path, "a") as f:
        f.write(json.dumps({"nodeid": report.nodeid, "outcome": report.outcome, "text": text}) + "\n")


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


@pytest.fixture(scope="session")
def guest_kernel() -> None:
    """In the guest: the modules the tests need, and dm-nbdsink from the host's build."""
    if not IN_GUEST:
        pytest.fail("this fixture only works inside the VM (mark the test with @pytest.mark.vm)")
    for m in GUEST_MODULES:
        _sh("modprobe", m)
    if not Path("/dev/nbdsink-dm").exists():
        _sh("insmod", os.environ[KO_ENV])


@pytest.fixture
def make_loop(tmp_path: Path, guest_kernel: None) -> Iterator[Callable[[int], str]]:
    """``make_loop(size)``: a loop device over a sparse file in the guest's tmpfs."""
    loops: list[str] = []

    def make(size: int) -> str:
        img = tmp_path / f"loop{len(loops)}.img"
        with open(img, "wb") as f:
            f.truncate(size)
        loop = _sh("losetup", "-f", "--show", str(img)).stdout.strip()
        loops.append(loop)
        return loop

    try:
        yield make
    finally:
        for loop in reversed(loops):
            for _ in range(50):
                if _sh("losetup", "-d", loop, check=False).returncode == 0:
                    break
                time.sleep(0.1)


@pytest.fixture
def make_dm(guest_kernel: None) -> Iterator[Callable[[str, str], str]]:
    """``make_dm(name, table)``: a dm device, removed (with anything stacked) afterwards."""
    made: list[str] = []

    def make(name: str, table: str) -> str:
        _sh("dmsetup", "create", name, "--table", table)
        made.append(name)
        return f"/dev/mapper/{name}"

    try:
        yield make
    finally:
        for name in reversed(made):
            remove_dm_stack(name)


def remove_dm_stack(name: str) -> None:
    """Remove dm device ``name`` and the tracker origin under it, if any, even if busy."""
    for n in (name, name + "-nbdsink-origin"):
        if _sh("dmsetup", "info", n, check=False).returncode != 0:
            continue
        for _ in range(50):
            if _sh("dmsetup", "remove", n, check=False).returncode == 0:
                break
            time.sleep(0.1)
        else:
            _sh("dmsetup", "remove", "--force", n, check=False)


@pytest.fixture
def linear(make_loop: Callable[[int], str], make_dm: Callable[[str, str], str]) -> Callable[..., str]:
    """``linear(name, size=64 MiB)``: a dm linear device over a fresh loop device (an "LV")."""

    def make(name: str, size: int = 64 << 20) -> str:
        loop = make_loop(size)
        return make_dm(name, f"0 {size // 512} linear {loop} 0")

    return make


def kernel_problems() -> list[str]:
    """Lines of the kernel log that show a warning, bug or oops."""
    log = _sh("dmesg").stdout
    bad = ("WARNING:", "BUG:", "Oops", "Call Trace", "general protection", "RIP:", "Kernel panic")
    return [line for line in log.splitlines() if any(b in line for b in bad)]


# -- an nbdsink server and the kernel NBD client, in the guest ------------------------------


@pytest.fixture
def server(tmp_path: Path, guest_kernel: None) -> Iterator[ServerProcess]:
    """``nbdsink serve`` on a unix socket, with a 64 MiB volume ``vol`` (64 KiB blocks)."""
    srv = ServerProcess(tmp_path / "store", tmp_path / "nbd.sock")
    srv.create_volume("vol", 64 << 20, 64 << 10)
    with srv:
        yield srv


@pytest.fixture
def nbd_devices() -> Iterator[list[str]]:
    """The /dev/nbdN attached by the test; all detached afterwards."""
    attached: list[str] = []
    try:
        yield attached
    finally:
        for dev in attached:
            subprocess.run(["umount", dev], capture_output=True, check=False)
            subprocess.run(["nbd-client", "-d", dev], capture_output=True, check=False)


def attach(srv: ServerProcess, dev: str, export: str, attached: list[str]) -> None:
    """``nbd-client`` as a user runs it: export ``export`` of ``srv`` on ``dev``."""
    run = subprocess.run(
        ["nbd-client", "-unix", str(srv.socket), dev, "-N", export, "-b", "4096"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, f"nbd-client {export}: {run.stdout}{run.stderr}"
    attached.append(dev)


def detach(dev: str, attached: list[str], *, commit: bool = True) -> None:
    """Disconnect ``dev``; with ``commit`` (a writable head), FLUSH first, as a user must for
    the final state to become a version: the last writes of an unmount are FUA writes (ext4's
    superblock), durable but no version, and ``nbd-client -d`` sends no FLUSH."""
    if commit:
        # coreutils sync on a device fsyncs it: the kernel sends the device a FLUSH.
        subprocess.run(["sync", dev], capture_output=True, check=True)
    subprocess.run(["nbd-client", "-d", dev], capture_output=True, check=True)
    attached.remove(dev)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (but lost+found) with its content."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "lost+found" not in p.parts
    }
