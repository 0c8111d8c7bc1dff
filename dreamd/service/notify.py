"""A small sd_notify client: tells systemd (Type=notify) that dreamd is ready, what it is doing,
and that its loop still makes progress.

The protocol (sd_notify(3)) is one datagram of newline-separated KEY=VALUE lines sent to the
AF_UNIX SOCK_DGRAM socket named by $NOTIFY_SOCKET. A name starting with '@' is an abstract
socket (Linux): the '@' becomes a leading NUL byte. Without $NOTIFY_SOCKET (dreamd started from a
shell, in tests, in CI) every call is a no-op that returns False.

Watchdog: systemd sets WATCHDOG_USEC (and WATCHDOG_PID, the process meant to ping) when the unit
has WatchdogSec=. dreamd sends WATCHDOG=1 only from its loop, through `progress()`, called at
step boundaries, phase changes and while paused or waiting for a schedule slot. A loop that hangs
(a deadlocked collective, a stuck CUDA call) stops calling it, and systemd restarts the service
after WatchdogSec. There is deliberately no background thread pinging on a timer: a thread would
keep pinging while the loop is dead, which defeats the watchdog.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from dreamd.log import get_logger

log = get_logger(__name__)

# Rate limit for WATCHDOG=1: at most one ping per min(this, WatchdogSec / 4). A tiny model steps
# ~1000 times a second; one datagram per step is wasted work, while pinging at a quarter of the
# interval leaves three missed windows of slack before systemd acts.
MAX_PING_SPACING_S = 1.0


def socket_address(notify_socket: str) -> str:
    """The AF_UNIX address for a $NOTIFY_SOCKET value: a path, or '@name' for an abstract socket."""
    if notify_socket.startswith("@"):
        return "\0" + notify_socket[1:]
    if notify_socket.startswith("/"):
        return notify_socket
    raise ValueError(f"NOTIFY_SOCKET={notify_socket!r} is not supported: expected an absolute "
                     "path or '@abstract-name' (AF_UNIX)")


def watchdog_interval(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """WatchdogSec in seconds when the watchdog is meant for this process, else None.

    systemd sets WATCHDOG_USEC; WATCHDOG_PID, when present, names the process that must ping
    (sd_watchdog_enabled(3)): a child that inherited the environment must not ping for us.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and (not owner.isdigit() or int(owner) != (os.getpid() if pid is None else pid)):
        return None
    return int(usec) / 1e6


def _clean(value: str) -> str:
    # A newline inside STATUS= would start a new KEY=VALUE line: a phase name containing
    # "\nREADY=1" must not be able to declare readiness.
    return " ".join(str(value).split())


class SystemdNotifier:
    """Sends sd_notify messages; a no-op without $NOTIFY_SOCKET.

    `environ` defaults to os.environ (read once, at construction). With
    `unset_environment=True` NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID are removed from
    os.environ afterwards so child processes (vLLM workers) cannot talk to systemd in our name;
    with NotifyAccess=main systemd ignores them anyway.
    """

    def __init__(self, environ: Mapping[str, str] | None = None, *, unset_environment: bool = False):
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = socket_address(raw) if raw else None
        self.watchdog_s: float | None = watchdog_interval(env) if self.address else None
        self._sock: socket.socket | None = None
        self._last_ping: float | None = None
        self.sent = 0
        self.failed = 0
        if unset_environment:
            for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(key, None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    # ---- the raw protocol -------------------------------------------------------------------
    def send(self, **fields: str | int) -> bool:
        """Send one datagram of KEY=VALUE lines (keys upper-cased). True when it was sent.

        Failures (systemd restarting, socket gone, queue full) are logged and counted, never
        raised: notification is advisory, and a loop that cannot reach systemd gets restarted
        by the watchdog anyway.
        """
        if self.address is None:
            return False
        payload = "\n".join(f"{k.upper()}={_clean(str(v))}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(payload, self.address)
        except OSError as exc:
            self.failed += 1
            log.warning("sd_notify failed", error=str(exc), fields=sorted(fields))
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # ---- the messages dreamd sends ----------------------------------------------------------
    def ready(self, status: str | None = None) -> bool:
        """READY=1: startup finished (store migrated, model and engine loaded)."""
        return self.send(READY=1, **({"STATUS": status} if status is not None else {}))

    def status(self, text: str) -> bool:
        """STATUS=<text>: shown by `systemctl status dreamd`."""
        return self.send(STATUS=text)

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC (systemd >= 253 needs it): a SIGHUP reload began;
        follow with ready() when it is applied."""
        return self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: graceful shutdown began (finish step, checkpoint, commit)."""
        return self.send(STOPPING=1, **({"STATUS": status} if status is not None else {}))

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: ask for more time in a slow start or stop (a large model load,
        a checkpoint of tens of GB), instead of raising TimeoutStartSec for every box."""
        return self.send(EXTEND_TIMEOUT_USEC=int(seconds * 1e6))

    def watchdog(self) -> bool:
        """WATCHDOG=1, unconditionally. The loop normally calls progress() instead."""
        sent = self.send(WATCHDOG=1)
        if sent:
            self._last_ping = time.monotonic()
        return sent

    def progress(self, now: float | None = None) -> bool:
        """The loop made progress: send WATCHDOG=1 if the last ping is older than the spacing.

        `now` is a time.monotonic() value (given by tests; read here otherwise). Returns True
        when a ping was sent.
        """
        if self.watchdog_s is None:
            return False
        now = time.monotonic() if now is None else now
        spacing = min(MAX_PING_SPACING_S, self.watchdog_s / 4)
        if self._last_ping is not None and now - self._last_ping < spacing:
            return False
        if not self.send(WATCHDOG=1):
            return False
        self._last_ping = now
        return True


def status_line(phase: str, cycle: int | None = None, detail: str = "") -> str:
    """The STATUS= text: 'cycle 12: train step 40/96', 'cycle 12: paused step 40/96',
    'starting: load model 1/6' (before a cycle has a number)."""
    if cycle is None:
        return f"{phase}: {detail}" if detail else phase
    return f"cycle {cycle}: {phase} {detail}" if detail else f"cycle {cycle}: {phase}"
