"""Schedule decisions with an explicit clock: `now` is passed in, idle readings are passed in
(and measured for real in one test)."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone

import pytest

from dreamd.config import ScheduleConfig
from dreamd.config_file import load_config
from dreamd.errors import UsageError
from dreamd.service.schedule import IdleReadings, Schedule, judge_idle, measure_idle, parse_gpu_utilization
from dreamd.timespec import parse_window, resolve_timezone

UTC = timezone.utc
T0 = datetime(2025, 1, 6, 12, 0, tzinfo=UTC)  # a Monday


def at(hours: float = 0, minutes: float = 0, base: datetime = T0) -> datetime:
    return base + timedelta(hours=hours, minutes=minutes)


def cfg(**kw) -> ScheduleConfig:
    return ScheduleConfig(timezone="UTC", **kw)


def test_no_gates_runs_back_to_back():
    s = Schedule(cfg())
    d = s.next_decision(T0)
    assert d == (True, "no schedule gates: cycles run back to back", T0)
    s.cycle_started(T0)
    assert s.next_decision(at(minutes=1)).run_now


def test_interval_slots_on_a_fixed_grid():
    s = Schedule(cfg(every_minutes=30))
    run_now, reason, next_time = s.next_decision(T0)
    assert run_now and "slot 2025-01-06 12:00 UTC due" in reason
    s.cycle_started(T0)
    d = s.next_decision(at(minutes=10))
    assert not d.run_now and d.next_time == at(minutes=30)
    assert "next slot 2025-01-06 12:30 UTC" in d.reason and "every 30 min" in d.reason
    assert s.next_decision(at(minutes=30)).run_now
    s.cycle_started(at(minutes=31))  # a late start does not move the grid
    d = s.next_decision(at(minutes=45))
    assert not d.run_now and d.next_time == at(minutes=60)


def test_missed_slots_coalesce_into_one_run():
    s = Schedule(cfg(every_minutes=30))
    s.cycle_started(T0)
    # Down (or one long cycle) for 3 h 05 min: six slots passed, one cycle runs.
    d = s.next_decision(at(hours=3, minutes=5))
    assert d.run_now and "6 pending slots coalesced into one" in d.reason
    s.cycle_started(at(hours=3, minutes=5))
    d = s.next_decision(at(hours=3, minutes=6))
    assert not d.run_now and d.next_time == at(hours=3, minutes=30)


def test_misfire_grace_skips_a_late_slot():
    s = Schedule(cfg(every_minutes=30, misfire_grace_minutes=10))
    s.cycle_started(T0)
    d = s.next_decision(at(minutes=45))  # the 12:30 slot is 15 min late > 10 min grace
    assert not d.run_now and d.next_time == at(minutes=60)
    assert "slot 2025-01-06 12:30 UTC missed by more than 10 min (misfire grace), skipped" in d.reason
    assert s.next_decision(at(minutes=39)).run_now  # 9 min late: within grace
    assert s.next_decision(at(minutes=60)).run_now


def test_restart_keeps_the_grid_from_the_last_cycle():
    s = Schedule(cfg(every_minutes=30), last_started=T0)
    d = s.next_decision(at(minutes=10))
    assert not d.run_now and d.next_time == at(minutes=30)
    moved = s.with_config(cfg(every_minutes=30, windows=["00:00-24:00"]))
    assert moved.next_decision(at(minutes=10)).next_time == at(minutes=30)


@pytest.mark.parametrize(("window", "inside", "outside"), [
    ("01:00-06:00", ["01:00", "03:17", "05:59"], ["00:59", "06:00", "12:00"]),
    ("01:30-02:15", ["01:30", "02:00", "02:14"], ["01:29", "02:15", "13:45"]),
    ("22:00-06:00", ["22:00", "23:59", "00:00", "05:59"], ["06:00", "21:59", "12:00"]),
    ("00:00-24:00", ["00:00", "12:00", "23:59"], []),
    ("10:05-10:07", ["10:05", "10:06"], ["10:04", "10:07"]),
])
def test_daily_windows(window, inside, outside):
    w = parse_window(window, UTC)
    day = datetime(2025, 1, 7, tzinfo=UTC)
    for hhmm in inside:
        h, m = map(int, hhmm.split(":"))
        assert w.is_open(day.replace(hour=h, minute=m, second=30)), (window, hhmm)
    for hhmm in outside:
        h, m = map(int, hhmm.split(":"))
        assert not w.is_open(day.replace(hour=h, minute=m)), (window, hhmm)


def test_outside_window_says_when_it_opens():
    s = Schedule(cfg(windows=["01:00-06:00"]))
    d = s.next_decision(at(hours=12, minutes=30))  # 00:30; 2025-01-07 01:00 is the next opening
    assert not d.run_now and d.next_time == datetime(2025, 1, 7, 1, 0, tzinfo=UTC)
    assert "outside window (01:00-06:00); opens 2025-01-07 01:00 UTC" in d.reason
    d = s.next_decision(datetime(2025, 1, 7, 1, 0, tzinfo=UTC))
    assert d.run_now and "window 01:00-06:00 open" in d.reason


def test_crontab_window_with_weekdays():
    s = Schedule(cfg(windows=["* 1-5 * * mon-fri"]))
    saturday = datetime(2025, 1, 11, 2, 0, tzinfo=UTC)
    d = s.next_decision(saturday)
    assert not d.run_now and d.next_time == datetime(2025, 1, 13, 1, 0, tzinfo=UTC)  # Monday
    assert s.next_decision(datetime(2025, 1, 13, 3, 30, tzinfo=UTC)).run_now


def test_slots_missed_outside_a_window_run_once_when_it_opens():
    s = Schedule(cfg(every_minutes=60, windows=["01:00-06:00"]))
    d = s.next_decision(T0)  # 12:00: the first slot is due but the window is closed
    assert not d.run_now and "outside window" in d.reason and "slot 2025-01-06 12:00 UTC due" in d.reason
    opening = datetime(2025, 1, 7, 1, 0, tzinfo=UTC)
    assert d.next_time == opening
    d = s.next_decision(opening)
    assert d.run_now and "14 pending slots coalesced into one" in d.reason
    s.cycle_started(opening)
    d = s.next_decision(opening + timedelta(minutes=20))
    assert not d.run_now and d.next_time == opening + timedelta(hours=1)


def test_cron_start_times_and_a_long_downtime():
    s = Schedule(cfg(at="30 2 * * *"))
    d = s.next_decision(at(hours=-2))  # 10:00, never ran: wait for 02:30
    assert not d.run_now and d.next_time == datetime(2025, 1, 7, 2, 30, tzinfo=UTC)
    slot = datetime(2025, 1, 7, 2, 30, tzinfo=UTC)
    assert s.next_decision(slot).run_now
    s.cycle_started(slot + timedelta(minutes=1))
    d = s.next_decision(slot + timedelta(minutes=30))
    assert not d.run_now and d.next_time == slot + timedelta(days=1)
    # Down for three days: one run, not three.
    d = s.next_decision(slot + timedelta(days=3, hours=8))
    assert d.run_now and "3 pending slots coalesced" in d.reason
    graced = Schedule(cfg(at="30 2 * * *", misfire_grace_minutes=60), last_started=slot)
    d = graced.next_decision(slot + timedelta(days=3, hours=8))
    assert not d.run_now and "skipped" in d.reason and d.next_time == slot + timedelta(days=4)


def test_windows_follow_the_time_zone_across_dst():
    # Europe/Berlin switches to summer time on 2025-03-30 at 02:00 local (01:00 UTC).
    s = Schedule(ScheduleConfig(timezone="Europe/Berlin", windows=["01:00-06:00"]))
    assert s.next_decision(datetime(2025, 3, 30, 0, 30, tzinfo=UTC)).run_now   # 01:30 CET
    assert s.next_decision(datetime(2025, 3, 30, 3, 59, tzinfo=UTC)).run_now   # 05:59 CEST
    d = s.next_decision(datetime(2025, 3, 30, 4, 0, tzinfo=UTC))               # 06:00 CEST
    assert not d.run_now
    assert d.next_time == datetime(2025, 3, 30, 23, 0, tzinfo=UTC)             # 01:00 CEST
    assert "opens 2025-03-31 01:00 CEST" in d.reason


def test_idle_gate_with_given_readings():
    s = Schedule(cfg(idle_required=True, idle_poll_seconds=90, idle_activity_file="/tmp/x"))
    busy = IdleReadings(gpu_util=(3.0, 55.0), load_per_cpu=0.1, activity_age_s=3600)
    d = s.next_decision(T0, idle=busy)
    assert not d.run_now and d.next_time == at(minutes=1.5)
    assert d.reason == "box busy: GPU utilisation 55% > 10%"
    typing = IdleReadings(gpu_util=None, load_per_cpu=0.1, activity_age_s=120)
    d = s.next_decision(T0, idle=typing)
    assert not d.run_now and "user activity 2.0 min ago < 15 min" in d.reason
    loaded = IdleReadings(gpu_util=(0.0,), load_per_cpu=0.9, activity_age_s=None)
    assert "load 0.90/CPU > 0.50" in s.next_decision(T0, idle=loaded).reason
    idle = IdleReadings(gpu_util=(2.0,), load_per_cpu=0.2, activity_age_s=1800)
    d = s.next_decision(T0, idle=idle)
    assert d.run_now and d.reason.startswith("box idle: GPU utilisation 2% <= 10%")


def test_idle_probes_can_be_switched_off():
    c = cfg(idle_required=True, idle_gpu_util_max=None, idle_load_per_cpu_max=None)
    ok, why = judge_idle(IdleReadings(gpu_util=(99.0,), load_per_cpu=8.0, activity_age_s=None), c)
    assert ok and why == "box idle: no probe has a reading"


def test_measure_idle_reads_the_real_box(tmp_path):
    activity = tmp_path / "activity"
    activity.touch()
    twenty_min_ago = time.time() - 1200
    os.utime(activity, (twenty_min_ago, twenty_min_ago))
    c = cfg(idle_required=True, idle_activity_file=activity)
    r = measure_idle(c)
    assert r.load_per_cpu is not None and r.load_per_cpu >= 0
    assert r.load_per_cpu == pytest.approx(os.getloadavg()[0] / os.cpu_count(), abs=0.5)
    assert 1199 <= r.activity_age_s < 1260
    activity.touch()
    assert measure_idle(c).activity_age_s < 60
    assert measure_idle(cfg(idle_activity_file=tmp_path / "missing")).activity_age_s is None


def test_parse_nvidia_smi_output():
    assert parse_gpu_utilization("3\n[N/A]\n97 %\n") == (3.0, 97.0)
    assert parse_gpu_utilization("") == ()


def test_naive_times_are_refused():
    with pytest.raises(ValueError, match="aware datetime"):
        Schedule(cfg()).next_decision(datetime(2025, 1, 1, 12, 0))


@pytest.mark.parametrize(("toml", "message"), [
    ('windows = ["25:00-01:00"]', "not a time of day"),
    ('windows = ["03:00-03:00"]', "is empty"),
    ('windows = ["nightly"]', "HH:MM-HH:MM"),
    ('at = "0 2 * * 0"', "day of week as names"),
    ('at = "0 2 * *"', "5 fields"),
    ('every_minutes = 30\nat = "0 2 * * *"', "either every_minutes or at"),
    ('timezone = "Mars/Olympus"', "unknown time zone"),
])
def test_bad_schedules_are_usage_errors(tmp_path, toml, message):
    path = tmp_path / "dreamd.toml"
    path.write_text(f"[schedule]\n{toml}\n")
    with pytest.raises(UsageError, match="schedule") as err:
        load_config(path, environ={})
    assert message in str(err.value)


def test_local_timezone_resolves():
    assert resolve_timezone("local") is not None
    assert resolve_timezone("UTC").utcoffset(T0) == timedelta(0)
