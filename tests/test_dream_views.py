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
