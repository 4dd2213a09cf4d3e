"""Fixtures for the NBD client tests: real nbdkit / qemu-nbd servers and TLS certificates."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from nbd_servers import Certificates, Servers


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    started = Servers(tmp_path)
    yield started
    started.stop()


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("certs"))
