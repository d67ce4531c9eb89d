"""Fixtures for the serving tests: free local ports."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def free_ports() -> Callable[[int], list[int]]:
    return _free_ports
