"""Real NBD servers (nbdkit, qemu-nbd) started for a test, and TLS certificates made for it."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def _wait_for(proc: subprocess.Popen[bytes], ready: Callable[[], bool], what: str) -> None:
    for _ in range(400):
        if ready():
            return
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}: {err}")
        time.sleep(0.025)
    raise RuntimeError(f"{what} did not start")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _socket_open(path: Path) -> bool:
    """Whether a server accepts connections on the unix socket ``path``: the file appears at
    bind(), before listen(), and a connection in between is refused."""
    with socket.socket(socket.AF_UNIX) as s:
        return s.connect_ex(str(path)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Servers:
    """Starts servers for one test and stops them all afterwards."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(proc)
        return proc

    def nbdkit(self, *args: str) -> str:
        """nbdkit on a unix socket; returns its ``nbd+unix`` URI (export "")."""
        sock = self.tmp / f"nbdkit{len(self.procs)}.sock"
        proc = self._spawn(["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), *args])
        _wait_for(proc, lambda: _socket_open(sock), "nbdkit")
        return f"nbd+unix:///?socket={sock}"

    def nbdkit_tcp(self, *args: str) -> int:
        """nbdkit on 127.0.0.1; returns the port."""
        port = free_port()
        argv = ["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port)]
        proc = self._spawn([*argv, *args])
        _wait_for(proc, lambda: _port_open(port), "nbdkit")
        return port

    def qemu_nbd(self, image: Path, export: str, *args: str) -> str:
        """qemu-nbd serving a raw image as ``export``; returns the URI of that export."""
        sock = self.tmp / f"qemu{len(self.procs)}.sock"
        proc = self._spawn(
            ["qemu-nbd", "-t", "-k", str(sock), "-f", "raw", "-x", export, *args, str(image)]
        )
        _wait_for(proc, lambda: _socket_open(sock), "qemu-nbd")
        return f"nbd+unix:///{export}?socket={sock}"

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}-ca-key.pem", directory / f"{name}-ca-cert.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
             str(cert), "-days", "2", "-subj", f"/CN={name} test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    return key, cert


def _make_cert(
    directory: Path, name: str, ca: tuple[Path, Path], extensions: str
) -> tuple[Path, Path]:
    key, csr, cert = (directory / f"{name}-{part}.pem" for part in ("key", "csr", "cert"))
    ext = directory / f"{name}.ext"
    ext.write_text(extensions)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", f"/CN={name}")  # fmt: skip
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
    return key, cert


class Certificates:
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate, and a
    second (untrusted) CA with its own client certificate. ``server_dir`` is laid out for
    ``nbdkit --tls-certificates``, ``client_dir`` and ``rogue_dir`` for libnbd's
    ``tls-certificates``."""

    def __init__(self, base: Path) -> None:
        ca = _make_ca(base, "good")
        rogue_ca = _make_ca(base, "rogue")
        server = _make_cert(base, "server", ca,
                            "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                            "extendedKeyUsage=serverAuth\n")  # fmt: skip
        client = _make_cert(base, "client", ca, "extendedKeyUsage=clientAuth\n")
        rogue = _make_cert(base, "rogue", rogue_ca, "extendedKeyUsage=clientAuth\n")
        self.server_dir = base / "server"
        self.client_dir = base / "client"
        self.rogue_dir = base / "rogue"
        for directory, files in (
            (self.server_dir, {"ca-cert.pem": ca[1], "server-cert.pem": server[1],
                               "server-key.pem": server[0]}),
            (self.client_dir, {"ca-cert.pem": ca[1], "client-cert.pem": client[1],
                               "client-key.pem": client[0]}),
            (self.rogue_dir, {"ca-cert.pem": ca[1], "client-cert.pem": rogue[1],
                              "client-key.pem": rogue[0]}),
        ):  # fmt: skip
            directory.mkdir()
            for target, source in files.items():
                (directory / target).write_bytes(source.read_bytes())
        self.ca_cert = ca[1]
        self.rogue_ca_cert = rogue_ca[1]
