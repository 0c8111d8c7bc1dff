"""The controller: every rule of `decide` on numbers, the store side (baseline, rollback count,
decisions rows), and a real rollback inside a real cycle (a cycle that trained held-out probe
material is undone: weights, optimizer step, rows), then a halt after too many in a row."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dreamd.config import ControllerConfig, TrainConfig
from dreamd.config_file import load_config
from dreamd.controller import ControllerDecision, Settings, decide
from dreamd.cycle import decide_and_record, run_cycle
from dreamd.errors import ControllerHalt
from dreamd.run import RunState

CFG = ControllerConfig()
TRAIN = TrainConfig(lr=1e-5, lr_min=5e-6, lr_max=1e-4)
SETTINGS = Settings(lr=1e-5, general_share=0.25, examples_per_cycle=24)
START = {"margin.mean": 0.0, "margin.accept": 0.0, "margin.pushback": 0.0, "q1.pushback_rate": 0.5,
         "q1.sycophancy": 0.3, "forget.perplexity": 10.0, "forget.arith_em": 0.8, "forget.code_em": 0.6}


def now(**changes: float) -> dict[str, float]:
    base = {"margin.mean": 0.3, "margin.accept": 0.3, "margin.pushback": 0.3, "q1.pushback_rate": 0.6,
            "q1.sycophancy": 0.2, "forget.perplexity": 10.2, "forget.arith_em": 0.8, "forget.code_em": 0.6,
            "probes.overlap": 0.0, "probes.heldout_trained": 0.0}
    return {**base, **changes}


def run(metrics: dict[str, float], history: dict[str, list[float]] | None = None, steps: int = 40,
        rollbacks: int = 0, cfg: ControllerConfig = CFG, settings: Settings | None = None) -> ControllerDecision:
    return decide(cfg, TRAIN, settings or SETTINGS, metrics, history or {}, START, steps, rollbacks)


def test_keep_when_everything_is_in_bounds() -> None:
    d = run(now())
    assert d.action == "keep" and d.after == d.before == SETTINGS
    assert d.metrics["margin.mean"] == 0.3 and d.metrics["start:margin.mean"] == 0.0 and d.metrics["steps"] == 40


def test_wait_before_enough_steps_but_guardrails_always() -> None:
    assert run(now(), steps=CFG.wait_steps - 1).action == "wait"
    d = run(now(**{"forget.perplexity": 16.0}), steps=3)
    assert d.action == "rollback" and "perplexity 16 > 1.5 x start 10" in d.reason
    assert d.after.lr == 5e-6 and d.after.examples_per_cycle == 20  # the retry runs slower


@pytest.mark.parametrize("metrics,words", [
    ({"forget.arith_em": 0.4}, "arithmetic EM 0.4 fell more than 0.3"),
    ({"probes.overlap": 1.0}, "trained on probe material"),
    ({"probes.heldout_trained": 2.0}, "2 held-out-domain scenarios"),
    ({"margin.mean": float("nan")}, "non-finite metrics ['margin.mean']"),
])
def test_every_guardrail_rolls_back(metrics: dict[str, float], words: str) -> None:
    d = run(now(**metrics))
    assert d.rollback and words in d.reason


def test_sycophancy_guardrail_only_when_set() -> None:
    assert run(now(**{"q1.sycophancy": 0.9})).action == "keep"
    d = run(now(**{"q1.sycophancy": 0.9}), cfg=CFG.model_copy(update={"max_sycophancy": 0.8}))
    assert d.rollback and "sycophancy 0.9 > limit 0.8" in d.reason


def test_halt_after_too_many_rollbacks() -> None:
    d = run(now(**{"probes.overlap": 1.0}), rollbacks=CFG.max_rollbacks_in_a_row)
    assert d.halt and d.after == d.before and "3 rollbacks in a row" in d.reason


def test_forgetting_raises_the_general_share_and_names_the_skill() -> None:
    d = run(now(**{"forget.code_em": 0.3}))
    assert d.action == "raise_general_share"
    assert d.after.general_share == 0.40 and d.focus == "code" and d.after_json()["general_focus"] == "code"
    assert d.after.lr == d.before.lr  # no speed-up while forgetting
    d = run(now(**{"forget.perplexity": 12.0, "forget.arith_em": 0.75}))
    assert d.focus == "text" and "text +0.2" in d.reason
    # already at 0.40: slow down instead
    d = run(now(**{"forget.perplexity": 12.0}), settings=replace(SETTINGS, general_share=0.4))
    assert d.action == "slow_down" and d.after.lr == 5e-6 and d.after.general_share == 0.4


def test_too_large_slows_down() -> None:
    history = {"q1.pushback_rate": [0.7, 0.9]}
    d = run(now(**{"q1.pushback_rate": 0.7}), history=history)
    assert d.action == "slow_down" and "fell to 0.7 from its best 0.9" in d.reason
    assert d.after.lr == 5e-6 and d.after.examples_per_cycle == 20
    d = run(now(**{"margin.accept": 2.0, "margin.pushback": 0.5}))
    assert d.action == "slow_down" and "outgrew the pushback margin by 1.5" in d.reason
    # at the bounds: stays there and says so
    d = run(now(**{"q1.pushback_rate": 0.1}), settings=replace(SETTINGS, lr=5e-6, examples_per_cycle=20))
    assert d.after.lr == 5e-6 and "lr already at its bound" in d.reason
    # together with forgetting
    d = run(now(**{"q1.pushback_rate": 0.1, "forget.arith_em": 0.6}))
    assert d.action == "raise_general_share+slow_down"


def test_too_small_speeds_up_within_bounds() -> None:
    d = run(now(**{"margin.mean": 0.31}), history={"margin.mean": [0.3]})
    assert d.action == "speed_up" and d.after.lr == 2e-5 and d.after.examples_per_cycle == 36
    d = run(now(**{"margin.mean": 0.31}), history={"margin.mean": [0.3]},
            settings=replace(SETTINGS, lr=8e-5, examples_per_cycle=40))
    assert d.after.lr == 1e-4 and d.after.examples_per_cycle == 50  # lr_max, examples_max
    # the first judged cycle compares with the run's start
    assert run(now(**{"margin.mean": 0.01})).action == "speed_up"


def test_disabled_keeps() -> None:
    d = run(now(**{"probes.overlap": 3.0}), cfg=CFG.model_copy(update={"enabled": False}))
    assert d.action == "keep" and "disabled" in d.reason


def test_the_decision_carries_the_next_settings() -> None:
    d = run(now(**{"margin.mean": 0.31}), history={"margin.mean": [0.3]})
    assert d.after == Settings(lr=2e-5, general_share=0.25, examples_per_cycle=36) and d.before == SETTINGS


def at_step(cfg, store, step: int) -> SimpleNamespace:
    """What decide_and_record reads of a Run: the config, the store, the trainer's step."""
    return SimpleNamespace(cfg=cfg, store=store, trainer=SimpleNamespace(step=step))


def test_store_side(store) -> None:
    run_id = store.start_run("r", {}, "m", 0)
    store.add_evals(run_id, None, START)
    store.add_evals(run_id, None, {"margin.mean": 5.0})  # a later baseline row does not replace the first
    assert store.start_metrics(run_id) == START
    cfg = load_config(None, environ={})
    state = RunState(run_id=run_id, settings=Settings(lr=1e-5, general_share=0.25, examples_per_cycle=24))
    c1 = store.start_cycle(run_id, 1, 1e-5, 0.25, 24)
    d = decide_and_record(at_step(cfg, store, 20), state, c1, now(**{"probes.overlap": 1.0}))
    assert d.rollback and store.rollbacks_in_a_row(run_id) == 1
    store.finish_cycle(c1, "rolled_back")
    c2 = store.start_cycle(run_id, 1, 1e-5, 0.25, 24)
    decide_and_record(at_step(cfg, store, 20), state, c2, now(**{"probes.overlap": 1.0}))
    assert store.rollbacks_in_a_row(run_id) == 2
    store.finish_cycle(c2, "rolled_back")
    c3 = store.start_cycle(run_id, 1, 1e-5, 0.25, 24)
    decide_and_record(at_step(cfg, store, 20), state, c3, now())
    store.finish_cycle(c3, "committed")
    assert store.rollbacks_in_a_row(run_id) == 0
    rows = store.cycle_summary(run_id)
    assert [r["status"] for r in rows] == ["rolled_back", "rolled_back", "committed"]
    with store.read() as s:
        from sqlalchemy import select

        from dreamd.store.tables import Decision as Row
        got = s.execute(select(Row.action, Row.before_json, Row.after_json).order_by(Row.id)).all()
    assert [g.action for g in got] == ["rollback", "rollback", "keep"]
    assert set(got[0].before_json) == {"lr", "general_share", "examples_per_cycle"}


@pytest.mark.slow
def test_rollback_and_halt_in_real_cycles(tmp_path: Path) -> None:
    from tests.conftest import init_setup
    from dreamd.run import open_run

    init_setup(tmp_path / "init")
    environ = {"DREAMD_RUN__STATE_DIR": str(tmp_path / "state"), "DREAMD_MIX__EXAMPLES_PER_CYCLE": "24",
               "DREAMD_EVAL__ARITHMETIC_N": "4", "DREAMD_EVAL__PERPLEXITY_MAX_TOKENS": "256",
               "DREAMD_CONTROLLER__MAX_ROLLBACKS_IN_A_ROW": "1"}
    cfg = load_config(tmp_path / "init" / "dreamd.toml", environ=environ)
    parts, state = open_run(cfg)
    store = parts.store
    assert store.start_metrics(parts.run_id)["q1.balanced"] == 0.0  # the baseline, before cycle 1
    assert run_cycle(parts, state).status == "committed"
    good = {k: v.clone() for k, v in parts.model.state_dict().items()}
    step, lr = parts.trainer.step, state.settings.lr

    # Without the hold-out (dreamer filter and screening rule) the held-out domains reach
    # training: the cycle must go.
    probe_rule = next(r for r in parts.screener.rules if r[0] == "probe")
    parts.screener.rules.remove(probe_rule)
    held_out_dreamer, parts.dreamer = parts.dreamer, parts.dreamer.inner
    result = run_cycle(parts, state)
    assert result.status == "rolled_back" and result.metrics["probes.heldout_trained"] > 0
    assert all(torch.equal(v, good[k]) for k, v in parts.model.state_dict().items())
    assert parts.trainer.step == step and state.cycle == 1
    assert state.settings.lr == lr / 2 and state.settings.examples_per_cycle == 20
    rows = store.cycle_summary(parts.run_id)
    assert [(r["number"], r["attempt"], r["status"]) for r in rows] == [(1, 0, "committed"), (2, 0, "rolled_back")]
    assert rows[1]["superseded_steps"] == rows[1]["steps"] + rows[1]["superseded_steps"] > 0

    # One rollback in a row is the limit here: the next broken cycle halts (fails) the run.
    with pytest.raises(ControllerHalt, match="1 rollbacks in a row"):
        run_cycle(parts, state)
    assert store.cycle_summary(parts.run_id)[-1]["status"] == "failed"

    # With the rule back, cycle 2 commits on a new attempt.
    parts.screener.rules.insert(0, probe_rule)
    parts.dreamer = held_out_dreamer
    restored = parts.roll_back(state, reason="test: recover after the halt")
    assert run_cycle(parts, restored).status == "committed"
    assert [r["status"] for r in store.cycle_summary(parts.run_id)][-1] == "committed"
    probe_ids = [p.scenario_id for p in parts.probes.probe_set.probes]
    baseline_file = parts.probes.dir / "attention_baseline.pt"
    stamp = baseline_file.stat().st_mtime_ns
    baseline = store.start_metrics(parts.run_id)
    store.close()

    # A restart resumes the run: the same probes, the same baseline (not measured again).
    again, _ = open_run(cfg)
    assert again.run_id == parts.run_id and [p.scenario_id for p in again.probes.probe_set.probes] == probe_ids
    assert again.probes.has_baseline and baseline_file.stat().st_mtime_ns == stamp
    assert again.store.start_metrics(again.run_id) == baseline
    with again.store.read() as s:
        from sqlalchemy import func, select

        from dreamd.store.tables import Eval
        n_baseline = s.scalar(select(func.count()).select_from(Eval).where(Eval.cycle_id.is_(None)))
    assert n_baseline == len(baseline)
    again.store.close()


def test_cycles_without_the_full_suite_check_what_they_measured() -> None:
    """eval.full_every > 1: a cheap cycle has no q1.*, no margins and no exact match. The rules on
    them act on the cycles that measure them; perplexity and the probe checks every cycle."""
    generated = ("q1.sycophancy", "q1.pushback_rate", "forget.arith_em", "forget.code_em", "margin.mean",
                 "margin.accept", "margin.pushback")
    cheap = lambda **c: {k: v for k, v in now(**c).items() if k not in generated}  # noqa: E731
    strict = CFG.model_copy(update={"max_sycophancy": 0.8})
    assert run(now(**{"q1.sycophancy": 0.9}), cfg=strict).rollback
    assert not run(cheap(**{"q1.sycophancy": 0.9}), cfg=strict).rollback
    assert run(now(**{"forget.arith_em": 0.3})).rollback
    assert not run(cheap(**{"forget.arith_em": 0.3})).rollback
    # the cheap metrics still guard: perplexity's guardrail and the forgetting rule, the overlap
    assert run(cheap(**{"forget.perplexity": 20.0})).rollback
    assert run(cheap(**{"probes.overlap": 1.0})).rollback
    assert run(cheap(**{"forget.perplexity": 11.5})).action == "raise_general_share"
    # change is judged on full cycles: nothing to judge on a cheap one, margins against the last full one
    assert run(cheap(), history={"margin.mean": [0.3]}).action == "keep"
    d = run(now(), history={"margin.mean": [0.1, 0.3]})
    assert d.action == "speed_up" and "margin.mean moved" in d.reason
    # push-back fell on the last full cycle: the best so far comes from the cycles that measured it
    d = run(now(**{"q1.pushback_rate": 0.2}), history={"margin.mean": [0.1, 0.2], "q1.pushback_rate": [0.6]})
    assert d.action == "slow_down"
