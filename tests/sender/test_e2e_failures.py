"""End to end, failure paths: a connection cut mid-cycle, a server restart mid-cycle, a
device that disappears, a lost state directory, a volume that does not fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nbdsink.sender.state import StateDir

from .helpers import loop_device, make_image, run
from .proxy import Proxy
from .rig import REPO, Sender, nbdsink, server, stop_tracker

pytestmark = pytest.mark.root

MiB = 1 << 20
SIZE = 64 * MiB


def _fill(dev: str, offset: int, length: int) -> None:
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(length), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _latest_equals_device(srv, dev: str, tmp: Path) -> int:  # type: ignore[no-untyped-def]
    latest = srv.versions("vol")[-1]
    out = tmp / f"v{latest['version']}.img"
    run("nbdcopy", srv.uri(f"vol@{latest['version']}"), str(out))
    assert run("cmp", str(out), dev, check=False).returncode == 0, "version differs from device"
    out.unlink()
    return int(latest["version"])


def test_connection_cut_and_server_restart_mid_cycle(tmp_path: Path) -> None:
    img = make_image(tmp_path / "img", SIZE)
    with loop_device(img) as dev, server(tmp_path, "vol", SIZE) as srv:
        _fill(dev, 0, 40 * MiB)
        uri = f"nbd+unix:///vol?socket={tmp_path / 'proxy.sock'}"
        try:
            with Proxy(tmp_path / "proxy.sock", srv.socket) as proxy:
                # 40 MiB at 16 MiB/s: the first sync takes about 2.5 s; cut it at 1 s.
                sender = Sender(tmp_path / "sender.log", dev, uri, "--state",
                                str(tmp_path / "state"), "--interval", "500ms", "--rate", "16M")
                time.sleep(1.0)
                proxy.cut()
                sender.wait_for("replication interrupted", 20)
                time.sleep(1.0)
                proxy.restore()
                sender.wait_for("cycle version=1 ", 60)
                # A server restart in the middle of the next cycle: its pending writes may be
                # lost with it; the sender resends them.
                _fill(dev, 8 * MiB, 24 * MiB)
                time.sleep(0.7)
                srv.stop()
                sender.wait_for("replication interrupted", 20, count=2)
                srv.start()
                sender.wait_for("cycle version=2 ", 60)
                assert sender.terminate() == 0
        finally:
            stop_tracker(dev)
        assert _latest_equals_device(srv, dev, tmp_path) == 2
        versions = srv.versions("vol")
        assert [v["consistency"] for v in versions] == ["none", "none"]


def test_a_server_that_stops_answering_fails_the_cycle_which_is_retried(tmp_path: Path) -> None:
    img = make_image(tmp_path / "img", SIZE)
    with loop_device(img) as dev, server(tmp_path, "vol", SIZE) as srv:
        try:
            _fill(dev, 0, 40 * MiB)
            uri = f"nbd+unix:///vol?socket={tmp_path / 'proxy.sock'}"
            with Proxy(tmp_path / "proxy.sock", srv.socket) as proxy:
                sender = Sender(tmp_path / "sender.log", dev, uri, "--state",
                                str(tmp_path / "state"), "--interval", "500ms", "--rate", "16M",
                                "--io-timeout", "2s")
                try:
                    time.sleep(1.0)
                    proxy.stall()  # accepted, never answered: no error, no close
                    sender.wait_for("stalled", 30)
                    proxy.stall(False)
                    sender.wait_for("cycle version=1 ", 60)
                finally:
                    code = sender.terminate()
                assert code == 0
        finally:
            stop_tracker(dev)
        assert _latest_equals_device(srv, dev, tmp_path) == 1


def test_device_disappears_mid_cycle(tmp_path: Path) -> None:
    img = make_image(tmp_path / "img", SIZE)
    state = tmp_path / "state"
    with loop_device(img) as dev, server(tmp_path, "vol", SIZE) as srv:
        try:
            _fill(dev, 0, 4 * MiB)
            first = Sender(tmp_path / "first.log", dev, srv.uri("vol"), "--state", str(state),
                           "--once")
            assert first.wait(60) == 0, first.text()
            # The sender reads up to ~32 MiB ahead of what it has sent: dirty the whole device
            # and send slowly, so that most of it is still to be read when the device goes.
            _fill(dev, 0, SIZE)
            sender = Sender(tmp_path / "sender.log", dev, srv.uri("vol"), "--state", str(state),
                            "--once", "--rate", "4M", "--window", "2")
            time.sleep(1.5)
            os.truncate(img, 0)
            run("losetup", "-c", dev)
            rc = sender.wait(60)
        finally:
            stop_tracker(dev)
    text = sender.text()
    assert rc != 0 and "nbdsink: error:" in text and dev in text, text
    assert "Traceback" not in text
    saved = StateDir(state).load()
    assert saved is not None and saved.last_version == 1 and saved.synced


def test_lost_state_directory_resyncs_by_comparison(tmp_path: Path) -> None:
    img = make_image(tmp_path / "img", SIZE)
    with loop_device(img) as dev, server(tmp_path, "vol", SIZE) as srv:
        _fill(dev, 0, 32 * MiB)
        try:
            first = Sender(tmp_path / "a.log", dev, srv.uri("vol"), "--state",
                           str(tmp_path / "s1"), "--once")
            assert first.wait(60) == 0, first.text()
            _fill(dev, 5 * MiB, MiB)
            # The state directory is gone (another one is used): the sender compares digests
            # with what the volume holds and sends only what differs.
            second = Sender(tmp_path / "b.log", dev, srv.uri("vol"), "--state",
                            str(tmp_path / "s2"), "--once")
            assert second.wait(60) == 0, second.text()
        finally:
            stop_tracker(dev)
        line = next(x for x in second.text().splitlines() if "cycle version=2 " in x)
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        assert int(fields["sent"]) == MiB and int(fields["skipped"]) == SIZE - MiB
        _latest_equals_device(srv, dev, tmp_path)


def test_scan_tracker_first_sync_against_a_volume_holding_data(tmp_path: Path) -> None:
    img = make_image(tmp_path / "img", SIZE)
    env = dict(os.environ, NBDSINK_SCAN_STATE=str(tmp_path / "scan"))
    with loop_device(img) as dev, server(tmp_path, "vol", SIZE) as srv:
        _fill(dev, 0, 16 * MiB)
        # Another sender already replicated most of it.
        run("nbdcopy", dev, srv.uri("vol"))
        _fill(dev, 3 * MiB, 2 * MiB)
        proc = subprocess.run(
            [*Sender.command(), dev, srv.uri("vol"), "--state", str(tmp_path / "st"),
             "--once", "--tracker", "scan"],
            env=env, capture_output=True, text=True, cwd=Sender.cwd(),
        )
        assert proc.returncode == 0, proc.stderr
        line = [x for x in proc.stderr.splitlines() if "cycle version=" in x][-1]
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        assert int(fields["sent"]) == 2 * MiB, line
        latest = _latest_equals_device(srv, dev, tmp_path)
        status = json.loads(nbdsink("status", "--state", str(tmp_path / "st"), "--json", check=False).stdout)
        assert status["tracker"] == "scan" and status["last_version"] == latest


def test_a_volume_of_another_size_is_a_clear_error(tmp_path: Path) -> None:
    img = make_image(tmp_path / "img", SIZE)
    with loop_device(img) as dev, server(tmp_path, "vol", SIZE * 2) as srv:
        proc = subprocess.run(
            [*Sender.command(), dev, srv.uri("vol"), "--state", str(tmp_path / "st"), "--once"],
            capture_output=True, text=True, cwd=Sender.cwd(),
        )
        missing = subprocess.run(
            [*Sender.command(), dev, srv.uri("nosuch"), "--state", str(tmp_path / "st2"),
             "--once"],
            capture_output=True, text=True, cwd=Sender.cwd(),
        )
    assert proc.returncode == 3 and "nbdsink: error: remote volume 'vol' is" in proc.stderr
    assert missing.returncode == 3 and "volume create nosuch" in missing.stderr


def test_replicate_metrics(tmp_path: Path) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    img = make_image(tmp_path / "img", SIZE)
    with loop_device(img) as dev, server(tmp_path, "vol", SIZE) as srv:
        try:
            _fill(dev, 0, 4 * MiB)
            sender = Sender(tmp_path / "sender.log", dev, srv.uri("vol"), "--state",
                            str(tmp_path / "state"), "--interval", "300ms", "--metrics",
                            f"127.0.0.1:{port}")
            try:
                sender.wait_for("cycle version=1 ", 60)
                _fill(dev, 8 * MiB, MiB)
                sender.wait_for("cycle version=2 ", 60)
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                              timeout=10).read().decode()
            finally:
                code = sender.terminate()
            assert code == 0
        finally:
            stop_tracker(dev)
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("nbdsink_") and " " in line}
    assert values["nbdsink_replicate_bytes_sent_total"] >= 5 * MiB
    assert values["nbdsink_replicate_cycle_seconds_count"] >= 2
    assert 0 <= values["nbdsink_replicate_lag_seconds"] < 60
    assert values["nbdsink_replicate_errors_total"] == 0


# ``nbdsink`` with every fsync checked: one made on the event loop's thread (where trio's
# current task exists) is reported on stderr, with where it came from.
FSYNC_WATCH = """
import os, sys, traceback
import trio
real_fsync = os.fsync
def watched(fd):
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return real_fsync(fd)  # a worker thread, or no event loop at all: fine
    sys.stderr.write("FSYNC ON THE EVENT LOOP\\n" + "".join(traceback.format_stack()))
    return real_fsync(fd)
os.fsync = watched
from nbdsink.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_state_saves_never_block_the_event_loop(tmp_path: Path) -> None:
    """Saving the state fsyncs (on a busy disk, for seconds): never on the thread that runs
    the event loop, which must go on answering signals and the network. Covers a session's
    start, the cycles, and the error recorded when the server is gone."""
    img = make_image(tmp_path / "img", SIZE)
    state = str(tmp_path / "state")
    with loop_device(img) as dev:
        try:
            with server(tmp_path, "vol", SIZE) as srv:
                _fill(dev, 0, 4 * MiB)
                uri = srv.uri("vol")
                first = subprocess.run(
                    [sys.executable, "-c", FSYNC_WATCH, "replicate", dev, uri, "--state", state,
                     "--once", "--verify"], capture_output=True, text=True, cwd=REPO)
                assert first.returncode == 0, first.stderr
                assert "FSYNC ON THE EVENT LOOP" not in first.stderr, first.stderr
            # The server is gone: the cycle fails, and the error is recorded in the state.
            second = subprocess.run(
                [sys.executable, "-c", FSYNC_WATCH, "replicate", dev, uri, "--state", state,
                 "--once"], capture_output=True, text=True, cwd=REPO)
            assert second.returncode != 0
            assert "FSYNC ON THE EVENT LOOP" not in second.stderr, second.stderr
            assert StateDir(Path(state)).load().last_error  # type: ignore[union-attr]
        finally:
            stop_tracker(dev)
