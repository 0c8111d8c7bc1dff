"""The template dreamer: coverage of the grammar, determinism, reachable space, and that the
facts its targets state are TRUE (checked against Python, `re`, `datetime`, the tz database)."""

from __future__ import annotations

import datetime as dt
import json
import random
import re
import time
from collections import Counter
from fractions import Fraction

import pytest
from transformers import LlamaConfig, Qwen3_5Config, Qwen3_5TextConfig

from dreamd.dream import procedural, tasks_code, tasks_time
from dreamd.dream.grammar import FLAWS, LEX
from dreamd.dream.scenario import ScenarioKind
from dreamd.dream.self_facts import config_facts, numbers_in
from dreamd.dream.templates import DOMAINS, TEMPLATES, TemplateDreamer, space_report

SPEC = "Follow sound directions; push back on wrong ones with the specific reason."


@pytest.fixture(scope="module")
def hybrid_config() -> Qwen3_5TextConfig:
    return Qwen3_5TextConfig(num_hidden_layers=8, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=1000)


def test_grammar_covers_domains_kinds_and_flaws() -> None:
    assert len(DOMAINS) >= 15
    for domain in DOMAINS:
        kinds = {t.kind for t in TEMPLATES if t.domain == domain}
        assert kinds == {"accept", "pushback"}, domain
    flaws = Counter(t.flaw for t in TEMPLATES if t.kind == "pushback")
    for flaw in ("wrong_argument", "arithmetic_slip", "constraint", "unsafe"):
        assert flaws[flaw] >= 4, flaws
    assert set(flaws) <= set(FLAWS)
    assert len({t.name for t in TEMPLATES}) == len(TEMPLATES)
    assert all(isinstance(v, list) and v for v in LEX.values())


def test_same_rng_state_same_scenarios_and_from_seed_rebuilds(hybrid_config) -> None:
    d = TemplateDreamer(SPEC, seed=3)
    for kind in ScenarioKind:
        a = [d.dream(kind, random.Random(42), hybrid_config).content_hash for _ in range(2)]
        assert a[0] == a[1]
        r1, r2 = random.Random(7), random.Random(7)
        one = [d.dream(kind, r1, hybrid_config) for _ in range(20)]
        two = [d.dream(kind, r2, hybrid_config) for _ in range(20)]
        assert [s.content_hash for s in one] == [s.content_hash for s in two]
        again = d.from_seed(kind, one[5].meta["seed"], hybrid_config)
        assert again.content_hash == one[5].content_hash and again.meta == one[5].meta
    stream = d.stream("accept")
    first = [next(stream).content_hash for _ in range(3)]
    assert first == [s.content_hash for s, _ in zip(TemplateDreamer(SPEC, seed=3).stream("accept"), range(3))]


def test_ten_thousand_distinct_scenarios_per_kind_and_space(hybrid_config) -> None:
    d = TemplateDreamer(SPEC, seed=0)
    rng = random.Random(2024)
    start = time.perf_counter()
    for kind in ("accept", "pushback", "derail", "general"):
        hashes: set[str] = set()
        draws = 0
        while len(hashes) < 10_000 and draws < 10_300:  # at most 3% repeats allowed
            hashes.add(d.dream(kind, rng).content_hash)
            draws += 1
        assert len(hashes) == 10_000, (kind, draws, len(hashes))
    self_hashes = {d.dream("self", rng, hybrid_config).content_hash for _ in range(600)}
    assert len(self_hashes) >= 200
    elapsed = time.perf_counter() - start
    spaces = space_report(hybrid_config)
    print(f"\n40k+ draws in {elapsed:.1f} s; reachable space (upper bound) per kind:",
          {k: f"{v:.2e}" for k, v in spaces.items()}, f"self distinct in 600 draws: {len(self_hashes)}")
    assert all(v >= 10_000 for k, v in spaces.items() if k != "self") and spaces["self"] >= 200


def test_scenario_fields_per_kind(hybrid_config) -> None:
    d = TemplateDreamer(SPEC, seed=1)
    rng = random.Random(1)
    multi_turn = 0
    for kind in ScenarioKind:
        for _ in range(300):
            s = d.dream(kind, rng, hybrid_config)
            assert s.kind is kind and s.messages[-1]["role"] == "user"
            assert "seed" in s.meta and "domain" in s.meta
            if kind is ScenarioKind.GENERAL:
                assert s.source == "procedural" and s.spec is None and s.meta["answer"]
            else:
                assert s.source == "template" and s.spec == SPEC
            if kind is ScenarioKind.PUSHBACK:
                assert s.meta["flaw"] in FLAWS and s.meta["flaw_evidence"]
                if s.meta["flaw"] == "constraint":
                    assert [m["role"] for m in s.messages if m["role"] != "system"][:3] == \
                        ["user", "assistant", "user"], s.messages
                    multi_turn += 1
            if kind is ScenarioKind.ACCEPT:
                assert not re.search(r"\b(alternatively|instead|you might consider|however)\b", s.target, re.I)
    assert multi_turn > 20


def test_self_facts_come_from_the_config(hybrid_config) -> None:
    facts = config_facts(hybrid_config)
    assert facts["num_hidden_layers"] == 8 and facts["hidden_size"] == 64
    assert facts["layer_types"] == {"linear_attention": 6, "full_attention": 2}
    assert facts["full_attention_layers"] == [3, 7]
    assert facts["max_position_embeddings"] == hybrid_config.max_position_embeddings
    # multimodal wrapper (text under text_config), a plain dict, and a dense Llama
    wrapped = config_facts(Qwen3_5Config(text_config=hybrid_config.to_dict()))
    assert wrapped["num_hidden_layers"] == 8 and wrapped["layer_types"]["full_attention"] == 2
    as_dict = config_facts(json.loads(hybrid_config.to_json_string()))
    assert as_dict["layer_types"] == facts["layer_types"]
    llama = config_facts(LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=500))
    assert llama["num_hidden_layers"] == 2 and "layer_types" not in llama
    d = TemplateDreamer(SPEC, seed=0)
    with pytest.raises(ValueError, match="model_config"):
        d.dream("self", random.Random(0))
    rng = random.Random(9)
    for _ in range(200):
        s = d.dream("self", rng, hybrid_config)
        for key, value in s.meta["claims"].items():
            assert facts[key] == value
            if isinstance(value, int):
                assert value in numbers_in(s.target)


def _general(kind: str, n: int) -> list:
    d = TemplateDreamer(SPEC, seed=5)
    rng = random.Random(5)
    return [s for s in (d.dream("general", rng) for _ in range(n)) if s.meta["domain"] == kind]


def test_general_arithmetic_answers_recomputed_from_the_question() -> None:
    ops = {"+": lambda a, b: a + b, "−": lambda a, b: a - b, "×": lambda a, b: a * b,
           "^": lambda a, b: a ** b}
    checked = 0
    for s in _general("arithmetic", 600):
        q = s.messages[-1]["content"]
        if m := re.search(r"(\d+) ([+−×^]) (\d+)|(\d+)\^(\d+)", q):
            a, op, b = (int(m[1]), m[2], int(m[3])) if m[1] else (int(m[4]), "^", int(m[5]))
            assert s.meta["answer"] == str(ops[op](a, b)), q
        elif m := re.search(r"(\d+) ÷ (\d+)", q):
            assert s.meta["answer"] == str(int(m[1]) // int(m[2]))
            assert f"remainder is {int(m[1]) % int(m[2])}" in s.target
        else:
            m = re.search(r"([\d.]+)% of (\d+)", q)
            assert Fraction(s.meta["answer"]) == Fraction(m[1]) * int(m[2]) / 100, q
        assert s.meta["answer"] in s.target
        checked += 1
    assert checked > 100


def test_general_code_answers_match_the_snippet_shown() -> None:
    for s in _general("code", 300):
        q = s.messages[-1]["content"]
        src = re.search(r"```python\n(.*?)\n```", q, re.S)[1]
        call = re.search(r"`(f\(.*?\))`", q)[1]
        assert repr(procedural.run_snippet(src, call)) == s.meta["answer"]
        assert f"`{s.meta['answer']}`" in s.target


def test_general_reasoning_weekdays_and_durations_are_right() -> None:
    for s in _general("reasoning", 600):
        q = s.messages[-1]["content"]
        if m := re.match(r"(\d+) (\w+) (\d{4}) is a \w+\. What weekday is it (\d+) days later", q):
            start = dt.datetime.strptime(f"{m[1]} {m[2]} {m[3]}", "%d %B %Y").date()
            assert s.meta["answer"] == (start + dt.timedelta(days=int(m[4]))).strftime("%A")
        elif m := re.match(r"A session starts at (\d\d):(\d\d) and lasts (\d+) minutes", q):
            end = dt.datetime(2024, 1, 1, int(m[1]), int(m[2])) + dt.timedelta(minutes=int(m[3]))
            assert s.meta["answer"] == end.strftime("%H:%M")


def _draws(template, n: int = 40):
    rng = random.Random(11)
    return [template.draw(rng) for _ in range(n)]


def test_python_claims_in_targets_are_what_python_does() -> None:
    for dr in _draws(tasks_code.python_sort_reverse_string):
        bad = dr.evidence[1]
        with pytest.raises(TypeError, match="cannot be interpreted as an integer"):
            [2, 1].sort(reverse=eval(bad))  # noqa: S307 - a quoted string literal from the template
        assert "cannot be interpreted as an integer" in dr.target
    with pytest.raises(TypeError, match="'decimals' is an invalid keyword argument for round"):
        round(3.14159, decimals=2)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="must have exactly one of create/read/write/append mode"):
        open("x", "rw")  # noqa: SIM115
    for dr in _draws(tasks_code.python_json_loads_path):
        path = re.search(r'json\.loads\("(.*?)"\)', dr.direction)[1]
        with pytest.raises(json.JSONDecodeError, match="Expecting value"):
            json.loads(path)
    for dr in _draws(tasks_code.python_range_length):
        a, b, s = map(int, re.search(r"range\((\d+), (\d+), (\d+)\)", dr.setup).groups())
        assert dr.evidence[0] == f"[None] * {len(range(a, b, s))}"


def test_regex_claims_in_targets_are_what_re_does() -> None:
    for dr in _draws(tasks_code.regex_match_not_search):
        example = re.search(r'like "(.*?)"', dr.setup)[1]
        assert re.match(r"\d+", example) is None and re.search(r"\d+", example)[0] in dr.target
    for dr in _draws(tasks_code.regex_unanchored_validation):
        pattern = re.search(r're\.fullmatch\(r"(.*?)"', dr.target)[1]
        bad = dr.evidence[1]
        assert re.search(pattern, bad) and not re.fullmatch(pattern, bad)


def test_time_zone_offsets_hold_all_year_in_the_tz_database() -> None:
    zoneinfo = pytest.importorskip("zoneinfo")
    names = {"Tokyo": "Asia/Tokyo", "Seoul": "Asia/Seoul", "Singapore": "Asia/Singapore",
             "Shanghai": "Asia/Shanghai", "Manila": "Asia/Manila", "Jakarta": "Asia/Jakarta",
             "Bangkok": "Asia/Bangkok", "Kolkata": "Asia/Kolkata", "Kathmandu": "Asia/Kathmandu",
             "Karachi": "Asia/Karachi", "Dubai": "Asia/Dubai", "Nairobi": "Africa/Nairobi",
             "Moscow": "Europe/Moscow", "Riyadh": "Asia/Riyadh", "Reykjavik": "Atlantic/Reykjavik",
             "Accra": "Africa/Accra", "Lagos": "Africa/Lagos", "Johannesburg": "Africa/Johannesburg",
             "Buenos Aires": "America/Argentina/Buenos_Aires", "Sao Paulo": "America/Sao_Paulo",
             "Bogota": "America/Bogota", "Lima": "America/Lima", "Phoenix": "America/Phoenix",
             "Honolulu": "Pacific/Honolulu", "Brisbane": "Australia/Brisbane"}
    try:
        zoneinfo.ZoneInfo("Asia/Tokyo")
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip("no tz database on this machine")
    for city, minutes in tasks_time.CITIES:
        for month in (1, 7):  # both halves of the year: no daylight saving anywhere
            offset = dt.datetime(2025, month, 15, 12, tzinfo=zoneinfo.ZoneInfo(names[city])).utcoffset()
            assert offset == dt.timedelta(minutes=minutes), (city, month)


def test_dates_and_cron_in_targets() -> None:
    for dr in _draws(tasks_time.scheduling_wrong_weekday):
        day = dt.datetime.strptime(re.match(r"(\d+ \w+ \d{4})", dr.setup)[1], "%d %B %Y").date()
        assert dr.evidence == (day.strftime("%A"),)
    for dr in _draws(tasks_time.scheduling_blocked_weekday):
        day = dt.datetime.strptime(re.search(r"on (\d+ \w+ \d{4})", dr.direction)[1], "%d %B %Y").date()
        assert day.strftime("%A") == dr.evidence[0]
        nxt = re.search(r"is (\w+) (\d+ \w+ \d{4});", dr.target)
        nxt_day = dt.datetime.strptime(nxt[2], "%d %B %Y").date()
        assert nxt_day.weekday() < 5 and nxt[1] == nxt_day.strftime("%A") and nxt_day > day
    for dr in _draws(tasks_time.scheduling_cron_field_order):
        hh, mm = map(int, re.search(r"daily at (\d\d):(\d\d)", dr.direction).groups())
        assert dr.evidence[0].startswith(f"{mm} {hh} * * * ")
