"""Shared fixtures: planted circuits with known roles, and a network that only reaches loopback.

Every test runs with outbound sockets refused (loopback stays open for torch.distributed), so nothing
in the suite can silently depend on a model hub.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest
import torch

from chg_tlens.testbeds.benchmark_models import recall_benchmark
from chg_tlens.testbeds.planted import recall_circuit, repeat_circuit

# One intra-op thread: the toy models are too small to gain from two, and a second thread makes every
# test crawl whenever anything else shares the two cores (measured: a planted fit 2.5 s vs 24 s).
torch.set_num_threads(1)

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _is_local(address: object) -> bool:
    if not isinstance(address, tuple):
        return True  # AF_UNIX paths
    host = str(address[0])
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


class NetworkBlocked(OSError):
    """Raised for any connection to a non-loopback address during tests."""


def _guarded_connect(self: socket.socket, address: object) -> None:
    if not _is_local(address):
        raise NetworkBlocked(f"tests may not reach the network (tried {address!r})")
    return _real_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: object) -> int:
    if not _is_local(address):
        raise NetworkBlocked(f"tests may not reach the network (tried {address!r})")
    return _real_connect_ex(self, address)


@pytest.fixture(autouse=True, scope="session")
def no_network():
    """Refuse non-loopback connections for the whole session."""
    socket.socket.connect = _guarded_connect
    socket.socket.connect_ex = _guarded_connect_ex
    yield
    socket.socket.connect = _real_connect
    socket.socket.connect_ex = _real_connect_ex


@pytest.fixture(scope="session")
def recall():
    """One layer, four heads: 0.0 facilitating, 0.1 interfering, 0.2 and 0.3 irrelevant."""
    return recall_circuit()


@pytest.fixture(scope="session")
def recall_with_twin():
    """The recall circuit with a corrupt twin (position 1 changed), and 48 examples of its data."""
    circuit = recall_benchmark()
    return circuit, circuit.data(48, 0)


@pytest.fixture(scope="session")
def repeat():
    """Two layers, four heads each: 1.1 facilitating, 0.2 interfering, the rest irrelevant."""
    return repeat_circuit()
