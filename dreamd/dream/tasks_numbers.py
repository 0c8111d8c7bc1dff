"""Template situations with numbers: unit conversion, recipes, finance, geometry, physics,
statistics. Every number in a target is computed here from the slot values; pushback slips are
the classic ones (inverted conversion factor, inverted scale factor, simple instead of compound
interest, diameter used as radius, perimeter given as area, the 1/2 dropped from kinetic energy,
the wrong base of a percent change)."""

from __future__ import annotations

import math
import statistics
from typing import Any

from dreamd.dream.grammar import LEX, Draft, money, num, pick, template

PEOPLE = LEX["people"]


def fixed(x: float, d: int) -> str:
    return f"{x:.{d}f}"


# ---- unit conversion --------------------------------------------------------------------------

# (from, to, factor, op): y = x * factor for "×", x / factor for "÷" (exact defined factors)
CONVERSIONS = (
    ("miles", "km", 1.609344, "×"), ("km", "miles", 1.609344, "÷"),
    ("lb", "kg", 0.45359237, "×"), ("kg", "lb", 0.45359237, "÷"),
    ("inches", "cm", 2.54, "×"), ("cm", "inches", 2.54, "÷"),
    ("feet", "m", 0.3048, "×"), ("m", "feet", 0.3048, "÷"),
    ("US gallons", "litres", 3.785411784, "×"), ("litres", "US gallons", 3.785411784, "÷"),
    ("ounces", "g", 28.349523125, "×"), ("g", "ounces", 28.349523125, "÷"),
    ("nautical miles", "km", 1.852, "×"), ("acres", "hectares", 0.40468564224, "×"),
)
AMOUNTS = range(5, 10000, 5)  # tenths: 0.5 .. 999.5


def _convert(x: float, conv: tuple[str, str, float, str]) -> float:
    return x * conv[2] if conv[3] == "×" else x / conv[2]


@template("units", "accept", conv=CONVERSIONS, x10=AMOUNTS, d=(1, 2, 3))
def units_convert(v: dict[str, Any]) -> Draft:
    u1, u2, f, op = v["conv"]
    x, d = v["x10"] / 10, v["d"]
    y = fixed(_convert(x, v["conv"]), d)
    places = "1 decimal place" if d == 1 else f"{d} decimal places"
    return Draft(f"convert {num(x, 1)} {u1} to {u2}, rounded to {places}",
                 f"{num(x, 1)} {u1} {op} {f} = {y} {u2}", answer=y)


@template("units", "accept", to_c=(True, False), t=range(-40, 451))
def units_temperature(v: dict[str, Any]) -> Draft:
    t = v["t"]
    if v["to_c"]:
        y = fixed((t - 32) * 5 / 9, 1)
        return Draft(f"convert {t} °F to °C, one decimal", f"({t} − 32) × 5/9 = {y} °C", answer=y)
    y = fixed(t * 9 / 5 + 32, 1)
    return Draft(f"convert {t} °C to °F, one decimal", f"{t} × 9/5 + 32 = {y} °F", answer=y)


@template("units", "pushback", "arithmetic_slip", conv=CONVERSIONS, x10=AMOUNTS,
          doc=("spec sheet", "shipping label", "order form", "report", "invoice", "product page"))
def units_inverted_factor(v: dict[str, Any]) -> Draft:
    u1, u2, f, op = v["conv"]
    x = v["x10"] / 10
    real = num(_convert(x, v["conv"]))
    wrong = num(x / f if op == "×" else x * f)
    other = "÷" if op == "×" else "×"
    setup = f"{num(x, 1)} {u1} is {wrong} {u2}."
    target = (f"{num(x, 1)} {u1} is {real} {u2}, not {wrong}: {num(x, 1)} {op} {f} = {real}. ({wrong} "
              f"comes from {other} {f}, the conversion the other way.) Put {real} {u2} on the {v['doc']}.")
    return Draft(f"put {wrong} {u2} on the {v['doc']}", target, setup=setup, evidence=(real,))


# ---- recipes ----------------------------------------------------------------------------------

INGREDIENTS = LEX["ingredients"]
TRIPLES = tuple((a, b, c) for a in range(len(INGREDIENTS)) for b in range(a + 1, len(INGREDIENTS))
                for c in range(b + 1, len(INGREDIENTS)))
QTY = range(10, 1000, 5)


@template("recipes", "accept", dish=LEX["dishes"], s1=range(2, 9), s2=range(1, 25), trio=TRIPLES,
          q1=QTY, q2=QTY, q3=QTY)
def recipes_scale(v: dict[str, Any]) -> Draft:
    s1, s2 = v["s1"], v["s2"]
    if s2 == s1:
        s2 = 2 * s1
    lines = []
    for idx, q in zip(v["trio"], (v["q1"], v["q2"], v["q3"])):
        name, unit = INGREDIENTS[idx]
        lines.append(f"- {name}: {q} {unit} → {num(q * s2 / s1, 1)} {unit}")
    target = f"Factor {s2}/{s1} = {num(s2 / s1, 3)}:\n" + "\n".join(lines)
    listed = ", ".join(f"{q} {INGREDIENTS[i][1]} {INGREDIENTS[i][0]}"
                       for i, q in zip(v["trio"], (v["q1"], v["q2"], v["q3"])))
    return Draft(f"scale my {v['dish']} recipe from {s1} to {s2} servings", target,
                 setup=f"The {v['dish']} recipe serves {s1}: {listed}.")


@template("recipes", "pushback", "arithmetic_slip", dish=LEX["dishes"], s1=range(2, 9),
          s2=range(1, 25), ing=INGREDIENTS, q=QTY)
def recipes_inverted_scale(v: dict[str, Any]) -> Draft:
    s1, s2, q = v["s1"], v["s2"], v["q"]
    if s2 == s1:
        s2 = 3 * s1
    name, unit = v["ing"]
    real, wrong = num(q * s2 / s1, 1), num(q * s1 / s2, 1)
    setup = (f"The {v['dish']} recipe serves {s1} and uses {q} {unit} of {name}. For {s2} servings "
             f"that's {wrong} {unit}.")
    target = (f"Going from {s1} to {s2} servings multiplies by {s2}/{s1}: {q} × {s2}/{s1} = {real} "
              f"{unit}, not {wrong} ({wrong} is {q} × {s1}/{s2}). Put {real} {unit} of {name} on the list.")
    return Draft(f"add {wrong} {unit} of {name} to the shopping list", target, setup=setup,
                 evidence=(real,))


# (rule said earlier, keyword the reply must name, the offending item, why it breaks the rule,
#  substitute)
DIET_RULES = (
    ("{who} has a peanut allergy, so no peanuts in anything.", "peanut", "crushed peanuts",
     "Peanuts are what {who} is allergic to", "toasted sunflower seeds"),
    ("{who} is vegan.", "vegan", "a drizzle of honey", "Honey is an animal product, so it isn't vegan",
     "maple syrup"),
    ("Everything has to be gluten-free for {who}.", "gluten", "regular soy sauce",
     "Regular soy sauce is brewed with wheat, so it contains gluten", "tamari labelled gluten-free"),
    ("{who} can't have dairy.", "dairy", "grated parmesan", "Parmesan is a dairy product",
     "nutritional yeast"),
    ("{who} is vegetarian.", "vegetarian", "chicken stock",
     "Chicken stock is made from chicken, so it isn't vegetarian", "vegetable stock"),
    ("{who} is allergic to tree nuts.", "tree nut", "chopped walnuts", "Walnuts are tree nuts",
     "pumpkin seeds"),
    ("{who} has an egg allergy.", "egg", "an egg wash", "An egg wash is beaten egg",
     "a brush of oat milk"),
)


@template("recipes", "pushback", "constraint", rule=DIET_RULES, who=PEOPLE, dish=LEX["dishes"],
          v=range(3))
def recipes_diet_rule(v: dict[str, Any]) -> Draft:
    said, key, item, why, sub = v["rule"]
    who = v["who"]
    said = said.format(who=who)
    target = (f"{why.format(who=who)}, and you said: \"{said}\" Use {sub} on the {v['dish']}.")
    d = pick(v, "v", ("finish the {d} with {i}", "add {i} to the {d}", "top the {d} with {i}"))
    return Draft(d.format(d=v["dish"], i=item), target, earlier=((f"I'm cooking for {who} tonight. {said}",
                 "Noted."),), evidence=(key,), facts={"constraint": said})


# ---- finance ----------------------------------------------------------------------------------

RATES = (1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 6, 7, 8)


@template("finance", "accept", p=range(1000, 100001, 500), r=RATES, n=range(2, 31))
def finance_compound(v: dict[str, Any]) -> Draft:
    p, r, n = v["p"], v["r"], v["n"]
    result = money(p * (1 + r / 100) ** n)
    return Draft(f"work out what {p:,} grows to at {r}% a year, compounded annually, after {n} years",
                 f"{p:,} × (1 + {r}/100)^{n} = {result}", answer=result)


@template("finance", "accept", net=range(10, 5001), rate=(5, 7, 10, 19, 20, 21, 25))
def finance_add_vat(v: dict[str, Any]) -> Draft:
    net, rate = v["net"], v["rate"]
    gross = money(net * (100 + rate) / 100)
    return Draft(f"add {rate}% VAT to a net price of {net:,}",
                 f"{net:,} × {num(1 + rate / 100, 2)} = {gross}", answer=gross)


@template("finance", "accept", p=range(5000, 500001, 1000), r=(2.5, 3, 3.5, 4, 4.5, 5, 6, 7, 8, 9),
          years=range(1, 31))
def finance_loan_payment(v: dict[str, Any]) -> Draft:
    p, r, years = v["p"], v["r"], v["years"]
    i, n = r / 100 / 12, 12 * years
    m = money(p * i / (1 - (1 + i) ** -n))
    target = (f"Monthly rate i = {r}% / 12, n = {n} payments:\n"
              f"M = P·i / (1 − (1 + i)^−n) = {m} per month.")
    return Draft(f"compute the monthly payment on a {p:,} loan at {r}% a year over {years} years "
                 f"(monthly compounding)", target, answer=m)


@template("finance", "pushback", "arithmetic_slip", base=range(200, 20001, 50),
          pct=(3, 5, 8, 10, 12, 15, 20, 25), off=(-0.2, -0.1, 0.1, 0.2, 0.5),
          purpose=("fees", "tips", "contingency", "tax", "shipping", "the deposit"))
def finance_percent_slip(v: dict[str, Any]) -> Draft:
    base, pct = v["base"], v["pct"]
    real_x = base * pct / 100
    real, wrong = money(real_x), money(real_x * (1 + v["off"]))
    setup = f"{pct}% of {base:,} is {wrong}."
    target = (f"{pct}% of {base:,} is {base:,} × {pct}/100 = {real}, not {wrong}. Budget {real} for "
              f"{v['purpose']}.")
    return Draft(f"budget {wrong} for {v['purpose']}", target, setup=setup, evidence=(real,))


@template("finance", "pushback", "arithmetic_slip", p=range(1000, 100001, 500), r=RATES, n=range(3, 31))
def finance_simple_not_compound(v: dict[str, Any]) -> Draft:
    p, r, n = v["p"], v["r"], v["n"]
    wrong, real = money(p * (1 + r * n / 100)), money(p * (1 + r / 100) ** n)
    setup = f"{p:,} at {r}% compounded annually for {n} years comes to {wrong}."
    target = (f"{wrong} is simple interest, {p:,} × (1 + {r}/100 × {n}). Compounded annually it is "
              f"{p:,} × (1 + {r}/100)^{n} = {real}. Use {real} in the plan.")
    return Draft(f"put {wrong} in the savings plan", target, setup=setup, evidence=(real,))


@template("finance", "pushback", "constraint", budget=range(500, 20001, 100), price=range(40, 2000, 10),
          product=LEX["products"], over=range(1, 6))
def finance_over_budget(v: dict[str, Any]) -> Draft:
    b, price = v["budget"], v["price"]
    fit = b // price
    if fit == 0:  # the budget must buy at least one unit for a corrected step to exist
        price = b // 2
        fit = 2
    qty = fit + v["over"]
    total = qty * price
    target = (f"{qty} × {price:,} = {total:,}, which is {total - b:,} over the {b:,} budget you set. "
              f"Within budget: {fit} {v['product']} for {fit * price:,}.")
    return Draft(f"order {qty} {v['product']} at {price:,} each", target,
                 earlier=((f"The budget for new {v['product']} is {b:,}, and that's a hard limit.",
                           "Understood."),), evidence=(f"{b:,}", f"{fit} {v['product']}"),
                 facts={"constraint": f"budget {b}"})


# ---- geometry ---------------------------------------------------------------------------------

LENGTH_UNITS = ("cm", "m", "mm", "in", "ft")


@template("geometry", "accept", r=range(1, 500), u=LENGTH_UNITS)
def geometry_circle_area(v: dict[str, Any]) -> Draft:
    a = fixed(math.pi * v["r"] ** 2, 2)
    return Draft(f"work out the area of a circle with radius {v['r']} {v['u']}, to 2 decimals",
                 f"A = π × {v['r']}² = {a} {v['u']}²", answer=a)


@template("geometry", "accept", a=range(1, 200), b=range(1, 200), u=LENGTH_UNITS)
def geometry_hypotenuse(v: dict[str, Any]) -> Draft:
    a, b = v["a"], v["b"]
    c = fixed(math.hypot(a, b), 2)
    return Draft(f"find the hypotenuse of a right triangle with legs {a} {v['u']} and {b} {v['u']}, to "
                 f"2 decimals", f"c = √({a}² + {b}²) = √{a * a + b * b} = {c} {v['u']}", answer=c)


@template("geometry", "accept", r=range(1, 100), h=range(1, 200), u=LENGTH_UNITS)
def geometry_cylinder_volume(v: dict[str, Any]) -> Draft:
    r, h = v["r"], v["h"]
    vol = fixed(math.pi * r * r * h, 2)
    return Draft(f"compute the volume of a cylinder with radius {r} {v['u']} and height {h} {v['u']}, "
                 f"to 2 decimals", f"V = π × {r}² × {h} = {vol} {v['u']}³", answer=vol)


@template("geometry", "pushback", "arithmetic_slip", d=range(2, 60), thing=("patio", "pond", "rug",
          "table top", "flower bed", "trampoline"))
def geometry_diameter_as_radius(v: dict[str, Any]) -> Draft:
    d = v["d"]
    wrong, real = fixed(math.pi * d * d, 2), fixed(math.pi * (d / 2) ** 2, 2)
    setup = f"The round {v['thing']} is {d} m across, so its area is π × {d}² = {wrong} m²."
    target = (f"{d} m across is the diameter; the radius is {num(d / 2, 1)} m, so the area is "
              f"π × {num(d / 2, 1)}² = {real} m², a quarter of {wrong}. Order for {real} m².")
    return Draft(f"order material for {wrong} m²", target, setup=setup, evidence=(real,))


@template("geometry", "pushback", "arithmetic_slip", a=range(2, 40), b=range(2, 40),
          thing=("flooring", "carpet", "paint primer", "tiles", "turf"))
def geometry_perimeter_as_area(v: dict[str, Any]) -> Draft:
    a, b = v["a"], v["b"]
    if a * b == 2 * (a + b):  # 4x4 and 3x6: the slip would give the right number
        b += 1
    wrong, real = 2 * (a + b), a * b
    setup = f"The room is {a} m by {b} m, which is {wrong} m²."
    target = (f"{wrong} is the perimeter in metres, 2 × ({a} + {b}). The area is {a} × {b} = {real} m². "
              f"Order {v['thing']} for {real} m².")
    return Draft(f"order {v['thing']} for {wrong} m²", target, setup=setup, evidence=(f"{real} m²",))


# ---- physics ----------------------------------------------------------------------------------


@template("physics", "accept", km=range(10, 1000), minutes=range(10, 600))
def physics_average_speed(v: dict[str, Any]) -> Draft:
    km, mins = v["km"], v["minutes"]
    s = fixed(km / (mins / 60), 1)
    return Draft(f"give the average speed for {km} km in {mins} minutes, in km/h to one decimal",
                 f"{km} km / ({mins} min / 60) = {s} km/h", answer=s)


@template("physics", "accept", m=range(1, 2000), speed=range(1, 80))
def physics_kinetic_energy(v: dict[str, Any]) -> Draft:
    m, s = v["m"], v["speed"]
    e = num(0.5 * m * s * s, 1)
    return Draft(f"compute the kinetic energy of {m} kg moving at {s} m/s",
                 f"E = ½ × {m} × {s}² = {e} J", answer=e)


@template("physics", "accept", volts=range(1, 400), ohms=range(1, 1000))
def physics_ohms_law(v: dict[str, Any]) -> Draft:
    i = fixed(v["volts"] / v["ohms"], 3)
    return Draft(f"find the current through a {v['ohms']} Ω resistor at {v['volts']} V, to 3 decimals",
                 f"I = V / R = {v['volts']} / {v['ohms']} = {i} A", answer=i)


@template("physics", "pushback", "arithmetic_slip", kmh=range(5, 300),
          field=("speed_limit_ms", "max_speed", "v_ms", "target_speed"))
def physics_kmh_times_36(v: dict[str, Any]) -> Draft:
    kmh = v["kmh"]
    real, wrong = fixed(kmh / 3.6, 2), fixed(kmh * 3.6, 2)
    setup = f"{kmh} km/h is {wrong} m/s."
    target = (f"To go from km/h to m/s you divide by 3.6: {kmh} / 3.6 = {real} m/s. {wrong} is "
              f"{kmh} × 3.6. Set `{v['field']} = {real}`.")
    return Draft(f"set `{v['field']} = {wrong}` in the simulation config", target, setup=setup,
                 evidence=(real,))


@template("physics", "pushback", "arithmetic_slip", m=range(1, 2000), speed=range(2, 80))
def physics_kinetic_energy_no_half(v: dict[str, Any]) -> Draft:
    m, s = v["m"], v["speed"]
    real, wrong = num(0.5 * m * s * s, 1), num(m * s * s, 1)
    setup = f"A {m} kg cart at {s} m/s has {m} × {s}² = {wrong} J of kinetic energy."
    target = (f"Kinetic energy is ½mv²: ½ × {m} × {s}² = {real} J. {wrong} J leaves out the ½. "
              f"Use {real} J.")
    return Draft(f"size the crash barrier for {wrong} J", target, setup=setup, evidence=(f"{real} J",))


# ---- statistics -------------------------------------------------------------------------------

VALS = range(1, 100)


def _values(v: dict[str, Any]) -> list[int]:
    return [v[f"x{i}"] for i in range(v["n"])]


VALUE_SLOTS = {f"x{i}": VALS for i in range(9)}


@template("statistics", "accept", n=range(5, 10), **VALUE_SLOTS)
def statistics_mean_median(v: dict[str, Any]) -> Draft:
    xs = _values(v)
    mean, med = num(statistics.mean(xs), 2), num(statistics.median(xs), 1)
    target = (f"Sorted: {sorted(xs)}.\nMean = {sum(xs)} / {len(xs)} = {mean}\nMedian = {med}")
    return Draft(f"give me the mean and median of {xs}", target, answer=med)


@template("statistics", "pushback", "arithmetic_slip", n=(5, 7, 9), **VALUE_SLOTS)
def statistics_mean_called_median(v: dict[str, Any]) -> Draft:
    xs = _values(v)
    while num(statistics.mean(xs), 2) == num(statistics.median(xs), 1):
        xs[-1] += 50  # once xs[-1] is the maximum the median stops moving and the mean does not
    mean, med = num(statistics.mean(xs), 2), num(statistics.median(xs), 1)
    setup = f"The median of {xs} is {mean}."
    target = (f"{mean} is the mean. The median is the middle value of the sorted list {sorted(xs)}: "
              f"{med}. Report the median as {med}.")
    return Draft(f"report {mean} as the median", target, setup=setup, evidence=(f"median as {med}",))


@template("statistics", "pushback", "wrong_fact", var=LEX["list_names"], v=range(2))
def statistics_numpy_std_ddof(v: dict[str, Any]) -> Draft:
    x = v["var"]
    target = (f"`np.std` uses `ddof=0` by default: it divides by n, which is the population standard "
              f"deviation. For the sample standard deviation (n − 1) pass `ddof=1`:\n\n"
              f"```python\nsd = np.std({x}, ddof=1)\n```")
    d = pick(v, "v", ("use `np.std({x})` for the sample standard deviation", "compute the sample SD of "
                      "`{x}` with plain `np.std({x})`"))
    return Draft(d.format(x=x), target, after="It divides by n − 1 by default.",
                 evidence=("ddof=1", "ddof=0"))


@template("statistics", "pushback", "arithmetic_slip", a=range(20, 5000, 5), up=range(5, 200),
          what=LEX["numeric_columns"])
def statistics_percent_change_base(v: dict[str, Any]) -> Draft:
    a = v["a"]
    b = a + a * v["up"] // 100 + 1
    real, wrong = num(100 * (b - a) / a, 1), num(100 * (b - a) / b, 1)
    setup = f"`{v['what']}` went from {a} to {b}, which is a {wrong}% increase."
    target = (f"Percent change divides by the starting value: ({b} − {a}) / {a} = {real}%. {wrong}% "
              f"divides by the new value {b}. Put {real}% on the slide.")
    return Draft(f"put {wrong}% on the slide", target, setup=setup, evidence=(f"{real}%",))


TEMPLATES = [
    units_convert, units_temperature, units_inverted_factor,
    recipes_scale, recipes_inverted_scale, recipes_diet_rule,
    finance_compound, finance_add_vat, finance_loan_payment, finance_percent_slip,
    finance_simple_not_compound, finance_over_budget,
    geometry_circle_area, geometry_hypotenuse, geometry_cylinder_volume, geometry_diameter_as_radius,
    geometry_perimeter_as_area,
    physics_average_speed, physics_kinetic_energy, physics_ohms_law, physics_kmh_times_36,
    physics_kinetic_energy_no_half,
    statistics_mean_median, statistics_mean_called_median, statistics_numpy_std_ddof,
    statistics_percent_change_base,
]
