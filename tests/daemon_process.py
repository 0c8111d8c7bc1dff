"""A real `dreamd run` process for the service tests (test_daemon, test_faults,
test_resume_exact, test_status_cli): start it, watch its status file, its store and a real
sd_notify socket, signal it, and run the `dreamd` CLI against it.

Every subprocess runs with OMP_NUM_THREADS=1: on the 2-core CI box a tiny-model cycle takes
~0.6 s single-threaded but 13-28 s with torch's default 2 threads while other tests also run
(measured: oversubscribed OpenMP threads spin-wait for each other). Both runs of the exact-resume
test must use the same thread count anyway: float sums reduce in a thread-dependent order.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from dreamd.config_file import load_config, to_toml
from dreamd.status import read_status
from dreamd.store import Store

# Small cycles: 8 examples in 2 batches of 4, cheap evaluation (see tests/test_cycle.py).
FAST_FIELDS: dict[str, Any] = {
    "mix.examples_per_cycle": 8,
    "eval.arithmetic_n": 4,
    "eval.perplexity_max_tokens": 256,
}



def write_config(setup_dir: Path, path: Path, state_dir: Path, **fields: Any) -> Path:
    """A config file for one test: the `dreamd init` config with absolute paths, FAST_FIELDS,
    and `fields` given as section__name=value (e.g. mix__examples_per_cycle=16). Everything
    lives in the file (no DREAMD_* env), so a SIGHUP reload sees edits to it."""
    cfg = load_config(setup_dir / "dreamd.toml", environ={})
    cfg.model.path = (setup_dir / "model").resolve()
    cfg.run.state_dir = Path(state_dir).resolve()
    updates = {**FAST_FIELDS, **{k.replace("__", "."): v for k, v in fields.items()}}
    for dotted, value in updates.items():
        section, name = dotted.split(".")
        setattr(getattr(cfg, section), name, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(cfg))
    load_config(path, environ={})  # the file must load as written
    return path


def child_env(**extra: str) -> dict[str, str]:
    """os.environ without DREAMD_* / systemd variables of the outer shell, plus JSON logs."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DREAMD_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env.update(DREAMD_LOG_FORMAT="json", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def cli(config: Path, *args: str, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m dreamd <args> --config <config>`; output captured as text."""
    cmd = [sys.executable, "-m", "dreamd", args[0], "--config", str(config), *args[1:]]
    return subprocess.run(cmd, env=env or child_env(), capture_output=True, text=True, timeout=timeout,
                          check=False)


def cli_status(config: Path) -> dict[str, Any]:
    done = cli(config, "status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.01) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def store_rows(url: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    store = Store.open(url)
    try:
        with store.read() as s:
            return [dict(r) for r in s.execute(text(sql), params).mappings()]
    finally:
        store.close()


def sqlite_url(state_dir: Path) -> str:
    return f"sqlite:///{Path(state_dir) / 'dreamd.sqlite'}"


# ---------------------------------------------------------------------------------------------
# sd_notify receiver


class NotifySocket:
    """A bound abstract AF_UNIX datagram socket standing in for systemd's $NOTIFY_SOCKET
    (abstract: no 108-byte path limit under pytest's long tmp paths). A thread reads it all the
    time, as systemd does: Linux queues only net.unix.max_dgram_qlen (10) datagrams, after which
    the daemon's non-blocking sends fail with EAGAIN."""

    def __init__(self) -> None:
        self.name = f"dreamd-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def env_value(self) -> str:
        return "@" + self.name

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, OSError):
                continue
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def drain(self) -> list[tuple[float, dict[str, str]]]:
        """Every message received so far: (monotonic time, fields)."""
        with self._lock:
            return list(self.messages)

    def has(self, key: str, value: str | None = None) -> bool:
        return any(key in f and (value is None or f[key] == value) for _, f in self.drain())

    def values(self, key: str) -> list[str]:
        return [f[key] for _, f in self.drain() if key in f]

    def close(self) -> None:
        self._closed.set()
        self._reader.join()
        self.sock.close()


# ---------------------------------------------------------------------------------------------
# the daemon process


@dataclass
class DaemonProcess:
    """One `dreamd run --config CONFIG [args]` child; stdout+stderr go to a log file."""

    config: Path
    state_dir: Path
    log_path: Path
    args: tuple[str, ...] = ("--now",)
    env: dict[str, str] = field(default_factory=child_env)
    popen_kwargs: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        cmd = [sys.executable, "-m", "dreamd", "run", "--config", str(self.config), *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         **self.popen_kwargs)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict[str, Any]:
        """The daemon's status file (written at phase changes and step boundaries), {} if none."""
        return read_status(self.state_dir) or {}

    def wait_status(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict:
        def check() -> dict | None:
            if not self.alive():
                raise AssertionError(f"dreamd exited with {self.proc.returncode} while waiting for "
                                     f"{what}:\n{self.log_tail()}")
            st = self.status()
            # Only this process's status file counts (the file outlives a stopped daemon).
            return st if st.get("pid") == self.pid and predicate(st) else None
        return wait_until(check, timeout, what)

    def wait_ready(self, timeout: float = 180) -> dict:
        """Until READY=1 (phase 'ready' or later). A new run's start includes its own baseline
        evaluation (status says 'starting: baseline evaluation: ...'; it once showed phase
        'evaluate', which passed for ready), so on the shared 2-core box this takes longer."""
        return self.wait_status(lambda st: st.get("phase") not in (None, "starting"), timeout, "startup")

    def send(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 90) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"dreamd did not exit within {timeout} s:\n{self.log_tail()}") from None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines (non-JSON lines, e.g. library warnings, are skipped)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return out

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"
