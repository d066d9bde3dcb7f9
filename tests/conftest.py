from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from lmcache.client import MPClient
from lmcache.server.process import ServerProcess


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    """One real `lmcache server` process shared by a test module (tests must not depend on order)."""
    with ServerProcess() as proc:
        yield proc


@pytest.fixture
def client(server: ServerProcess) -> Iterator[MPClient]:
    with MPClient("127.0.0.1", server.port, timeout_s=5.0) as c:
        yield c


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http_url, timeout=5.0) as c:
        yield c
