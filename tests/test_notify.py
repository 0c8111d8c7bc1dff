"""sd_notify client against real AF_UNIX datagram sockets (a path and an abstract name)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dreamd.service.notify import (SystemdNotifier, socket_address, status_line,
                                   watchdog_interval)


def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2.0)
    return sock


def _recv_fields(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(65536).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


def _nothing_waiting(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(65536)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(2.0)
    return False


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """(value for $NOTIFY_SOCKET, the bound receiving socket)."""
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        sock = _receiver(path)
        yield path, sock
    else:
        name = f"dreamd-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        sock = _receiver("\0" + name)
        yield "@" + name, sock
    sock.close()


def test_ready_status_and_stopping_reach_the_socket(notify_socket):
    value, sock = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": value})
    assert notifier.enabled
    assert notifier.ready(status="cycle 0: idle")
    assert _recv_fields(sock) == {"READY": "1", "STATUS": "cycle 0: idle"}
    assert notifier.status(status_line("train", 3, "step 4/96"))
    assert _recv_fields(sock) == {"STATUS": "cycle 3: train step 4/96"}
    assert notifier.stopping()
    assert _recv_fields(sock) == {"STOPPING": "1"}
    assert notifier.extend_timeout(90)
    assert _recv_fields(sock) == {"EXTEND_TIMEOUT_USEC": "90000000"}
    assert notifier.reloading()
    fields = _recv_fields(sock)
    assert fields["RELOADING"] == "1" and int(fields["MONOTONIC_USEC"]) > 0
    assert notifier.sent == 5 and notifier.failed == 0
    notifier.close()


def test_newlines_in_status_cannot_inject_fields(notify_socket):
    value, sock = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": value})
    notifier.status("phase\nREADY=1")
    assert _recv_fields(sock) == {"STATUS": "phase READY=1"}


def test_no_socket_means_no_op():
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.status("x") is False
    assert notifier.progress() is False
    assert notifier.sent == 0


def test_vanished_socket_is_counted_not_raised(tmp_path):
    path = tmp_path / "gone.sock"
    _receiver(str(path)).close()
    path.unlink()
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(path)})
    assert notifier.status("x") is False
    assert notifier.failed == 1


def test_socket_address_forms():
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abc") == "\0abc"
    with pytest.raises(ValueError, match="absolute path"):
        socket_address("relative.sock")


def test_watchdog_interval_honours_watchdog_pid():
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 30.0
    # A child that inherited the parent's environment must not ping for it.
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None


def test_progress_pings_watchdog_rate_limited(notify_socket):
    value, sock = notify_socket
    # WatchdogSec=2 s: pings at most every min(1 s, 2/4 s) = 0.5 s.
    notifier = SystemdNotifier({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "2000000"})
    assert notifier.watchdog_s == 2.0
    assert notifier.progress(now=100.0)
    assert _recv_fields(sock) == {"WATCHDOG": "1"}
    assert not notifier.progress(now=100.3)  # too soon after the last ping
    assert _nothing_waiting(sock)
    assert notifier.progress(now=100.5)
    assert _recv_fields(sock) == {"WATCHDOG": "1"}
    # Step boundaries 1000 times a second for 2 s send 4 pings, not 2000.
    sent = sum(notifier.progress(now=101.0 + i / 1000) for i in range(2000))
    assert sent == 4


def test_progress_without_watchdog_sends_nothing(notify_socket):
    value, sock = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": value})
    assert notifier.watchdog_s is None
    assert not notifier.progress(now=5.0)
    assert _nothing_waiting(sock)


def test_unset_environment_hides_socket_from_children(monkeypatch, notify_socket):
    value, _sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    notifier = SystemdNotifier(unset_environment=True)
    assert notifier.enabled and notifier.watchdog_s == 1.0
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
