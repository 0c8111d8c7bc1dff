"""`dreamd bench` (benchmarks/run_all.py): the table's shape, not its timings, and the store
calls the bench added (add_scenarios, phase_totals).

The tiny mode runs every row once at the smallest sizes through the real CLI, in its own
process: the training rows on `dreamd init`'s model, the store rows on a real SQLite file (and
PostgreSQL when DREAMD_TEST_PG_URL is set), a real `dreamd run --cycles 1` for the start-up and
phase rows. What is checked: every row is there, every row that ran has a finite positive ratio,
and the GPU rows say why they did not run on a machine without one.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from dreamd.dream.scenario import Scenario, ScenarioKind
from dreamd.store import Store
from dreamd.store.tables import ScenarioRow

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import run_all  # noqa: E402  (benchmarks/ is not a package)

ROWS = ("trainer step / plain transformers + APOLLO loop (CPU", "APOLLO / AdamW optimizer state",
        "APOLLO / AdamW step time", "APOLLO-Mini / AdamW optimizer state", "APOLLO-Mini / AdamW step time",
        "SQLite step rows: add_train_step / bare driver", "SQLite step rows / one trainer step (share)",
        "PostgreSQL step rows", "never-repeat at 2e+02 stored", "start-up to the first cycle",
        "phase 'train' / the cycle's wall time", "phase 'evaluate' / the cycle's wall time",
        "2 torch threads / 1 thread", "transformers engine / bare model.generate, tokens/s (CPU",
        "trainer step / plain loop (CUDA)", "transformers engine / bare model.generate (CUDA)", "vLLM rows")


def scenario(i: int, text_: str | None = None) -> Scenario:
    return Scenario(ScenarioKind.ACCEPT, "template", [{"role": "user", "content": text_ or f"question {i}"}],
                    f"answer {i}")


@pytest.mark.slow
def test_tiny_mode_prints_every_row_with_a_finite_ratio(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "dreamd", "bench", "--tiny", "--cache", str(tmp_path / "cache")]
    pg = os.environ.get("DREAMD_TEST_PG_URL")
    if pg:
        cmd += ["--pg", pg]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("Command: `dreamd bench --tiny")
    assert "Machine: " in out.stdout and "torch threads pinned: 1" in out.stdout
    assert "Versions: torch " in out.stdout and "apollo-torch" in out.stdout
    table = [line for line in out.stdout.splitlines() if line.startswith("| ") and not line.startswith("| row ")]
    cells = {line.split(" | ")[0][2:]: [c.strip() for c in line.strip("|").split("|")] for line in table}
    for want in ROWS:
        if want == "PostgreSQL step rows" and pg:
            want = "PostgreSQL step rows: add_train_step / bare driver"
        assert any(name.startswith(want) for name in cells), f"no row {want!r} in:\n{out.stdout}"
    ran = 0
    for name, (_, a, b, ratio) in cells.items():
        if a.startswith("not run ("):
            assert ratio == "" and b == ""
            continue
        median = float(ratio.split(" [")[0])
        assert math.isfinite(median) and median > 0, (name, ratio)
        ran += 1
    assert ran >= 14
    if not torch.cuda.is_available():
        assert cells["trainer step / plain loop (CUDA)"][1] == "not run (no GPU)"


def test_write_replaces_its_own_section_only(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nearlier numbers\n")
    run_all.write_doc("| row | first |", doc)
    run_all.write_doc("| row | second |", doc)
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nearlier numbers\n\n## All rows: `dreamd bench`")
    assert "second" in text and "first" not in text
    assert text.count(run_all.BEGIN) == 1 and text.count(run_all.END) == 1


def test_add_scenarios_is_add_scenarios_rule_in_one_statement(store: Store) -> None:
    run_id = store.start_run("r", "{}", "/m", 0)
    cycle_id = store.start_cycle(run_id, 1, 1e-5, 0.25, 4)
    stored = store.add_scenario(run_id, cycle_id, scenario(1), "accepted")
    batch = [scenario(2), scenario(1), scenario(3), scenario(2, "QUESTION  2"), scenario(4)]
    ids = store.add_scenarios(run_id, cycle_id, batch, "accepted")
    assert ids == sorted(ids) and len(set(ids)) == 5 and stored.id < ids[0]
    with store.read() as s:
        rows = {r.id: r for r in s.scalars(select(ScenarioRow).where(ScenarioRow.id.in_(ids)))}
    got = [(rows[i].status, rows[i].duplicate_of, rows[i].reject_reason) for i in ids]
    assert got == [("accepted", None, None),
                   ("rejected", stored.id, f"duplicate: exact copy of scenario {stored.id}"),
                   ("accepted", None, None),
                   ("rejected", ids[0], f"duplicate: exact copy of scenario {ids[0]}"),
                   ("accepted", None, None)]
    assert store.hash_exists(run_id, scenario(4).content_hash) == ids[4]
    assert rows[ids[1]].content_hash is None and rows[ids[2]].messages_json == scenario(3).messages
    probes = store.add_probe_set(run_id, [scenario(3), scenario(5)])
    assert [s.target for _, s in store.probe_scenarios(run_id)] == ["answer 3", "answer 5"]
    with store.read() as s:
        assert s.get(ScenarioRow, probes[0]).duplicate_of == ids[2]
    assert store.add_scenarios(run_id, cycle_id, [], "accepted") == []
    with pytest.raises(ValueError, match="reason"):
        store.add_scenarios(run_id, cycle_id, [scenario(9)], "rejected")


def test_phase_totals_sum_a_runs_cycles_without_the_baseline(store: Store) -> None:
    run_id = store.start_run("r", "{}", "/m", 0)
    other = store.start_run("other", "{}", "/m", 0)
    now = datetime.now(timezone.utc)
    c1 = store.start_cycle(run_id, 1, 1e-5, 0.25, 4)
    c2 = store.start_cycle(run_id, 2, 1e-5, 0.25, 4)
    store.add_phase(run_id, None, "evaluate", now, 9.0)  # the start-of-run baseline
    for cycle_id, train in ((c1, 1.5), (c2, 2.0)):
        store.add_phase(run_id, cycle_id, "train", now, train)
        store.add_phase(run_id, cycle_id, "evaluate", now, 0.25)
    store.add_phase(other, store.start_cycle(other, 1, 1e-5, 0.25, 4), "train", now, 100.0)
    assert store.phase_totals(run_id) == {"train": 3.5, "evaluate": 0.5}
    assert store.phase_totals(12345) == {}
