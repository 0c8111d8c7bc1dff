"""Balance: the accepted scenarios of every cycle match the configured mix of kinds
(train/mix.py's kind_quotas) within one example, through real cycles on a real tiny model and
store, for the template source and for the mixed source (model + template, with the template
fallback)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from dreamd.config_file import load_config
from dreamd.cycle import run_cycle
from dreamd.run import open_run
from dreamd.train.mix import kind_quotas

COLUMNS = {"accept": "n_accept", "pushback": "n_pushback", "derail": "n_derail", "general": "n_general",
           "self": "n_self"}



def run_cycles(setup_dir: Path, state: Path, n: int, **env: str):
    environ = {"DREAMD_RUN__STATE_DIR": str(state), "DREAMD_EVAL__ARITHMETIC_N": "4",
               "DREAMD_EVAL__PERPLEXITY_MAX_TOKENS": "256", **env}
    cfg = load_config(setup_dir / "dreamd.toml", environ=environ)
    parts, state_ = open_run(cfg)
    results = [run_cycle(parts, state_) for _ in range(n)]
    summary = parts.store.cycle_summary(parts.run_id)
    with parts.store.read() as s:
        sources = dict(s.execute(text("SELECT source, COUNT(*) FROM scenarios GROUP BY source")).all())
    parts.store.close()
    return cfg, results, summary, sources


def assert_matches_mix(cfg, summary, n_cycles: int) -> None:
    want = kind_quotas(cfg.mix, cfg.train.batch_size)
    assert len(summary) == n_cycles
    for row in summary:
        assert row["status"] == "committed"
        got = {kind: row[col] for kind, col in COLUMNS.items()}
        for kind, column in COLUMNS.items():
            assert abs(got[kind] - want.get(kind, 0)) <= 1, (row["number"], kind, got, want)
        assert sum(got.values()) == cfg.mix.examples_per_cycle


def test_template_cycles_match_the_default_mix(setup_dir: Path, tmp_path: Path) -> None:
    # Default weights accept:pushback 1:1, derail 0.25, self 0; 12 examples in batches of 4.
    cfg, results, summary, _ = run_cycles(setup_dir, tmp_path / "state", 2, DREAMD_MIX__EXAMPLES_PER_CYCLE="12")
    want = kind_quotas(cfg.mix, cfg.train.batch_size)
    assert want == {"accept": 4, "pushback": 4, "derail": 1, "general": 3}
    assert_matches_mix(cfg, summary, 2)


def test_template_cycles_match_a_custom_mix_with_self(setup_dir: Path, tmp_path: Path) -> None:
    cfg, _, summary, _ = run_cycles(setup_dir, tmp_path / "state", 2, DREAMD_MIX__EXAMPLES_PER_CYCLE="16",
                                    DREAMD_MIX__DERAIL="1.0", DREAMD_MIX__SELF_FACTS="0.5",
                                    DREAMD_MIX__GENERAL_SHARE="0.5")
    want = kind_quotas(cfg.mix, cfg.train.batch_size)
    assert want["self"] >= 1 and want["general"] == 8
    assert_matches_mix(cfg, summary, 2)


def test_mixed_source_cycles_match_the_mix(setup_dir: Path, tmp_path: Path) -> None:
    """Half the behavioural candidates go to the random tiny model (all rejected, 'parse: ...'),
    the fallback and the template half fill the quotas exactly."""
    cfg, results, summary, sources = run_cycles(
        setup_dir, tmp_path / "state", 2, DREAMD_MIX__EXAMPLES_PER_CYCLE="12", DREAMD_DREAM__SOURCE="mixed",
        DREAMD_DREAM__SITUATION_MAX_TOKENS="32", DREAMD_DREAM__REPLY_MAX_TOKENS="32",
        DREAMD_MIX__SELF_FACTS="0.25")
    assert_matches_mix(cfg, summary, 2)
    assert sources.get("model", 0) > 0 and sources.get("template", 0) > 0
    assert sum(r.rejected for r in results) >= sources["model"]
