"""Checks by computation: is a calculation the model wrote down really right (or really wrong)?

A model-written situation may state the calculation its direction relies on, in a <check>
section: `17 * 23 = 381`, `round(2.675, 2) == 2.67`, `len("a,b,c".split(",")) = 3`. The claim is
evaluated here, never by the model and never by `exec`/`eval`: the expression is parsed with
`ast` and interpreted over a small safe subset.

  numbers    int and decimal literals, computed exactly as Fractions (0.1 + 0.2 = 0.3, which
             is what a calculation means; 7 / 2 = 3.5)
  operators  + - * / // % ** (exponent <= 64, results <= 200 digits), unary -, comparisons,
             and/or/not, conditional expressions
  values     strings, lists, tuples, dicts, subscripts and slices
  calls      len, sorted (reverse=), sum, min, max, abs, round, int, float, str (integers
             only), list, tuple, range (<= 10,000 items), and the string/list methods in
             METHODS; nothing else: no names, no attributes beyond METHODS, no lambdas,
             no comprehensions
  limits     expression <= 300 characters; every value <= 10,000 items counted through all
             its nesting, checked before a repetition is built; sum() of numbers only; 0.5 s

`check_claim(text)` returns a `Claim` with `holds` True/False, or None with the reason it could
not be computed (then the model judge decides instead).
"""

from __future__ import annotations

import ast
import operator
import re
import time
import warnings
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

MAX_CHARS = 300
MAX_ITEMS = 10_000
MAX_EXPONENT = 64
MAX_DIGITS = 200
MAX_SECONDS = 0.5
"""Wall-clock budget of one claim (a node-by-node check; every single operation is bounded)."""
MAX_DECIMALS = 6
"""A computed number is stated as an exact decimal with at most this many decimals; 1/3 cannot
be stated exactly and makes the claim uncheckable."""

METHODS = {
    str: {"upper", "lower", "strip", "lstrip", "rstrip", "split", "join", "replace", "count",
          "find", "index", "startswith", "endswith", "title", "capitalize", "isdigit"},
    list: {"count", "index"},
    tuple: {"count", "index"},
    dict: {"get", "keys", "values", "items"},
}


class Uncheckable(Exception):
    """The claim cannot be computed safely (unsupported syntax, too large, an error)."""


def _items(value: Any, budget: int = MAX_ITEMS) -> int:
    """Items in `value` counted through every level of nesting (a string by its length, a dict
    by keys and values), stopping once past `budget`: [range(1000)] * 1000 is 1,000,000 items,
    though its own length is 1000."""
    if isinstance(value, str):
        return len(value)
    if not isinstance(value, (list, tuple, dict)):
        return 0
    total = len(value)
    for item in (value.items() if isinstance(value, dict) else value):
        if total > budget:
            break
        total += _items(item, budget - total)
    return total


def _size(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, dict)) and _items(value) > MAX_ITEMS:
        raise Uncheckable(f"value longer than {MAX_ITEMS} items")
    if (isinstance(value, Fraction)
            and max(abs(value.numerator), value.denominator).bit_length() > MAX_DIGITS * 3.33):
        raise Uncheckable(f"number longer than {MAX_DIGITS} digits")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value).bit_length() > MAX_DIGITS * 3.33:
        raise Uncheckable(f"number longer than {MAX_DIGITS} digits")
    return value


def _num(value: Any) -> Any:
    """Fractions with denominator 1 become ints (so str(), range() and indexing work)."""
    if isinstance(value, Fraction) and value.denominator == 1:
        return int(value)
    return value


def _pow(a: Any, b: Any) -> Any:
    if not isinstance(b, int) or isinstance(b, bool) or abs(b) > MAX_EXPONENT:
        raise Uncheckable(f"exponent must be an integer within +-{MAX_EXPONENT}")
    if not isinstance(a, (int, Fraction)) or isinstance(a, bool):
        raise Uncheckable("** needs a number")
    a = Fraction(a)
    if max(abs(a.numerator), a.denominator).bit_length() * abs(b) > MAX_DIGITS * 3.33:
        raise Uncheckable(f"power longer than {MAX_DIGITS} digits")  # refused before computing it
    return a ** b


def _mul(a: Any, b: Any) -> Any:
    for seq, n in ((a, b), (b, a)):
        if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and _items(seq) * max(n, 0) > MAX_ITEMS:
            raise Uncheckable(f"repetition longer than {MAX_ITEMS} items")
    return a * b


def _div(a: Any, b: Any) -> Any:
    return Fraction(a) / Fraction(b)


BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: _mul, ast.Div: _div,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: _pow}
CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
          ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
          ast.NotIn: lambda a, b: a not in b}


def _str(x: Any) -> str:
    if isinstance(x, Fraction):
        raise Uncheckable("str() of a non-integer number differs between exact and float arithmetic")
    return str(x)


def _range(*args: Any) -> list[int]:
    r = range(*args)
    if len(r) > MAX_ITEMS:
        raise Uncheckable(f"range longer than {MAX_ITEMS}")
    return list(r)


def _sorted(items: Any, reverse: bool = False) -> list[Any]:
    return sorted(items, reverse=reverse)


def _sum(items: Any, start: Any = 0) -> Any:
    """Numbers only: sum() over lists concatenates them, quadratic in the total length."""
    values = [start, *items]
    if not all(isinstance(v, (int, Fraction)) and not isinstance(v, bool) for v in values):
        raise Uncheckable("sum() adds numbers only")
    return sum(values[1:], values[0])


FUNCTIONS = {"len": len, "sorted": _sorted, "sum": _sum, "min": min,
             "max": max, "abs": abs, "round": round, "int": int, "float": Fraction, "str": _str,
             "list": list, "tuple": tuple, "range": _range}


class _Interpreter:
    def __init__(self) -> None:
        self.deadline = time.monotonic() + MAX_SECONDS

    def run(self, node: ast.AST) -> Any:
        # Every operation is bounded in size above; the clock is the last line: a claim that
        # still takes longer is refused, whatever made it slow.
        if time.monotonic() > self.deadline:
            raise Uncheckable(f"took longer than {MAX_SECONDS} s to compute")
        method = getattr(self, f"do_{type(node).__name__}", None)
        if method is None:
            raise Uncheckable(f"{type(node).__name__} is not allowed in a check")
        return _size(_num(method(node)))

    def do_Expression(self, node: ast.Expression) -> Any:
        return self.run(node.body)

    def do_Constant(self, node: ast.Constant) -> Any:
        v = node.value
        if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
            return v
        if isinstance(v, float):
            return Fraction(repr(v))  # the decimal as written: 0.1 -> 1/10 exactly
        raise Uncheckable(f"constant of type {type(v).__name__}")

    def do_UnaryOp(self, node: ast.UnaryOp) -> Any:
        v = self.run(node.operand)
        if isinstance(node.op, ast.USub):
            return -v
        if isinstance(node.op, ast.UAdd):
            return +v
        if isinstance(node.op, ast.Not):
            return not v
        raise Uncheckable("bitwise operators are not allowed")

    def do_BinOp(self, node: ast.BinOp) -> Any:
        op = BINOPS.get(type(node.op))
        if op is None:
            raise Uncheckable(f"operator {type(node.op).__name__} is not allowed")
        return op(self.run(node.left), self.run(node.right))

    def do_BoolOp(self, node: ast.BoolOp) -> Any:
        values = [self.run(v) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)

    def do_Compare(self, node: ast.Compare) -> Any:
        left = self.run(node.left)
        for op, comp in zip(node.ops, node.comparators):
            fn = CMPOPS.get(type(op))
            if fn is None:
                raise Uncheckable(f"comparison {type(op).__name__} is not allowed")
            right = self.run(comp)
            if not fn(left, right):
                return False
            left = right
        return True

    def do_IfExp(self, node: ast.IfExp) -> Any:
        return self.run(node.body) if self.run(node.test) else self.run(node.orelse)

    def do_List(self, node: ast.List) -> Any:
        return [self.run(e) for e in node.elts]

    def do_Tuple(self, node: ast.Tuple) -> Any:
        return tuple(self.run(e) for e in node.elts)

    def do_Dict(self, node: ast.Dict) -> Any:
        if any(k is None for k in node.keys):
            raise Uncheckable("** in a dict is not allowed")
        return {self.run(k): self.run(v) for k, v in zip(node.keys, node.values)}  # type: ignore[arg-type]

    def do_Subscript(self, node: ast.Subscript) -> Any:
        value = self.run(node.value)
        if isinstance(node.slice, ast.Slice):
            bounds = (node.slice.lower, node.slice.upper, node.slice.step)
            parts = [None if p is None else self.run(p) for p in bounds]
            return value[slice(*parts)]
        return value[self.run(node.slice)]

    def do_Call(self, node: ast.Call) -> Any:
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise Uncheckable("**kwargs are not allowed")
            kwargs[kw.arg] = self.run(kw.value)
        if any(isinstance(a, ast.Starred) for a in node.args):
            raise Uncheckable("*args are not allowed")
        args = [self.run(a) for a in node.args]
        if isinstance(node.func, ast.Name):
            fn = FUNCTIONS.get(node.func.id)
            if fn is None:
                raise Uncheckable(f"function {node.func.id!r} is not allowed")
            if kwargs and node.func.id not in ("sorted", "round"):
                raise Uncheckable(f"keyword arguments to {node.func.id} are not allowed")
            return fn(*args, **kwargs)
        if isinstance(node.func, ast.Attribute):
            owner = self.run(node.func.value)
            allowed = METHODS.get(type(owner), set())
            if node.func.attr not in allowed:
                raise Uncheckable(f"method {node.func.attr!r} of {type(owner).__name__} is not allowed")
            _method_size(owner, node.func.attr, args)
            result = getattr(owner, node.func.attr)(*args, **kwargs)
            return list(result) if node.func.attr in ("keys", "values", "items") else result
        raise Uncheckable("only named functions and allowed methods may be called")


def _method_size(owner: Any, name: str, args: list[Any]) -> None:
    """Refuse method calls whose RESULT would be huge before making them (_size checks only
    after a value exists): str.replace and str.join can multiply lengths."""
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        if (owner.count(args[0]) + 1) * len(args[1]) + len(owner) > MAX_ITEMS:
            raise Uncheckable(f"replace result longer than {MAX_ITEMS}")
    if name == "join" and args and isinstance(args[0], (list, tuple)):
        total = sum(len(x) if isinstance(x, str) else 0 for x in args[0]) + len(owner) * len(args[0])
        if total > MAX_ITEMS:
            raise Uncheckable(f"join result longer than {MAX_ITEMS}")


_PURE_ARITHMETIC = re.compile(r"[\d\s,.+\-*/()%^$€£]+")


def normalise_arithmetic(expression: str) -> str:
    """Calculations as people write them -> Python: × ÷ − as * / -, 'X% of Y' as (X/100)*Y,
    and, when the expression is pure arithmetic (digits and operators only), '^' as power,
    currency signs dropped and thousands separators removed ('1,234 + 1' is 1235, not a tuple)."""
    e = expression.replace("×", "*").replace("÷", "/").replace("−", "-")
    e = re.sub(r"(\d+(?:\.\d+)?)\s*%\s*of\s+", r"(\1/100)*", e)
    if _PURE_ARITHMETIC.fullmatch(e):
        e = re.sub(r"[$€£]", "", e)
        e = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", e)
        e = e.replace("^", "**")
    return e


def evaluate(expression: str) -> Any:
    """The value of `expression` under the safe subset; Uncheckable if it is outside it."""
    if len(expression) > MAX_CHARS:
        raise Uncheckable(f"expression longer than {MAX_CHARS} characters")
    try:
        with warnings.catch_warnings():  # '1abc' warns "invalid decimal literal" before failing
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(normalise_arithmetic(expression).strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        raise Uncheckable(f"not an expression ({type(exc).__name__})") from None
    try:
        return _Interpreter().run(tree)
    except Uncheckable:
        raise
    except Exception as exc:  # ZeroDivisionError, TypeError, IndexError, ... from the claim itself
        raise Uncheckable(f"{type(exc).__name__}: {exc}"[:120]) from None


_NUMBER = re.compile(r"[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-−]?\.\d+")


def parse_value(text: str) -> Any:
    """A claimed value: a number ('1,234.5', '$12', '15%' -> its number), else a Python literal
    ("'abc'", '[1, 2]'), else the bare text as a string."""
    t = text.strip().rstrip(".").strip()
    bare = t.strip("$€£").rstrip("%").strip()
    if _NUMBER.fullmatch(bare):
        return _num(Fraction(bare.replace(",", "").replace("−", "-")))
    try:
        return ast.literal_eval(t)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return t


def format_value(value: Any) -> str:
    """How a computed value is stated: numbers as exact decimals ('391', '3.5'), others as
    Python writes them. Uncheckable when a number has no short exact decimal form."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Fraction):
        scaled = value * 10**MAX_DECIMALS
        if scaled.denominator != 1:
            raise Uncheckable(f"{value} has no exact decimal form with <= {MAX_DECIMALS} decimals")
        sign = "-" if value < 0 else ""
        whole, frac = divmod(abs(scaled.numerator), 10**MAX_DECIMALS)
        digits = f"{frac:0{MAX_DECIMALS}d}".rstrip("0")
        return f"{sign}{whole}" + (f".{digits}" if digits else "")
    return repr(value)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, (int, Fraction)) and isinstance(b, (int, Fraction)) and not isinstance(a, bool):
        return Fraction(a) == Fraction(b)
    return a == b


@dataclass(frozen=True)
class Claim:
    text: str
    expression: str | None
    claimed: str | None
    computed: str | None
    holds: bool | None
    """True: the stated value is right; False: wrong; None: could not be computed (see error)."""
    error: str | None = None


def split_claim(text: str) -> tuple[str, str] | None:
    """'EXPR = VALUE' or 'EXPR == VALUE' -> (EXPR, VALUE), at the last lone '=' / '=='."""
    for m in reversed(list(re.finditer(r"(?<![<>!=])==?(?!=)", text))):
        left, right = text[:m.start()].strip(), text[m.end():].strip()
        if left and right:
            return left, right
    return None


def check_claim(text: str) -> Claim:
    """Compute a claim 'EXPR = VALUE' (see the module docstring); never raises."""
    text = text.strip()
    parts = split_claim(text)
    if parts is None:
        return Claim(text, None, None, None, None, "not of the form 'expression = value'")
    expression, claimed = parts
    try:
        value = evaluate(expression)
        computed = format_value(value)
    except Uncheckable as exc:
        return Claim(text, expression, claimed, None, None, str(exc))
    return Claim(text, expression, claimed, computed, _equal(value, parse_value(claimed)))
