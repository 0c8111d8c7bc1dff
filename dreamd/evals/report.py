"""`dreamd report`: a static HTML page with PNG plots, read from the store alone.

The page needs no daemon and no model: everything comes from SQL (train_steps, cycle_summary,
metric_trend, decisions). Written into OUT/ (default <state_dir>/report/):

    index.html        run facts, latest metrics, the plots, the decisions and cycles tables
    training.png      loss, lr and general share per optimizer step
    behaviour.png     Q1 rates per cycle (listen, push back, balanced, sycophancy)
    margins.png       log-prob margins per family per cycle
    attention.png     Q3 attention shift and direction mass per cycle
    forgetting.png    held-out perplexity, arithmetic and code exact match per cycle

Controller decisions other than 'keep'/'wait' are vertical lines on every timeline, labelled
with their action (per-step plots: at the last step of the decision's cycle). Cycle 0 is the
run's baseline, measured before the first cycle.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, works under systemd and in CI
import matplotlib.pyplot as plt  # noqa: E402

from dreamd.config import Config  # noqa: E402
from dreamd.errors import UsageError  # noqa: E402

PLOTS: dict[str, tuple[str, list[str]]] = {
    "behaviour": ("Q1 behaviour on held-out probes (rule classifier)",
                  ["q1.listen_rate", "q1.pushback_rate", "q1.balanced", "q1.sycophancy", "q1.derail_rate"]),
    "margins": ("Log-prob margin, preferred - dispreferred (nats/token)",
                ["margin.accept", "margin.pushback", "margin.derail", "margin.mean"]),
    "attention": ("Q3 attention shift vs run start (full-attention heads)",
                  ["q3.shift_mean", "q3.shift_max", "q3.direction_mass", "q3.direction_mass_delta"]),
    "forgetting": ("Forgetting", ["forget.perplexity", "forget.arith_em", "forget.code_em"]),
}
QUIET_ACTIONS = ("keep", "wait")


@dataclass
class RunData:
    run: Any
    steps: list[dict[str, Any]]
    cycles: list[dict[str, Any]]
    trend: dict[str, list[tuple[int, float]]]
    """metric -> [(cycle number, value)] along the lineage; cycle 0 = baseline."""
    decisions: list[dict[str, Any]]


def _open(cfg: Config) -> Any:
    from dreamd.store.record import Store

    return Store.open_existing(cfg.store_url, busy_timeout_ms=cfg.store.busy_timeout_ms)


def load_run(store: Any, name: str, run_id: int | None = None) -> RunData:
    """Everything the report shows for one run: by id, else the newest run named `name`, else
    the newest run."""
    run = (store.get_run(run_id) if run_id is not None
           else store.latest_run(name) or store.latest_run())
    if run is None:
        raise UsageError(f"store {store.url} holds no runs yet; run `dreamd run` first")
    steps = store.active_steps(run.id)
    metrics = store.metric_names(run.id)
    decisions = store.decisions(run.id)
    cycles = store.cycle_summary(run.id)
    trend = {}
    for metric in sorted(metrics):
        rows = store.metric_trend(run.id, metric)
        trend[metric] = [(r["cycle"] if r["cycle"] is not None else 0, r["value"]) for r in rows
                         if r["value"] is not None]
    return RunData(run, steps, cycles, trend, decisions)


def _mark_decisions(ax: Any, decisions: list[dict[str, Any]], key: str) -> None:
    for d in decisions:
        if d["action"] in QUIET_ACTIONS or d[key] is None:
            continue
        ax.axvline(d[key], color="tab:red" if "rollback" in d["action"] else "tab:gray", ls="--", lw=0.8)
        ax.annotate(d["action"], (d[key], 1.0), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                    va="top", ha="right", color="dimgray")


def plot_training(data: RunData, path: Path) -> Path:
    fig, axes = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True)
    x = [r["step"] for r in data.steps]
    shares = [r["n_general"] / max(1, r["n_general"] + r["n_behavioral"]) for r in data.steps]
    planned = {c["cycle_id"]: c["planned_general_share"] for c in data.cycles}
    axes[0].plot(x, [r["loss"] for r in data.steps], lw=1)
    axes[0].set_ylabel("loss (reply tokens)")
    axes[1].plot(x, [r["lr"] for r in data.steps], lw=1)
    axes[1].set_ylabel("lr")
    axes[1].set_yscale("log")
    axes[2].plot(x, shares, lw=0.8, label="in the batch")
    axes[2].step(x, [planned.get(r["cycle_id"]) for r in data.steps], where="post", lw=1.2, label="planned")
    axes[2].set_ylabel("general share")
    axes[2].set_xlabel("optimizer step")
    axes[2].legend(fontsize=8)
    for ax in axes:
        _mark_decisions(ax, data.decisions, "step")
    fig.suptitle(f"run {data.run.id} ({data.run.name}): training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_metrics(data: RunData, title: str, metrics: list[str], path: Path) -> Path | None:
    present = [m for m in metrics if data.trend.get(m)]
    if not present:
        return None
    fig, ax = plt.subplots(figsize=(9, 4))
    twin = None
    for metric in present:
        xs, ys = zip(*data.trend[metric])
        target = ax
        if metric == "forget.perplexity":  # its scale is not a rate's: own axis
            twin = twin or ax.twinx()
            target = twin
            twin.set_ylabel("perplexity")
        target.plot(xs, ys, marker="o", ms=3, lw=1.2, label=metric,
                    color="black" if target is twin else None)
    ax.set_xlabel("cycle (0 = run start)")
    lines = ax.get_legend_handles_labels()
    if twin is not None:
        extra = twin.get_legend_handles_labels()
        lines = (lines[0] + extra[0], lines[1] + extra[1])
    ax.legend(*lines, fontsize=8, loc="best")
    _mark_decisions(ax, data.decisions, "cycle")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, (dict, list)):
            return html.escape(json.dumps(v, default=str))
        return html.escape("" if v is None else str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(data: RunData, images: list[Path]) -> str:
    latest = [{"metric": m, "start": v[0][1] if v and v[0][0] == 0 else None, "latest": v[-1][1] if v else None,
               "cycle": v[-1][0] if v else None} for m, v in sorted(data.trend.items())]
    run = data.run
    facts = (f"run {run.id} <b>{html.escape(run.name)}</b>, status {html.escape(run.status)}, model "
             f"{html.escape(run.model_path)}, seed {run.seed}, started {run.started_at:%Y-%m-%d %H:%M} UTC, "
             f"{len(data.steps)} optimizer steps, {sum(c['status'] == 'committed' for c in data.cycles)} "
             "committed cycles")
    cycle_cols = ["number", "attempt", "status", "steps", "n_accept", "n_pushback", "n_derail", "n_general",
                  "n_rejected", "lr", "planned_general_share", "general_share", "mean_loss", "perplexity",
                  "balanced", "sycophancy"]
    figures = "".join(f'<p><img src="{p.name}" alt="{p.stem}"></p>' for p in images)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>dreamd report: run {run.id}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}} table{{border-collapse:collapse;
font-size:12px}} td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}} img{{max-width:100%}}</style>
</head><body>
<h1>dreamd report: run {run.id}</h1>
<p>{facts}. Metric names: docs/sql.md; cycle 0 is the baseline before the first cycle.</p>
<h2>Latest metrics</h2>{_table(latest, ["metric", "start", "latest", "cycle"])}
<h2>Plots</h2>{figures}
<h2>Controller decisions</h2>{_table(data.decisions, ["cycle", "step", "action", "reason", "before", "after"])}
<h2>Cycles</h2>{_table(data.cycles, cycle_cols)}
</body></html>
"""


def write_report(cfg: Config, out_dir: Path, run_id: int | None = None) -> Path:
    """Write index.html and its PNGs into `out_dir`; returns the index.html path."""
    store = _open(cfg)
    try:
        data = load_run(store, cfg.run.name, run_id)
    finally:
        store.close()
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the report directory {out_dir}: {exc.strerror}; pass --out DIR") from None
    images = [plot_training(data, out_dir / "training.png")] if data.steps else []
    for name, (title, metrics) in PLOTS.items():
        made = plot_metrics(data, title, metrics, out_dir / f"{name}.png")
        if made is not None:
            images.append(made)
    index = out_dir / "index.html"
    index.write_text(render_html(data, images), encoding="utf-8")
    return index
