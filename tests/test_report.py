"""`dreamd report`: HTML + PNG plots from the store alone (no daemon, no model), on a store
holding a run with steps, a baseline, cycles (one rolled back), metrics and decisions."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreamd.cli import main
from dreamd.config_file import load_config
from dreamd.errors import UsageError
from dreamd.evals.report import load_run, write_report
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
    for name in ("training", "behaviour", "margins", "attention", "forgetting"):
        png = setup / "out" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000
    page = index.read_text()
    for text in ("run 1", "<b>demo</b>", 'src="training.png"', "rollback", "speed_up", "because 3",
                 "q1.balanced", "forget.perplexity"):
        assert text in page
    assert "calib.auroc" not in page  # only metrics that were measured


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
