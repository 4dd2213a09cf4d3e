"""One volume, one replication: a second device replicated into the same volume (two hosts
given the same volume name) is refused, so that no version mixes two devices."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .helpers import loop_device, run
from .rig import export_bytes, nbdsink, random_image, replicate_once, server, stop_tracker

pytestmark = pytest.mark.root

MiB = 1 << 20
SIZE = 32 * MiB


def _description(srv, export: str) -> str:  # type: ignore[no-untyped-def]
    out = run("nbdinfo", "--json", srv.uri(export)).stdout
    return str(json.loads(out)["exports"][0].get("description", ""))


def test_a_second_device_into_the_same_volume_is_refused_unless_it_takes_over(
        tmp_path: Path) -> None:
    a = random_image(tmp_path / "a.img", SIZE)
    b = random_image(tmp_path / "b.img", SIZE)
    with server(tmp_path, "vol", SIZE) as srv, loop_device(a) as dev_a, \
            loop_device(b) as dev_b:
        try:
            first = replicate_once(dev_a, srv.uri("vol"), tmp_path / "state-a")
            assert first.returncode == 0, first.stderr
            assert ", replication " in _description(srv, "vol@1")

            # Another device, with its own state (another host given the same volume name).
            refused = replicate_once(dev_b, srv.uri("vol"), tmp_path / "state-b")
            assert refused.returncode == 6, refused.stderr
            assert "committed by another replication" in refused.stderr
            assert "--take-over" in refused.stderr and "Traceback" not in refused.stderr
            assert [v["version"] for v in srv.versions("vol")] == [1]
            assert export_bytes(srv, "vol@1", tmp_path) == a.read_bytes()

            # The first replication carries on, even with its state directory lost.
            with open(dev_a, "r+b") as f:
                f.seek(3 * MiB)
                f.write(os.urandom(MiB))
                os.fsync(f.fileno())
            again = replicate_once(dev_a, srv.uri("vol"), tmp_path / "state-a-new")
            assert again.returncode == 0, again.stderr
            assert export_bytes(srv, "vol@2", tmp_path) == a.read_bytes()

            # Taken over on purpose: from then on the volume is B's, and A is refused.
            taken = replicate_once(dev_b, srv.uri("vol"), tmp_path / "state-b", "--take-over")
            assert taken.returncode == 0, taken.stderr
            assert "taking volume vol over" in taken.stderr
            assert export_bytes(srv, "vol@3", tmp_path) == b.read_bytes()
            assert export_bytes(srv, "vol@2", tmp_path) == a.read_bytes()
            back = replicate_once(dev_a, srv.uri("vol"), tmp_path / "state-a-new")
            assert back.returncode == 6, back.stderr
            assert [v["version"] for v in srv.versions("vol")] == [1, 2, 3]
        finally:
            stop_tracker(dev_a)
            stop_tracker(dev_b)


def test_a_clone_belongs_to_whoever_replicates_into_it(tmp_path: Path) -> None:
    a = random_image(tmp_path / "a.img", SIZE)
    b = random_image(tmp_path / "b.img", SIZE)
    with server(tmp_path, "vol", SIZE) as srv, loop_device(a) as dev_a, \
            loop_device(b) as dev_b:
        try:
            assert replicate_once(dev_a, srv.uri("vol"), tmp_path / "state-a").returncode == 0
            nbdsink("clone", "vol@1", "dr", "--store", str(srv.store))
            assert ", replication " not in _description(srv, "dr@1")
            # The DR machine's device goes into the clone: nobody replicated into it yet.
            into_clone = replicate_once(dev_b, srv.uri("dr"), tmp_path / "state-b")
            assert into_clone.returncode == 0, into_clone.stderr
            out = tmp_path / "dr2.img"
            run("nbdcopy", srv.uri("dr@2"), str(out))
            assert out.read_bytes() == b.read_bytes()
        finally:
            stop_tracker(dev_a)
            stop_tracker(dev_b)


def test_versions_another_writer_committed_are_replaced_by_a_comparison(
        tmp_path: Path) -> None:
    """Something else wrote the head and committed (qemu-io here; a client attached to the
    head): the device's tracker saw none of it, so sending only what it saw would keep the
    other writes in every later version. The next session compares in full instead."""
    a = random_image(tmp_path / "a.img", SIZE)
    state = tmp_path / "state"
    with server(tmp_path, "vol", SIZE) as srv, loop_device(a) as dev:
        try:
            assert replicate_once(dev, srv.uri("vol"), state).returncode == 0
            # Four MiB of other data at 8 MiB, committed as version 2 by another writer.
            run("qemu-io", "-f", "raw", "-c", f"write -P 0xab {8 * MiB} {4 * MiB}", "-c",
                "flush", srv.uri("vol"))
            assert [v["version"] for v in srv.versions("vol")] == [1, 2]
            assert export_bytes(srv, "vol@2", tmp_path) != a.read_bytes()
            again = replicate_once(dev, srv.uri("vol"), state)
            assert again.returncode == 0, again.stderr
            assert "resynchronising by comparison" in again.stderr
            assert export_bytes(srv, "vol@3", tmp_path) == a.read_bytes()
        finally:
            stop_tracker(dev)
