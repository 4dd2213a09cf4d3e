"""libnbd-style NBD URIs."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbdsink.nbd import TLSConfig, URIError, parse_uri


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("nbd://backup/web01-root", dict(tls=False, host="backup", port=10809, export="web01-root")),
        ("nbd://backup:10900/", dict(host="backup", port=10900, export="")),
        ("nbd://backup", dict(host="backup", export="")),
        ("nbds://[::1]:10809/vol%40latest", dict(tls=True, host="::1", export="vol@latest")),
        ("nbd://h/vol@2026-11-21T10:00:00Z", dict(export="vol@2026-11-21T10:00:00Z")),
        ("nbd+unix:///disk?socket=/run/nbd.sock", dict(socket="/run/nbd.sock", export="disk")),
        ("nbd+unix:///?socket=/tmp/s", dict(socket="/tmp/s", export="", host=None)),
        (
            "nbds+unix:///v?socket=/s&tls-certificates=/etc/pki/nbd&tls-verify-peer=false",
            dict(tls=True, tls_certificates="/etc/pki/nbd", tls_verify_peer=False),
        ),
        ("nbds://h/?tls-hostname=backup.example.com", dict(tls_hostname="backup.example.com")),
    ],
)
def test_parse(uri: str, expected: dict[str, object]) -> None:
    target = parse_uri(uri)
    for key, value in expected.items():
        assert getattr(target, key) == value, key


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("http://h/", "scheme"),
        ("nbd:///disk", "missing host"),
        ("nbd+unix:///disk", "socket"),
        ("nbd+unix://host/disk?socket=/s", "no host"),
        ("nbd://h/?socket=/s", "nbd\\+unix"),
        ("nbds://h/?tls-psk-file=/k", "PSK"),
        ("nbds://alice@h/", "PSK"),
        ("nbd://h/?tls-certificates=/x", "nbds"),
        ("nbd://h/?frobnicate=1", "unknown query parameter"),
        ("nbds://h/?tls-verify-peer=maybe", "true or false"),
        ("nbd://h:99999/", "out of range"),
    ],
)
def test_rejected(uri: str, match: str) -> None:
    with pytest.raises(URIError, match=match):
        parse_uri(uri)


def test_tls_config_from_uri_directory(tmp_path: Path) -> None:
    base = tmp_path
    (base / "ca-cert.pem").write_text("x")
    target = parse_uri(f"nbds://h/?tls-certificates={base}&tls-verify-peer=false")
    tls = TLSConfig.from_target(target)
    assert tls.ca_file == str(base / "ca-cert.pem")
    assert tls.cert_file is None and not tls.verify_peer
    assert tls.server_hostname(target) is None
    target = parse_uri(f"nbds://h/?tls-certificates={base}")
    assert TLSConfig.from_target(target).server_hostname(target) == "h"
