"""The report's plots: one small PNG per panel, each with one unit on its y axis.

A panel holds metrics of one unit and one scale (METRICS[...].unit is its y-axis label), so a
number near 0.34 never squeezes one near 0.005 flat. Series in one panel get distinct markers,
drawn large-and-hollow under small-and-filled, so two series on the same values both stay
visible. Cycle and step axes have integer ticks only. Each plot returns a `Plot` with what its
axes really show (labels and tick texts read back from the drawn figure), which the page
carries as data- attributes for a machine to check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, works under systemd and in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from dreamd.evals.metric_names import BETTER_TEXT, METRICS, RATE  # noqa: E402

QUIET_ACTIONS = ("keep", "wait")
CYCLE_AXIS = "cycle (0 = before training)"
STEP_AXIS = "optimizer step"
SIZE = (4.2, 2.8)  # inches at DPI: 504 x 336 px, shown at most 1:1 so its text stays legible
DPI = 120
STYLES = [("o", 9, "none", "-"), ("s", 6, None, "--"), ("^", 6, None, ":"), ("D", 4, None, "-.")]
"""(marker, size, face, line) per series: the first hollow and large, later ones smaller and
filled, so a series hidden under another still shows as a ring."""


@dataclass(frozen=True)
class Panel:
    section: str
    metrics: tuple[str, ...]
    title: str = ""
    """Default: the single metric's label."""


SECTIONS: dict[str, tuple[str, str]] = {
    "training": ("Training",
                 "Every optimizer step of the model's lineage (a rolled-back cycle's steps are left out). "
                 "Each cycle dreams new examples, trains one pass over them, then is evaluated."),
    "behaviour": ("Behaviour on held-out probes (Q1)",
                  "Requests the model never trained on. Each reply is labelled by rules (did it carry the "
                  "direction out, push back, or neither?); the judge rates ask the model itself. One panel "
                  "per rate, all from 0 to 1."),
    "margins": ("Preference margins",
                "How much more likely the model finds the preferred reply than the dispreferred one, per "
                "token. Above 0: it prefers the right reply. These move before the rates do."),
    "forgetting": ("Forgetting: general skills",
                   "Plain text, arithmetic and code that training never touches: if these get worse, the "
                   "controller adds more general examples or rolls back."),
    "attention": ("Attention (Q3)",
                  "Where the model looks, compared with the run's start on fixed conversations. Descriptive: "
                  "a larger shift is neither good nor bad by itself."),
    "steering": ("Steering direction",
                 "Whether the model's hidden states hold one direction that separates following from "
                 "pushing back, and where its own replies fall on it."),
    "calibration": ("Calibration",
                    "Whether the model's confidence that a claim is true tells right claims from wrong ones."),
    "guardrails": ("Guardrails, timing and the engine",
                   "Counts that must stay 0 (training on an evaluation item would make the numbers above "
                   "meaningless), the evaluation's time, and whether the generation engine serves the trained "
                   "weights."),
    "other": ("Other metrics", "Metrics without a panel of their own."),
}

PANELS: list[Panel] = [
    *(Panel("behaviour", (m,)) for m in (
        "q1.balanced", "q1.listen_rate", "q1.pushback_rate", "q1.sycophancy", "q1.mule_rate", "q1.unclear_rate",
        "q1.derail_rate", "q1.regressive_flips", "q1.judge_listen_rate", "q1.judge_pushback_rate",
        "q1.judge_agreement")),
    Panel("margins", ("margin.mean", "margin.accept", "margin.pushback", "margin.derail"), "log-prob margin per family"),
    Panel("forgetting", ("forget.perplexity",)),
    Panel("forgetting", ("forget.nll",)),
    Panel("forgetting", ("forget.arith_em", "forget.code_em"), "exact match on fixed questions"),
    Panel("forgetting", ("forget.arith_logprob", "forget.code_logprob"), "log-prob of the right answers"),
    Panel("attention", ("q3.shift_mean", "q3.shift_max"), "attention shift since the start"),
    Panel("attention", ("q3.direction_mass",)),
    Panel("attention", ("q3.direction_mass_delta",)),
    Panel("steering", ("steer.consistency",)),
    Panel("steering", ("steer.own_sound", "steer.own_flawed"), "own replies on the direction"),
    Panel("steering", ("steer.separation",)),
    Panel("calibration", ("calib.auroc",)),
    Panel("calibration", ("calib.p_true_gap",)),
    Panel("guardrails", ("probes.overlap", "probes.heldout_trained"), "probe leaks into training"),
    Panel("guardrails", ("probes.seconds",)),
    Panel("guardrails", ("engine.canary_mean_abs_diff", "engine.canary_max_abs_diff"), "engine vs trainer"),
]


@dataclass(frozen=True)
class Plot:
    """One saved panel and what its axes show, read back from the drawn figure."""

    path: Path
    section: str
    title: str
    metrics: tuple[str, ...]
    xlabel: str
    ylabel: str
    xticks: tuple[str, ...]
    caption: str
    size: tuple[int, int]
    """Width and height in pixels."""


def panels_for(names: list[str]) -> list[Panel]:
    """PANELS with data in `names`, then one 'other' panel per metric no panel holds."""
    have = set(names)
    placed = {m for p in PANELS for m in p.metrics}
    chosen = [Panel(p.section, tuple(m for m in p.metrics if m in have), p.title) for p in PANELS]
    chosen = [p for p in chosen if p.metrics]
    return chosen + [Panel("other", (m,)) for m in sorted(have - placed)]


def _label(metric: str) -> str:
    known = METRICS.get(metric)
    return known.label if known and known.label else metric


def _better(metric: str) -> str:
    known = METRICS.get(metric)
    return BETTER_TEXT[known.better] if known else "no description in dreamd/evals/metric_names.py"


def _integer_x(ax: Any) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}"))


def _mark_decisions(ax: Any, decisions: list[dict[str, Any]], key: str) -> None:
    for d in decisions:
        if d["action"] in QUIET_ACTIONS or d[key] is None:
            continue
        ax.axvline(d[key], color="tab:red" if "rollback" in d["action"] else "tab:gray", ls="--", lw=0.8, zorder=0)
        ax.annotate(d["action"], (d[key], 1.0), xycoords=("data", "axes fraction"), fontsize=7, va="bottom",
                    ha="center", color="tab:red" if "rollback" in d["action"] else "dimgray")


def _figure(series: int) -> tuple[Any, Any]:
    """A panel's figure: SIZE, taller by a legend row per series beyond the first (the legend
    goes below the axes, never over the data)."""
    extra = 0.2 * series if series > 1 else 0.0
    return plt.subplots(figsize=(SIZE[0], SIZE[1] + extra), layout="constrained")


def _legend(fig: Any, ax: Any) -> None:
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", fontsize=8, frameon=False)


def _save(fig: Any, ax: Any, path: Path, section: str, title: str, metrics: tuple[str, ...],
          caption: str) -> Plot:
    fig.savefig(path, dpi=DPI)
    fig.canvas.draw()  # tick texts are set at draw time
    ticks = tuple(t.get_text() for t in ax.get_xticklabels() if t.get_text() and t.get_visible()
                  and ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1])
    width, height = (round(v * DPI) for v in fig.get_size_inches())
    plot = Plot(path, section, title, metrics, ax.get_xlabel(), ax.get_ylabel(), ticks, caption, (width, height))
    plt.close(fig)
    return plot


def plot_panel(panel: Panel, trend: dict[str, list[tuple[int, float]]], decisions: list[dict[str, Any]],
               path: Path) -> Plot:
    """One panel: its metrics per cycle (cycle 0 = the baseline), non-quiet decisions as lines."""
    fig, ax = _figure(len(panel.metrics))
    units = {METRICS[m].unit if m in METRICS else "value" for m in panel.metrics}
    assert len(units) == 1, f"panel {panel.metrics} mixes units {units}"
    unit = units.pop()
    one = len(panel.metrics) == 1
    xs_all: list[int] = []
    for metric, (marker, size, face, line) in zip(panel.metrics, STYLES * 3):
        xs, ys = zip(*trend[metric])
        xs_all += xs
        ax.plot(xs, ys, marker=marker, ms=size, mfc=face, ls=line, lw=1.3, mew=1.4,
                label=None if one else f"{_label(metric)} ({_better(metric).split(':')[0]})")
    if unit == RATE:
        ax.set_ylim(-0.05, 1.05)
    elif unit == "count":
        top = max(v for m in panel.metrics for _, v in trend[m])
        ax.set_ylim(-0.5, max(1.0, top) + 0.5)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(min(xs_all) - 0.4, max(xs_all) + 0.4)
    _integer_x(ax)
    ax.set_xlabel(CYCLE_AXIS)
    ax.set_ylabel(unit)
    ax.grid(alpha=0.3)
    _mark_decisions(ax, decisions, "cycle")
    title = panel.title or _label(panel.metrics[0])
    ax.set_title(title, fontsize=10, pad=12)
    if not one:
        _legend(fig, ax)
    betters = {_better(m) for m in panel.metrics}
    caption = (f"{', '.join(panel.metrics)}: {betters.pop()}" if len(betters) == 1
               else "; ".join(f"{m}: {_better(m)}" for m in panel.metrics))
    return _save(fig, ax, path, panel.section, title, panel.metrics, caption)


def plot_training(steps: list[dict[str, Any]], cycles: list[dict[str, Any]], decisions: list[dict[str, Any]],
                  out_dir: Path) -> list[Plot]:
    """Loss, learning rate and general share per optimizer step; dotted lines where cycles begin."""
    x = [r["step"] for r in steps]
    planned = {c["cycle_id"]: c["planned_general_share"] for c in cycles}
    number = {c["cycle_id"]: c["number"] for c in cycles}
    starts: dict[int, int] = {}
    for r in steps:
        starts.setdefault(r["cycle_id"], r["step"])
    lrs = [r["lr"] for r in steps]
    series = [
        ("loss", "training loss", "loss (nats per token)", [[r["loss"] for r in steps]], [None],
         "lower is better, but it is measured on each batch's new examples: noisy by nature"),
        ("lr", "learning rate", "learning rate", [lrs], [None],
         "at each step: the controller sets each cycle's rate (speed up / slow down); the run's first "
         "train.warmup_steps ramp up to it"),
        ("share", "general share of each batch", "general share (0 to 1)",
         [[r["n_general"] / max(1, r["n_general"] + r["n_behavioral"]) for r in steps],
          [planned.get(r["cycle_id"]) for r in steps]], ["in the batch", "planned for the cycle"],
         "general (non-behavioural) examples guard against forgetting; every batch holds at least the plan"),
    ]
    plots = []
    for name, title, ylabel, ys_list, labels, caption in series:
        fig, ax = _figure(len(ys_list))
        for ys, label, (marker, size, face, line) in zip(ys_list, labels, STYLES):
            ax.plot(x, ys, marker=marker if len(x) <= 60 else None, ms=size * 0.7, mfc=face, ls=line, lw=1.2,
                    label=label, drawstyle="steps-post" if name != "loss" else "default")
        for cycle_id, step in starts.items():
            ax.axvline(step, color="lightgray", ls=":", lw=1, zorder=0)
            ax.annotate(f"c{number.get(cycle_id, '?')}", (step, 0.02), xycoords=("data", "axes fraction"),
                        fontsize=7, color="gray", ha="left")
        if name == "lr" and lrs and min(lrs) > 0 and max(lrs) / min(lrs) > 20:
            ax.set_yscale("log")
        elif name == "lr":
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        if name == "share":
            ax.set_ylim(-0.05, 1.05)
            _legend(fig, ax)
        _integer_x(ax)
        ax.set_xlabel(STEP_AXIS + " (cN: cycle N starts)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10, pad=12)
        ax.grid(alpha=0.3)
        _mark_decisions(ax, decisions, "step")
        plots.append(_save(fig, ax, out_dir / f"training_{name}.png", "training", title, (), caption))
    return plots


def plot_all(steps: list[dict[str, Any]], cycles: list[dict[str, Any]], trend: dict[str, list[tuple[int, float]]],
             decisions: list[dict[str, Any]], out_dir: Path) -> list[Plot]:
    """Every plot of the report, in page order, written into `out_dir`."""
    plots = plot_training(steps, cycles, decisions, out_dir) if steps else []
    finite = {m: [(c, y) for c, y in v if math.isfinite(y)] for m, v in trend.items()}
    for panel in panels_for([m for m, v in finite.items() if v]):
        stem = "_".join(m.replace(".", "-") for m in panel.metrics[:2])
        plots.append(plot_panel(panel, finite, decisions, out_dir / f"{stem}.png"))
    return plots
