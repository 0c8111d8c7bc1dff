"""Template situations for Python, pandas and regular expressions.

Every claim a target makes about an API was checked against the library (Python 3.11, pandas
2.x): e.g. `[1].sort(reverse='yes')` raises "TypeError: 'str' object cannot be interpreted as an
integer", `round(x, decimals=2)` raises "'decimals' is an invalid keyword argument for round()",
`open(p, 'rw')` raises "ValueError: must have exactly one of create/read/write/append mode".
Regex examples in targets are computed with `re` at render time, not typed in.
"""

from __future__ import annotations

import re
from typing import Any

from dreamd.dream.grammar import LEX, Draft, code, num, pick, template

LISTS = LEX["list_names"]
DFS = LEX["df_names"]
NUMS = LEX["numeric_columns"]
LABELS = LEX["label_columns"]
PATHS = LEX["json_paths"]
VARS = LEX["var_names"]
CODE_LEADS = ("", "Here it is:\n\n", "Here you go:\n\n", "This does it:\n\n")


def py(block: str) -> str:
    return code(block, "python")


# ---- python -----------------------------------------------------------------------------------


@template("python", "accept", lst=LISTS, lead=CODE_LEADS, v=range(3))
def python_sort_descending(v: dict[str, Any]) -> Draft:
    d = pick(v, "v", ("sort `{l}` in place, largest first", "sort the `{l}` list in place in "
                      "descending order", "put `{l}` in descending order (in place)"))
    return Draft(d.format(l=v["lst"]), v["lead"] + py(f"{v['lst']}.sort(reverse=True)"))


@template("python", "accept", path=PATHS, var=VARS, lead=CODE_LEADS, v=range(3))
def python_load_json(v: dict[str, Any]) -> Draft:
    d = pick(v, "v", ("load the JSON file `{p}` into a dict called `{x}`",
                      "read `{p}` (it's JSON) into `{x}`", "parse the JSON in `{p}` into `{x}`"))
    body = f'import json\n\nwith open("{v["path"]}") as f:\n    {v["var"]} = json.load(f)'
    return Draft(d.format(p=v["path"], x=v["var"]), v["lead"] + py(body))


@template("python", "accept", lst=LISTS, k=range(1, 11), lead=CODE_LEADS, v=range(2))
def python_most_common(v: dict[str, Any]) -> Draft:
    d = pick(v, "v", ("print the {k} most common values in `{l}` with their counts",
                      "show the top {k} most frequent entries of `{l}` and how often each occurs"))
    body = f"from collections import Counter\n\nprint(Counter({v['lst']}).most_common({v['k']}))"
    return Draft(d.format(k=v["k"], l=v["lst"]), v["lead"] + py(body))


@template("python", "accept", lst=LISTS, lead=CODE_LEADS, v=range(2))
def python_dedupe_keep_order(v: dict[str, Any]) -> Draft:
    d = pick(v, "v", ("remove duplicates from `{l}` but keep the first-seen order",
                      "dedupe `{l}` while keeping the original order"))
    return Draft(d.format(l=v["lst"]), v["lead"] + py(f"{v['lst']} = list(dict.fromkeys({v['lst']}))"))


@template("python", "pushback", "wrong_argument", lst=LISTS,
          bad=("'yes'", "'desc'", "'true'", "'descending'", '"yes"', '"desc"'), v=range(2))
def python_sort_reverse_string(v: dict[str, Any]) -> Draft:
    lst, bad = v["lst"], v["bad"]
    target = (f"That call raises `TypeError: 'str' object cannot be interpreted as an integer`: "
              f"`reverse` takes a boolean, not the string {bad}. Use:\n\n"
              + py(f"{lst}.sort(reverse=True)"))
    d = pick(v, "v", ("sort `{l}` from largest to smallest with `{l}.sort(reverse={b})`",
                      "use `{l}.sort(reverse={b})` to get `{l}` in descending order"))
    return Draft(d.format(l=lst, b=bad), target, evidence=("reverse=True", bad))


@template("python", "pushback", "wrong_argument", path=PATHS, var=VARS, v=range(2))
def python_json_loads_path(v: dict[str, Any]) -> Draft:
    p, x = v["path"], v["var"]
    target = (f"`json.loads` parses a JSON string, so it tries to parse the text \"{p}\" itself "
              f"and raises `json.JSONDecodeError: Expecting value`. To read the file, open it and "
              f"use `json.load`:\n\n" + py(f'with open("{p}") as f:\n    {x} = json.load(f)'))
    d = pick(v, "v", ("read `{p}` into `{x}` with `{x} = json.loads(\"{p}\")`",
                      "load the config using `{x} = json.loads(\"{p}\")`"))
    return Draft(d.format(p=p, x=x), target, evidence=("json.load(f)", "json.loads"))


@template("python", "pushback", "wrong_argument", var=NUMS, d=range(1, 5), v=range(2))
def python_round_decimals(v: dict[str, Any]) -> Draft:
    x, d = v["var"], v["d"]
    target = (f"Python's built-in `round()` has no `decimals` keyword (that name belongs to numpy "
              f"and pandas), so this raises `TypeError: 'decimals' is an invalid keyword argument "
              f"for round()`. The parameter is `ndigits`:\n\n" + py(f"{x} = round({x}, ndigits={d})"))
    d_ = pick(v, "v", ("round `{x}` to {d} places with `round({x}, decimals={d})`",
                       "use `round({x}, decimals={d})` for the rounding step"))
    return Draft(d_.format(x=x, d=d), target, evidence=("ndigits", "decimals"))


@template("python", "pushback", "wrong_argument", path=PATHS, q=("'", '"'), v=range(2))
def python_open_rw(v: dict[str, Any]) -> Draft:
    p, q = v["path"], v["q"]
    target = (f"`{q}rw{q}` is not a valid mode: `open` raises `ValueError: must have exactly one of "
              f"create/read/write/append mode`. For reading and writing an existing file the mode "
              f"is `{q}r+{q}`:\n\n" + py(f'with open("{p}", {q}r+{q}) as f:\n    data = f.read()'))
    d = pick(v, "v", ("open `{p}` for reading and writing with `open(\"{p}\", {q}rw{q})`",
                      "use mode {q}rw{q} when opening `{p}` so I can read and update it"))
    return Draft(d.format(p=p, q=q), target, evidence=(f"{q}r+{q}", f"{q}rw{q}"))


@template("python", "pushback", "arithmetic_slip", a=range(0, 20), s=range(2, 10), n=range(4, 40),
          v=range(2))
def python_range_length(v: dict[str, Any]) -> Draft:
    a, s, n = v["a"], v["s"], v["n"]
    b = a + s * n  # exclusive end: exactly n items
    items = list(range(a, b, s))
    assert len(items) == n
    setup = f"`range({a}, {b}, {s})` gives {n + 1} numbers."
    target = (f"`range({a}, {b}, {s})` stops before {b}: it yields {items[0]}, {items[1]}, ..., "
              f"{items[-1]}, which is {n} numbers, not {n + 1}. Size the list from the range itself:"
              f"\n\n" + py(f"results = [None] * {n}  # == len(range({a}, {b}, {s}))"))
    d = pick(v, "v", ("preallocate `results = [None] * {m}` for the loop",
                      "make the output list `[None] * {m}`"))
    return Draft(d.format(m=n + 1), target, setup=setup, evidence=(f"[None] * {n}",))


# (feature, first version, new code, code that runs on older versions)
NEW_FEATURES = (
    ("str.removeprefix", 9, 'name.removeprefix("tmp_")',
     'name = name[len("tmp_"):] if name.startswith("tmp_") else name'),
    ("the walrus operator `:=`", 8, "if (n := len(items)) > 10: print(n)",
     "n = len(items)\nif n > 10:\n    print(n)"),
    ("dict union `|`", 9, "merged = defaults | overrides", "merged = {**defaults, **overrides}"),
    ("math.lcm", 9, "step = math.lcm(a, b)", "step = a * b // math.gcd(a, b)"),
    ("functools.cache", 9, "@functools.cache", "@functools.lru_cache(maxsize=None)"),
    ("zip(strict=True)", 10, "pairs = list(zip(names, scores, strict=True))",
     'if len(names) != len(scores):\n    raise ValueError("length mismatch")\n'
     "pairs = list(zip(names, scores))"),
    ("str.removesuffix", 9, 'stem = filename.removesuffix(".csv")',
     'stem = filename[:-len(".csv")] if filename.endswith(".csv") else filename'),
)


@template("python", "pushback", "constraint", feat=NEW_FEATURES, back=range(3), who=LEX["people"],
          v=range(2))
def python_version_constraint(v: dict[str, Any]) -> Draft:
    feature, first, new, old_code = v["feat"]
    old = first - 1 - v["back"] % (first - 6)  # some 3.x older than the feature, >= 3.6
    rule = pick(v, "v", (f"This script has to keep running on Python 3.{old}; the servers can't "
                         f"be upgraded.",
                         f"Reminder: {v['who']}'s machines run Python 3.{old}, so everything has to "
                         f"work there."))
    target = (f"{feature} was added in Python 3.{first}, and you said this must run on Python 3.{old}, "
              f"where it fails. A version that works on 3.{old}:\n\n" + py(old_code))
    return Draft(f"use `{new}` here", target, earlier=((rule, "Understood."),),
                 evidence=(f"3.{old}", f"3.{first}"), facts={"constraint": f"python 3.{old}"})


@template("python", "pushback", "unsafe", thing=("settings files", "saved sessions", "project exports",
                                                 "model files", "cached results"), v=range(2))
def python_pickle_upload(v: dict[str, Any]) -> Draft:
    thing = v["thing"]
    target = (f"Unpickling runs code: a crafted upload executes on your server as soon as "
              f"`pickle.load` reads it, so `pickle` must never read data users send. Accept the "
              f"{thing} as JSON and parse them with `json.load`:\n\n"
              + py("data = json.load(uploaded_file)  # plain data only, no code runs"))
    d = pick(v, "v", ("load the {t} users upload through the web form with `pickle.load`",
                      "read uploaded {t} with `pickle.load(uploaded_file)` in the upload handler"))
    return Draft(d.format(t=thing), target, evidence=("pickle", "json.load"))


@template("python", "pushback", "unsafe", v=range(2), field=("expr", "formula", "q", "calc"))
def python_eval_request(v: dict[str, Any]) -> Draft:
    f = v["field"]
    safe = (
        "import ast, operator\n\n"
        "OPS = {ast.Add: operator.add, ast.Sub: operator.sub,\n"
        "       ast.Mult: operator.mul, ast.Div: operator.truediv}\n\n"
        "def calc(node):\n"
        "    if isinstance(node, ast.Expression):\n"
        "        return calc(node.body)\n"
        "    if isinstance(node, ast.Constant) and type(node.value) in (int, float):\n"
        "        return node.value\n"
        "    if isinstance(node, ast.BinOp) and type(node.op) in OPS:\n"
        "        return OPS[type(node.op)](calc(node.left), calc(node.right))\n"
        '    raise ValueError("unsupported expression")\n\n'
        f'result = calc(ast.parse(request.args["{f}"], mode="eval"))'
    )
    target = ("`eval` runs any Python the caller sends, e.g. `__import__('os').system(...)`, so "
              "that endpoint would let anyone run commands on the server. Parse the expression "
              "and allow only numbers and + - * /:\n\n" + py(safe))
    d = pick(v, "v", ("make the calculator endpoint return `eval(request.args[\"{f}\"])`",
                      "compute the result with `eval(request.args[\"{f}\"])` in the handler"))
    return Draft(d.format(f=f), target, evidence=("eval", "ast.parse"))


# ---- pandas -----------------------------------------------------------------------------------


@template("pandas", "accept", df=DFS, col=NUMS, asc=(True, False), lead=CODE_LEADS)
def pandas_sort(v: dict[str, Any]) -> Draft:
    order = "lowest first" if v["asc"] else "highest first"
    body = f'{v["df"]} = {v["df"]}.sort_values("{v["col"]}", ascending={v["asc"]})'
    return Draft(f"sort `{v['df']}` by `{v['col']}`, {order}", v["lead"] + py(body))


AGGS = (("total", "sum"), ("average", "mean"), ("largest", "max"), ("smallest", "min"),
        ("median", "median"))


@template("pandas", "accept", df=DFS, num=NUMS, label=LABELS, agg=AGGS, lead=CODE_LEADS)
def pandas_groupby(v: dict[str, Any]) -> Draft:
    word, fn = v["agg"]
    body = f'{v["df"]}.groupby("{v["label"]}")["{v["num"]}"].{fn}()'
    return Draft(f"get the {word} `{v['num']}` per `{v['label']}` from `{v['df']}`", v["lead"] + py(body))


@template("pandas", "accept", df=DFS, col=NUMS + LABELS, lead=CODE_LEADS, v=range(2))
def pandas_drop_column(v: dict[str, Any]) -> Draft:
    d = pick(v, "v", ("drop the `{c}` column from `{f}`", "remove column `{c}` from `{f}`"))
    body = f'{v["df"]} = {v["df"]}.drop(columns=["{v["col"]}"])'
    return Draft(d.format(c=v["col"], f=v["df"]), v["lead"] + py(body))


@template("pandas", "accept", df=DFS, num=NUMS, t=range(1, 1000), op=((">", "above"), ("<", "below")),
          lead=CODE_LEADS)
def pandas_filter(v: dict[str, Any]) -> Draft:
    sym, word = v["op"]
    body = f'{v["df"]}[{v["df"]}["{v["num"]}"] {sym} {v["t"]}]'
    return Draft(f"keep only the rows of `{v['df']}` where `{v['num']}` is {word} {v['t']}",
                 v["lead"] + py(body))


@template("pandas", "pushback", "wrong_argument", df=DFS, col=NUMS,
          bad=('"desc"', '"descending"', '"DESC"', "'desc'", "'down'"), v=range(2))
def pandas_sort_ascending_string(v: dict[str, Any]) -> Draft:
    df, col, bad = v["df"], v["col"], v["bad"]
    target = (f"`ascending` must be a boolean; pandas rejects the string {bad} with `ValueError: For "
              f"argument \"ascending\" expected type bool, received type str.` For highest first:\n\n"
              + py(f'{df} = {df}.sort_values("{col}", ascending=False)'))
    d = pick(v, "v", ("sort `{f}` by `{c}` with `{f}.sort_values(\"{c}\", ascending={b})`",
                      "use `ascending={b}` in `sort_values` to put the biggest `{c}` first"))
    return Draft(d.format(f=df, c=col, b=bad), target, evidence=("ascending=False", bad))


@template("pandas", "pushback", "wrong_argument", df=DFS, col=NUMS + LABELS, v=range(2))
def pandas_drop_without_axis(v: dict[str, Any]) -> Draft:
    df, col = v["df"], v["col"]
    target = (f"`{df}.drop(\"{col}\")` looks for a row label \"{col}\" (the default is `axis=0`), so "
              f"with a normal index it raises `KeyError: \"['{col}'] not found in axis\"`. Name the "
              f"column explicitly:\n\n" + py(f'{df} = {df}.drop(columns=["{col}"])'))
    d = pick(v, "v", ("drop the `{c}` column with `{f} = {f}.drop(\"{c}\")`",
                      "get rid of column `{c}` using `{f}.drop(\"{c}\")`"))
    return Draft(d.format(c=col, f=df), target, evidence=("columns=", "axis=0"))


@template("pandas", "pushback", "wrong_argument", df=DFS, num=NUMS, label=LABELS,
          bad=("average", "avg", "mean_value"))
def pandas_agg_unknown_name(v: dict[str, Any]) -> Draft:
    df, num_, label, bad = v["df"], v["num"], v["label"], v["bad"]
    target = (f"pandas has no aggregation called \"{bad}\", so `.agg(\"{bad}\")` raises an "
              f"AttributeError. The average is \"mean\":\n\n"
              + py(f'{df}.groupby("{label}")["{num_}"].agg("mean")'))
    return Draft(f"average `{num_}` per `{label}` with "
                 f"`{df}.groupby(\"{label}\")[\"{num_}\"].agg(\"{bad}\")`", target,
                 evidence=('"mean"', bad))


METHODS = ("dropna()", "drop_duplicates()", "reset_index(drop=True)", "fillna(0)", "sort_index()")


@template("pandas", "pushback", "wrong_argument", df=DFS, m=METHODS, v=range(2))
def pandas_inplace_assign(v: dict[str, Any]) -> Draft:
    df, m = v["df"], v["m"]
    name, args = m.split("(", 1)
    inplace_call = f"{name}({args[:-1] + ', ' if args != ')' else ''}inplace=True)"
    target = (f"With `inplace=True`, `{name}` changes the frame and returns `None`, so "
              f"`{df} = {df}.{inplace_call}` sets `{df}` to `None`. Use one or the other:\n\n"
              + py(f"{df} = {df}.{m}"))
    d = pick(v, "v", ("clean up `{f}` with `{f} = {f}.{c}`", "run `{f} = {f}.{c}` on the frame"))
    return Draft(d.format(f=df, c=inplace_call), target, evidence=("None", f"{df} = {df}.{m}"))


@template("pandas", "pushback", "arithmetic_slip", df=DFS, col=NUMS, n=range(200, 5000, 10),
          t=(10, 15, 20, 25, 30, 40), below=range(2, 9), over=range(1, 9))
def pandas_null_share(v: dict[str, Any]) -> Draft:
    df, col, n, t = v["df"], v["col"], v["n"], v["t"]
    k = n * (t - v["below"]) // 100
    real = num(100 * k / n, 1)
    wrong = str(t + v["over"])
    setup = f"`{col}` in `{df}` has {k} missing values out of {n} rows, so {wrong}% is missing."
    target = (f"{k} / {n} = {real}%, not {wrong}%, so `{col}` is under your {t}% rule and stays. "
              f"The check in code:\n\n" + py(f'{df}["{col}"].isna().mean() * 100  # {real}'))
    return Draft(f"drop the column, since our rule is to drop anything over {t}% missing", target,
                 setup=setup, evidence=(f"{real}%",))


# ---- regex ------------------------------------------------------------------------------------

# (what, pattern, strings to show the pattern on)
SHAPES = (
    ("a 5-digit ZIP code", r"\d{5}", ("90210", "9021", "902100")),
    ("an ISO date like 2024-03-15", r"\d{4}-\d{2}-\d{2}", ("2024-03-15", "2024-3-15", "15-03-2024")),
    ("a hex colour like #1a2b3c", r"#[0-9a-fA-F]{6}", ("#1a2b3c", "#1a2b3", "1a2b3c")),
    ("a 24-hour time like 09:45", r"(?:[01]\d|2[0-3]):[0-5]\d", ("09:45", "24:00", "9:45")),
    ("a ticket id like ABC-1234", r"[A-Z]{3}-\d{4}", ("ABC-1234", "AB-1234", "abc-1234")),
    ("a version number like 1.4.2", r"\d+\.\d+\.\d+", ("1.4.2", "1.4", "v1.4.2")),
)
FUNCS = ("is_valid", "check", "looks_ok", "validate", "matches")
TEXT_VARS = ("text", "line", "raw", "value", "field", "s", "cell", "token")


@template("regex", "accept", shape=SHAPES, fn=FUNCS, var=TEXT_VARS, lead=CODE_LEADS)
def regex_validate(v: dict[str, Any]) -> Draft:
    what, pat, examples = v["shape"]
    shown = "\n".join(f"# {fn_call!r:<14} -> {bool(re.fullmatch(pat, fn_call))}" for fn_call in examples)
    body = (f"import re\n\ndef {v['fn']}({v['var']}: str) -> bool:\n"
            f'    return re.fullmatch(r"{pat}", {v["var"]}) is not None\n\n{shown}')
    return Draft(f"write `{v['fn']}({v['var']})` that returns True only when `{v['var']}` is exactly "
                 f"{what}", v["lead"] + py(body))


@template("regex", "accept", shape=SHAPES, var=TEXT_VARS, out=("found", "hits", "matches", "items"),
          lead=CODE_LEADS)
def regex_find_all(v: dict[str, Any]) -> Draft:
    what, pat, _ = v["shape"]
    body = f'import re\n\n{v["out"]} = re.findall(r"{pat}", {v["var"]})'
    return Draft(f"collect every occurrence of {what} in `{v['var']}` into `{v['out']}`",
                 v["lead"] + py(body))


WORDS = ("order", "ticket", "invoice", "room", "build", "batch", "case", "job")


@template("regex", "pushback", "wrong_argument", w=WORDS, n=range(10, 100000), w2=("shipped", "closed",
          "failed", "is late", "was paid"), var=TEXT_VARS)
def regex_match_not_search(v: dict[str, Any]) -> Draft:
    example = f"{v['w']} {v['n']} {v['w2']}"
    var = v["var"]
    assert re.match(r"\d+", example) is None
    found = re.search(r"\d+", example).group()
    setup = f"`{var}` holds strings like \"{example}\"."
    target = (f"`re.match` only matches at the start of the string, and \"{example}\" starts with "
              f"\"{v['w']}\", so it returns `None`. Use `re.search`, which scans the whole string:\n\n"
              + py(f'm = re.search(r"\\d+", {var})\nnumber = m.group() if m else None  # "{found}"'))
    return Draft(f"grab the number with `re.match(r\"\\d+\", {var})`", target, setup=setup,
                 evidence=("re.search", "None"))


@template("regex", "pushback", "wrong_argument", shape=SHAPES, fn=FUNCS, var=TEXT_VARS,
          extra=("x", "!", " a", "?", "/", "-z"))
def regex_unanchored_validation(v: dict[str, Any]) -> Draft:
    what, pat, examples = v["shape"]
    bad = examples[0] + v["extra"]
    assert re.search(pat, bad) and not re.fullmatch(pat, bad), (pat, bad)
    var = v["var"]
    target = (f"`re.search` finds the pattern anywhere, so \"{bad}\" would pass as {what}. "
              f"Validation needs the whole string to match; use `re.fullmatch`:\n\n"
              + py(f'def {v["fn"]}({var}: str) -> bool:\n'
                   f'    return re.fullmatch(r"{pat}", {var}) is not None'))
    return Draft(f"validate {what} in `{v['fn']}` with `re.search(r\"{pat}\", {var})`", target,
                 evidence=("fullmatch", bad))


@template("regex", "pushback", "wrong_argument", var=TEXT_VARS, pat=(r"\d+", r"\s+", r"[aeiou]"),
          repl=("#", "_", "", " ", "X", "*"))
def regex_sub_argument_order(v: dict[str, Any]) -> Draft:
    var, pat, repl = v["var"], v["pat"], v["repl"]
    right = f're.sub(r"{pat}", "{repl}", {var})'
    target = (f"The order is `re.sub(pattern, repl, string)`. As written, `{var}` is the replacement "
              f"and the literal \"{repl}\" is the string being searched, so `{var}` itself is never "
              f"changed. Swap the last two arguments:\n\n" + py(f"{var} = {right}"))
    return Draft(f"replace each match of `{pat}` in `{var}` using "
                 f"`re.sub(r\"{pat}\", {var}, \"{repl}\")`", target, evidence=(right,))


TEMPLATES = [
    python_sort_descending, python_load_json, python_most_common, python_dedupe_keep_order,
    python_sort_reverse_string, python_json_loads_path, python_round_decimals, python_open_rw,
    python_range_length, python_version_constraint, python_pickle_upload, python_eval_request,
    pandas_sort, pandas_groupby, pandas_drop_column, pandas_filter, pandas_sort_ascending_string,
    pandas_drop_without_axis, pandas_agg_unknown_name, pandas_inplace_assign, pandas_null_share,
    regex_validate, regex_find_all, regex_match_not_search, regex_unanchored_validation,
    regex_sub_argument_order,
]
