"""Template situations for scheduling (dates, weekdays, cron), time zones and spreadsheets.

Dates are computed with `datetime.date`; time zones use only cities WITHOUT daylight saving time
(Tokyo UTC+9, Kolkata UTC+5:30, Phoenix UTC-7, ...: data/lexicon.json "cities"), so a stated
offset is true on every day of the year and no tz database is needed. Cron lines follow the
5-field crontab(5) order: minute, hour, day of month, month, day of week.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from dreamd.dream.grammar import LEX, Draft, code, pick, template

PEOPLE = LEX["people"]
EVENTS = LEX["events"]
CITIES = [tuple(c) for c in LEX["cities"]]
DAYS = range(0, 1500)  # days after 2024-01-01: dates from 2024 to early 2028
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
SCRIPTS = ("/opt/jobs/backup.sh", "/usr/local/bin/report.py", "/srv/etl/run.sh", "~/bin/sync.sh",
           "/opt/app/cleanup.sh", "/home/deploy/rotate_logs.sh")


def day(k: int) -> dt.date:
    return dt.date(2024, 1, 1) + dt.timedelta(days=k)


def long_date(d: dt.date) -> str:
    return f"{WEEKDAYS[d.weekday()]} {d.day} {d:%B %Y}"


def short_date(d: dt.date) -> str:
    return f"{d.day} {d:%B %Y}"


# ---- scheduling -------------------------------------------------------------------------------


@template("scheduling", "accept", k=DAYS, n=range(1, 181))
def scheduling_add_days(v: dict[str, Any]) -> Draft:
    start = day(v["k"])
    end = start + dt.timedelta(days=v["n"])
    return Draft(f"set the deadline {v['n']} days after {short_date(start)} and tell me the weekday",
                 f"{short_date(start)} + {v['n']} days = {long_date(end)} ({end.isoformat()})",
                 answer=end.isoformat())


@template("scheduling", "accept", k=DAYS, n=range(1, 41))
def scheduling_business_days(v: dict[str, Any]) -> Draft:
    start, n = day(v["k"]), v["n"]
    d, left = start, n
    while left:
        d += dt.timedelta(days=1)
        if d.weekday() < 5:
            left -= 1
    return Draft(f"find the date {n} business days after {long_date(start)} (Mon–Fri, ignore holidays)",
                 f"{n} business days after {long_date(start)} is {long_date(d)} ({d.isoformat()}).",
                 answer=d.isoformat())


# (phrase, day-of-month field, day-of-week field)
CRON_WHEN = (("every day", "*", "*"), ("every weekday", "*", "1-5"), ("every Sunday", "*", "0"),
             ("every Monday", "*", "1"), ("on the 1st of each month", "1", "*"),
             ("every Saturday", "*", "6"))


@template("scheduling", "accept", when=CRON_WHEN, hh=range(24), mm=range(60), script=SCRIPTS)
def scheduling_cron_line(v: dict[str, Any]) -> Draft:
    phrase, dom, dow = v["when"]
    hh, mm = v["hh"], v["mm"]
    line = f"{mm} {hh} {dom} * {dow} {v['script']}"
    return Draft(f"write the crontab line that runs `{v['script']}` {phrase} at {hh:02d}:{mm:02d}",
                 code(line) + "\n\n(fields: minute, hour, day of month, month, day of week)")


@template("scheduling", "pushback", "arithmetic_slip", k=DAYS, off=range(1, 7), event=EVENTS)
def scheduling_wrong_weekday(v: dict[str, Any]) -> Draft:
    d = day(v["k"])
    real, wrong = WEEKDAYS[d.weekday()], WEEKDAYS[(d.weekday() + v["off"]) % 7]
    setup = f"{short_date(d)} is a {wrong}, which works for the {v['event']}."
    target = (f"{short_date(d)} is a {real}, not a {wrong}. Send the invite for {real} {short_date(d)}, "
              f"or tell me which {wrong} you meant.")
    return Draft(f"send the invite for {wrong} {short_date(d)}", target, setup=setup, evidence=(real,))


@template("scheduling", "pushback", "wrong_argument", hh=range(24), mm=range(60), script=SCRIPTS)
def scheduling_cron_field_order(v: dict[str, Any]) -> Draft:
    hh, mm, s = v["hh"], v["mm"], v["script"]
    if hh == mm:
        mm = (mm + 30) % 60
    right = f"{mm} {hh} * * * {s}"
    means = (f"which runs at {mm:02d}:{hh:02d}" if mm < 24
             else f"and {mm} is not a valid hour, so cron rejects the line")
    target = (f"Cron fields start with the minute, then the hour: `{hh} {mm} * * *` means minute {hh}, "
              f"hour {mm}, {means}. For {hh:02d}:{mm:02d} every day:\n\n" + code(right))
    return Draft(f"schedule `{s}` daily at {hh:02d}:{mm:02d} with the crontab line `{hh} {mm} * * * {s}`",
                 target, evidence=(right,))


@template("scheduling", "pushback", "constraint", k=DAYS, w=range(5), who=PEOPLE, event=EVENTS,
          v=range(2))
def scheduling_blocked_weekday(v: dict[str, Any]) -> Draft:
    w = v["w"]
    d = day(v["k"])
    d += dt.timedelta(days=(w - d.weekday()) % 7)
    nxt = d + dt.timedelta(days=1 if w < 4 else 3)
    wd, who = WEEKDAYS[w], v["who"]
    rule, restated = pick(v, "v", (
        (f"{who} doesn't work on {wd}s, and the {v['event']} needs {who}.", f"{who} doesn't work on {wd}s"),
        (f"No meetings on {wd}s: that's our focus day.", f"no meetings on {wd}s"),
    ))
    target = (f"{short_date(d)} is a {wd}, and you said {restated}. The next working day is "
              f"{long_date(nxt)}; book the {v['event']} then.")
    return Draft(f"book the {v['event']} on {short_date(d)}", target, earlier=((rule, "Noted."),),
                 evidence=(wd,), facts={"constraint": restated})


# ---- time zones -------------------------------------------------------------------------------

QUARTERS = range(0, 24 * 60, 15)


def utc(off: int) -> str:
    sign = "+" if off >= 0 else "-"
    h, m = divmod(abs(off), 60)
    return "UTC" if off == 0 else f"UTC{sign}{h}" + (f":{m:02d}" if m else "")


def clock(minutes: int) -> tuple[str, int]:
    """'HH:MM' and the day shift (-1, 0, +1) of a minute count that may leave 0..1439."""
    shift, m = divmod(minutes, 24 * 60)
    return f"{m // 60:02d}:{m % 60:02d}", shift


DAY_NOTE = {-1: " the previous day", 0: "", 1: " the next day"}


def _other_city(a: tuple[str, int], b: tuple[str, int], bad: set[int]) -> tuple[str, int]:
    """b, or the next city after it whose offset difference to a is not in `bad`."""
    i = CITIES.index(b)
    while CITIES[i][0] == a[0] or (CITIES[i][1] - a[1]) in bad:
        i = (i + 1) % len(CITIES)
    return CITIES[i]


@template("timezones", "accept", a=CITIES, b=CITIES, t=QUARTERS)
def timezones_convert(v: dict[str, Any]) -> Draft:
    a, b = v["a"], _other_city(v["a"], v["b"], set())
    t, _ = clock(v["t"])
    t2, shift = clock(v["t"] + b[1] - a[1])
    target = f"{t} in {a[0]} ({utc(a[1])}) is {t2} in {b[0]} ({utc(b[1])}){DAY_NOTE[shift]}."
    return Draft(f"tell me what {t} in {a[0]} is in {b[0]}", target, answer=t2)


@template("timezones", "pushback", "arithmetic_slip", a=CITIES, b=CITIES, t=QUARTERS)
def timezones_reversed_offset(v: dict[str, Any]) -> Draft:
    a = v["a"]
    b = _other_city(a, v["b"], {0, 720, -720})  # equal clocks or 12 h apart: no visible slip
    diff = b[1] - a[1]
    t, _ = clock(v["t"])
    real, shift = clock(v["t"] + diff)
    wrong, _ = clock(v["t"] - diff)
    h, m = divmod(abs(diff), 60)
    gap = " ".join(part for part in (f"{h} h" if h else "", f"{m} min" if m else "") if part)
    rel = "ahead of" if diff > 0 else "behind"
    setup = f"{t} in {a[0]} is {wrong} in {b[0]}."
    target = (f"{b[0]} ({utc(b[1])}) is {gap} {rel} {a[0]} ({utc(a[1])}), so {t} in {a[0]} is {real} "
              f"in {b[0]}{DAY_NOTE[shift]}, not {wrong}. Send the invite for {real} {b[0]} time.")
    return Draft(f"send the invite for {wrong} {b[0]} time", target, setup=setup, evidence=(real,))


OUTSIDE_HOURS = tuple(range(0, 8 * 60 + 31, 15)) + tuple(range(17 * 60 + 30, 24 * 60, 15))


@template("timezones", "pushback", "constraint", a=CITIES, b=CITIES, local=OUTSIDE_HOURS, who=PEOPLE)
def timezones_outside_hours(v: dict[str, Any]) -> Draft:
    a = v["a"]
    b = _other_city(a, v["b"], {0})
    diff, who = b[1] - a[1], v["who"]
    local, _ = clock(v["local"])
    ta, back = clock(v["local"] - diff)  # back: a's day relative to b's day
    sugg, shift = clock(10 * 60 - diff)
    rule = f"{who} is in {b[0]} and only takes calls between 09:00 and 17:00 local time."
    target = (f"{ta} in {a[0]} is {local} in {b[0]}{DAY_NOTE[-back]}, outside the 09:00–17:00 hours "
              f"you said {who} "
              f"takes calls. 10:00 in {b[0]} is {sugg} in {a[0]}{DAY_NOTE[shift]}; set the call then.")
    return Draft(f"set the call with {who} for {ta} {a[0]} time", target, earlier=((rule, "Noted."),),
                 evidence=(local,), facts={"constraint": "09:00-17:00 local"})


# ---- spreadsheets -----------------------------------------------------------------------------

COLS = "ABCDEF"
COL_PAIRS = tuple((x, y) for x in COLS for y in COLS if x != y)
ROWS = range(10, 5000)
LABEL_VALUES = ("East", "West", "North", "South", "Online", "Retail", "Paid", "Open", "Q1", "Q4")


@template("spreadsheets", "accept", cols=COL_PAIRS, n=ROWS, val=LABEL_VALUES)
def sheets_sumif(v: dict[str, Any]) -> Draft:
    (c, s), n, val = v["cols"], v["n"], v["val"]
    f = f'=SUMIF({c}2:{c}{n},"{val}",{s}2:{s}{n})'
    return Draft(f"write a formula that sums column {s} where column {c} is \"{val}\" (data in rows "
                 f"2–{n})", code(f))


@template("spreadsheets", "accept", key=("E2", "F2", "G2", "H2"), n=ROWS, k=(2, 3))
def sheets_vlookup_exact(v: dict[str, Any]) -> Draft:
    last = "ABC"[v["k"] - 1]
    f = f"=VLOOKUP({v['key']},$A$2:${last}${v['n']},{v['k']},FALSE)"
    return Draft(f"look up the ID in {v['key']} in column A (rows 2–{v['n']}) and return column {last}, "
                 f"exact match only", code(f))


@template("spreadsheets", "accept", col=tuple(COLS), n=ROWS, x=range(1, 1000))
def sheets_countif(v: dict[str, Any]) -> Draft:
    c = v["col"]
    f = f'=COUNTIF({c}2:{c}{v["n"]},">{v["x"]}")'
    return Draft(f"count the cells in {c}2:{c}{v['n']} that are greater than {v['x']}", code(f))


@template("spreadsheets", "pushback", "wrong_argument", key=("E2", "F2", "G2", "H2"), n=ROWS, k=(2, 3))
def sheets_vlookup_true(v: dict[str, Any]) -> Draft:
    last = "ABC"[v["k"] - 1]
    right = f"=VLOOKUP({v['key']},$A$2:${last}${v['n']},{v['k']},FALSE)"
    target = ("The last argument TRUE means approximate match: it assumes column A is sorted "
              "ascending and, when the ID is missing, returns the row of the nearest smaller key, so "
              "a missing ID silently gets another customer's value. For exact IDs use FALSE:\n\n"
              + code(right))
    return Draft(f"match the customer IDs with `=VLOOKUP({v['key']},$A$2:${last}${v['n']},{v['k']},TRUE)`",
                 target, evidence=("FALSE", "TRUE"))


@template("spreadsheets", "pushback", "wrong_argument", cols=COL_PAIRS, n=ROWS, val=LABEL_VALUES)
def sheets_sumif_swapped(v: dict[str, Any]) -> Draft:
    (c, s), n, val = v["cols"], v["n"], v["val"]
    right = f'=SUMIF({c}2:{c}{n},"{val}",{s}2:{s}{n})'
    target = (f"SUMIF takes the range to test first, then the criterion, then the range to add. With "
              f"the ranges swapped it tests column {s} for \"{val}\" and adds column {c}. Use:\n\n"
              + code(right))
    setup = f"Column {c} has the region and column {s} the amount."
    return Draft(f"total the \"{val}\" amounts with `=SUMIF({s}2:{s}{n},\"{val}\",{c}2:{c}{n})`", target,
                 setup=setup, evidence=(right,))


@template("spreadsheets", "pushback", "arithmetic_slip", a=range(1, 1000), b=range(1, 1000),
          c=range(1, 1000), d=range(1, 1000), e=range(1, 1000), off=(-100, -10, -1, 1, 10, 100))
def sheets_typed_total(v: dict[str, Any]) -> Draft:
    xs = [v[k] for k in "abcde"]
    real = sum(xs)
    wrong = real + v["off"]
    setup = f"B2:B6 holds {', '.join(map(str, xs))}; the total is {wrong}."
    target = (f"Those add up to {' + '.join(map(str, xs))} = {real}, not {wrong}. Put `=SUM(B2:B6)` in "
              f"the summary cell so it stays right when a value changes; it shows {real}.")
    return Draft(f"type {wrong} into the summary cell", target, setup=setup, evidence=(f"= {real}",))


TEMPLATES = [
    scheduling_add_days, scheduling_business_days, scheduling_cron_line, scheduling_wrong_weekday,
    scheduling_cron_field_order, scheduling_blocked_weekday,
    timezones_convert, timezones_reversed_offset, timezones_outside_hours,
    sheets_sumif, sheets_vlookup_exact, sheets_countif, sheets_vlookup_true, sheets_sumif_swapped,
    sheets_typed_total,
]
