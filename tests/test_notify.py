"""sd_notify datagrams (path and abstract sockets), watchdog interval, LISTEN_FDS."""

from __future__ import annotations

import os
import socket

import pytest

from nodeagent.notify import Notifier, listen_fds, watchdog_interval


def receiver(address):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    return sock


def test_messages_reach_a_path_socket(tmp_path):
    path = str(tmp_path / "notify")
    with receiver(path) as sock:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
        assert notifier.ready("ready; 0 pods")
        assert sock.recv(4096).decode().split("\n") == ["READY=1", f"MAINPID={os.getpid()}", "STATUS=ready; 0 pods"]
        assert notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert notifier.status("multi\nline")
        assert sock.recv(4096) == b"STATUS=multi line"
        assert notifier.stopping()
        assert sock.recv(4096) == b"STOPPING=1"


def test_messages_reach_an_abstract_socket():
    name = f"agent-machine-test-{os.getpid()}"
    with receiver(b"\0" + name.encode()) as sock:
        assert Notifier.from_env({"NOTIFY_SOCKET": "@" + name}).send(READY=1)
        assert sock.recv(4096) == b"READY=1"


def test_without_notify_socket_nothing_is_sent():
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert Notifier.from_env({"NOTIFY_SOCKET": "relative/path"}).enabled is False


def test_a_vanished_socket_does_not_raise(tmp_path):
    assert Notifier(str(tmp_path / "gone")).watchdog() is False


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid())}, 0.2),
    ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}, None),
    ({"WATCHDOG_USEC": "junk"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
])
def test_watchdog_interval_is_half_the_timeout(env, expected):
    assert watchdog_interval(env) == expected


def test_listen_fds_takes_fd_3_when_the_pid_matches():
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    saved = os.dup(3) if _fd_open(3) else None
    try:
        os.dup2(server.fileno(), 3)
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "api"}
        sockets = listen_fds(env)
        assert len(sockets) == 1 and sockets[0].fileno() == 3
        assert sockets[0].family == socket.AF_UNIX
        assert "LISTEN_FDS" not in env and "LISTEN_PID" not in env  # not inherited by children
        sockets[0].detach()
        assert listen_fds({"LISTEN_PID": "1", "LISTEN_FDS": "1"}) == []
        assert listen_fds({}) == []
    finally:
        server.close()
        if saved is not None:
            os.dup2(saved, 3)
            os.close(saved)
        elif _fd_open(3):
            os.close(3)


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
