"""The schedule's time specifications, parsed: time zones, 5-field crontabs and daily windows.

The ground floor of scheduling: ScheduleConfig's validator checks `at`, `windows` and `timezone`
with these functions, and service/schedule.py evaluates the triggers they return. They import
nothing of dreamd, so the config can use them without importing the schedule back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, tzinfo
from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger


def resolve_timezone(name: str) -> tzinfo:
    """'local' (the box's zone, via tzlocal as APScheduler does) or an IANA name ('UTC')."""
    if name == "local":
        from tzlocal import get_localzone

        return get_localzone()
    try:
        return ZoneInfo(name)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r}: use 'local' or an IANA name such as "
                         "'UTC' or 'Europe/Berlin'") from exc


def parse_crontab(expr: str, tz: tzinfo) -> CronTrigger:
    """A 5-field crontab as a CronTrigger. Numeric day-of-week is refused: APScheduler 3.x
    counts 0 as Monday where crontab counts 0 as Sunday, so '0' would silently shift a day."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"crontab {expr!r} needs 5 fields (minute hour day month day-of-week), "
                         f"got {len(fields)}")
    if any(ch.isdigit() for ch in fields[4]):
        raise ValueError(f"crontab {expr!r}: write the day of week as names (mon-fri, sat,sun): "
                         "APScheduler 3.x counts 0 as Monday, crontab as Sunday")
    return CronTrigger.from_crontab(expr, timezone=tz)


def _minute_of_day(text: str) -> int:
    hh, sep, mm = text.strip().partition(":")
    if not sep or not hh.isdigit() or not mm.isdigit() or len(mm) != 2:
        raise ValueError(f"{text!r} is not HH:MM")
    value = int(hh) * 60 + int(mm)
    if int(mm) > 59 or value > 24 * 60:
        raise ValueError(f"{text!r} is not a time of day between 00:00 and 24:00")
    return value


def _day_range_triggers(start: int, end: int, tz: tzinfo) -> list[CronTrigger]:
    """CronTriggers matching every minute in [start, end) minutes of a day (start < end)."""
    (sh, sm), (eh, em) = divmod(start, 60), divmod(end, 60)
    if sh == eh:
        return [CronTrigger(hour=sh, minute=f"{sm}-{em - 1}", timezone=tz)]
    out: list[CronTrigger] = []
    first_full = sh
    if sm:
        out.append(CronTrigger(hour=sh, minute=f"{sm}-59", timezone=tz))
        first_full = sh + 1
    if eh - 1 >= first_full:
        out.append(CronTrigger(hour=f"{first_full}-{eh - 1}", minute="*", timezone=tz))
    if em:
        out.append(CronTrigger(hour=eh, minute=f"0-{em - 1}", timezone=tz))
    return out


@dataclass(frozen=True)
class Window:
    """A set of allowed minutes, as CronTriggers that fire on each of them."""

    label: str
    triggers: tuple[CronTrigger, ...]

    def is_open(self, now: datetime) -> bool:
        minute = now.replace(second=0, microsecond=0)
        return any(t.get_next_fire_time(None, minute) == minute for t in self.triggers)

    def next_open(self, now: datetime) -> datetime | None:
        """The first allowed minute at or after `now`."""
        times = [t.get_next_fire_time(None, now) for t in self.triggers]
        return min((t for t in times if t is not None), default=None)


def parse_window(text: str, tz: tzinfo) -> Window:
    """'HH:MM-HH:MM' (daily, end exclusive, may wrap midnight: '22:00-06:00'), or a crontab
    whose matching minutes are the window ('* 1-5 * * mon-fri' = 01:00-05:59 on weekdays)."""
    text = text.strip()
    if len(text.split()) == 5:
        return Window(text, (parse_crontab(text, tz),))
    begin, sep, end = text.partition("-")
    if not sep:
        raise ValueError(f"window {text!r}: use 'HH:MM-HH:MM' or a 5-field crontab")
    start, stop = _minute_of_day(begin), _minute_of_day(end)
    if start == stop:
        raise ValueError(f"window {text!r} is empty; for all day use '00:00-24:00'")
    if start < stop:
        return Window(text, tuple(_day_range_triggers(start, stop, tz)))
    return Window(text, tuple(_day_range_triggers(start, 24 * 60, tz)
                              + (_day_range_triggers(0, stop, tz) if stop else [])))
