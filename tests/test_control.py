"""Signals, pause flag, pidfile and SIGHUP reload rules, with a REAL child process that runs a step loop.

The child installs dreamd's handlers, takes the pidfile and loops "steps" (a sleep, so signals
arrive mid-step); it prints one JSON line per event. CLOCK_MONOTONIC is system-wide on Linux, so
the child's timestamps and the parent's send times are comparable: the tests check that a
signal sent mid-step is applied only after that step ends.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dreamd.config import Config
from dreamd.config_file import load_config
from dreamd.errors import UsageError
from dreamd.service.control import (ControlState, DaemonNotRunning, PauseFlag, Pidfile,
                                    daemon_status, looks_like_dreamd, signal_daemon)
from dreamd.service.reload import (LIVE_FIELDS, REFUSAL_REASONS, diff_reloadable, is_live,
                                   refusal_reason, reload_config)

REPO = Path(__file__).resolve().parents[1]
STEP_S = 0.3

CHILD = r'''
import json, os, sys, time
from pathlib import Path
from dreamd.service.control import ControlState, Pidfile
from dreamd.service.notify import SystemdNotifier

state_dir, step_s = Path(sys.argv[1]), float(sys.argv[2])

def say(kind, **kw):
    print(json.dumps({"t": time.monotonic(), "kind": kind, **kw}), flush=True)

notifier = SystemdNotifier()
control = ControlState(
    state_dir,
    on_event=lambda e: say("event", event=e.kind, source=e.source, changed=e.changed),
    on_pause_change=lambda paused, e: say("paused" if paused else "resumed"))
control.install()

def heartbeat():
    notifier.progress()
    notifier.status("paused")

with Pidfile(state_dir):
    notifier.ready()
    say("ready", pid=os.getpid())
    step = 0
    while True:
        control.step_boundary(heartbeat=heartbeat, heartbeat_every=0.05)
        if control.should_stop:
            break
        if control.take_reload():
            say("reload")
        say("step_start", step=step)
        time.sleep(step_s)          # the step; handlers run during it but only set flags
        say("step_end", step=step)
        notifier.progress()
        step += 1
    say("checkpoint", step=step)
    notifier.stopping()
control.close(process_exits=True)
say("exit")
time.sleep(float(os.environ.get("TEARDOWN_S", "0")))   # a daemon's teardown: engine, store, torch
'''


class Child:
    """A running step-loop child and the JSON lines it printed."""

    def __init__(self, tmp_path: Path, state_dir: Path, env: dict[str, str] | None = None):
        script = tmp_path / "dreamd_step_loop.py"  # its name makes /proc/<pid>/cmdline look like dreamd
        script.write_text(CHILD)
        inherited = {k: v for k, v in os.environ.items()
                     if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        full_env = {**inherited, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, str(script), str(state_dir), str(STEP_S)],
                                     stdout=subprocess.PIPE, text=True, env=full_env)
        self.records: list[dict] = []
        self._queue: queue.Queue[dict | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(json.loads(line))
        self._queue.put(None)

    def wait_for(self, kind: str, timeout: float = 15.0, **match: object) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"child never printed {kind} {match}; got {self.records[-8:]}")
            try:
                rec = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if rec is None:
                raise AssertionError(f"child ended before {kind} {match}; got {self.records[-8:]}")
            self.records.append(rec)
            if rec["kind"] == kind and all(rec.get(k) == v for k, v in match.items()):
                return rec

    def since(self, t: float) -> list[dict]:
        return [r for r in self.records if r["t"] > t]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def children():
    started: list[Child] = []
    yield started
    for child in started:
        child.stop()


def _send_mid_step(child: Child, sig: signal.Signals) -> tuple[dict, float]:
    """Wait for a step to start, send `sig` at once; return (step_start record, send time)."""
    start = child.wait_for("step_start")
    sent = time.monotonic()
    os.kill(child.proc.pid, sig)
    assert sent < start["t"] + STEP_S, "signal was not sent while the step ran"
    return start, sent


def test_pause_resume_reload_stop_with_real_signals(tmp_path, children):
    state_dir = tmp_path / "state"
    sock_path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(sock_path))
    receiver.settimeout(5.0)
    # WatchdogSec = 0.2 s: the paused loop must keep pinging.
    child = Child(tmp_path, state_dir, env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "200000"})
    children.append(child)
    ready = child.wait_for("ready")
    assert receiver.recv(4096) == b"READY=1"

    # The pidfile names the child; a second daemon on the same state dir is refused.
    status = daemon_status(state_dir)
    assert status.running and status.pid == ready["pid"] == child.proc.pid
    with pytest.raises(UsageError, match=f"pid {child.proc.pid}"):
        Pidfile(state_dir).acquire()

    # SIGHUP: noted by the handler, taken at the next boundary; steps go on.
    _send_mid_step(child, signal.SIGHUP)
    child.wait_for("reload")
    child.wait_for("step_end")

    # SIGUSR1 mid-step: that step finishes, then the loop pauses.
    start, sent = _send_mid_step(child, signal.SIGUSR1)
    end = child.wait_for("step_end", step=start["step"])
    paused = child.wait_for("paused")
    assert start["t"] < sent < end["t"] <= paused["t"]
    assert PauseFlag(state_dir).read() is not None
    assert daemon_status(state_dir).paused.source == "SIGUSR1"

    # While paused: no steps, but WATCHDOG=1 and STATUS=paused keep coming.
    t_pause = time.monotonic()
    messages = []
    while time.monotonic() < t_pause + 0.6:
        messages.append(receiver.recv(4096).decode())
    assert sum(m == "WATCHDOG=1" for m in messages) >= 3, messages
    assert "STATUS=paused" in messages
    assert not [r for r in child.since(paused["t"]) if r["kind"] == "step_start"]

    # SIGUSR2 through the pidfile, as `dreamd resume` does it.
    assert signal_daemon(state_dir, signal.SIGUSR2) == child.proc.pid
    resumed = child.wait_for("resumed")
    child.wait_for("step_start")
    assert PauseFlag(state_dir).read() is None
    no_steps = [r for r in child.since(paused["t"]) if r["kind"] == "step_start" and r["t"] < resumed["t"]]
    assert no_steps == []

    # SIGTERM mid-step: finish the step, checkpoint, exit 0.
    start, sent = _send_mid_step(child, signal.SIGTERM)
    end = child.wait_for("step_end", step=start["step"])
    ckpt = child.wait_for("checkpoint")
    child.wait_for("exit")
    assert child.proc.wait(10) == 0
    assert sent < end["t"] <= ckpt["t"] and ckpt["step"] == start["step"] + 1
    assert not [r for r in child.since(sent) if r["kind"] == "step_start"]
    assert not (state_dir / "dreamd.pid").exists()
    receiver.close()


def test_pause_survives_restart_and_stop_wakes_a_paused_loop(tmp_path, children):
    state_dir = tmp_path / "state"
    first = Child(tmp_path, state_dir)
    children.append(first)
    first.wait_for("ready")
    _send_mid_step(first, signal.SIGUSR1)
    first.wait_for("paused")
    sent = time.monotonic()
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(10) == 0
    assert time.monotonic() - sent < 2.0, "a paused loop must wake for SIGTERM at once"
    assert PauseFlag(state_dir).read().source == "SIGUSR1"

    second = Child(tmp_path, state_dir)
    children.append(second)
    second.wait_for("ready")
    restored = second.wait_for("event", event="pause")
    assert restored["source"] == "pause flag"
    paused = second.wait_for("paused")
    time.sleep(0.6)
    assert signal_daemon(state_dir, signal.SIGUSR2) == second.proc.pid
    resumed = second.wait_for("resumed")
    first_step = second.wait_for("step_start")
    assert paused["t"] < resumed["t"] < first_step["t"]
    assert resumed["t"] - paused["t"] >= 0.5  # no step ran during the restored pause
    assert PauseFlag(state_dir).read() is None
    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(10) == 0


@pytest.mark.parametrize("late", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGINT],
                         ids=lambda s: s.name)
def test_a_signal_during_teardown_leaves_the_exit_code_alone(tmp_path, children, late):
    """After the loop ends the process tears down (engine, store, torch): a stop, pause or
    reload sent then has nothing to act on. It must not kill the process with its default
    action (-15 after a clean stop, -10 for a late `dreamd pause`)."""
    child = Child(tmp_path, tmp_path / "state", env={"TEARDOWN_S": "2"})
    children.append(child)
    child.wait_for("ready")
    _send_mid_step(child, signal.SIGINT if late == signal.SIGINT else signal.SIGTERM)
    child.wait_for("exit")                      # the handlers are held; teardown sleeps 2 s
    child.proc.send_signal(late)
    assert child.proc.wait(10) == (-signal.SIGINT if late == signal.SIGINT else 0)


def test_stale_pidfiles_are_detected(tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    with pytest.raises(DaemonNotRunning, match="no pidfile"):
        signal_daemon(state_dir, signal.SIGUSR1)

    dead = subprocess.Popen(["true"])
    dead.wait()
    (state_dir / "dreamd.pid").write_text(f"{dead.pid}\n")
    status = daemon_status(state_dir)
    assert not status.running and status.stale_pid == dead.pid and "not running" in status.stale_reason
    with pytest.raises(DaemonNotRunning, match="not running"):
        signal_daemon(state_dir, signal.SIGUSR1)

    # A live process that is not dreamd (the pid was reused): never signalled.
    other = subprocess.Popen(["sleep", "30"])
    try:
        (state_dir / "dreamd.pid").write_text(f"{other.pid}\n")
        status = daemon_status(state_dir)
        assert not status.running and "not dreamd" in status.stale_reason
        with pytest.raises(DaemonNotRunning):
            signal_daemon(state_dir, signal.SIGUSR1)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()

    (state_dir / "dreamd.pid").write_text("garbage")
    assert "not a pid" in daemon_status(state_dir).stale_reason

    # A stale (unlocked) pidfile is taken over.
    with Pidfile(state_dir):
        assert (state_dir / "dreamd.pid").read_text() == f"{os.getpid()}\n"
    assert not (state_dir / "dreamd.pid").exists()


def test_looks_like_dreamd():
    assert looks_like_dreamd(["/opt/dreamd/.venv/bin/python", "/opt/dreamd/.venv/bin/dreamd", "run"])
    assert looks_like_dreamd(["python3", "-m", "dreamd", "run"])
    assert not looks_like_dreamd(["sleep", "30"])
    assert not looks_like_dreamd(["/usr/bin/python3", "/srv/other/train.py"])


def test_poll_applies_requests_in_order_and_reports_each(tmp_path):
    events, flips = [], []
    control = ControlState(tmp_path, on_event=events.append,
                           on_pause_change=lambda paused, e: flips.append(paused))
    try:
        control.request_pause("SIGUSR1")
        control.request_pause("SIGUSR1")
        assert not control.paused and control.pause_requested  # nothing applies before a boundary
        control.poll()
        assert control.paused and not control.pause_requested and flips == [True]
        assert [e.changed for e in events] == [True, False]
        assert events[1].detail["changed"] is False and events[1].detail["requested_by"] == "SIGUSR1"
        # Pause and resume inside one step: both are recorded, the net state is running.
        control.request_resume("SIGUSR2")
        control.request_pause("SIGUSR1")
        control.request_resume("SIGUSR2")
        control.poll()
        assert not control.paused and flips == [True, False, True, False]
        assert [e.kind for e in events[2:]] == ["resume", "pause", "resume"]
        assert PauseFlag(tmp_path).read() is None
    finally:
        control.close()


def test_wait_while_paused_wakes_for_resume_and_stop(tmp_path):
    control = ControlState(tmp_path)
    try:
        control.request_pause()
        control.poll()
        assert control.wait_while_paused(timeout=0.1) is True  # times out, still paused
        threading.Timer(0.2, control.request_resume).start()
        t0 = time.monotonic()
        assert control.wait_while_paused(timeout=10) is False
        assert 0.15 < time.monotonic() - t0 < 2.0
        control.request_pause()
        control.poll()
        threading.Timer(0.2, control.request_stop).start()
        t0 = time.monotonic()
        assert control.wait_while_paused(timeout=10) is False
        assert control.should_stop and time.monotonic() - t0 < 2.0
    finally:
        control.close()


def test_real_signals_in_process_sleep_reload_and_double_ctrl_c(tmp_path):
    before = signal.getsignal(signal.SIGINT)   # not always Python's default: a background job ignores SIGINT
    control = ControlState(tmp_path)
    control.install()
    try:
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGHUP)).start()
        t0 = time.monotonic()
        assert control.sleep(10) is True  # woken by the signal, not the timeout
        assert time.monotonic() - t0 < 2.0
        assert control.take_reload() and not control.take_reload()
        assert [e.kind for e in control.poll()] == ["reload"]

        os.kill(os.getpid(), signal.SIGINT)
        assert control.should_stop and control.stop_source == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        control.close()
    assert signal.getsignal(signal.SIGINT) is before      # close() puts back what was there


# ---------------------------------------------------------------------------------------------
# SIGHUP reload rules

BASE_TOML = """
[run]
state_dir = "state"
[model]
path = "model"
[mix]
general_share = 0.25
[train]
lr = 1e-5
lr_max = 1e-4
[optimizer]
rank = 128
"""


def test_diff_reloadable_applies_live_fields_and_refuses_the_rest(tmp_path):
    path = tmp_path / "dreamd.toml"
    path.write_text(BASE_TOML)
    old = load_config(path, environ={})
    path.write_text(BASE_TOML.replace("general_share = 0.25", "general_share = 0.4")
                    .replace("lr_max = 1e-4", "lr_max = 5e-5").replace("lr = 1e-5", "lr = 2e-5")
                    .replace('path = "model"', 'path = "other-model"').replace("rank = 128", "rank = 64")
                    + '[schedule]\nwindows = ["01:00-06:00"]\n')
    new = load_config(path, environ={})
    applied, refused = diff_reloadable(old, new)
    assert applied == {"mix.general_share": (0.25, 0.4), "train.lr_max": (1e-4, 5e-5),
                       "schedule.windows": ([], ["01:00-06:00"])}
    assert set(refused) == {"model.path", "optimizer.rank", "train.lr"}
    assert "loaded once at start" in refused["model.path"]
    assert "exact resume" in refused["optimizer.rank"]
    assert "change those instead" in refused["train.lr"]

    result = reload_config(old, environ={})
    assert result.error is None and result.applied == applied and result.refused == refused
    assert result.config.mix.general_share == 0.4 and result.config.schedule.windows == ["01:00-06:00"]
    assert result.config.model.path == old.model.path and result.config.optimizer.rank == 128
    assert result.config.train.lr == 1e-5 and result.config.source == old.source
    assert "applied mix.general_share: 0.25 -> 0.4" in result.summary()


def test_reload_of_a_broken_file_keeps_the_running_config(tmp_path):
    path = tmp_path / "dreamd.toml"
    path.write_text(BASE_TOML)
    old = load_config(path, environ={})
    path.write_text("[mix\ngeneral_share = ")
    result = reload_config(old, environ={})
    assert result.config is old and "not valid TOML" in result.error
    path.write_text("[mix]\ngeneral_share = 0.1\n")  # below the 0.25 floor
    result = reload_config(old, environ={})
    assert result.config is old and "mix.general_share" in result.error
    assert result.summary().startswith("reload failed, config unchanged")


def test_every_field_is_either_live_or_has_a_specific_refusal_reason():
    for section, model in Config.model_fields.items():
        if model.exclude:
            continue
        for name in model.annotation.model_fields:
            dotted = f"{section}.{name}"
            if not is_live(dotted):
                assert refusal_reason(dotted) in REFUSAL_REASONS.values(), (
                    f"{dotted}: decide whether it can change on SIGHUP (add it to LIVE_FIELDS) "
                    "or give a reason in REFUSAL_REASONS")
    for pattern in LIVE_FIELDS:  # the live list names real fields only
        section, _, name = pattern.partition(".")
        assert section in Config.model_fields, pattern
        assert name == "*" or name in Config.model_fields[section].annotation.model_fields, pattern


def test_a_pause_request_written_before_a_restart_is_applied_and_marked(tmp_path):
    """`dreamd pause` writes its request into the flag (applied: false) before it signals; a
    daemon that starts with such a flag pauses, and the flag then says applied, by whom asked."""
    PauseFlag(tmp_path).set("dreamd pause", applied=False)
    assert PauseFlag(tmp_path).read().applied is False
    control = ControlState(tmp_path)
    try:
        control.poll()
        record = PauseFlag(tmp_path).read()
        assert control.paused and record.applied and record.source == "dreamd pause"
    finally:
        control.close()
