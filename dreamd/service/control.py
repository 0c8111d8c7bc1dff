"""Run control: signals to the main process, the pause flag, and the pidfile.

Signals (send them to the main PID only: `systemctl kill --kill-whom=main -s USR1 dreamd` or
`dreamd pause`; a plain `systemctl kill` also hits vLLM's workers, which die on USR1):

    SIGUSR1          pause at the next step boundary (never mid-step)
    SIGUSR2          resume
    SIGHUP           reload the config at the next cycle (see dreamd.service.reload)
    SIGTERM, SIGINT  finish the current step, checkpoint, commit, exit 0
                     (a second SIGINT raises KeyboardInterrupt: Ctrl-C twice aborts now)

Once the loop has ended the daemon holds these signals until its process exits: a late one
changes nothing (the exit code stays the one the run earned) instead of killing the process
mid-teardown.

`ControlState`'s signal handlers only set flags, append to a deque and write one byte to a
non-blocking self-pipe; they do no other I/O and take no lock. The loop polls at step
boundaries (`step_boundary()` / `poll()`), which is where the pause flag file is written and
where the callbacks that write events rows and runs.paused run.

Why a self-pipe and not threading.Event: Event.set() takes the Event's Condition lock. A Python
signal handler runs in the main thread between two bytecodes, so it can run while that same
thread is inside Event.wait() holding the lock (between `with self._cond:` and the release
inside Condition.wait) and then deadlock on a non-reentrant lock. os.write() to a pipe is
async-signal-safe and lock-free, and select() on the read end sleeps without polling.

The pause survives a restart: the flag file <state_dir>/paused is read at start, and the first
poll() reports it as a pause event (so runs.paused and the events table agree with it).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from dreamd.errors import UsageError
from dreamd.files import fsync_path, write_atomic

PIDFILE_NAME = "dreamd.pid"
PAUSE_FLAG_NAME = "paused"

SIGNAL_ACTIONS: dict[signal.Signals, str] = {
    signal.SIGUSR1: "pause",
    signal.SIGUSR2: "resume",
    signal.SIGHUP: "reload",
    signal.SIGTERM: "stop",
    signal.SIGINT: "stop",
}


# ---------------------------------------------------------------------------------------------
# events and the pause flag


@dataclass(frozen=True)
class ControlEvent:
    """One control request as applied by the loop; the lead stores it as an events row."""

    kind: str
    """'pause', 'resume', 'reload' or 'stop'."""
    source: str
    """Who asked: a signal name ('SIGUSR1'), 'pause flag' (restored after a restart), or the
    `source` given to request_pause()/request_resume()."""
    received_at: float
    """Epoch seconds when the request arrived (in the handler); applied later, at a boundary."""
    changed: bool = True
    """False when it changed nothing (a pause while already paused)."""

    @property
    def detail(self) -> dict[str, object]:
        """The events row's detail: who asked, when it arrived, whether it changed anything."""
        when = datetime.fromtimestamp(self.received_at, timezone.utc).isoformat(timespec="seconds")
        return {"requested_by": self.source, "requested_at": when, "changed": self.changed}


@dataclass(frozen=True)
class PauseRecord:
    paused_at: str
    """ISO-8601 UTC time the pause was applied."""
    source: str
    """What paused the run (e.g. 'SIGUSR1')."""
    applied: bool = True
    """False while only requested: `dreamd pause` writes the request before it signals the
    daemon, which applies it at the next step boundary and rewrites the file (applied)."""


class PauseFlag:
    """The file <state_dir>/paused: present while the run is paused, so a pause outlives a
    restart. Written by the loop (never by a signal handler); readable by `dreamd status`."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / PAUSE_FLAG_NAME

    def read(self) -> PauseRecord | None:
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
            return PauseRecord(paused_at=str(data["paused_at"]), source=str(data["source"]),
                               applied=data.get("applied", True) is not False)
        except (ValueError, KeyError, TypeError):
            # Someone touched the file by hand: it still means "paused".
            return PauseRecord(paused_at="unknown", source=f"hand-made {self.path}")

    def set(self, source: str, at: float | None = None, applied: bool = True) -> None:
        stamp = datetime.fromtimestamp(time.time() if at is None else at, timezone.utc)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps({"paused_at": stamp.isoformat(timespec="seconds"),
                                             "source": source, "applied": applied}) + "\n")
        owner = self.path.parent.stat()
        if os.geteuid() == 0 and owner.st_uid != 0:
            # `dreamd pause` run as root in the service user's state dir: the flag stays the
            # service user's, so the daemon can clear it on `dreamd resume`.
            os.chown(self.path, owner.st_uid, owner.st_gid)

    def clear(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        fsync_path(self.path.parent)


# ---------------------------------------------------------------------------------------------
# the flags the loop polls


class ControlState:
    """Flags set by signal handlers, applied by the loop at step boundaries.

    Typical loop:

        control = ControlState(state_dir, on_event=store_event, on_pause_change=set_runs_paused)
        control.install()
        while True:
            control.step_boundary(heartbeat=lambda: notifier.progress())
            if control.should_stop:
                break
            train_one_step()
        checkpoint(); commit()                         # then exit 0
    """

    def __init__(self, state_dir: Path | None = None, *,
                 on_event: Callable[[ControlEvent], None] | None = None,
                 on_pause_change: Callable[[bool, ControlEvent], None] | None = None):
        self.pause_flag = PauseFlag(state_dir) if state_dir is not None else None
        self.on_event = on_event
        self.on_pause_change = on_pause_change
        # deque.append/popleft are atomic in CPython and take no Python-level lock: safe from a
        # signal handler.
        self._pending: deque[tuple[str, str, float]] = deque()
        self._paused = False
        self._pause_requested = False
        self._stop = False
        self._stop_source: str | None = None
        self._reload = False
        self._installed: dict[signal.Signals, object] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        record = self.pause_flag.read() if self.pause_flag is not None else None
        if record is not None:
            self._pending.append(("pause", "pause flag", time.time()))

    # ---- the handler side (flags only) ------------------------------------------------------
    def install(self) -> None:
        """Install the handlers (main thread only, as Python requires)."""
        for sig in SIGNAL_ACTIONS:
            self._installed[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, previous in self._installed.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._installed.clear()

    def _handle(self, signum: int, _frame: object) -> None:
        sig = signal.Signals(signum)
        action = SIGNAL_ACTIONS[sig]
        if action == "stop":
            if sig == signal.SIGINT and self._stop:
                raise KeyboardInterrupt  # Ctrl-C twice: the user wants out now
            self._stop = True
            self._stop_source = self._stop_source or sig.name
        elif action == "reload":
            self._reload = True
        elif action in ("pause", "resume"):
            self._pause_requested = action == "pause"
        self._pending.append((action, sig.name, time.time()))
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass  # pipe full: a wake-up is already pending

    # ---- requests from code (CLI-less tests, an admin thread) -------------------------------
    def request_pause(self, source: str = "api") -> None:
        self._pause_requested = True
        self._pending.append(("pause", source, time.time()))
        self._wake()

    def request_resume(self, source: str = "api") -> None:
        self._pause_requested = False
        self._pending.append(("resume", source, time.time()))
        self._wake()

    def request_stop(self, source: str = "api") -> None:
        self._stop = True
        self._stop_source = self._stop_source or source
        self._pending.append(("stop", source, time.time()))
        self._wake()

    # ---- what the loop reads ----------------------------------------------------------------
    @property
    def should_stop(self) -> bool:
        """True once SIGTERM/SIGINT arrived: finish the step, checkpoint, commit, exit 0."""
        return self._stop

    @property
    def stop_source(self) -> str | None:
        return self._stop_source

    @property
    def paused(self) -> bool:
        """The applied pause state (changes only in poll(), i.e. at a step boundary)."""
        return self._paused

    @property
    def pause_requested(self) -> bool:
        """A pause arrived and is not applied yet: it takes effect at the next step boundary
        (the next optimizer step, or the next cycle's start); `dreamd status` says so meanwhile."""
        return self._pause_requested and not self._paused

    @property
    def reload_requested(self) -> bool:
        return self._reload

    def take_reload(self) -> bool:
        """True once per SIGHUP burst: the caller reloads the config now (at a cycle start)."""
        requested, self._reload = self._reload, False
        return requested

    def poll(self) -> list[ControlEvent]:
        """Apply every pending request in arrival order; call on_event for each, and
        on_pause_change when the pause state flips. Call this only at a step boundary."""
        events: list[ControlEvent] = []
        while self._pending:
            kind, source, received = self._pending.popleft()
            changed = True
            if kind in ("pause", "resume"):
                self._pause_requested = False
                want = kind == "pause"
                changed = want != self._paused
                if changed:
                    self._paused = want
                    if self.pause_flag is None:
                        pass
                    elif not want:
                        self.pause_flag.clear()
                    elif source != "pause flag":
                        self.pause_flag.set(source, received)
                    elif (record := self.pause_flag.read()) is not None and not record.applied:
                        # a request `dreamd pause` wrote before a restart: applied now, its record kept
                        self.pause_flag.set(record.source, received)
            event = ControlEvent(kind=kind, source=source, received_at=received, changed=changed)
            events.append(event)
            if self.on_event is not None:
                self.on_event(event)
            if changed and kind in ("pause", "resume") and self.on_pause_change is not None:
                self.on_pause_change(self._paused, event)
        return events

    def sleep(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking early when any signal or request arrives.
        Returns True when woken early. Does not apply the request: call poll() after."""
        deadline = time.monotonic() + max(0.0, seconds)
        while True:
            self._drain_wake()
            if self._pending or self._stop:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            select.select([self._wake_r], [], [], remaining)

    def wait_while_paused(self, timeout: float | None = None) -> bool:
        """Block while paused, up to `timeout` seconds (None: until resumed or stopped).
        Applies requests as they arrive; wakes at once for resume and stop.
        Returns True when still paused (the timeout ran out)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.poll()
        while self._paused and not self._stop:
            remaining = 3600.0 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                break
            self.sleep(remaining)
            self.poll()
        return self._paused and not self._stop

    def step_boundary(self, heartbeat: Callable[[], object] | None = None,
                      heartbeat_every: float = 1.0) -> list[ControlEvent]:
        """Call between two steps: apply requests, then block while paused. `heartbeat` runs
        before each wait (e.g. sd_notify WATCHDOG=1 + STATUS=paused), so a paused daemon keeps
        its watchdog fed for as long as its loop is alive."""
        events = self.poll()
        while self._paused and not self._stop:
            if heartbeat is not None:
                heartbeat()
            self.sleep(heartbeat_every)
            events.extend(self.poll())
        return events

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def close(self, *, process_exits: bool = False) -> None:
        """Put back the handlers install() replaced. With `process_exits` (the daemon's own
        process, about to exit), hold the signals instead, swapped in one call per signal so
        no default action is ever armed: a stop, pause or reload that arrives during teardown
        has nothing left to act on, and the default actions of SIGTERM and SIGUSR1 would kill
        the exiting process (exit -15 after a clean stop). Ctrl-C twice still aborts."""
        if process_exits:
            for sig in self._installed:
                signal.signal(sig, self._handle_late)
            self._installed.clear()
        else:
            self.uninstall()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def _handle_late(self, signum: int, _frame: object) -> None:
        if SIGNAL_ACTIONS[signal.Signals(signum)] == "stop":
            if signum == signal.SIGINT and self._stop:
                raise KeyboardInterrupt
            self._stop = True


# ---------------------------------------------------------------------------------------------
# pidfile and finding the running daemon


def looks_like_dreamd(argv: list[str]) -> bool:
    """True when a command line is a dreamd process: some argument's base name starts with
    'dreamd' (the `dreamd` script, `python -m dreamd`, a dreamd*.py entry point)."""
    return any(os.path.basename(arg).startswith("dreamd") for arg in argv)


def process_cmdline(pid: int) -> list[str] | None:
    """argv of a live process from /proc, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user (the dreamd service user)
    return True


class DaemonNotRunning(UsageError):
    """No live dreamd for this state dir (no pidfile, or a stale one)."""


@dataclass(frozen=True)
class DaemonStatus:
    state_dir: Path
    pid: int | None
    """The pid of the running daemon; None when none runs."""
    stale_pid: int | None = None
    """A pid found in the pidfile that is not a live dreamd."""
    stale_reason: str = ""
    paused: PauseRecord | None = None
    """The pause flag, whether or not the daemon runs (it applies at the next start)."""

    @property
    def running(self) -> bool:
        return self.pid is not None


def daemon_status(state_dir: Path) -> DaemonStatus:
    """Read the pidfile and pause flag of `state_dir`. A pidfile is stale when its pid is dead,
    or alive but not a dreamd command line (the pid was reused after a crash or reboot)."""
    state_dir = Path(state_dir)
    paused = PauseFlag(state_dir).read()
    try:
        text = (state_dir / PIDFILE_NAME).read_text().strip()
    except FileNotFoundError:
        return DaemonStatus(state_dir, None, paused=paused)
    if not text.isdigit():
        return DaemonStatus(state_dir, None, None, f"pidfile holds {text!r}, not a pid", paused)
    pid = int(text)
    if not pid_alive(pid):
        return DaemonStatus(state_dir, None, pid, f"pid {pid} is not running", paused)
    argv = process_cmdline(pid)
    if argv is None or not looks_like_dreamd(argv):
        shown = " ".join(argv or [])[:80]
        return DaemonStatus(state_dir, None, pid, f"pid {pid} is not dreamd ({shown!r})", paused)
    return DaemonStatus(state_dir, pid, paused=paused)


def signal_daemon(state_dir: Path, sig: int | signal.Signals) -> int:
    """Send `sig` to the main process of the dreamd that owns `state_dir`; returns its pid.
    Raises DaemonNotRunning / UsageError (one line: what, where, how to fix)."""
    status = daemon_status(state_dir)
    pidfile = Path(state_dir) / PIDFILE_NAME
    if status.pid is None:
        why = status.stale_reason or "no pidfile"
        raise DaemonNotRunning(f"no running dreamd for {state_dir} ({why}, {pidfile}); start it "
                               "with `systemctl start dreamd` or `dreamd run`, or check run.state_dir")
    try:
        os.kill(status.pid, sig)
    except PermissionError:
        name = signal.Signals(sig).name
        raise UsageError(f"not allowed to signal dreamd pid {status.pid} (owned by another "
                         f"user); run as root or the service user, or use `systemctl kill "
                         f"--kill-whom=main -s {name.removeprefix('SIG')} dreamd`") from None
    return status.pid


class Pidfile:
    """<state_dir>/dreamd.pid holding the main pid, locked with flock for the daemon's life.

    The lock makes acquiring race-free (two `dreamd run` on one state dir: the second gets
    UsageError); an unlocked pidfile left by a crash is simply overwritten.
    """

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / PIDFILE_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                holder = daemon_status(self.path.parent)
                who = f"pid {holder.pid}" if holder.pid else "a process"
                raise UsageError(f"another dreamd ({who}) is running on {self.path.parent} (its "
                                 f"pidfile {self.path} is locked); stop it first "
                                 "(`systemctl stop dreamd`) or use another run.state_dir") from None
            # The holder may have unlinked the file between our open and flock: then we locked
            # an orphan inode. Retry until the locked inode is the one at the path.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing drops the lock
        self._fd = None

    def __enter__(self) -> Pidfile:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
