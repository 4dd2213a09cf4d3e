"""``serve --access FILE``: per-volume access by client address (TCP, over real TLS with
client certificates) and by uid/gid (unix socket), since nbdkit 1.32 gives plugins no way to
see which certificate a client used."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from nbdsink.server.access import AccessFileError, AccessRules
from nbdsink.server.nbdkit_c import PeerInfo
from nbdsink.testing import ServerProcess, run_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nbd"))
from nbd_servers import Certificates, free_port

BS = 65536
SIZE = 1 << 20
NOBODY = 65534


def _peer(address: str) -> PeerInfo:
    return PeerInfo(socket.AF_INET, address)


def test_rules_strongest_match_wins_and_nothing_else_is_allowed() -> None:
    rules = AccessRules.parse({"allow": [
        {"clients": ["10.1.0.0/24"], "volumes": ["web*"], "access": "read"},
        {"clients": ["10.1.0.7", "2001:db8::/64"], "volumes": ["web01"], "access": "write"},
        {"clients": "uid:1001", "volumes": "db01", "access": "read"},
        {"clients": ["any"], "volumes": ["public"], "access": "read"},
    ]})
    assert rules.grant(_peer("10.1.0.7"), "web01") == "write"
    assert rules.grant(_peer("10.1.0.7"), "web02") == "read"
    assert rules.grant(_peer("10.1.0.8"), "web01") == "read"
    assert rules.grant(_peer("10.1.1.7"), "web01") is None
    assert rules.grant(PeerInfo(socket.AF_INET6, "2001:db8::5"), "web01") == "write"
    assert rules.grant(_peer("10.1.0.7"), "db01") is None
    assert rules.grant(PeerInfo(socket.AF_UNIX, uid=1001, gid=1001), "db01") == "read"
    assert rules.grant(PeerInfo(socket.AF_UNIX, uid=1002, gid=1001), "db01") is None
    assert rules.grant(None, "public") == "read"  # an unidentified client: only "any"
    assert rules.grant(None, "web01") is None


@pytest.mark.parametrize(("rule", "says"), [
    ({"clients": ["CN=web01.example.com"], "volumes": ["web01"], "access": "write"},
     "does not tell plugins which certificate"),
    ({"clients": ["psk:web01"], "volumes": ["web01"], "access": "write"},
     "does not tell plugins which certificate"),
    ({"clients": ["web01.example.com"], "volumes": ["web01"], "access": "write"},
     "host names are not resolved"),
    ({"clients": ["10.0.0.1"], "volumes": ["web01"], "access": "rw"},
     'access must be "read" or "write"'),
    ({"clients": [], "volumes": ["web01"], "access": "read"}, "clients must be a non-empty"),
    ({"clients": ["uid:x"], "volumes": ["web01"], "access": "read"}, "expected uid:NUMBER"),
    ({"clients": ["any"], "volume": ["web01"], "access": "read"}, "unknown key 'volume'"),
])
def test_a_bad_rule_says_what_is_wrong(rule: dict[str, object], says: str) -> None:
    with pytest.raises(AccessFileError) as err:
        AccessRules.parse({"allow": [rule]})
    assert says in str(err.value) and "rule 1" in str(err.value)


def test_serve_refuses_a_bad_access_file_in_one_line(tmp_path: Path) -> None:
    access = tmp_path / "access.toml"
    access.write_text('[[allow]]\nclients = ["CN=web01"]\nvolumes = ["web01"]\n'
                      'access = "write"\n')
    for path in (access, tmp_path / "missing.toml"):
        run = run_cli("serve", "--store", str(tmp_path / "store"), "--socket",
                      str(tmp_path / "s.sock"), "--access", str(path), check=False)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert "--access" in run.stderr


class TcpServer(ServerProcess):
    """``nbdsink serve --listen 127.0.0.1:PORT`` (TLS and access rules in ``extra_args``)."""

    def __init__(self, store: Path, log: Path, *extra_args: str) -> None:
        super().__init__(store, log.with_suffix(".sock"), *extra_args, log=log)
        self.port = free_port()

    def start(self, timeout: float = 30.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "nbdsink.cli.main", "serve", "--store", str(self.store),
               "--listen", f"127.0.0.1:{self.port}", *self.extra_args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text(errors="replace")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise TimeoutError(f"nbdsink serve did not listen on port {self.port}")

    def client(self, source: str, export: str, certificates: Path,
               list_only: bool = False) -> nbd.NBD:
        """A libnbd handle connected over TLS from the address ``source`` (any 127.x.y.z
        is this machine), with the client certificate in ``certificates``."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=30,
                                     source_address=(source, 0))
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(certificates))
        h.set_export_name(export)
        h.set_opt_mode(list_only)
        h.connect_socket(s.detach())
        return h

    def listed(self, source: str, certificates: Path) -> set[str]:
        h = self.client(source, "", certificates, list_only=True)
        names: set[str] = set()
        h.opt_list(lambda name, description: names.add(name) or 0)
        h.opt_abort()
        return names


def _refusals(log: Path, export: str) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines()
            if f"export {export!r} refused:" in line]


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tcp_server(tmp_path: Path, certificates: Certificates) -> Iterator[TcpServer]:
    access = tmp_path / "access.toml"
    access.write_text("""
[[allow]]                       # web01's source host
clients = ["127.0.0.1"]
volumes = ["web*"]
access = "write"

[[allow]]                       # a restore host: reads the databases, and web01
clients = ["127.0.0.2/32"]
volumes = ["db*", "web01"]
access = "read"
""")
    srv = TcpServer(tmp_path / "store", tmp_path / "serve.log",
                    "--tls-certificates", str(certificates.server_dir), "--access", str(access))
    for volume in ("web01", "db01"):
        srv.create_volume(volume, SIZE, BS)
    with srv:
        yield srv


def test_tls_clients_get_what_their_address_is_allowed(tcp_server: TcpServer,
                                                       certificates: Certificates) -> None:
    srv, client_certs = tcp_server, certificates.client_dir

    # 127.0.0.1 writes web01 (a version), and may not open db01 at all.
    h = srv.client("127.0.0.1", "web01", client_certs)
    assert not h.is_read_only()
    h.pwrite(b"w" * BS, 0)
    h.flush()
    h.shutdown()
    with pytest.raises(nbd.Error):
        srv.client("127.0.0.1", "db01", client_certs)
    [line] = _refusals(srv.log, "db01")
    assert "client 127.0.0.1 has no access to volume 'db01'" in line
    assert srv.listed("127.0.0.1", client_certs) == {"web01", "web01@latest", "web01@1"}

    # 127.0.0.2 reads: every export read-only, but a scratch view is writable (its writes
    # never reach the store).
    for export in ("web01", "web01@1", "web01@latest", "db01", "web01;digests"):
        h = srv.client("127.0.0.2", export, client_certs)
        assert h.is_read_only(), export
        h.shutdown()
    scratch = srv.client("127.0.0.2", "web01@1;scratch", client_certs)
    assert not scratch.is_read_only()
    scratch.pwrite(b"s" * BS, 0)
    assert scratch.pread(BS, 0) == b"s" * BS
    scratch.shutdown()
    h = srv.client("127.0.0.2", "web01@1", client_certs)
    assert h.pread(BS, 0) == b"w" * BS
    h.shutdown()
    assert srv.listed("127.0.0.2", client_certs) == {"web01", "web01@latest", "web01@1",
                                                     "db01"}

    # 127.0.0.3 is named by no rule: a valid certificate is not enough.
    with pytest.raises(nbd.Error):
        srv.client("127.0.0.3", "web01", client_certs)
    [line] = _refusals(srv.log, "web01")
    assert "client 127.0.0.3 has no access to volume 'web01'" in line
    assert srv.listed("127.0.0.3", client_certs) == set()

    # TLS still decides who connects at all: a certificate of another CA is turned away
    # even from the address allowed to write.
    with pytest.raises(nbd.Error):
        srv.client("127.0.0.1", "web01", certificates.rogue_dir)
    assert srv.alive
    assert "Traceback" not in srv.log.read_text(errors="replace")


def test_unix_socket_clients_by_uid(tmp_path: Path) -> None:
    run_dir = Path(f"/tmp/nbdsink-access-{os.getpid()}")
    run_dir.mkdir(mode=0o755)
    try:
        access = tmp_path / "access.toml"
        access.write_text(f"""
[[allow]]
clients = ["uid:0"]
volumes = ["*"]
access = "write"

[[allow]]
clients = ["uid:{NOBODY}"]
volumes = ["db01"]
access = "read"
""")
        srv = ServerProcess(tmp_path / "store", run_dir / "nbd.sock", "--access", str(access),
                            log=tmp_path / "serve.log")
        for volume in ("web01", "db01"):
            srv.create_volume(volume, SIZE, BS)
        with srv:
            os.chmod(srv.socket, 0o777)  # let another user connect at all
            h = nbd.NBD()
            h.connect_uri(srv.uri("web01"))
            assert not h.is_read_only()
            h.shutdown()

            def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                     "nbdinfo", *args], capture_output=True, text=True, timeout=60)

            listed = as_nobody("--list", "--json", srv.uri(""))
            assert listed.returncode == 0, listed.stderr
            assert '"db01"' in listed.stdout and "web01" not in listed.stdout
            info = as_nobody("--json", srv.uri("db01"))
            assert info.returncode == 0 and '"is_read_only": true' in info.stdout, info
            refused = as_nobody(srv.uri("web01"))
            assert refused.returncode != 0 and "No such file" in refused.stderr
            [line] = _refusals(srv.log, "web01")
            assert (f"unix-socket client (uid {NOBODY}, gid {NOBODY}) has no access to "
                    "volume 'web01'") in line
    finally:
        for leftover in run_dir.iterdir():
            leftover.unlink()
        run_dir.rmdir()


def test_without_access_rules_every_client_has_everything(tmp_path: Path) -> None:
    """The default is unchanged: no --access, no per-volume checks."""
    srv = ServerProcess(tmp_path / "store", tmp_path / "nbd.sock")
    srv.create_volume("web01", SIZE, BS)
    with srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri("web01"))
        assert not h.is_read_only()
        h.shutdown()
