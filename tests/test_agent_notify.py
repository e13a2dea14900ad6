"""sd_notify over real AF_UNIX datagram sockets: filesystem paths and the abstract namespace."""
from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Iterator

import pytest

from edge_agent.notify import Notifier


@pytest.fixture
def path_socket() -> Iterator[tuple[socket.socket, str]]:
    d = tempfile.mkdtemp(prefix="ntf", dir="/tmp")  # AF_UNIX paths must be short
    path = os.path.join(d, "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(10)
    yield s, path
    s.close()
    os.unlink(path)
    os.rmdir(d)


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    name = f"edge-agent-test-{uuid.uuid4().hex}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(10)
    yield s, "@" + name
    s.close()


def recv(s: socket.socket) -> dict[str, str]:
    return dict(line.split("=", 1) for line in s.recv(4096).decode().splitlines())


def test_path_socket(path_socket) -> None:
    s, path = path_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled and n.ready("warming up")
    msg = recv(s)
    assert msg["READY"] == "1" and msg["STATUS"] == "warming up" and msg["MAINPID"] == str(os.getpid())
    assert n.stopping()
    assert recv(s) == {"STOPPING": "1"}


def test_abstract_socket_and_watchdog(abstract_socket) -> None:
    s, name = abstract_socket
    n = Notifier({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval == 2.0
    assert n.watchdog()
    assert recv(s) == {"WATCHDOG": "1"}
    assert n.status("screened 3")
    assert recv(s) == {"STATUS": "screened 3"}


def test_watchdog_for_another_pid_is_not_ours(abstract_socket) -> None:
    _, name = abstract_socket
    n = Notifier({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"})
    assert n.watchdog_interval is None and not n.watchdog()


def test_no_op_outside_systemd_and_on_a_dead_socket() -> None:
    n = Notifier({})
    assert not n.enabled and not n.ready() and not n.watchdog() and not n.stopping()
    gone = Notifier({"NOTIFY_SOCKET": "/tmp/definitely-not-a-socket-" + uuid.uuid4().hex})
    assert gone.enabled and not gone.ready()  # best effort: never raises
