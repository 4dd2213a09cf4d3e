"""The server through real NBD clients: libnbd, nbdcopy, nbdinfo, qemu-img."""

from __future__ import annotations

import errno
import json
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from nbdsink import nbd as nbdsink_nbd
from nbdsink.sender.errors import VolumeMismatch
from nbdsink.sender.remote import NbdRemote
from nbdsink.server.session import PREFERRED_REQUEST
from nbdsink.testing import ServerProcess, run_cli

BS = 65536
SIZE = 16 << 20


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path / "store", tmp_path / "nbd.sock")
    srv.create_volume("vol", SIZE, BS)
    with srv:
        yield srv


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def versions(srv: ServerProcess, volume: str = "vol") -> list[dict[str, object]]:
    out = run_cli("versions", volume, "--json", "--store", str(srv.store)).stdout
    result: list[dict[str, object]] = json.loads(out)
    return result


def read_version(srv: ServerProcess, export: str, dest: Path) -> bytes:
    subprocess.run(["nbdcopy", srv.uri(export), str(dest)], check=True)
    return dest.read_bytes()


def test_random_rounds_through_libnbd(server: ServerProcess, tmp_path: Path) -> None:
    rng = random.Random(42)
    model = bytearray(SIZE)
    expected: list[bytes] = []
    h = connect(server.uri("vol"))
    assert not h.is_read_only() and h.can_multi_conn() and h.can_fast_zero()
    for _ in range(12):
        for _ in range(rng.randint(2, 10)):
            op = rng.choice(["big", "unaligned", "small", "zero", "fastzero", "trim", "fua"])
            if op == "big":
                length = rng.randint(1, 8) << 20
                off = rng.randrange(0, SIZE - length + 1, 512)
            elif op == "small":
                length = rng.randint(1, 700)
                off = rng.randrange(0, SIZE - length)
            else:
                length = rng.randint(1, 3 * BS)
                off = rng.randrange(0, SIZE - length)
            if op in ("big", "unaligned", "small", "fua"):
                data = rng.randbytes(length)
                h.pwrite(data, off, nbd.CMD_FLAG_FUA if op == "fua" else 0)
                model[off : off + length] = data
            elif op in ("zero", "fastzero"):
                h.zero(length, off, nbd.CMD_FLAG_FAST_ZERO if op == "fastzero" else 0)
                model[off : off + length] = bytes(length)
            else:
                h.trim(length, off)
                model[off : off + length] = bytes(length)
        assert h.pread(SIZE, 0) == model
        h.flush()
        if not expected or expected[-1] != model:
            expected.append(bytes(model))
    h.shutdown()

    listed = versions(server)
    assert [v["version"] for v in listed] == list(range(1, len(expected) + 1))
    for i, image in enumerate(expected, start=1):
        assert read_version(server, f"vol@{i}", tmp_path / f"v{i}.img") == image, f"version {i}"
    # qemu-img agrees on the newest one, through its own NBD client
    (tmp_path / "model.img").write_bytes(expected[-1])
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(tmp_path / "model.img"),
                    f"nbd+unix:///vol@latest?socket={server.socket}"], check=True)


def test_nbdcopy_in_and_out_with_sparseness(server: ServerProcess, tmp_path: Path) -> None:
    image = bytearray(SIZE)
    rng = random.Random(7)
    for off in (0, 3 << 20, 9 << 20):
        image[off : off + (1 << 20)] = rng.randbytes(1 << 20)
    src = tmp_path / "src.img"
    src.write_bytes(image)
    subprocess.run(["nbdcopy", "--flush", str(src), server.uri("vol")], check=True)
    (v1,) = versions(server)
    assert v1["blocks_changed"] == 48 and v1["bytes_stored"] == 3 << 20
    out = tmp_path / "out.img"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                    f"nbd+unix:///vol@1?socket={server.socket}", str(out)], check=True)
    assert out.read_bytes() == image
    mapping = json.loads(subprocess.run(["nbdinfo", "--map", "--json", server.uri("vol@1")],
                                        check=True, capture_output=True, text=True).stdout)
    data = [(e["offset"], e["length"]) for e in mapping if e["type"] == 0]
    assert data == [(0, 1 << 20), (3 << 20, 1 << 20), (9 << 20, 1 << 20)]
    # the same image again: no new version, nothing stored
    subprocess.run(["nbdcopy", "--flush", str(src), server.uri("vol")], check=True)
    assert len(versions(server)) == 1


def test_read_only_versions_and_bad_names(server: ServerProcess) -> None:
    h = connect(server.uri("vol"))
    h.pwrite(b"a" * 4096, 0)
    h.flush()
    h.shutdown()
    ro = connect(server.uri("vol@1"))
    assert ro.is_read_only()
    with pytest.raises(nbd.Error) as err:
        ro.pwrite(b"b" * 4096, 0)
    assert err.value.errnum == errno.EPERM
    assert ro.pread(4096, 0) == b"a" * 4096
    for name in ("missing", "vol@7", "vol@0", "vol@sometime", "vol@1999-01-01T00:00:00Z",
                 "vol;consistency=bogus"):
        run = subprocess.run(["nbdinfo", server.uri(name)], capture_output=True, text=True)
        assert run.returncode != 0
        assert "No such file or directory" in run.stderr and "export" in run.stderr, run.stderr
    assert server.alive
    assert ro.pread(4096, 0) == b"a" * 4096  # other clients keep being served
    ro.shutdown()


def test_list_exports_with_descriptions(server: ServerProcess) -> None:
    h = connect(server.uri("vol"))
    for i in range(3):
        h.pwrite(bytes([i + 1]) * 512, 0)
        h.flush()
    h.shutdown()
    run = subprocess.run(["nbdinfo", "--list", "--json", server.uri("")], check=True,
                         capture_output=True, text=True)
    exports = {e["export-name"]: e for e in json.loads(run.stdout)["exports"]}
    assert set(exports) == {"vol", "vol@latest", "vol@1", "vol@2", "vol@3"}
    assert exports["vol@latest"]["description"].startswith("version 3 of vol, committed ")
    assert exports["vol@2"]["is_read_only"] is True
    assert exports["vol"]["is_read_only"] is False
    # Larger than a block, because each request costs a round through Python; the block
    # size itself is in the head's description (the sender reads it there).
    assert exports["vol"]["block_size_preferred"] == max(BS, PREFERRED_REQUEST)
    assert exports["vol@2"]["block_size_preferred"] == max(BS, PREFERRED_REQUEST)
    assert f"block size {BS})" in exports["vol"]["description"]


def test_time_export_names(server: ServerProcess) -> None:
    h = connect(server.uri("vol"))
    h.pwrite(b"1" * 512, 0)
    h.flush()
    first = versions(server)[0]["time"]
    time.sleep(0.01)
    h.pwrite(b"2" * 512, 0)
    h.flush()
    h.shutdown()
    assert isinstance(first, str)
    assert connect(server.uri(f"vol@{first}")).pread(512, 0) == b"1" * 512
    assert connect(server.uri("vol@2999-01-01T00:00:00Z")).pread(512, 0) == b"2" * 512


def test_fua_writes_make_no_version_only_flush_does(server: ServerProcess) -> None:
    h = connect(server.uri("vol"))
    assert h.can_fua()
    for i in range(20):
        h.pwrite(bytes([i]) * 4096, i * BS, nbd.CMD_FLAG_FUA)
    h.zero(BS, 30 * BS, nbd.CMD_FLAG_FUA)
    assert versions(server) == []
    h.flush()
    assert [v["version"] for v in versions(server)] == [1]
    for i in range(20, 40):
        h.pwrite(bytes([i]) * 4096, i * BS, nbd.CMD_FLAG_FUA)
    h.flush()
    h.flush()  # nothing pending: no version
    listed = versions(server)
    assert [v["version"] for v in listed] == [1, 2]
    assert listed[1]["blocks_changed"] == 20
    v1, v2 = connect(server.uri("vol@1")), connect(server.uri("vol@2"))
    assert v1.pread(4096, 19 * BS) == bytes([19]) * 4096
    assert v1.pread(4096, 20 * BS) == bytes(4096)
    assert v2.pread(4096, 39 * BS) == bytes([39]) * 4096


def test_multi_conn_flush_commits_every_connection(server: ServerProcess) -> None:
    a, b = connect(server.uri("vol")), connect(server.uri("vol"))
    a.pwrite(b"A" * BS, 0)
    b.pwrite(b"B" * BS, BS)
    assert a.pread(BS, BS) == b"B" * BS  # writes on one connection are visible on the other
    b.flush()
    v = connect(server.uri("vol@1"))
    assert v.pread(2 * BS, 0) == b"A" * BS + b"B" * BS


def test_concurrent_writers_on_many_connections(server: ServerProcess, tmp_path: Path) -> None:
    rng = random.Random(9)
    image = rng.randbytes(SIZE)
    errors: list[BaseException] = []

    def writer(part: int) -> None:
        try:
            h = connect(server.uri("vol"))
            for off in range(part * 4096, SIZE, 4 * 4096):  # 4K writes interleaved in 64K blocks
                h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(image[off : off + 4096])), off)
                while h.aio_in_flight() > 32:
                    h.poll(-1)
            while h.aio_in_flight() > 0:
                h.poll(-1)
            h.shutdown()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    h = connect(server.uri("vol"))
    h.flush()
    assert read_version(server, "vol@1", tmp_path / "v.img") == image


def test_clean_stop_keeps_pending_writes(server: ServerProcess) -> None:
    h = connect(server.uri("vol"))
    h.pwrite(b"p" * BS, 0)
    h.shutdown()
    assert server.stop() == 0
    server.start()
    h = connect(server.uri("vol"))
    assert h.pread(BS, 0) == b"p" * BS
    h.flush()
    assert len(versions(server)) == 1


def test_sigterm_with_a_client_still_connected(server: ServerProcess) -> None:
    """SIGTERM stops the server even while a client stays connected, and writes it left
    unflushed but idle are still pending in the head afterwards."""
    h = connect(server.uri("vol"))
    h.pwrite(b"q" * BS, BS)
    time.sleep(1.6)  # idle long enough for the periodic save
    assert server.stop() == 0
    server.start()
    h2 = connect(server.uri("vol"))
    assert h2.pread(BS, BS) == b"q" * BS
    h2.flush()
    assert versions(server)[-1]["blocks_changed"] == 1


def test_second_server_on_same_store_is_refused(server: ServerProcess, tmp_path: Path) -> None:
    run = run_cli("serve", "--store", str(server.store), "--socket", str(tmp_path / "other.sock"),
                  check=False)
    assert run.returncode != 0
    assert "another nbdsink server is serving" in run.stderr


def test_largest_request_and_garbage_on_the_wire(tmp_path: Path) -> None:
    """A 32 MiB write (the advertised maximum) in one request; a client that sends garbage is
    dropped without harm to the server or to the data."""
    import socket

    srv = ServerProcess(tmp_path / "store", tmp_path / "nbd.sock")
    srv.create_volume("big", 64 << 20, BS)
    with srv:
        h = connect(srv.uri("big"))
        assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20
        data = random.Random(3).randbytes(32 << 20)
        h.pwrite(data, 4096 + 512)  # unaligned at both ends, spanning 513 blocks
        h.flush()
        for junk in (b"\x00" * 64, b"NBDMAGIC" + b"\xff" * 200, random.Random(5).randbytes(4096)):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(srv.socket))
                s.settimeout(1)
                s.recv(18)
                try:
                    s.sendall(junk)
                    s.recv(4096)
                except OSError:
                    pass
        assert srv.alive
        assert connect(srv.uri("big@1")).pread(32 << 20, 4096 + 512) == data


async def test_sender_learns_the_block_size_from_the_head(tmp_path: Path) -> None:
    """The head prefers requests larger than a block; the sender's chunk size must still be
    the volume's block size, which it reads from the head's description."""
    srv = ServerProcess(tmp_path / "store", tmp_path / "nbd.sock")
    srv.create_volume("small", SIZE, 16384)
    with srv:
        async with nbdsink_nbd.connect(srv.uri("small")) as conn:
            assert conn.block_size[1] == PREFERRED_REQUEST
            remote = NbdRemote(srv.uri("small"), conn, None)
            assert remote.block_size == 16384
            remote.check(size=SIZE, chunk_size=16384)
            with pytest.raises(VolumeMismatch, match="block size 16384"):
                remote.check(size=SIZE, chunk_size=BS)


async def test_a_flush_that_commits_nothing_reports_no_version(tmp_path: Path) -> None:
    from nbdsink.sender.remote import open_remote

    srv = ServerProcess(tmp_path / "store", tmp_path / "nbd.sock")
    srv.create_volume("vol", SIZE, BS)
    with srv:
        async with open_remote(srv.uri("vol")) as remote:
            await remote.pwrite(b"x" * BS, 0)
            assert await remote.commit("none", {}) == 1
            assert await remote.commit("none", {}) is None  # nothing changed: no version
            await remote.pwrite(b"y" * BS, BS)
            assert await remote.commit("none", {}) == 2
            # The digests view of the head and of a version, as the contract says.
            assert await remote.version_digests(None, 0, 2 * BS) == await remote.version_digests(
                2, 0, 2 * BS)
            import blake3

            got = await remote.version_digests(1, 0, 2 * BS)
            assert got == blake3.blake3(b"x" * BS).digest() + blake3.blake3(bytes(BS)).digest()


def test_safe_defaults_read_only_and_connection_limit(tmp_path: Path) -> None:
    refused = run_cli("serve", "--store", str(tmp_path / "store"), "--listen", "0.0.0.0:10999",
                      check=False)
    assert refused.returncode == 2 and "--tls-certificates" in refused.stderr
    srv = ServerProcess(tmp_path / "store", tmp_path / "nbd.sock", "--read-only",
                        "--max-connections", "2")
    srv.create_volume("vol", SIZE, BS)
    with srv:
        a, b = connect(srv.uri("vol")), connect(srv.uri("vol"))
        assert a.is_read_only() and b.is_read_only()
        with pytest.raises(nbd.Error):
            connect(srv.uri("vol"))  # the third at once is refused
        a.shutdown()
        time.sleep(0.5)
        connect(srv.uri("vol")).shutdown()  # a slot is free again
        b.shutdown()


def test_metrics(tmp_path: Path) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = ServerProcess(tmp_path / "store", tmp_path / "nbd.sock", "--metrics",
                        f"127.0.0.1:{port}")
    srv.create_volume("vol", SIZE, BS)
    with srv:
        h = connect(srv.uri("vol"))
        h.pwrite(b"m" * BS, 0)
        h.flush()
        h.shutdown()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'nbdsink_volume_versions{volume="vol"} 1.0' in text
    assert "nbdsink_volume_latest_version_timestamp_seconds" in text
    assert 'nbdsink_store_bytes{kind="disk"}' in text and 'nbdsink_store_bytes{kind="stored"}' in text
    ingest = [line for line in text.splitlines() if line.startswith("nbdsink_ingest_bytes_total")]
    assert ingest and float(ingest[0].split()[-1]) == BS
