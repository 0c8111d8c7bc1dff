"""`dreamd status` and `dreamd history` against a real store and a real daemon: phase, cycle,
step, paused or not, the next scheduled cycle and why no cycle runs now; the schedule's grid
stays anchored at the last cycle start across a restart."""

from __future__ import annotations

import json
import re
import signal
from datetime import datetime, timedelta

import pytest

from tests.daemon_process import (
    DaemonProcess,
    cli,
    cli_status,
    sqlite_url,
    store_rows,
    write_config,
)

__all__ = ["daemons", "setup_dir"]


def test_status_and_history_before_any_run(setup_dir, tmp_path):
    config = write_config(setup_dir, tmp_path / "dreamd.toml", tmp_path / "state")
    status = cli_status(config)
    assert status["daemon"] == "not running" and status["pid"] is None and status["paused"] is False
    assert "no daemon" in status["why_not_running"]
    done = cli(config, "history")
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "no store at" in err[0] and "dreamd run" in err[0]
    assert not (tmp_path / "state" / "dreamd.sqlite").exists()  # reading never makes a store
    assert cli(config, "db", "upgrade").returncode == 0
    assert cli(config, "history").returncode == 0  # a store without runs: an empty history


@pytest.mark.slow
def test_status_while_waiting_for_the_schedule_and_after_a_restart(setup_dir, tmp_path, daemons):
    """every_minutes=60: the first cycle runs at start, then the daemon waits for the slot an
    hour after that cycle's start, and says so. A restart keeps the grid (no extra cycle)."""
    state = tmp_path / "state"
    config = write_config(setup_dir, tmp_path / "dreamd.toml", state, schedule__every_minutes=60,
                          schedule__timezone="UTC")
    url = sqlite_url(state)
    d = DaemonProcess(config, state, tmp_path / "a.log", args=()).start()
    daemons.append(d)
    d.wait_status(lambda s: s["phase"] == "waiting", 120, "waiting for the next slot")
    started = store_rows(url, "SELECT started_at FROM cycles WHERE status = 'committed'")
    assert len(started) == 1
    first_start = datetime.fromisoformat(str(started[0]["started_at"]))

    status = cli_status(config)
    assert status["daemon"] == "running" and status["pid"] == d.pid
    assert status["phase"] == "waiting" and status["paused"] is False
    assert status["cycle"] == 2 and status["step"] == 1 and status["last_committed_cycle"] == 1
    next_at = datetime.fromisoformat(status["next_cycle_at"])
    assert abs((next_at.replace(tzinfo=None) - first_start) - timedelta(minutes=60)) < timedelta(seconds=2)
    assert status["why_not_running"].startswith("next slot") and "every 60 min" in status["why_not_running"]
    text = cli(config, "status").stdout
    assert "waiting" in text and "next slot" in text
    said = [e for e in d.log_lines() if e.get("event") == "schedule.waiting"]
    assert len(said) == 1 and said[0]["next_cycle_at"] and "next slot" in said[0]["reason"], said  # once, not per tick

    d.send(signal.SIGTERM)
    assert d.wait() == 0
    d2 = DaemonProcess(config, state, tmp_path / "b.log", args=()).start()
    daemons.append(d2)
    st = d2.wait_status(lambda s: s["phase"] == "waiting", 120, "waiting again after the restart")
    # The grid did not move (the anchor is now the cycle row's started_at, written ~ms after
    # the running process's own clock reading).
    assert abs(datetime.fromisoformat(st["next_cycle_at"]) - next_at) < timedelta(seconds=1)
    assert len(store_rows(url, "SELECT id FROM cycles")) == 1        # no cycle at the restart
    d2.send(signal.SIGTERM)
    assert d2.wait() == 0

    history = json.loads(cli(config, "history", "--json").stdout)
    assert [(r["number"], r["status"], r["steps"]) for r in history] == [(1, "committed", 2)]
    table = cli(config, "history").stdout.splitlines()
    assert "cycle" in table[1] and "committed" in table[3]
    assert cli_status(config)["why_not_running"].startswith("no daemon")


def test_status_names_who_paused(setup_dir, tmp_path, daemons):
    state = tmp_path / "state"
    config = write_config(setup_dir, tmp_path / "dreamd.toml", state)
    d = DaemonProcess(config, state, tmp_path / "a.log").start()
    daemons.append(d)
    d.wait_ready()
    assert cli(config, "pause").returncode == 0
    d.wait_status(lambda s: s["paused"], 60, "paused")
    status = cli_status(config)
    assert status["paused"] is True and status["phase"] == "paused"
    assert status["paused_by"]["source"] == "SIGUSR1"
    assert status["why_not_running"].startswith("paused by SIGUSR1")
    d.send(signal.SIGTERM)
    assert d.wait() == 0
    status = cli_status(config)
    assert status["daemon"] == "not running" and status["paused"] is True
    assert "paused by SIGUSR1" in status["why_not_running"]


def test_read_commands_never_make_a_store_and_say_when_defaults_are_used(tmp_path):
    """`dreamd status` in a directory without a dreamd.toml once created ./state/dreamd.sqlite
    silently; `dreamd pause` as root created a root-owned store the service user could not
    write. Commands that read or mark never create the store, and say which config they use."""
    import subprocess
    import sys

    from tests.daemon_process import child_env

    done = subprocess.run([sys.executable, "-m", "dreamd", "status"], cwd=tmp_path, env=child_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "using the built-in defaults" in done.stderr, done.stderr
    assert "no store at" in done.stdout and list(tmp_path.iterdir()) == []
    paused = subprocess.run([sys.executable, "-m", "dreamd", "pause"], cwd=tmp_path, env=child_env(),
                            capture_output=True, text=True, timeout=60)
    assert paused.returncode == 0 and "no run in the store yet" in paused.stdout, paused.stderr
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["paused"]  # the flag, no store


def test_pause_as_root_leaves_the_flag_to_the_state_dirs_owner(setup_dir, tmp_path):
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root: the case is an operator running `sudo dreamd pause`")
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 4242, 4242)  # the service user
    config = write_config(setup_dir, tmp_path / "dreamd.toml", state)
    done = cli(config, "pause")
    assert done.returncode == 0, done.stderr
    flag = state / "paused"
    assert (flag.stat().st_uid, flag.stat().st_gid) == (4242, 4242)
    assert not (state / "dreamd.sqlite").exists()


@pytest.mark.parametrize("make", ["file", "unwritable"])
def test_a_state_dir_that_cannot_be_used_is_one_line_exit_2(setup_dir, tmp_path, make):
    import os

    state = tmp_path / "state"
    if make == "file":
        state.write_text("not a directory")
    else:
        if os.geteuid() == 0:
            pytest.skip("root can write any directory")
        state.mkdir(mode=0o500)
    config = write_config(setup_dir, tmp_path / "dreamd.toml", tmp_path / "elsewhere")
    config.write_text(config.read_text().replace(str(tmp_path / "elsewhere"), str(state)))
    for command in ("status", "pause", "run"):
        done = cli(config, command)
        err = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(err) == 1 and "run.state_dir" in err[0], done.stderr


def test_status_after_kill_9_says_the_pidfile_is_stale_and_the_run_died(setup_dir, tmp_path, daemons):
    state = tmp_path / "state"
    config = write_config(setup_dir, tmp_path / "dreamd.toml", state)
    d = DaemonProcess(config, state, tmp_path / "daemon.log").start()
    daemons.append(d)
    d.wait_ready()
    d.kill()
    d.wait()
    status = cli_status(config)
    assert status["daemon"] == "not running" and status["pid"] is None
    assert status["pidfile"].startswith(f"stale: pid {d.pid} is not running"), status
    assert "no daemon runs it" in status["run_status"], status
    text = cli(config, "status").stdout
    assert "None" not in text and "{" not in text, text  # words, not Python values


@pytest.mark.slow
def test_a_pause_not_yet_applied_says_so_until_it_is(setup_dir, tmp_path, daemons):
    """The pause applies at the next step boundary, which a long evaluation holds off for
    minutes: status said 'paused False' with no word of the request. A SIGSTOPped daemon stands
    in for one busy inside a step: `dreamd pause` is answered, status says the pause is
    requested, and once the daemon runs on it is paused, by whom in words."""
    import os

    state = tmp_path / "state"
    config = write_config(setup_dir, tmp_path / "dreamd.toml", state)
    d = DaemonProcess(config, state, tmp_path / "a.log").start()
    daemons.append(d)
    d.wait_ready(240)
    os.kill(d.pid, signal.SIGSTOP)
    try:
        done = cli(config, "pause")
        assert done.returncode == 0 and "pause requested, takes effect at the next step" in done.stdout, done
        status = cli_status(config)
        assert status["paused"] is False and status["paused_by"] is None
        assert status["pause_pending"].startswith("pause requested, takes effect at the next step"), status
        assert "pause requested, takes effect at the next step" in cli(config, "status").stdout
    finally:
        os.kill(d.pid, signal.SIGCONT)
    d.wait_status(lambda s: s["paused"], 60, "paused")
    status = cli_status(config)
    assert status["paused"] is True and status["pause_pending"] is None
    assert status["paused_by"]["source"] == "SIGUSR1"
    line = [ln for ln in cli(config, "status").stdout.splitlines() if ln.strip().startswith("paused_by:")][0]
    assert line.split(": ", 1)[1].startswith("SIGUSR1 at 20") and "{" not in line, line
    d.send(signal.SIGTERM)
    assert d.wait() == 0


@pytest.mark.slow
def test_a_sighup_that_adds_a_window_moves_next_cycle_at(setup_dir, tmp_path, daemons):
    """Waiting for a window 3 h away; a reload adds one that opens in 1 h: status shows the
    new next_cycle_at (it kept the old one)."""
    from datetime import timezone

    now = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    window = lambda start, hours: f"{start:%H:%M}-{start + timedelta(hours=hours):%H:%M}"  # noqa: E731
    far, near = now + timedelta(hours=3), now + timedelta(hours=1)
    state = tmp_path / "state"
    config = write_config(setup_dir, tmp_path / "dreamd.toml", state, schedule__timezone="UTC",
                          schedule__windows=[window(far, 1)])
    d = DaemonProcess(config, state, tmp_path / "a.log", args=()).start()
    daemons.append(d)
    st = d.wait_status(lambda s: s["phase"] == "waiting", 240, "waiting for the window")
    assert datetime.fromisoformat(st["next_cycle_at"]) == far
    assert cli_status(config)["progress"].startswith("next cycle in 3.0 h")
    write_config(setup_dir, config, state, schedule__timezone="UTC", schedule__windows=[window(far, 1), window(near, 1)])
    d.send(signal.SIGHUP)
    st = d.wait_status(lambda s: s["next_cycle_at"] and datetime.fromisoformat(s["next_cycle_at"]) == near, 60,
                       "the new window's opening as next_cycle_at")
    status = cli_status(config)
    assert datetime.fromisoformat(status["next_cycle_at"]) == near and status["phase"] == "waiting"
    minutes = re.match(r"next cycle in (\d+) min \(outside window", status["progress"])
    assert minutes and 30 <= int(minutes[1]) <= 60, status                  # was 3.0 h
    d.send(signal.SIGTERM)
    assert d.wait() == 0
