"""The real `dreamd run` process end to end: signals sent by `dreamd pause|resume` and by hand,
sd_notify messages on a real socket, SIGHUP reload, graceful stop, the pidfile lock.

Each test starts `python -m dreamd run` on a tiny llama model with a real SQLite store and talks
to it only the way an operator would: the CLI, signals, the status file, the store.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import time

import pytest

from dreamd.evals.suite import CHEAP_PARTS, FULL_PARTS
from dreamd.store.db import head_revision
from tests.daemon_process import (
    DaemonProcess,
    NotifySocket,
    child_env,
    cli,
    cli_status,
    sqlite_url,
    store_rows,
    wait_until,
    write_config,
)

__all__ = ["daemons", "setup_dir"]  # fixtures used below


def max_step(url: str) -> int | None:
    return store_rows(url, "SELECT MAX(step) AS m FROM train_steps WHERE status = 'active'")[0]["m"]


def events(url: str, kind: str | None = None) -> list[dict]:
    """events rows, each detail a JSON object (every kind: docs/sql.md), parsed."""
    sql = "SELECT kind, detail FROM events" + (" WHERE kind = :k" if kind else "") + " ORDER BY id"
    rows = store_rows(url, sql, **({"k": kind} if kind else {}))
    return [{**r, "detail": json.loads(r["detail"])} for r in rows]


@pytest.fixture
def notify() -> NotifySocket:
    sock = NotifySocket()
    yield sock
    sock.close()


@pytest.mark.slow
def test_pause_resume_stop_through_the_cli_with_sd_notify(setup_dir, tmp_path, daemons, notify):
    state = tmp_path / "state"
    config = write_config(setup_dir, tmp_path / "dreamd.toml", state, mix__examples_per_cycle=16)
    url = sqlite_url(state)
    env = child_env(NOTIFY_SOCKET=notify.env_value, WATCHDOG_USEC="2000000")  # pings every 0.5 s
    d = DaemonProcess(config, state, tmp_path / "daemon.log", env=env).start()
    daemons.append(d)

    # READY=1 comes after migrations and the model load: the store is at head with a run row.
    wait_until(lambda: notify.has("READY", "1"), 90, "READY=1")
    assert store_rows(url, "SELECT version_num FROM alembic_version")[0]["version_num"] == head_revision()
    assert len(store_rows(url, "SELECT id FROM runs WHERE status = 'running'")) == 1
    wait_until(lambda: (max_step(url) or 0) >= 2, 60, "two optimizer steps")

    done = cli(config, "pause")
    assert done.returncode == 0, done.stderr
    assert f"sent SIGUSR1 to pid {d.pid}" in done.stdout          # the main pid, from the pidfile
    st = d.wait_status(lambda s: s["paused"], 30, "paused in the status file")
    # Paused at a step boundary: the step it shows is the last one written, none in flight.
    assert st["phase"] == "paused" and st["step"] == max_step(url)
    frozen = max_step(url)
    paused_at = time.monotonic()
    time.sleep(2.5)
    assert max_step(url) == frozen, "a step ran while paused"
    # WatchdogSec 2 s: while paused the loop pings every 0.5 s (WatchdogSec / 4).
    pings = [t for t, f in notify.drain() if "WATCHDOG" in f and t >= paused_at]
    assert len(pings) >= 3 and max(b - a for a, b in itertools.pairwise(pings)) < 1.5, pings
    # 'cycle 1: paused step 3/4 (loss 7.1)' inside a cycle, 'cycle 2: paused' between two
    assert any(re.fullmatch(r"cycle \d+: paused( step \d+/\d+( \(loss .*\))?)?", v) for v in notify.values("STATUS"))

    status = cli_status(config)
    assert status["daemon"] == "running" and status["pid"] == d.pid
    assert status["paused"] and status["phase"] == "paused" and status["step"] == frozen
    assert status["cycle"] >= 1 and status["run_status"] == "running"
    assert store_rows(url, "SELECT paused FROM runs")[0]["paused"]
    assert events(url, "pause")[-1]["detail"]["requested_by"] == "SIGUSR1"

    done = cli(config, "resume")
    assert done.returncode == 0 and f"sent SIGUSR2 to pid {d.pid}" in done.stdout
    wait_until(lambda: (max_step(url) or 0) > frozen, 60, "training to go on after resume")
    assert not d.status()["paused"] and not store_rows(url, "SELECT paused FROM runs")[0]["paused"]
    assert events(url, "resume")[-1]["detail"]["requested_by"] == "SIGUSR2"

    d.send(signal.SIGTERM)
    assert d.wait() == 0
    assert notify.has("STOPPING", "1")
    phases = {v.split(": ", 1)[-1].split()[0] for v in notify.values("STATUS")}
    assert {"ready", "dream", "train", "evaluate", "checkpoint", "paused", "stopped"} <= phases
    counted = [v for v in notify.values("STATUS") if re.fullmatch(r"cycle \d+: train step \d+/\d+( \(loss .*\))?", v)]
    assert counted, notify.values("STATUS")  # the promised step counter, once per optimizer step
    assert len(notify.values("WATCHDOG")) > len(pings)      # also pinged while training
    assert store_rows(url, "SELECT status FROM runs")[0]["status"] == "stopped"
    assert events(url, "stop")[-1]["detail"]["reason"] == "SIGTERM"
    assert not (state / "dreamd.pid").exists()


@pytest.mark.slow
def test_pause_survives_a_restart_and_shows_in_status(setup_dir, tmp_path, daemons):
    state = tmp_path / "state"
    config = write_config(setup_dir, tmp_path / "dreamd.toml", state)
    url = sqlite_url(state)
    d = DaemonProcess(config, state, tmp_path / "a.log").start()
    daemons.append(d)
    d.wait_ready()
    wait_until(lambda: max_step(url) is not None, 60, "the first step")
    assert cli(config, "pause").returncode == 0
    d.wait_status(lambda s: s["paused"], 30, "paused")
    d.send(signal.SIGTERM)                                   # stop while paused: exit 0
    assert d.wait() == 0

    status = cli_status(config)                              # no daemon: the flag and the store
    assert status["daemon"] == "not running" and status["paused"]
    assert (state / "paused").exists()

    frozen = max_step(url)
    d2 = DaemonProcess(config, state, tmp_path / "b.log").start()
    daemons.append(d2)
    d2.wait_status(lambda s: s["paused"], 90, "paused again after the restart")
    time.sleep(1.0)
    assert max_step(url) == frozen
    assert cli_status(config)["paused"]
    assert events(url, "pause")[-1]["detail"]["requested_by"] == "pause flag"
    assert cli(config, "resume").returncode == 0
    wait_until(lambda: (max_step(url) or 0) > frozen, 60, "training after resume")
    assert not (state / "paused").exists()
    d2.send(signal.SIGINT)                                   # SIGINT stops like SIGTERM
    assert d2.wait() == 0
    assert events(url, "stop")[-1]["detail"]["reason"] == "SIGINT"


@pytest.mark.slow
def test_pause_and_resume_without_a_daemon_decide_the_next_start(setup_dir, tmp_path, daemons):
    state = tmp_path / "state"
    config = write_config(setup_dir, tmp_path / "dreamd.toml", state)
    url = sqlite_url(state)
    done = cli(config, "pause")
    assert done.returncode == 0 and "comes up paused" in done.stdout
    d = DaemonProcess(config, state, tmp_path / "a.log").start()
    daemons.append(d)
    d.wait_status(lambda s: s["paused"] and s["phase"] == "paused", 90, "start paused")
    assert max_step(url) is None                             # not one step trained
    d.send(signal.SIGTERM)
    assert d.wait() == 0
    assert store_rows(url, "SELECT paused FROM runs")[0]["paused"]

    done = cli(config, "resume")
    assert done.returncode == 0 and "comes up running" in done.stdout
    assert not cli_status(config)["paused"]
    d2 = DaemonProcess(config, state, tmp_path / "b.log", args=("--now", "--cycles", "1")).start()
    daemons.append(d2)
    assert d2.wait() == 0, d2.log_tail()                     # one cycle, not held by runs.paused
    assert max_step(url) == 1


@pytest.mark.slow
def test_store_pause_without_the_flag_file_pauses_at_start(setup_dir, tmp_path, daemons):
    """runs.paused set (another state dir on a shared store paused the run): a daemon whose
    own state dir has no flag file still comes up paused."""
    shared = f"sqlite:///{tmp_path / 'shared' / 'dreamd.sqlite'}"
    first = write_config(setup_dir, tmp_path / "a.toml", tmp_path / "state-a", store__url=shared)
    d = DaemonProcess(first, tmp_path / "state-a", tmp_path / "a.log",
                      args=("--now", "--cycles", "1")).start()
    daemons.append(d)
    assert d.wait() == 0, d.log_tail()
    assert cli(first, "pause").returncode == 0               # no daemon: flag file in state-a only
    d = DaemonProcess(first, tmp_path / "state-a", tmp_path / "a2.log").start()
    daemons.append(d)
    d.wait_status(lambda s: s["paused"], 90, "paused by the flag")
    d.send(signal.SIGTERM)
    assert d.wait() == 0
    assert store_rows(shared, "SELECT paused FROM runs")[0]["paused"]

    second = write_config(setup_dir, tmp_path / "b.toml", tmp_path / "state-b", store__url=shared)
    d2 = DaemonProcess(second, tmp_path / "state-b", tmp_path / "b.log").start()
    daemons.append(d2)
    st = d2.wait_status(lambda s: s["paused"], 90, "paused by runs.paused")
    assert st["phase"] == "paused"
    assert events(shared, "pause")[-1]["detail"]["requested_by"] == "store"
    d2.send(signal.SIGTERM)
    assert d2.wait() == 0


@pytest.mark.slow
def test_sighup_applies_live_fields_at_the_next_cycle_and_refuses_the_rest(setup_dir, tmp_path,
                                                                          daemons, notify):
    state = tmp_path / "state"
    config = write_config(setup_dir, tmp_path / "dreamd.toml", state)
    url = sqlite_url(state)
    d = DaemonProcess(config, state, tmp_path / "daemon.log",
                      env=child_env(NOTIFY_SOCKET=notify.env_value)).start()
    daemons.append(d)
    d.wait_ready()
    wait_until(lambda: store_rows(url, "SELECT id FROM cycles WHERE status = 'committed'"), 60,
               "a committed cycle")

    # Live: the cycle size and a screening pattern; refused: the starting lr and the optimizer.
    write_config(setup_dir, config, state, mix__examples_per_cycle=12, train__lr=5e-4,
                 optimizer__rank=8, screen__extra_honesty_patterns=[r"(?i)\bpython\b"])
    d.send(signal.SIGHUP)
    # Two rows: the request as the signal arrived, then what the reload did with each field.
    applied = lambda: [e for e in events(url, "reload") if "applied" in e["detail"]]
    reload = wait_until(applied, 30, "the reload summary events row")[-1]["detail"]["summary"]
    assert events(url, "reload")[0]["detail"]["requested_by"] == "SIGHUP"
    assert "applied mix.examples_per_cycle: 8 -> 12" in reload
    assert "applied screen.extra_honesty_patterns" in reload
    assert re.search(r"refused train\.lr: .*lr_min", reload)
    assert re.search(r"refused optimizer\.rank: .*exact resume", reload)
    wait_until(lambda: notify.has("RELOADING", "1") and notify.has("STATUS", "reloaded"), 30,
               "RELOADING=1 then READY=1 with STATUS=reloaded")

    reload_id = store_rows(url, "SELECT MAX(id) AS i FROM events WHERE kind = 'reload'")[0]["i"]
    after_reload = ("SELECT id FROM cycles WHERE started_at >= (SELECT ts FROM events WHERE id = :i)")
    after = wait_until(lambda: store_rows(url, f"SELECT n_examples, lr FROM cycles WHERE status = "
                                               f"'committed' AND id IN ({after_reload})", i=reload_id),
                       60, "a cycle after the reload")
    assert after[0]["n_examples"] == 12 and after[0]["lr"] == pytest.approx(1e-3)  # lr unchanged
    # ~13% of targets say "python": within a few cycles the new pattern rejects one, and no
    # cycle before the reload rejected anything for it.
    honesty = "SELECT s.id FROM scenarios s WHERE s.reject_reason LIKE 'honesty:%python%' AND s.cycle_id "
    wait_until(lambda: store_rows(url, honesty + f"IN ({after_reload})", i=reload_id), 60,
               "a scenario rejected by the reloaded screening pattern")
    assert not store_rows(url, honesty + f"NOT IN ({after_reload})", i=reload_id)
    d.send(signal.SIGTERM)
    assert d.wait() == 0


def test_second_daemon_on_one_state_dir_is_refused_in_one_line(setup_dir, tmp_path, daemons):
    state = tmp_path / "state"
    config = write_config(setup_dir, tmp_path / "dreamd.toml", state)
    d = DaemonProcess(config, state, tmp_path / "daemon.log").start()
    daemons.append(d)
    d.wait_ready()
    done = cli(config, "run", "--now")
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and f"another dreamd (pid {d.pid})" in err[0], done.stderr
    d.send(signal.SIGTERM)
    assert d.wait() == 0


@pytest.mark.slow
def test_pause_signal_reaches_only_the_main_pid(setup_dir, tmp_path, daemons):
    """`dreamd pause|resume` signal the pid in the pidfile, never its process group: a process
    sharing the daemon's group (as vLLM's workers would) survives SIGUSR1, whose default action
    kills. A pidfile naming a live process that is not dreamd is stale and nobody is signalled."""
    state = tmp_path / "state"
    config = write_config(setup_dir, tmp_path / "dreamd.toml", state)
    d = DaemonProcess(config, state, tmp_path / "daemon.log", popen_kwargs={"process_group": 0}).start()
    daemons.append(d)
    d.wait_ready()
    sibling = subprocess.Popen(["sleep", "120"], process_group=d.pid)
    try:
        assert (state / "dreamd.pid").read_text().strip() == str(d.pid)
        assert cli(config, "pause").returncode == 0
        d.wait_status(lambda s: s["paused"], 30, "paused")
        assert cli(config, "resume").returncode == 0
        d.wait_status(lambda s: not s["paused"], 30, "resumed")
        assert sibling.poll() is None, "SIGUSR1/2 reached another process of the group"
        d.send(signal.SIGTERM)
        assert d.wait() == 0

        (state / "dreamd.pid").write_text(f"{sibling.pid}\n")   # pid reused by a non-dreamd
        status = cli_status(config)
        assert status["daemon"] == "not running"
        done = cli(config, "pause")
        assert done.returncode == 0 and "no daemon running" in done.stdout
        time.sleep(0.2)
        assert sibling.poll() is None
    finally:
        sibling.kill()
        sibling.wait()


def test_second_daemon_on_one_run_in_one_store_is_refused_in_one_line(setup_dir, tmp_path, daemons, store_url):
    """Different state dirs (so the pidfile cannot see it), one store, one run.name: the second
    would have resumed the same run and superseded or interleaved the first one's steps. The
    store-side claim refuses it, names the holder, and the first one trains on."""
    a = write_config(setup_dir, tmp_path / "a.toml", tmp_path / "state-a", store__url=store_url)
    b = write_config(setup_dir, tmp_path / "b.toml", tmp_path / "state-b", store__url=store_url)
    first = DaemonProcess(a, tmp_path / "state-a", tmp_path / "a.log").start()
    daemons.append(first)
    first.wait_ready()
    done = cli(b, "run", "--now", "--cycles", "1")
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "is being trained by another dreamd" in err[0] and f"pid {first.pid}" in err[0], err
    first.send(signal.SIGTERM)
    assert first.wait() == 0
    again = cli(b, "run", "--now", "--cycles", "1")  # released with the process: the run goes on here
    assert again.returncode == 0, again.stderr[-2000:]


@pytest.mark.slow
def test_a_sighup_storm_with_broken_files_never_stops_the_run(setup_dir, tmp_path, daemons):
    """40 SIGHUPs in ~4 s while it trains, the file flipping between valid edits, a non-UTF-8
    byte and a value the schedule cannot hold (each once crashed a running daemon with exit 1):
    the daemon keeps its last good config through every broken one, goes on committing cycles,
    and stops cleanly."""
    state = tmp_path / "state"
    config = write_config(setup_dir, tmp_path / "dreamd.toml", state)
    good = config.read_text()
    url = sqlite_url(state)
    d = DaemonProcess(config, state, tmp_path / "daemon.log", args=("--now",)).start()  # until stopped
    daemons.append(d)
    d.wait_ready()
    assert "[schedule]\n" in good and "\naccept = 1.0\n" in good
    broken = [good.encode() + b"\n# caf\xe9\n",
              good.replace("[schedule]\n", "[schedule]\nmisfire_grace_minutes = 1e308\n", 1).encode(),
              good.replace("\naccept = 1.0\n", "\naccept = inf\n", 1).encode(),
              good.replace("\naccept = 1.0\n", "\naccept = 0.9\n", 1).encode()]
    for i in range(40):  # the storm: signals coalesce; each reload reads the file as it is then
        config.write_bytes(broken[i % len(broken)])
        assert d.alive(), d.log_tail()
        d.send(signal.SIGHUP)
        time.sleep(0.1)
    for content, said in zip(broken[:3], ("not UTF-8", "527040", "finite number")):  # then one by one
        seen = len(events(url, "reload"))
        config.write_bytes(content)
        d.send(signal.SIGHUP)
        # A storm signal still pending when `seen` was counted may reload the file first ("no
        # changes"): wait for the reload of this content, which must say why it was refused.
        refused = wait_until(lambda: [e["detail"]["summary"] for e in events(url, "reload")[seen:]
                                      if "reload failed, config unchanged" in e["detail"].get("summary", "")
                                      and said in e["detail"]["summary"]], 60, f"a reload refusing the file ({said})")
        assert refused
    config.write_text(good)
    before = len(store_rows(url, "SELECT id FROM cycles WHERE status = 'committed'"))
    wait_until(lambda: len(store_rows(url, "SELECT id FROM cycles WHERE status = 'committed'")) > before,
               120, "a cycle committed after the storm")
    d.send(signal.SIGTERM)
    assert d.wait(300) == 0, d.log_tail()


@pytest.mark.slow
def test_every_phase_reports_progress_and_one_step_number_everywhere(setup_dir, tmp_path, daemons, notify):
    """One real run under a real NOTIFY_SOCKET: STATUS= says how far each phase is (startup
    stages, the start's own evaluation, candidates accepted/written, steps, evaluation parts);
    one step number is shown by status.json, `dreamd status`, the log, the events rows and
    train_steps.step alike (they once said 23 / 24 for one step); the run ends with a summary
    line."""
    state = tmp_path / "state"
    config = write_config(setup_dir, tmp_path / "dreamd.toml", state, mix__examples_per_cycle=16)
    url = sqlite_url(state)
    env = child_env(NOTIFY_SOCKET=notify.env_value)
    d = DaemonProcess(config, state, tmp_path / "daemon.log", env=env, args=("--now", "--cycles", "2")).start()
    daemons.append(d)
    d.wait_ready(240)                                        # the store is migrated by then
    wait_until(lambda: (max_step(url) or 0) >= 5, 300, "a step of the second cycle")
    d.send(signal.SIGUSR1)                                   # at once: the cycle has 2 steps left
    st = d.wait_status(lambda s: s["paused"], 60, "paused")
    status, last = cli_status(config), max_step(url)
    said = [e for e in d.log_lines() if e.get("event") == "control" and e.get("action") == "pause"]
    assert st["step"] == status["step"] == said[-1]["step"] == last, (st, status, said, last)
    assert st["progress"] == f"step {last - 3}/4" or st["progress"].startswith(f"step {last - 3}/4 ")
    d.send(signal.SIGUSR2)
    assert d.wait(300) == 0, d.log_tail()

    last = max_step(url)
    stopped = [e for e in d.log_lines() if e.get("event") == "daemon.stopped"][-1]
    stop_event = events(url, "stop")[-1]["detail"]
    assert stopped["step"] == stop_event["step"] == d.status()["step"] == last == 7
    # the end-of-run summary: cycles, steps, examples, time, headline metrics start -> now, where next
    assert (stopped["cycles"], stopped["rolled_back"], stopped["failed"]) == (2, 0, 0)
    assert (stopped["steps"], stopped["examples"]) == (8, 32) and stopped["seconds"] > 0
    assert re.fullmatch(r"[-\d.e+]+->[-\d.e+]+", stopped["forget_perplexity"]), stopped
    assert "dreamd history" in stopped["see"] and "dreamd report" in stopped["see"]

    shown = notify.values("STATUS")
    for stage in ("open store 0/6", "load model 1/6", "build engine 2/6", "probes 3/6", "dreamer 4/6"):
        assert f"starting: {stage}" in shown, shown
    for i, part in enumerate(FULL_PARTS):   # the baseline is the full suite
        assert f"starting: baseline evaluation: {part} {i}/{len(FULL_PARTS)}" in shown, shown
    assert any(re.fullmatch(r"cycle 1: dream accepted 16/16 \(written \d+\)", v) for v in shown), shown
    assert any(re.fullmatch(r"cycle 2: train step 4/4 \(loss [-\d.e+]+\)", v) for v in shown), shown
    for i, part in enumerate(CHEAP_PARTS):  # cycle 1 is not an eval.full_every cycle
        assert f"cycle 1: evaluate {part} {i}/{len(CHEAP_PARTS)}" in shown, shown
    assert "cycle 2: paused step" in " ".join(shown)


def test_a_pause_signalled_by_hand_shows_as_pending_at_the_next_progress_report(tmp_path):
    """SIGUSR1 from `systemctl kill` writes no request file: the daemon itself says the pause is
    pending in status.json at its next progress report, not a second later, and drops it once
    the step boundary applied it."""
    import os

    from dreamd.config import Config
    from dreamd.daemon import Daemon
    from dreamd.log import Progress
    from dreamd.status import read_status

    cfg = Config()
    cfg.run.state_dir = tmp_path
    daemon = Daemon(cfg)
    daemon.control.install()
    try:
        daemon._on_progress(Progress("accepted", 1, 24))
        assert read_status(tmp_path)["pause_requested"] is False
        os.kill(os.getpid(), signal.SIGUSR1)                 # a real signal to this process
        daemon._on_progress(Progress("accepted", 2, 24))     # well inside the 1 s spacing
        st = read_status(tmp_path)
        assert st["pause_requested"] is True and st["paused"] is False and st["progress"] == "accepted 2/24"
        daemon.control.poll()                                # the step boundary
        daemon.publish()
        st = read_status(tmp_path)
        assert st["paused"] is True and st["pause_requested"] is False and st["phase"] == "paused"
    finally:
        daemon.control.close()
