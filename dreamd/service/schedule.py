"""When the next cycle may start: interval or cron slots, time windows, and idle gating.

The daemon polls; it does not run an APScheduler scheduler. Its loop must also react to
signals (pause, stop, reload), keep the systemd watchdog fed and run exactly one cycle at a time,
which a BlockingScheduler's own thread and job store would only get in the way of. So
APScheduler's triggers do the time arithmetic (IntervalTrigger's fixed grid, CronTrigger's
calendar matching and DST handling) and the loop asks:

    decision = schedule.next_decision(now)          # (run_now, reason, next_time)
    if decision.run_now:
        schedule.cycle_started(now); run_cycle()
    else:
        control.sleep((decision.next_time - now).total_seconds())   # wakes on any signal

Gates, all of which must pass (a missing one passes):
  slot    `every_minutes` (a fixed grid anchored at the first cycle, or at the last cycle start
          after a restart) or `at` (crontab start times). A slot is pending from its time until
          a cycle starts.
  window  `windows`: the current minute lies in one of them ('01:00-06:00', or a crontab whose
          matching minutes are allowed, '* 1-5 * * mon-fri'). Windows gate starts only: a cycle
          that starts inside a window runs to its end.
  idle    `idle_required`: GPU utilisation (nvidia-smi, when present), load average per CPU,
          and a user-activity file untouched for `idle_activity_minutes`.

Misfire and coalesce rules (APScheduler's coalesce=True and misfire_grace_time, applied to the
loop): all pending slots collapse into ONE cycle (slots missed while a cycle ran long, the
daemon was down, a window was closed or the box was busy never run twice or in a burst); a
cycle start consumes every slot up to that moment. With `misfire_grace_minutes` set, a slot
more than that late is skipped (reason says so) and the next slot is waited for.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from dreamd.timespec import parse_crontab, parse_window, resolve_timezone

if TYPE_CHECKING:
    from dreamd.config import ScheduleConfig

# Slots iterated per decision at most. Only reached after a long downtime with no grace set
# (30 days of 1-minute slots are 43,200); past it the slot is still due, and the reason says
# "1000+ slots coalesced".
MAX_SLOTS_COUNTED = 1000
TICK = timedelta(microseconds=1)



# ---------------------------------------------------------------------------------------------
# idle gating


@dataclass(frozen=True)
class IdleReadings:
    """What the box is doing; measured by measure_idle(), or given by a caller."""

    gpu_util: tuple[float, ...] | None
    """Utilisation percent per GPU from nvidia-smi; None when nvidia-smi is absent or failed."""
    load_per_cpu: float | None
    """1-minute load average divided by the CPU count."""
    activity_age_s: float | None
    """Seconds since the user-activity file changed; None when none is configured or it does
    not exist (no activity recorded)."""


def parse_gpu_utilization(text: str) -> tuple[float, ...]:
    """Parse `nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits` output;
    lines such as '[N/A]' (MIG slices) are skipped."""
    out = []
    for line in text.splitlines():
        line = line.strip().rstrip("%").strip()
        try:
            out.append(float(line))
        except ValueError:
            continue
    return tuple(out)


def measure_idle(cfg: ScheduleConfig, now_epoch: float | None = None) -> IdleReadings:
    gpu: tuple[float, ...] | None = None
    smi = shutil.which("nvidia-smi")
    if smi is not None and cfg.idle_gpu_util_max is not None:
        try:
            done = subprocess.run([smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=15, check=True)
            gpu = parse_gpu_utilization(done.stdout) or None
        except (OSError, subprocess.SubprocessError):
            gpu = None
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    age = None
    if cfg.idle_activity_file is not None:
        try:
            mtime = Path(cfg.idle_activity_file).stat().st_mtime
            age = max(0.0, (time.time() if now_epoch is None else now_epoch) - mtime)
        except FileNotFoundError:
            age = None
    return IdleReadings(gpu_util=gpu, load_per_cpu=load, activity_age_s=age)


def judge_idle(readings: IdleReadings, cfg: ScheduleConfig) -> tuple[bool, str]:
    """(idle, reason). Every configured probe that has a reading must say idle."""
    busy: list[str] = []
    seen: list[str] = []
    if cfg.idle_gpu_util_max is not None and readings.gpu_util:
        top = max(readings.gpu_util)
        (busy if top > cfg.idle_gpu_util_max else seen).append(
            f"GPU utilisation {top:.0f}% {'>' if top > cfg.idle_gpu_util_max else '<='} "
            f"{cfg.idle_gpu_util_max:.0f}%")
    if cfg.idle_load_per_cpu_max is not None and readings.load_per_cpu is not None:
        over = readings.load_per_cpu > cfg.idle_load_per_cpu_max
        (busy if over else seen).append(f"load {readings.load_per_cpu:.2f}/CPU "
                                        f"{'>' if over else '<='} {cfg.idle_load_per_cpu_max:.2f}")
    if cfg.idle_activity_file is not None and readings.activity_age_s is not None:
        minutes = readings.activity_age_s / 60
        recent = minutes < cfg.idle_activity_minutes
        (busy if recent else seen).append(
            f"user activity {minutes:.1f} min ago {'<' if recent else '>='} "
            f"{cfg.idle_activity_minutes:g} min ({cfg.idle_activity_file})")
    if busy:
        return False, "box busy: " + ", ".join(busy)
    return True, "box idle: " + (", ".join(seen) if seen else "no probe has a reading")


# ---------------------------------------------------------------------------------------------
# the decision


class ScheduleDecision(NamedTuple):
    run_now: bool
    reason: str
    """Why it runs or what blocks it (stored with the cycle / shown in STATUS=)."""
    next_time: datetime
    """`now` when run_now; else the earliest time worth asking again."""


@dataclass(frozen=True)
class _Slots:
    due: datetime | None        # the latest pending slot (within grace), None if none
    count: int                  # pending slots coalesced into one run
    skipped: datetime | None    # the first slot dropped for being later than the grace
    upcoming: datetime | None   # the first slot after now


class Schedule:
    """Decides whether a cycle may start now. Stateful only in `last_started`, the start of the
    last cycle (pass it from the store after a restart so slots are not re-run)."""

    def __init__(self, cfg: ScheduleConfig, *, last_started: datetime | None = None):
        self.cfg = cfg
        self.tz = resolve_timezone(cfg.timezone)
        self.windows = [parse_window(w, self.tz) for w in cfg.windows]
        self.at = parse_crontab(cfg.at, self.tz) if cfg.at else None
        self.last_started = last_started
        self._anchor = last_started
        self._interval: IntervalTrigger | None = None

    def with_config(self, cfg: ScheduleConfig) -> Schedule:
        """A schedule for a reloaded config that keeps the consumed-slot state."""
        fresh = Schedule(cfg, last_started=self.last_started)
        if cfg.every_minutes == self.cfg.every_minutes:
            fresh._anchor = self._anchor
        return fresh

    def cycle_started(self, now: datetime) -> None:
        """Record a cycle start: every slot up to `now` is consumed (coalesced)."""
        self._check_aware(now)
        self.last_started = now
        if self._anchor is None:
            self._anchor = now

    # ---- gates ------------------------------------------------------------------------------
    def _slot_trigger(self, now: datetime) -> IntervalTrigger | CronTrigger | None:
        if self.at is not None:
            return self.at
        if not self.cfg.every_minutes:
            return None
        if self._interval is None:
            self._anchor = self._anchor or now  # no history: the first slot is the first ask
            self._interval = IntervalTrigger(seconds=self.cfg.every_minutes * 60,
                                             start_date=self._anchor, timezone=self.tz)
        return self._interval

    def _slots(self, trigger: IntervalTrigger | CronTrigger, now: datetime) -> _Slots:
        if self.last_started is not None:
            lower = self.last_started + TICK
        else:
            lower = self._anchor or now
        skipped = None
        if self.cfg.misfire_grace_minutes is not None:
            earliest = now - timedelta(minutes=self.cfg.misfire_grace_minutes)
            if lower < earliest:
                first = trigger.get_next_fire_time(None, lower)
                if first is not None and first < earliest:
                    skipped = first
                lower = earliest
        due, count = None, 0
        slot = trigger.get_next_fire_time(None, lower)
        while slot is not None and slot <= now and count < MAX_SLOTS_COUNTED:
            due, count = slot, count + 1
            slot = trigger.get_next_fire_time(slot, now)
        if slot is not None and slot <= now:  # hit the count cap: find the first future slot
            slot = trigger.get_next_fire_time(None, now + TICK)
        return _Slots(due=due, count=count, skipped=skipped, upcoming=slot)

    def _slot_text(self) -> str:
        return f"every {self.cfg.every_minutes:g} min" if self.at is None else f"at {self.cfg.at!r}"

    def _fmt(self, t: datetime | None) -> str:
        return "never" if t is None else t.astimezone(self.tz).strftime("%Y-%m-%d %H:%M %Z")

    @staticmethod
    def _check_aware(now: datetime) -> None:
        if now.tzinfo is None:
            raise ValueError("pass an aware datetime (datetime.now(timezone.utc)), not a naive one")

    def next_decision(self, now: datetime, idle: IdleReadings | None = None) -> ScheduleDecision:
        """Whether a cycle may start at `now`, why, and when to ask next.

        `idle`: readings to judge instead of measuring (tests, or a caller that measured).
        """
        self._check_aware(now)
        far = now + timedelta(days=1)
        reasons: list[str] = []

        trigger = self._slot_trigger(now)
        if trigger is not None:
            slots = self._slots(trigger, now)
            if slots.due is None:
                missed = ""
                if slots.skipped is not None:
                    missed = (f"slot {self._fmt(slots.skipped)} missed by more than "
                              f"{self.cfg.misfire_grace_minutes:g} min (misfire grace), skipped; ")
                return ScheduleDecision(False, f"{missed}next slot {self._fmt(slots.upcoming)} "
                                f"({self._slot_text()})", slots.upcoming or far)
            more = f", {slots.count}{'+' if slots.count >= MAX_SLOTS_COUNTED else ''} pending " \
                   "slots coalesced into one" if slots.count > 1 else ""
            reasons.append(f"slot {self._fmt(slots.due)} due ({self._slot_text()}{more})")

        if self.windows:
            open_now = [w for w in self.windows if w.is_open(now)]
            if not open_now:
                opens = min((t for w in self.windows if (t := w.next_open(now)) is not None),
                            default=None)
                labels = ", ".join(w.label for w in self.windows)
                pending = f"; {reasons[0]}" if reasons else ""
                return ScheduleDecision(False, f"outside window ({labels}); opens "
                                f"{self._fmt(opens)}{pending}", opens or far)
            reasons.append(f"window {open_now[0].label} open")

        if self.cfg.idle_required:
            readings = idle if idle is not None else measure_idle(self.cfg, now.timestamp())
            is_idle, why = judge_idle(readings, self.cfg)
            if not is_idle:
                return ScheduleDecision(False, why, now + timedelta(seconds=self.cfg.idle_poll_seconds))
            reasons.append(why)

        return ScheduleDecision(True, "; ".join(reasons) or "no schedule gates: cycles run back to back", now)
