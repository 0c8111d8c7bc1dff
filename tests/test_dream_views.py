"""The dreaming views of migration 0003 on SQLite and PostgreSQL: dream_summary's per-kind
counts of model-written candidates, and dream_rejections (per kind, source and screening rule)."""

from __future__ import annotations

from sqlalchemy import text

from dreamd.dream.scenario import Scenario, ScenarioKind
from dreamd.store import Store


def _scenario(i: int, kind: str, source: str) -> Scenario:
    return Scenario(kind=ScenarioKind(kind), source=source,
                    messages=[{"role": "user", "content": f"Please rename variable x{i} to count{i}."}],
                    target=f"Done: x{i} -> count{i}.", spec="follow sound directions", meta={"i": i})


def test_per_kind_acceptance_and_rejections_by_rule(store_url: str) -> None:
    store = Store.open(store_url)
    store.upgrade()
    run_id = store.start_run("r", "{}", "/m", 0)
    cycle_id = store.start_cycle(run_id, 1, 1e-5, 0.25, 4)
    rows = [  # kind, source, reject reason (None: accepted)
        ("accept", "model", None), ("accept", "model", "parse: no <situation> tag"),
        ("accept", "model", "parse: empty reply"), ("pushback", "model", "judge: the self-check said no"),
        ("self", "model", None), ("self", "model", None), ("self", "model", "check: 30 layers, not 12"),
        ("accept", "template", None), ("general", "template", "honesty: claims a feeling"),
    ]
    for i, (kind, source, reason) in enumerate(rows):
        store.add_scenario(run_id, cycle_id, _scenario(i, kind, source),
                           "accepted" if reason is None else "rejected", reason)
    with store.read() as s:
        summary = s.execute(text("SELECT * FROM dream_summary WHERE cycle_id = :c"), {"c": cycle_id}).mappings().one()
        rejections = s.execute(text("SELECT kind, source, rule, n, example FROM dream_rejections "
                                    "WHERE cycle_id = :c ORDER BY n DESC, kind, rule"), {"c": cycle_id}).all()
    assert (summary["candidates"], summary["accepted"], summary["model_written"], summary["model_accepted"]) == (9, 4, 7, 3)
    got = {k: (summary[f"model_{k}_written"], summary[f"model_{k}_accepted"])
           for k in ("accept", "pushback", "derail", "self", "general")}
    assert got == {"accept": (3, 1), "pushback": (1, 0), "derail": (0, 0), "self": (3, 2), "general": (0, 0)}
    assert summary["n_parse"] == 2 and summary["max_temperature"] is None  # 0002's columns kept
    assert [tuple(r) for r in rejections] == [
        ("accept", "model", "parse", 2, "parse: empty reply"),
        ("general", "template", "honesty", 1, "honesty: claims a feeling"),
        ("pushback", "model", "judge", 1, "judge: the self-check said no"),
        ("self", "model", "check", 1, "check: 30 layers, not 12"),
    ]
    store.close()


def test_rejections_and_examples_for_the_report(store_url: str) -> None:
    """Store.rejections sums dream_rejections over a run's attempts; scenario_examples picks the
    newest of a status by kind and by rule (the reason before its first colon), probes never."""
    store = Store.open(store_url)
    store.upgrade()
    run_id = store.start_run("r", "{}", "/m", 0)
    other = store.start_run("o", "{}", "/m", 0)
    store.add_probe_set(run_id, [_scenario(99, "accept", "template")])
    rows = [(1, "accept", "model", "parse: no tag"), (1, "accept", "template", None), (2, "accept", "model", "parse: empty"),
            (2, "pushback", "template", "honesty: claims a feeling"), (2, "accept", "template", None),
            (2, "general", "procedural", None)]
    cycles = {n: store.start_cycle(run_id, n, 1e-5, 0.25, 4) for n in (1, 2)}
    for i, (number, kind, source, reason) in enumerate(rows):
        store.add_scenario(run_id, cycles[number], _scenario(i, kind, source),
                           "accepted" if reason is None else "rejected", reason)
    store.add_scenario(other, store.start_cycle(other, 1, 1e-5, 0.25, 4), _scenario(50, "accept", "model"),
                       "rejected", "parse: other run")
    assert [(r["rule"], r["kind"], r["source"], r["n"], r["example"]) for r in store.rejections(run_id)] == [
        ("parse", "accept", "model", 2, "parse: empty"), ("honesty", "pushback", "template", 1, "honesty: claims a feeling")]
    accepted = store.scenario_examples(run_id, "accepted", kind="accept", limit=5)
    assert [(e["cycle"], e["target"]) for e in accepted] == [(2, "Done: x4 -> count4."), (1, "Done: x1 -> count1.")]
    assert accepted[0]["messages"][-1]["role"] == "user" and accepted[0]["meta"] == {"i": 4}
    parse = store.scenario_examples(run_id, "rejected", rule="parse", limit=1)
    assert [(e["reject_reason"], e["source"]) for e in parse] == [("parse: empty", "model")]
    assert store.scenario_examples(run_id, "rejected", rule="pars") == []
    assert {e["kind"] for e in store.scenario_examples(run_id, "accepted", limit=9)} == {"accept", "general"}
    store.close()
