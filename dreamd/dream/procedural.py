"""General (anti-forgetting) tasks with checkable answers: arithmetic, short code, reasoning.

Answers are computed, never typed: arithmetic with Python integers and Fractions, code answers
by running the snippet this module generated (only code built here from fixed templates is ever
run, with a namespace of a few harmless builtins: no user or model text reaches `exec`),
reasoning answers with `datetime` and sorting. The answer goes into meta['answer'] so the
screener can check that the target states it.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable
from fractions import Fraction

from dreamd.dream.grammar import LEX
from dreamd.dream.tasks_time import WEEKDAYS, long_date, short_date

PEOPLE = LEX["people"]
ASK = ("What is {q}?", "Compute {q}.", "Calculate {q} exactly.", "{q} = ?", "Work out {q}.",
       "Quick arithmetic: {q}?")

# ---- arithmetic -------------------------------------------------------------------------------


def exact_decimal(x: Fraction) -> str:
    """A fraction whose denominator divides a power of ten, written exactly: 1749.86, 12, 0.5."""
    whole, frac = divmod(abs(x.numerator), x.denominator)
    digits = ""
    while frac:
        frac *= 10
        d, frac = divmod(frac, x.denominator)
        digits += str(d)
        assert len(digits) <= 12, f"{x} is not a terminating decimal"
    return ("-" if x < 0 else "") + str(whole) + (f".{digits}" if digits else "")


def _digits(r: random.Random, lo: int, hi: int) -> int:
    return r.randrange(10 ** (lo - 1), 10 ** hi)


def arithmetic(r: random.Random) -> tuple[str, str, str, str]:
    op = r.choice(("add", "sub", "mul", "div", "pct", "pow"))
    if op == "add":
        a, b = _digits(r, 4, 7), _digits(r, 4, 7)
        q, ans, work = f"{a} + {b}", a + b, ""
    elif op == "sub":
        a, b = sorted((_digits(r, 4, 7), _digits(r, 3, 6)), reverse=True)
        q, ans, work = f"{a} − {b}", a - b, ""
    elif op == "mul":
        a, b = _digits(r, 3, 4), _digits(r, 2, 3)
        parts = [(int(d) * 10 ** i) for i, d in enumerate(reversed(str(b))) if d != "0"]
        q, ans = f"{a} × {b}", a * b
        work = (" + ".join(f"{a} × {p}" for p in reversed(parts)) + " = "
                + " + ".join(str(a * p) for p in reversed(parts)) + "\n") if len(parts) > 1 else ""
    elif op == "div":
        b = r.randrange(3, 100)
        a = _digits(r, 4, 6)
        quot, rem = divmod(a, b)
        q = f"{a} ÷ {b} (quotient and remainder)"
        return "div", r.choice(ASK).format(q=q), f"{a} = {b} × {quot} + {rem}, so the quotient is {quot} " \
            f"and the remainder is {rem}.", str(quot)
    elif op == "pct":
        p, n = r.choice((5, 12.5, 15, 17.5, 20, 25, 35, 40, 62.5, 75)), r.randrange(8, 100000, 8)
        ans_s = exact_decimal(Fraction(str(p)) * n / 100)
        return "pct", r.choice(ASK).format(q=f"{p}% of {n}"), f"{n} × {p}/100 = {ans_s}", ans_s
    else:
        b = r.randrange(2, 1000)
        e = r.randrange(2, 3 if b >= 200 else 4 if b >= 40 else 5 if b >= 20 else 6)  # < ~10^7
        q, ans, work = f"{b}^{e}", b ** e, ""
    return op, r.choice(ASK).format(q=q), f"{work}{q} = {ans}", str(ans)


# ---- code -------------------------------------------------------------------------------------

SAFE_BUILTINS = {"range": range, "len": len, "sorted": sorted, "sum": sum, "min": min, "max": max,
                 "abs": abs, "str": str, "list": list, "dict": dict}


def run_snippet(src: str, call: str) -> object:
    """Run a snippet THIS MODULE generated and evaluate `call` against it."""
    ns: dict[str, object] = {"__builtins__": SAFE_BUILTINS}
    exec(compile(src, "<procedural>", "exec"), ns)  # noqa: S102 - generated here from templates
    return eval(compile(call, "<procedural>", "eval"), ns)  # noqa: S307 - same


def _loop(r: random.Random) -> tuple[str, str]:
    init, start, step, op = r.randrange(0, 10), r.randrange(0, 5), r.randrange(1, 5), r.choice("+-")
    src = (f"def f(n):\n    total = {init}\n    for i in range({start}, n, {step}):\n"
           f"        total {op}= i\n    return total")
    return src, f"f({r.randrange(5, 60)})"


def _comprehension(r: random.Random) -> tuple[str, str]:
    op, k, m = r.choice("+-*"), r.randrange(1, 10), r.randrange(2, 5)
    rem = r.randrange(0, m)
    src = f"def f(xs):\n    return [x {op} {k} for x in xs if x % {m} == {rem}]"
    xs = [r.randrange(0, 50) for _ in range(r.randrange(4, 9))]
    return src, f"f({xs})"


WORDS = ("banana", "network", "pipeline", "gradient", "teapot", "lighthouse", "keyboard", "sunflower",
         "notebook", "umbrella", "calendar", "spreadsheet", "algorithm", "mountain")


def _strings(r: random.Random) -> tuple[str, str]:
    i, j = sorted(r.sample(range(0, 8), 2))
    tail = r.choice((".upper()", "[::-1]", " * 2", ".replace('a', '_')", " + s[-1]", ".count('e')"))
    src = f"def f(s):\n    return s[{i}:{j}]{tail}"
    return src, f"f({r.choice(WORDS)!r})"


def _counting(r: random.Random) -> tuple[str, str]:
    key = r.choice(("len(w)", "w[0]", "w[-1]"))
    src = ("def f(words):\n    counts = {}\n    for w in words:\n"
           f"        counts[{key}] = counts.get({key}, 0) + 1\n    return counts")
    return src, f"f({r.sample(WORDS, r.randrange(3, 7))})"


def _while(r: random.Random) -> tuple[str, str]:
    d = r.randrange(2, 5)
    src = (f"def f(n):\n    steps = 0\n    while n > 1:\n        n = n // {d} if n % {d} == 0 else n - 1\n"
           f"        steps += 1\n    return steps")
    return src, f"f({r.randrange(2, 500)})"


def _recursion(r: random.Random) -> tuple[str, str]:
    base, k, c, add = r.randrange(2, 4), r.randrange(2, 4), r.randrange(1, 6), r.randrange(0, 4)
    src = (f"def f(n):\n    if n < {base}:\n        return n + {add}\n"
           f"    return f(n - 1) + {c} * f(n - {k})")
    return src, f"f({r.randrange(base, 16)})"


def _sorting(r: random.Random) -> tuple[str, str]:
    key = r.choice(("-x", "x % 10", "abs(x - 25)", "(x % 3, x)"))
    src = f"def f(xs):\n    return sorted(xs, key=lambda x: {key})[:{r.randrange(2, 5)}]"
    return src, f"f({[r.randrange(0, 60) for _ in range(r.randrange(5, 9))]})"


CODE_FAMILIES: tuple[Callable[[random.Random], tuple[str, str]], ...] = (
    _loop, _comprehension, _strings, _counting, _while, _recursion, _sorting)
CODE_ASK = ("What does `{call}` return?\n\n```python\n{src}\n```",
            "```python\n{src}\n```\n\nWhat is the value of `{call}`?",
            "Given this function:\n\n```python\n{src}\n```\n\nwhat does `{call}` evaluate to?")


def code_question(r: random.Random) -> tuple[str, str, str, str]:
    family = r.choice(CODE_FAMILIES)
    src, call = family(r)
    value = repr(run_snippet(src, call))
    target = r.choice(("`{c}` returns `{v}`.", "It returns `{v}`.", "`{c}` evaluates to `{v}`."))
    return family.__name__.lstrip("_"), r.choice(CODE_ASK).format(call=call, src=src), \
        target.format(c=call, v=value), value


# ---- reasoning --------------------------------------------------------------------------------

ORDERINGS = (("taller", "tallest", "shortest"), ("older", "oldest", "youngest"),
             ("faster", "fastest", "slowest"), ("heavier", "heaviest", "lightest"))


def _ordering(r: random.Random) -> tuple[str, str, str]:
    names = r.sample(PEOPLE, r.randrange(3, 6))  # names[0] is the most <attribute>
    more, most, least = r.choice(ORDERINGS)
    facts = [f"{a} is {more} than {b}." for a, b in zip(names, names[1:])]
    r.shuffle(facts)
    top = r.random() < 0.5
    ans = names[0] if top else names[-1]
    q = " ".join(facts) + f" Who is the {most if top else least}?"
    chain = " > ".join(names)
    return q, f"From the facts, {chain} ({more} first), so {ans} is the {most if top else least}.", ans


def _weekday(r: random.Random) -> tuple[str, str, str]:
    d = dt.date(2024, 1, 1) + dt.timedelta(days=r.randrange(0, 1500))
    n = r.randrange(1, 400)
    later = d + dt.timedelta(days=n)
    ans = WEEKDAYS[later.weekday()]
    q = f"{short_date(d)} is a {WEEKDAYS[d.weekday()]}. What weekday is it {n} days later?"
    return q, f"{n} = 7 × {n // 7} + {n % 7}, so move {n % 7} weekdays on: {long_date(later)}. It is a {ans}.", ans


UNIT_QUESTIONS = (
    ("How many seconds are in {a} hours and {b} minutes?", lambda a, b: a * 3600 + b * 60,
     "{a} × 3600 + {b} × 60 = {x}"),
    ("How many minutes are in {a} days and {b} hours?", lambda a, b: a * 1440 + b * 60,
     "{a} × 1440 + {b} × 60 = {x}"),
    ("How many millilitres are in {a} litres and {b} centilitres?", lambda a, b: a * 1000 + b * 10,
     "{a} × 1000 + {b} × 10 = {x}"),
    ("How many centimetres are in {a} metres and {b} millimetres?", lambda a, b: Fraction(a * 1000 + b, 10),
     "{a} × 100 + {b} / 10 = {x}"),
    ("How many grams are in {a} kg and {b} g?", lambda a, b: a * 1000 + b, "{a} × 1000 + {b} = {x}"),
)


def _units(r: random.Random) -> tuple[str, str, str]:
    q, fn, work = r.choice(UNIT_QUESTIONS)
    a, b = r.randrange(1, 100), r.randrange(1, 100)
    xs = exact_decimal(Fraction(fn(a, b)))
    return q.format(a=a, b=b), work.format(a=a, b=b, x=xs) + ".", xs


def _duration(r: random.Random) -> tuple[str, str, str]:
    h, m, n = r.randrange(6, 23), r.randrange(0, 60, 5), r.randrange(15, 600, 5)
    end = dt.datetime(2024, 1, 1, h, m) + dt.timedelta(minutes=n)
    ans = f"{end:%H:%M}"
    q = f"A session starts at {h:02d}:{m:02d} and lasts {n} minutes. When does it end?"
    extra = " the next day" if end.day == 2 else ""
    return q, f"{n} min = {n // 60} h {n % 60} min; {h:02d}:{m:02d} + {n // 60} h {n % 60} min = {ans}{extra}.", ans


REASONING = (_ordering, _weekday, _units, _duration)


def reasoning(r: random.Random) -> tuple[str, str, str, str]:
    fam = r.choice(REASONING)
    q, target, ans = fam(r)
    return fam.__name__.lstrip("_"), q, target, ans


def general_turn(r: random.Random) -> tuple[str, str, dict[str, object]]:
    """(user turn, target, meta) for one general scenario with a checkable answer."""
    area = r.choice(("arithmetic", "code", "reasoning"))
    family, q, target, ans = {"arithmetic": arithmetic, "code": code_question, "reasoning": reasoning}[area](r)
    return q, target, {"domain": area, "family": family, "answer": ans}


def space() -> int:
    """Upper bound on distinct general turns (sum over families of their choices)."""
    arith = len(ASK) * (2 * 9_999_000 ** 2 + 9_900 * 990 + 97 * 999_000 + 10 * 12_500 + 1_250)
    code = len(CODE_ASK) * 3 * (10 * 5 * 4 * 2 * 55 + 3 * 9 * 9 * 50 ** 6 + 28 * 6 * 14
                                + 3 * 14 ** 5 + 3 * 498 + 4 * 14 * 20 + 4 * 3 * 60 ** 6)
    reason = 2 * 4 * 40 ** 5 * 120 + 1500 * 399 + 5 * 99 * 99 + 17 * 12 * 117
    return arith + code + reason
