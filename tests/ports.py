"""Ports for the servers the tests start, one block per pytest-xdist worker.

A port found by binding port 0 comes from the kernel's ephemeral range, the range it also
hands to every other ``bind(0)`` and every outgoing connection on the machine. A test that
picks a port that way and keeps it idle for a while (a deploy target's second slot waits
for the next rollout) can find it taken by another worker's server in the meantime: CI saw
a rollback refused with "slot port 54785 is in use by a process this target did not start".

So each worker takes its ports in turn from a block of its own below the ephemeral range:
no other worker and no kernel-chosen port can land there, and within a worker a port is not
handed out again until the block has gone round once.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path

FIRST_PORT = 20000
BLOCK_SIZE = 1000
DEFAULT_EPHEMERAL = (32768, 60999)


def ephemeral_range(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux's default where it cannot be read)."""
    try:
        low, high = (int(v) for v in path.read_text().split())
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL
    return low, high


def worker_index(worker: str | None) -> int:
    """0 for ``gw0`` and for a run without xdist (``None`` or ``master``), N for ``gwN``."""
    if worker in (None, "", "master"):
        return 0
    match = re.fullmatch(r"gw(\d+)", worker)
    if not match:
        raise ValueError(f"unexpected PYTEST_XDIST_WORKER {worker!r} (expected gw<N>)")
    return int(match.group(1))


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class PortBlock:
    """Hands out the ports of ``ports`` in turn, skipping any that cannot be bound now."""

    def __init__(self, ports: range) -> None:
        self.ports = ports
        self._next = 0
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            for _ in range(len(self.ports)):
                port = self.ports[self._next % len(self.ports)]
                self._next += 1
                if _bindable(port):
                    return port
        raise RuntimeError(
            f"no free port left in {self.ports.start}-{self.ports.stop - 1}: "
            "servers from earlier tests still hold them all"
        )


def block_for(worker: str | None, ephemeral_low: int | None = None) -> PortBlock:
    """The block of ``worker``; an error if it would reach the kernel's ephemeral range."""
    low = ephemeral_range()[0] if ephemeral_low is None else ephemeral_low
    first = FIRST_PORT + worker_index(worker) * BLOCK_SIZE
    if first + BLOCK_SIZE > low:
        raise RuntimeError(
            f"worker {worker}'s test ports {first}-{first + BLOCK_SIZE - 1} would reach the "
            f"kernel's ephemeral range (from {low}): run fewer xdist workers"
        )
    return PortBlock(range(first, first + BLOCK_SIZE))


_block: PortBlock | None = None
_block_lock = threading.Lock()


def free_port() -> int:
    """A port no server holds now and no other test will be given: this worker's next one."""
    global _block
    with _block_lock:
        if _block is None:
            _block = block_for(os.environ.get("PYTEST_XDIST_WORKER"))
    return _block.take()


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports, each as ``free_port``."""
    return [free_port() for _ in range(n)]
