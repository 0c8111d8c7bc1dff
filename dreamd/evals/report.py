"""`dreamd report`: a static HTML page of one run's history, read from the store alone.

The page needs no daemon and no model: everything comes from SQL (train_steps, cycle_summary,
metric_trend, decisions, dream_rejections, scenarios). Written into OUT/ (default
<state_dir>/report/), with nothing fetched from the network:

    index.html        run facts; every metric at the start and now, with its meaning and which
                      direction is better; the plots by topic; the controller's decisions in
                      words; example scenarios (accepted, and rejected with their reasons); cycles
    training_*.png    loss, learning rate and general share per optimizer step
    <metric>*.png     one panel per metric or per group of metrics of one unit, per cycle

Which run: `--run ID` or `--run NAME` (the newest run of that name); by default the newest run
of the config's run.name, else the newest run in the store. Cycle 0 is the run's baseline,
measured before the first cycle; rolled-back attempts are left out of the plots (the lineage).
report_plots.py draws, report_html.py writes the page, metric_names.py says what each metric is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dreamd.config import Config
from dreamd.dream.scenario import ScenarioKind
from dreamd.errors import UsageError
from dreamd.evals.report_html import RunData, render_html
from dreamd.evals.report_plots import plot_all

EXAMPLES_PER_KIND = 2
REJECTED_EXAMPLES = 6  # one per (rule, kind) group, the most frequent groups first


def _open(cfg: Config) -> Any:
    from dreamd.store.record import Store

    return Store.open_existing(cfg.store_url, busy_timeout_ms=cfg.store.busy_timeout_ms)


def pick_run(store: Any, name: str, which: str | int | None = None) -> Any:
    """The run `which` names (an id, or a name: its newest run); None: the newest run named
    `name`, else the newest run. A UsageError names the runs there are."""
    if which is None:
        run = store.latest_run(name) or store.latest_run()
        if run is None:
            raise UsageError(f"store {store.url} holds no runs yet; run `dreamd run` first")
        return run
    text = str(which).strip()
    run = (store.get_run(int(text)) if text.isdigit() else None) or store.latest_run(text)
    if run is None:
        newest = store.latest_run()
        hint = f"the newest is {newest.id} ({newest.name})" if newest else "it holds no runs yet"
        raise UsageError(f"--run {text}: no run with that id or name in store {store.url}; {hint}; "
                         "pass --run ID or --run NAME (`dreamd history` shows the current run)")
    return run


def load_run(store: Any, name: str, which: str | int | None = None) -> RunData:
    """Everything the report shows for one run (pick_run says which)."""
    run = pick_run(store, name, which)
    trend = {}
    for metric in sorted(store.metric_names(run.id)):
        rows = store.metric_trend(run.id, metric)
        trend[metric] = [(r["cycle"] if r["cycle"] is not None else 0, r["value"]) for r in rows
                         if r["value"] is not None]
    data = RunData(run, store.active_steps(run.id), store.cycle_summary(run.id), trend, store.decisions(run.id),
                   store.rejections(run.id))
    for kind in ScenarioKind:
        data.accepted_examples += store.scenario_examples(run.id, "accepted", kind=str(kind), limit=EXAMPLES_PER_KIND)
    for group in data.rejections[:REJECTED_EXAMPLES]:
        if group["rule"] != "other":
            data.rejected_examples += store.scenario_examples(run.id, "rejected", kind=group["kind"],
                                                              rule=group["rule"], limit=1)
    return data


def write_report(cfg: Config, out_dir: Path, run: str | int | None = None) -> Path:
    """Write index.html and its PNGs into `out_dir`; returns the index.html path."""
    store = _open(cfg)
    try:
        data = load_run(store, cfg.run.name, run)
    finally:
        store.close()
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot write the report directory {out_dir}: {exc.strerror}; pass --out DIR") from None
    plots = plot_all(data.steps, data.cycles, data.trend, data.decisions, out_dir)
    index = out_dir / "index.html"
    index.write_text(render_html(data, plots), encoding="utf-8")
    return index
