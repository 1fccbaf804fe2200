"""The systemd notify and socket-activation protocols, without libsystemd.

`sd_notify`: one datagram of ``KEY=VALUE`` lines to the ``AF_UNIX`` socket named
by ``$NOTIFY_SOCKET`` (a leading ``@`` means the Linux abstract namespace).
Without ``$NOTIFY_SOCKET`` (not started by systemd) every call is a no-op that
returns False, so the daemon runs the same code everywhere.

`listen_fds`: the sockets systemd passed (``$LISTEN_PID`` == our pid,
``$LISTEN_FDS`` = count, descriptors from 3 on).

`watchdog_interval`: half of ``$WATCHDOG_USEC`` (when ``$WATCHDOG_PID`` is unset
or ours), the period at which ``WATCHDOG=1`` keeps systemd from restarting us.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Mapping, MutableMapping

SD_LISTEN_FDS_START = 3


def _address(value: str) -> str | bytes:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


@dataclass
class Notifier:
    """Sends notify messages to one socket; `None` socket means "not under systemd"."""

    socket_path: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Notifier":
        env = os.environ if env is None else env
        value = env.get("NOTIFY_SOCKET") or None
        if value is not None and not (value.startswith("/") or value.startswith("@")):
            value = None  # systemd only uses absolute or abstract addresses; ignore anything else
        return cls(value)

    @property
    def enabled(self) -> bool:
        return self.socket_path is not None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines; keys are upper-cased. Returns False if not sent.

        Never raises: a vanished notify socket must not take the daemon down.
        """
        if self.socket_path is None:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value).replace("\n", " ")
            lines.append(f"{key.upper()}={text}")
        payload = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, _address(self.socket_path))
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        fields: dict[str, str | int] = {"READY": 1, "MAINPID": os.getpid()}
        if status:
            fields["STATUS"] = status
        return self.send(**fields)

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def reloading(self) -> bool:
        return self.send(RELOADING=1)

    def stopping(self, status: str | None = None) -> bool:
        fields: dict[str, str | int] = {"STOPPING": 1}
        if status:
            fields["STATUS"] = status
        return self.send(**fields)


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None if no watchdog."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 1_000_000 / 2


def listen_fds(env: MutableMapping[str, str] | None = None, *, unset: bool = True) -> list[socket.socket]:
    """Sockets handed over by systemd socket activation (empty when none).

    With ``unset`` the LISTEN_* variables are removed so child processes (the
    providers we start) do not think the sockets are theirs.
    """
    env = os.environ if env is None else env
    pid, count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    if unset:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(name, None)
    if not pid or not count or not pid.isdigit() or not count.isdigit():
        return []
    if int(pid) != os.getpid():
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets
