"""One source of truth for what the numbers mean: dreamd/evals/metric_names.py.

Every metric name the evaluation code writes has an entry (a static scan of the modules that
produce metrics; tests/test_report_page.py checks the same against a real run's store), the
report plots every entry, and docs/sql.md holds exactly the table rendered from it. The words
the report uses for controller actions and scenario kinds cover every one there is.
"""

from __future__ import annotations

import re
from pathlib import Path

from dreamd.controller import ACTIONS
from dreamd.dream.scenario import KIND_MEANINGS, ScenarioKind
from dreamd.evals.metric_names import BETTER_TEXT, METRICS, markdown_table, with_table
from dreamd.evals.report_plots import PANELS

ROOT = Path(__file__).resolve().parents[1]
PRODUCERS = ["dreamd/evals/behaviour.py", "dreamd/evals/attention.py", "dreamd/evals/steering.py",
             "dreamd/evals/calibration.py", "dreamd/evals/forgetting.py", "dreamd/evals/suite.py", "dreamd/cycle.py"]
NAME = re.compile(r'"((?:q1|q3|margin|steer|calib|forget|probes|engine)\.[a-z_]+)"')


def test_every_metric_the_evaluation_writes_has_an_entry() -> None:
    written = {m for path in PRODUCERS for m in NAME.findall((ROOT / path).read_text())}
    assert len(written) > 30
    assert written <= set(METRICS), f"add to dreamd/evals/metric_names.py: {sorted(written - set(METRICS))}"
    assert set(METRICS) <= written, f"no code writes {sorted(set(METRICS) - written)}"


def test_every_entry_is_complete_and_plotted_once() -> None:
    for name, metric in METRICS.items():
        assert metric.meaning.strip() and metric.unit.strip() and metric.label.strip(), name
        assert metric.better in BETTER_TEXT, name
    plotted = [m for panel in PANELS for m in panel.metrics]
    assert sorted(plotted) == sorted(METRICS)  # each once
    for panel in PANELS:  # one unit per axis
        assert len({METRICS[m].unit for m in panel.metrics}) == 1, panel


def test_sql_doc_holds_the_generated_table() -> None:
    doc = (ROOT / "docs" / "sql.md").read_text()
    assert with_table(doc) == doc, ("docs/sql.md's metric table is stale: python -c \"from "
                                    "dreamd.evals.metric_names import update_sql_doc; update_sql_doc('docs/sql.md')\"")
    for name in METRICS:
        assert f"| `{name}` |" in markdown_table()


def test_every_action_and_kind_has_words() -> None:
    source = (ROOT / "dreamd" / "controller.py").read_text()
    actions = set(re.findall(r'made\("(\w+)"', source)) | set(re.findall(r'actions\.append\("(\w+)"\)', source))
    assert actions and actions <= set(ACTIONS), actions - set(ACTIONS)
    assert set(KIND_MEANINGS) == set(ScenarioKind)
