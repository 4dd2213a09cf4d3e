"""STARTTLS against nbdkit ``--tls=require`` with X.509 certificates made for the test."""

from __future__ import annotations

import os

import pytest
from nbd_servers import Certificates, Servers

from nbdsink.nbd import (
    NBDOptionError,
    NBDTLSError,
    TLSConfig,
    URIError,
    connect,
    list_exports,
)
from nbdsink.nbd import protocol as p


def tls_server(servers: Servers, certs: Certificates, *extra: str) -> int:
    return servers.nbdkit_tcp(
        "--tls=require", f"--tls-certificates={certs.server_dir}", *extra, "memory", "4M"
    )


async def test_tls_roundtrip_with_uri_certificate_directory(
    servers: Servers, certificates: Certificates
) -> None:
    port = tls_server(servers, certificates)
    uri = f"nbds://localhost:{port}/?tls-certificates={certificates.client_dir}"
    data = os.urandom(1 << 20)
    async with connect(uri) as conn:
        assert conn.tls
        await conn.pwrite(data, 4096)
        assert await conn.pread(len(data), 4096) == data
    assert await list_exports(uri) == [("", "")]


async def test_tls_by_ip_address_with_a_config_object(
    servers: Servers, certificates: Certificates
) -> None:
    port = tls_server(servers, certificates)
    tls = TLSConfig(ca_file=str(certificates.ca_cert))
    async with connect(f"nbds://127.0.0.1:{port}/", tls=tls) as conn:
        await conn.pwrite(b"\x5a" * 4096, 0)
        assert await conn.pread(4096, 0) == b"\x5a" * 4096


async def test_plain_client_is_told_tls_is_required(
    servers: Servers, certificates: Certificates
) -> None:
    port = tls_server(servers, certificates)
    with pytest.raises(NBDOptionError) as info:
        async with connect(f"nbd://localhost:{port}/"):
            pass
    assert info.value.reply_type == p.NBD_REP_ERR_TLS_REQD
    assert "nbds://" in str(info.value)


async def test_untrusted_server_certificate_is_rejected(
    servers: Servers, certificates: Certificates
) -> None:
    port = tls_server(servers, certificates)
    tls = TLSConfig(ca_file=str(certificates.rogue_ca_cert))
    with pytest.raises(NBDTLSError, match="CERTIFICATE_VERIFY_FAILED"):
        async with connect(f"nbds://localhost:{port}/", tls=tls):
            pass


async def test_hostname_mismatch_is_rejected(
    servers: Servers, certificates: Certificates
) -> None:
    port = tls_server(servers, certificates)
    tls = TLSConfig(ca_file=str(certificates.ca_cert), hostname="backup.example.com")
    with pytest.raises(NBDTLSError, match="CERTIFICATE_VERIFY_FAILED"):
        async with connect(f"nbds://127.0.0.1:{port}/", tls=tls):
            pass


async def test_mutual_tls_accepts_our_client_and_rejects_a_foreign_one(
    servers: Servers, certificates: Certificates
) -> None:
    port = tls_server(servers, certificates, "--tls-verify-peer")
    good = f"nbds://localhost:{port}/?tls-certificates={certificates.client_dir}"
    async with connect(good) as conn:
        await conn.pwrite(b"m" * 512, 0)
        assert await conn.pread(512, 0) == b"m" * 512
    rogue = f"nbds://localhost:{port}/?tls-certificates={certificates.rogue_dir}"
    with pytest.raises(NBDTLSError):
        async with connect(rogue) as conn:
            await conn.pread(512, 0)
    anonymous = TLSConfig(ca_file=str(certificates.ca_cert))
    with pytest.raises(NBDTLSError):
        async with connect(f"nbds://localhost:{port}/", tls=anonymous) as conn:
            await conn.pread(512, 0)


async def test_tls_over_a_unix_socket(servers: Servers, certificates: Certificates) -> None:
    uri = servers.nbdkit(
        "--tls=require", f"--tls-certificates={certificates.server_dir}", "memory", "1M"
    )
    tls_uri = uri.replace("nbd+unix", "nbds+unix") + f"&tls-certificates={certificates.client_dir}"
    async with connect(tls_uri) as conn:
        assert conn.tls
        assert await conn.pread(512, 0) == bytes(512)


async def test_tls_settings_need_a_tls_uri(servers: Servers, certificates: Certificates) -> None:
    with pytest.raises(URIError, match="nbds"):
        async with connect(f"nbd://localhost:1/?tls-certificates={certificates.client_dir}"):
            pass
