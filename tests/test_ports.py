"""The test ports (tests/ports.py): never one the kernel or another worker can hand out."""

from __future__ import annotations

import socket

import pytest

from tests import conftest, ports


def test_the_suites_ports_are_below_the_kernels_ephemeral_range():
    """CI: a deploy slot picked with bind(0) and idle until the next rollout was taken by
    another worker's server meanwhile ("slot port 54785 is in use by a process this target
    did not start"). Ports below the ephemeral range are never handed out by the kernel."""
    low, _ = ports.ephemeral_range()
    taken = [conftest.free_port() for _ in range(20)] + conftest._free_ports(5)
    assert all(port < low for port in taken), taken
    assert len(set(taken)) == len(taken)


def test_two_workers_never_get_the_same_port():
    gw0, gw1 = ports.block_for("gw0"), ports.block_for("gw1")
    first = {gw0.take() for _ in range(50)}
    second = {gw1.take() for _ in range(50)}
    assert len(first) == len(second) == 50
    assert not first & second


def test_a_port_someone_holds_is_skipped_and_a_full_block_says_so():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"no free port left in {port}-{port}"):
            ports.PortBlock(range(port, port + 1)).take()
    assert ports.PortBlock(range(port, port + 1)).take() == port


def test_a_block_goes_round_before_it_repeats_a_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    block = ports.PortBlock(range(port, port + 1))
    assert [block.take(), block.take()] == [port, port]


@pytest.mark.parametrize(("worker", "index"), [(None, 0), ("master", 0), ("gw0", 0), ("gw7", 7)])
def test_worker_index(worker, index):
    assert ports.worker_index(worker) == index


def test_too_many_workers_is_a_clear_error():
    with pytest.raises(RuntimeError, match="run fewer xdist workers"):
        ports.block_for("gw12", ephemeral_low=32768)
    with pytest.raises(ValueError, match="expected gw<N>"):
        ports.worker_index("worker-3")


def test_an_unreadable_range_falls_back_to_linuxs_default(tmp_path):
    assert ports.ephemeral_range(tmp_path / "absent") == ports.DEFAULT_EPHEMERAL
    (tmp_path / "range").write_text("10000\t20000\n")
    assert ports.ephemeral_range(tmp_path / "range") == (10000, 20000)
