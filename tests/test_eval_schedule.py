"""The evaluation's two suites (evals/suite.py): the full one generates every reply in ONE engine
call and measures every metric, the cheap one generates nothing; eval.full_every picks which
runs after a cycle. On a real tiny model, a real store and real cycles: every metric is the same
number whichever path computed it, and the readers of the store (state.history, the
cycle_summary view, `dreamd history`, `dreamd report`) and the controller cope with cycles that
lack the generated metrics."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import text

from dreamd.cli import main
from dreamd.config import EvalConfig
from dreamd.config_file import load_config
from dreamd.cycle import run_cycle
from dreamd.evals.report import load_run, write_report
from dreamd.evals.suite import full_suite_due
from dreamd.run import open_run

ENV = {  # small cycles and the full suite after every 2nd cycle: cycle 1 cheap, 2 full, 3 cheap
    "DREAMD_MIX__EXAMPLES_PER_CYCLE": "8",
    "DREAMD_EVAL__ARITHMETIC_N": "4",
    "DREAMD_EVAL__PERPLEXITY_MAX_TOKENS": "256",
    "DREAMD_EVAL__FULL_EVERY": "2",
}
FULL_ONLY = {"q1.listen_rate", "q1.pushback_rate", "q1.balanced", "q1.sycophancy", "q1.mule_rate",
             "q1.unclear_rate", "q1.derail_rate", "q1.judge_listen_rate", "q1.judge_pushback_rate",
             "steer.own_sound", "steer.own_flawed", "steer.separation", "forget.arith_em", "forget.code_em",
             "q3.shift_mean", "q3.shift_max", "q3.direction_mass", "q3.direction_mass_delta", "calib.auroc",
             "calib.p_true_gap", "margin.accept", "margin.pushback", "margin.derail", "margin.mean",
             "steer.consistency"}
"""What only the full suite measures (generated replies; scoring the probe conversations)."""
CHEAP = {"forget.perplexity", "forget.nll", "forget.arith_logprob", "forget.code_logprob"}
"""What every evaluation measures (what guards the run, off forward passes over fixed text)."""
TIMING = "probes.seconds"


@pytest.fixture(scope="module")
def ran(setup_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A run of three cycles with eval.full_every = 2 (baseline full, 1 cheap, 2 full, 3 cheap)."""
    state_dir = tmp_path_factory.mktemp("sched") / "state"
    env = dict(ENV, DREAMD_RUN__STATE_DIR=str(state_dir))
    cfg = load_config(setup_dir / "dreamd.toml", environ=env)
    run, state = open_run(cfg)
    results = [run_cycle(run, state) for _ in range(3)]
    assert [r.status for r in results] == ["committed"] * 3
    with run.store.read() as s:
        rows = s.execute(text("SELECT c.number, e.metric, e.value, e.detail_json FROM evals e "
                              "LEFT JOIN cycles c ON c.id = e.cycle_id WHERE e.run_id = :r"),
                         {"r": run.run_id}).all()
    by_cycle: dict[int, dict[str, float]] = {}
    details: dict[int, dict[str, object]] = {}
    for number, metric, value, detail in rows:
        by_cycle.setdefault(number or 0, {})[metric] = value
        if detail is not None:
            details.setdefault(number or 0, {})[metric] = json.loads(detail) if isinstance(detail, str) else detail
    return SimpleNamespace(run=run, state=state, cfg=cfg, env=env, config=setup_dir / "dreamd.toml",
                           by_cycle=by_cycle, details=details)


def test_full_suite_due_by_cycle_number_alone() -> None:
    every3 = EvalConfig(full_every=3)
    assert full_suite_due(every3, None)  # the run's start: always the baseline
    assert [n for n in range(1, 10) if full_suite_due(every3, n)] == [3, 6, 9]
    assert all(full_suite_due(EvalConfig(full_every=1), n) for n in range(1, 5))


def test_full_suite_at_the_start_and_every_full_every_th_cycle(ran) -> None:
    assert sorted(ran.by_cycle) == [0, 1, 2, 3]
    for number, full in ((0, True), (1, False), (2, True), (3, False)):
        names = set(ran.by_cycle[number])
        assert CHEAP <= names, (number, CHEAP - names)
        assert (FULL_ONLY <= names) if full else not (FULL_ONLY & names), (number, FULL_ONLY & names)
        assert ran.details[number][TIMING]["suite"] == ("full" if full else "cheap")
        assert ("generate" in ran.details[number][TIMING]) and (ran.details[number][TIMING]["generate"] > 0) == full
    for number in (1, 2, 3):  # the guardrail's overlap check runs after every cycle
        assert ran.by_cycle[number]["probes.overlap"] == 0.0


def test_cheap_suite_gives_the_full_suites_numbers(ran) -> None:
    """Same weights, both suites: every cheap metric is the very same float."""
    run = ran.run
    full = run.probes.measure(run.model, run.tokenizer, run.engine, 0, eval_cfg=run.cfg.eval, full=True)
    cheap = run.probes.measure(run.model, run.tokenizer, run.engine, 0, eval_cfg=run.cfg.eval, full=False)
    assert set(cheap.metrics) - {TIMING} == CHEAP
    assert {k: cheap.metrics[k] for k in CHEAP} == {k: full.metrics[k] for k in CHEAP}
    assert set(cheap.details[TIMING]) == {"suite", "generate", "forgetting", "code"}


class PerFamily:
    """The engine as the suite used it before generate_mixed: generate() only, so generate_each
    makes one call per Sampling (Q1, code, arithmetic), as the metrics each did on their own."""

    def __init__(self, engine) -> None:
        self.engine, self.calls = engine, []

    def generate(self, conversations, sampling):
        self.calls.append(sampling.max_tokens)
        return self.engine.generate(conversations, sampling)


def test_one_generation_call_gives_the_numbers_of_one_call_per_family(ran) -> None:
    run = ran.run
    engine = run.engine
    mixed_calls: list[int] = []
    original = engine.generate_mixed
    engine.generate_mixed = lambda convs, samplings: mixed_calls.append(len(convs)) or original(convs, samplings)
    try:
        batched = run.probes.measure(run.model, run.tokenizer, engine, 0, eval_cfg=run.cfg.eval)
    finally:
        del engine.generate_mixed
    per_family = PerFamily(engine)
    old = run.probes.measure(run.model, run.tokenizer, per_family, 0, eval_cfg=run.cfg.eval)
    assert len(mixed_calls) == 1 and sorted(per_family.calls) == [24, 48, 96]
    assert mixed_calls[0] == len(run.probes.probe_set.family("code")) + 4 + sum(
        p.family in ("accept", "pushback", "derail") for p in run.probes.probe_set.probes)
    drop = lambda d: {k: v for k, v in d.items() if k != TIMING}  # noqa: E731
    assert drop(batched.metrics) == drop(old.metrics)
    assert drop(batched.details) == drop(old.details)  # the replies themselves, label by label


def test_state_history_holds_the_cycles_that_measured_a_metric(ran) -> None:
    history = ran.state.history
    assert history["forget.perplexity"] == [ran.by_cycle[n]["forget.perplexity"] for n in (1, 2, 3)]
    assert history["q1.sycophancy"] == [ran.by_cycle[2]["q1.sycophancy"]]
    assert history["margin.mean"] == [ran.by_cycle[2]["margin.mean"]]
    saved = json.loads((ran.run.checkpoints.latest() / "loop_state.json").read_text())
    assert saved["history"] == history


def test_cycle_summary_and_dreamd_history_show_no_value_for_unmeasured_metrics(ran, capsys, monkeypatch) -> None:
    rows = {r["number"]: r for r in ran.run.store.cycle_summary(ran.run.run_id)}
    for number in (1, 3):
        assert rows[number]["sycophancy"] is None and rows[number]["arith_em"] is None
        assert rows[number]["perplexity"] == pytest.approx(ran.by_cycle[number]["forget.perplexity"])
    assert rows[2]["sycophancy"] == pytest.approx(ran.by_cycle[2]["q1.sycophancy"])
    for key, value in ran.env.items():
        monkeypatch.setenv(key, value)
    assert main(["history", "--config", str(ran.config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[1].split()
    table = {int(cells[0]): dict(zip(header, cells)) for cells in (line.split() for line in lines[3:])}
    assert table[1]["syco"] == "-" and table[3]["arith"] == "-" and table[1]["ppl"] != "-"
    assert table[2]["syco"] == f"{ran.by_cycle[2]['q1.sycophancy']:.2f}"


def test_report_plots_each_metric_on_the_cycles_that_measured_it(ran, tmp_path: Path) -> None:
    data = load_run(ran.run.store, ran.cfg.run.name)
    assert [c for c, _ in data.trend["q1.balanced"]] == [0, 2]
    assert [c for c, _ in data.trend["margin.mean"]] == [0, 2]
    assert [c for c, _ in data.trend["forget.perplexity"]] == [0, 1, 2, 3]
    index = write_report(ran.cfg, tmp_path / "report")
    page = index.read_text()
    # one plot per panel, drawn from the cycles that measured it (full-suite metrics too)
    assert 'src="q1-balanced.png"' in page and 'src="forget-perplexity.png"' in page
    assert 'src="margin-mean_margin-accept.png"' in page
    # the metrics table names the cycle each latest value comes from: q1.balanced's is cycle 2,
    # the perplexity's (measured every cycle) cycle 3
    def latest_cell(metric: str) -> str:
        name = metric.replace(".", ".<wbr>").replace("_", "_<wbr>")
        row = page.split(f"<code>{name}</code>")[1].split("</tr>")[0]
        return row.split('data-label="latest"')[1].split("</td>")[0]
    assert "(cycle 2)" in latest_cell("q1.balanced")
    assert "(cycle 3)" in latest_cell("forget.perplexity")
