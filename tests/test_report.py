"""`dreamd report`: HTML + PNG plots from the store alone (no daemon, no model), on a store
holding a run with steps, a baseline, cycles (one rolled back), metrics and decisions; and the
one table of metric meanings (dreamd/evals/metric_names.py) that the page and docs/sql.md use.
tests/test_report_page.py renders a real run's page in a browser."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dreamd.cli import main
from dreamd.config_file import load_config
from dreamd.controller import ACTIONS
from dreamd.dream.scenario import KIND_MEANINGS, ScenarioKind
from dreamd.errors import UsageError
from dreamd.evals.metric_names import BETTER_TEXT, METRICS, markdown_table, with_table
from dreamd.evals.report import load_run, write_report
from dreamd.evals.report_plots import PANELS, plot_all
from dreamd.store.record import Store

PNG = b"\x89PNG\r\n\x1a\n"


def fill(store: Store) -> int:
    run_id = store.start_run("demo", {}, "model", 0)
    metrics = lambda c: {"q1.listen_rate": 0.1 * c, "q1.pushback_rate": 0.05 * c, "q1.balanced": 0.07 * c,  # noqa: E731
                         "q1.sycophancy": 0.5 - 0.02 * c, "margin.accept": 0.2 * c, "margin.pushback": 0.1 * c,
                         "margin.derail": 0.3 * c, "q3.shift_mean": 0.01 * c, "q3.shift_max": 0.03 * c,
                         "forget.perplexity": 100.0 + c, "forget.arith_em": 0.5, "forget.code_em": 0.25}
    store.add_evals(run_id, None, metrics(0))
    step = 0
    for number, statuses in ((1, ["committed"]), (2, ["rolled_back", "committed"]), (3, ["committed"])):
        for status in statuses:
            cycle_id = store.start_cycle(run_id, number, lr=1e-3, general_share=0.25, n_examples=8)
            for _ in range(2):
                store.add_train_step(run_id, cycle_id, step, {"lr": 1e-3, "tokens": 100, "n_behavioral": 3,
                                                              "n_general": 1, "wall_ms": 5.0, "tokens_per_s": 2e4,
                                                              "loss": 5.0 - 0.1 * step}, [])
                step += 1
            store.add_evals(run_id, cycle_id, metrics(number + (10 if status == "rolled_back" else 0)))
            action = "rollback" if status == "rolled_back" else "keep" if number < 3 else "speed_up"
            store.add_decision(run_id, cycle_id, action, f"because {number}", {"lr": 1e-3}, {"lr": 2e-3})
            if status == "rolled_back":
                store.finish_cycle(cycle_id, "rolled_back")
                store.supersede_after(run_id, step - 3)
                step -= 2
            else:
                store.finish_cycle(cycle_id, "committed")
    return run_id


@pytest.fixture
def setup(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    (tmp_path / "dreamd.toml").write_text(f'[run]\nname = "demo"\nstate_dir = "{state}"\n')
    store = Store.open(f"sqlite:///{state / 'dreamd.sqlite'}")
    store.upgrade()
    fill(store)
    store.close()
    return tmp_path


def test_report_files(setup: Path) -> None:
    cfg = load_config(setup / "dreamd.toml")
    index = write_report(cfg, setup / "out")
    assert index == setup / "out" / "index.html"
    for name in ("training_loss", "training_lr", "training_share", "q1-balanced", "q1-sycophancy",
                 "margin-accept_margin-pushback", "q3-shift_mean_q3-shift_max", "forget-perplexity", "forget-arith_em_forget-code_em"):
        png = setup / "out" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000, name
    page = index.read_text()
    for text in ("run 1 (demo)", 'src="training_loss.png"', "<b>rollback</b>", "<b>speed_up</b>", "because 3",
                 "q1.<wbr>balanced", METRICS["q1.balanced"].meaning, "higher is better", "lower is better",
                 "learning rate 0.001 &rarr; 0.002", "No candidate was rejected"):
        assert text in page, text
    assert "calib.auroc" not in page  # only metrics that were measured
    assert '"lr"' not in page  # settings in words, not JSON


def test_one_unit_per_axis_and_integer_ticks(setup: Path) -> None:
    """q3.direction_mass (~0.34) gets its own axis, apart from the shifts (~0.005); every panel's
    y axis is labelled with its one unit and its cycle ticks are whole numbers."""
    store = Store.open(f"sqlite:///{setup / 'state' / 'dreamd.sqlite'}")
    data = load_run(store, "demo")
    store.close()
    data.trend["q3.direction_mass"] = [(c, 0.34 + 0.001 * c) for c in range(4)]
    plots = plot_all(data.steps, data.cycles, data.trend, data.decisions, setup)
    by_metrics = {p.metrics: p for p in plots}
    assert ("q3.direction_mass",) in by_metrics and ("q3.shift_mean", "q3.shift_max") in by_metrics
    assert ("margin.accept", "margin.pushback", "margin.derail") in by_metrics  # present ones only
    for plot in plots:
        assert plot.xlabel and plot.ylabel and plot.xticks, plot
        assert all(t.isdigit() for t in plot.xticks), (plot.metrics, plot.xticks)
        for metric in plot.metrics:
            assert METRICS[metric].unit == plot.ylabel
    assert by_metrics[("forget.perplexity",)].ylabel == "perplexity"
    assert [p.xlabel for p in plots[:3]] == [plots[0].xlabel] * 3 and "step" in plots[0].xlabel


def test_lineage_excludes_the_rolled_back_attempt(setup: Path) -> None:
    store = Store.open(f"sqlite:///{setup / 'state' / 'dreamd.sqlite'}")
    data = load_run(store, "demo")
    store.close()
    assert [c for c, _ in data.trend["q1.balanced"]] == [0, 1, 2, 3]
    assert data.trend["q1.balanced"][2][1] == pytest.approx(0.14)  # not the rolled-back 0.84
    assert [s["step"] for s in data.steps] == [0, 1, 2, 3, 4, 5]  # active steps only
    assert [d["action"] for d in data.decisions] == ["keep", "rollback", "keep", "speed_up"]
    assert data.decisions[1]["step"] == 3 and data.decisions[1]["cycle"] == 2


def test_cli_report(setup: Path, capsys) -> None:
    assert main(["report", "--config", str(setup / "dreamd.toml"), "--out", str(setup / "cli")]) == 0
    assert "report written to" in capsys.readouterr().out
    assert (setup / "cli" / "index.html").is_file()


def test_run_by_id_or_name_default_the_newest(setup: Path, capsys) -> None:
    store = Store.open(f"sqlite:///{setup / 'state' / 'dreamd.sqlite'}")
    other = store.start_run("other", {}, "model", 0)
    store.add_evals(other, None, {"q1.balanced": 0.5})
    store.close()
    toml = str(setup / "dreamd.toml")
    for which, shown in ((None, "run 1 (demo)"), ("2", "run 2 (other)"), ("other", "run 2 (other)"),
                         ("1", "run 1 (demo)"), ("demo", "run 1 (demo)")):
        out = setup / f"out-{which}"
        assert main(["report", "--config", toml, "--out", str(out), *(["--run", which] if which else [])]) == 0
        assert shown in (out / "index.html").read_text(), which
    assert main(["report", "--config", toml, "--run", "7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--run 7: no run with that id or name" in err[0] and "newest is 2 (other)" in err[0]


def test_usage_errors(tmp_path: Path) -> None:
    (tmp_path / "dreamd.toml").write_text(f'[run]\nstate_dir = "{tmp_path / "none"}"\n')
    with pytest.raises(UsageError, match="no store at"):
        write_report(load_config(tmp_path / "dreamd.toml"), tmp_path / "out")
    state = tmp_path / "empty"
    (tmp_path / "e.toml").write_text(f'[run]\nstate_dir = "{state}"\n')
    store = Store.open(f"sqlite:///{state / 'dreamd.sqlite'}")
    store.upgrade()
    store.close()
    with pytest.raises(UsageError, match="holds no runs yet"):
        write_report(load_config(tmp_path / "e.toml"), tmp_path / "out")


# ---- one source of truth for what the numbers mean: dreamd/evals/metric_names.py -----------
# Every metric name the evaluation code writes has an entry (a static scan of the modules that
# produce metrics; tests/test_report_page.py checks the same against a real run's store), the
# report plots every entry, and docs/sql.md holds exactly the table rendered from it. The words
# the report uses for controller actions and scenario kinds cover every one there is.

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
