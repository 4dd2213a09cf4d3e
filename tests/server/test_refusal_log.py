"""What the server's log says when an export is refused, and when something is a bug.

A refused export name (unknown volume, pruned version, malformed name, invalid UTF-8) is one
line naming the export and the reason, once per client attempt, although nbdinfo asks twice
on one connection (NBD_OPT_INFO, then NBD_OPT_GO); the client still gets a clean refusal.
An expected error on the data path (a damaged chunk) is one line too. A real bug (a damaged
volume record that makes the store raise an unexpected exception) logs its full traceback,
once.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
from pathlib import Path

import lmdb
import nbd
import pytest

from nbdsink import nbd as nbdsink_nbd
from nbdsink.nbd import protocol as p
from nbdsink.testing import ServerProcess, run_cli

BS = 65536
SIZE = 1 << 20
TRACEBACK = "Traceback (most recent call last)"


class Log:
    """The server's log, read from where the previous look ended."""

    def __init__(self, srv: ServerProcess) -> None:
        self.path = srv.log
        self.offset = self.path.stat().st_size

    def new_lines(self) -> list[str]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        return data.decode(errors="replace").splitlines()


def _write_versions(srv: ServerProcess, count: int) -> None:
    h = nbd.NBD()
    h.connect_uri(srv.uri("vol"))
    for i in range(count):
        h.pwrite(bytes([i + 1]) * BS, 0)
        h.flush()
    h.shutdown()


def _nbdinfo_refused(srv: ServerProcess, name: str) -> None:
    run = subprocess.run(["nbdinfo", srv.uri(name)], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "No such file or directory" in run.stderr, run.stderr


def _libnbd_refused(srv: ServerProcess, name: str) -> None:
    h = nbd.NBD()
    with pytest.raises(nbd.Error):
        h.connect_uri(srv.uri(name))


def _raw_refused(sock_path: Path, name: bytes, options: tuple[int, ...]) -> list[int]:
    """Ask for ``name`` (any bytes, UTF-8 or not) with each option on one connection; the
    reply type of each."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(sock_path))
        f = s.makefile("rwb")
        magic, opt_magic, _flags = struct.unpack(">QQH", f.read(18))
        assert (magic, opt_magic) == (p.NBDMAGIC, p.IHAVEOPT)
        f.write(struct.pack(">I", p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES))
        replies = []
        for option in options:
            payload = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
            f.write(struct.pack(">QII", p.IHAVEOPT, option, len(payload)) + payload)
            f.flush()
            while True:  # NBD_REP_INFO replies come before the final one
                _m, _opt, rtype, rlen = struct.unpack(">QIII", f.read(20))
                f.read(rlen)
                if rtype != p.NBD_REP_INFO:
                    replies.append(rtype)
                    break
        f.write(struct.pack(">QII", p.IHAVEOPT, p.NBD_OPT_ABORT, 0))
        f.flush()
    return replies


def _one_line(log: Log, shown: str, reason: str) -> None:
    lines = log.new_lines()
    about = [line for line in lines if f"export {shown} refused:" in line]
    assert len(about) == 1, lines
    assert reason in about[0], about[0]
    assert not any(TRACEBACK in line for line in lines), lines


@pytest.fixture
def server(tmp_path: Path) -> ServerProcess:
    srv = ServerProcess(tmp_path / "store", tmp_path / "nbd.sock")
    srv.create_volume("vol", SIZE, BS)
    return srv


REFUSED = [
    ("missing", "no volume named 'missing'"),
    ("vol@7", "volume 'vol' has no version 7"),
    ("vol@1", "(it was pruned)"),
    ("vol@01", "without leading zeros"),
    ("@1", "no volume name"),
    ("vol@sometime", "expected a version number"),
    ("vol;consistency=bogus", "consistency must be one of"),
    ("vol;scratch", ";scratch goes after a version"),
    ("vol;k=v;k=w", "attribute 'k' is given twice"),
]


async def test_a_refused_name_is_one_line_naming_it_and_why(server: ServerProcess,
                                                           tmp_path: Path) -> None:
    with server:
        _write_versions(server, 3)
        pruned = run_cli("prune", "vol", "--keep-last", "1", "--json", "--store",
                         str(server.store))
        assert json.loads(pruned.stdout)["pruned"] == [1, 2]
        for name, reason in REFUSED:
            shown = repr(name)
            log = Log(server)
            _nbdinfo_refused(server, name)  # two opens on one connection: INFO, then GO
            _one_line(log, shown, reason)
            _libnbd_refused(server, name)  # GO alone
            _one_line(log, shown, reason)
            # nbdsink's own client (the sender's and restore's): a clean option error.
            with pytest.raises(nbdsink_nbd.NBDOptionError) as err:
                async with nbdsink_nbd.connect(server.uri(name)):
                    pass
            assert err.value.reply_type == p.NBD_REP_ERR_UNKNOWN
            _one_line(log, shown, reason)

        # A name that is not UTF-8, asked for twice on one connection.
        log = Log(server)
        replies = _raw_refused(server.socket, b"vol\xff", (p.NBD_OPT_INFO, p.NBD_OPT_GO))
        assert replies == [p.NBD_REP_ERR_UNKNOWN] * 2
        _one_line(log, repr(b"vol\xff"), "not valid UTF-8")

        # Restore of a pruned version over NBD fails with its own clear error.
        restore = run_cli("restore", server.uri("vol@2"), str(tmp_path / "out.img"),
                          check=False)
        assert restore.returncode != 0 and "Traceback" not in restore.stderr, restore.stderr
        _one_line(log, "'vol@2'", "(it was pruned)")

        # The server goes on serving, and a good name logs nothing.
        h = nbd.NBD()
        h.connect_uri(server.uri("vol@3"))
        assert h.pread(BS, 0) == b"\x03" * BS
        h.shutdown()
        assert not [line for line in log.new_lines() if "export" in line]
        assert server.alive
    assert TRACEBACK not in server.log.read_text(errors="replace")


def test_a_damaged_chunk_read_is_one_line(server: ServerProcess) -> None:
    with server:
        _write_versions(server, 1)
    seg = lmdb.open(str(server.store / "segments" / "00000001.mdb"), subdir=False, max_dbs=2)
    chunks = seg.open_db(b"chunks")
    with seg.begin(write=True) as txn:
        digest, value = next(iter(txn.cursor(db=chunks)))
        damaged = bytearray(value)
        damaged[-7] ^= 0x55
        txn.put(digest, bytes(damaged), db=chunks)
    seg.close()
    with server:
        log = Log(server)
        h = nbd.NBD()
        h.connect_uri(server.uri("vol@1"))
        with pytest.raises(nbd.Error) as err:
            h.pread(BS, 0)
        assert err.value.errnum == 5  # EIO
        h.shutdown()
        lines = log.new_lines()
        about = [line for line in lines if "export 'vol@1': read of 65536 bytes at 0:" in line]
        assert len(about) == 1, lines
        assert not any(TRACEBACK in line for line in lines), lines


def test_a_real_bug_logs_one_full_traceback(server: ServerProcess) -> None:
    """A volume record whose id does not fit the store's 32-bit keys: the store raises
    struct.error, which no code expects. The client is refused, the log has the whole
    traceback once (not once per option), and everyone else is served."""
    server.create_volume("good", SIZE, BS)
    env = lmdb.open(str(server.store), max_dbs=64)
    volumes = env.open_db(b"volumes")
    with env.begin(write=True) as txn:
        record = json.loads(txn.get(b"vol", db=volumes))
        record["id"] = 1 << 32
        txn.put(b"vol", json.dumps(record).encode(), db=volumes)
    env.close()
    with server:
        log = Log(server)
        _nbdinfo_refused(server, "vol")
        text = "\n".join(log.new_lines())
        assert text.count(TRACEBACK) == 1, text
        assert "struct.error" in text and "in open" in text, text
        assert "refused" not in text, text
        h = nbd.NBD()
        h.connect_uri(server.uri("good"))
        h.pwrite(b"g" * BS, 0)
        h.flush()
        h.shutdown()
        _nbdinfo_refused(server, "vol")  # a new connection: its own traceback
        assert "\n".join(log.new_lines()).count(TRACEBACK) == 1
        assert server.alive
