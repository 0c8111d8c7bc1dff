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

Readable without the code: every metric shown carries its meaning and which direction is better
(METRICS, dreamd/evals/metric_names.py), every decision its action in words
(controller.ACTIONS) and the settings it changed, every scenario kind what it teaches. Tables
fit the page: long text wraps, and below 760 px each row becomes a card. The plots are drawn by
report_plots.py.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreamd.config import Config
from dreamd.controller import ACTIONS
from dreamd.dream.scenario import KIND_MEANINGS, ScenarioKind
from dreamd.errors import UsageError
from dreamd.evals.metric_names import BETTER_TEXT, METRICS
from dreamd.evals.report_plots import PANELS, SECTIONS, Plot, plot_all

SETTINGS = {"lr": "learning rate", "general_share": "general share", "examples_per_cycle": "examples per cycle",
            "general_focus": "general skill to practise"}
MAX_CHARS = 500  # per message in an example; the rest is counted, not shown
MAX_MESSAGES = 3  # the last ones of a conversation


@dataclass
class RunData:
    """What the page shows of one run (load_run reads it from the store)."""

    run: Any
    steps: list[dict[str, Any]]
    cycles: list[dict[str, Any]]
    trend: dict[str, list[tuple[int, float]]]
    """metric -> [(cycle number, value)] along the lineage; cycle 0 = baseline."""
    decisions: list[dict[str, Any]]
    rejections: list[dict[str, Any]] = field(default_factory=list)
    accepted_examples: list[dict[str, Any]] = field(default_factory=list)
    rejected_examples: list[dict[str, Any]] = field(default_factory=list)


CSS = """
*{box-sizing:border-box} body{font:15px/1.5 system-ui,sans-serif;color:#222;max-width:1240px;margin:0 auto;
padding:0 16px 40px} h1{font-size:1.6em;margin:.8em 0 .2em} h2{margin-top:1.8em;border-bottom:1px solid #ddd}
code{font-size:.92em;background:#f3f3f3;padding:0 3px;border-radius:3px} .lead{color:#444;max-width:60em}
nav a{margin-right:1em;white-space:nowrap} dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px}
dl.facts dt{font-weight:600} dl.facts dd{margin:0;overflow-wrap:anywhere}
table{border-collapse:collapse;width:100%;font-size:13px;margin:.6em 0}
th,td{border:1px solid #ddd;padding:4px 6px;vertical-align:top;text-align:left;overflow-wrap:break-word}
th{background:#f6f6f6;overflow-wrap:normal} td code{overflow-wrap:normal;word-break:normal} tr.sub th{background:#eef3fa}
td.num{text-align:right;white-space:nowrap} td.nowrap{white-space:nowrap}
.better{color:#1a7f37} .worse{color:#c62828} .muted{color:#777}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,380px),1fr));gap:14px}
figure{margin:0;border:1px solid #e3e3e3;border-radius:6px;padding:6px;background:#fff}
figure img{width:100%;height:auto;display:block} figcaption{font-size:12px;color:#555}
.examples{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,520px),1fr));gap:14px}
.example{border:1px solid #ddd;border-radius:6px;padding:8px 10px;font-size:13px;min-width:0}
.example.rejected{border-color:#e0a0a0;background:#fffafa} .example .head{font-weight:600}
.turn{margin:6px 0;padding:4px 8px;border-left:3px solid #bbb;white-space:pre-wrap;overflow-wrap:anywhere}
.turn.user{border-color:#5b8def} .turn.assistant{border-color:#3a9d5d} .turn.system{border-color:#999;color:#555}
.reason{color:#c62828;font-weight:600;overflow-wrap:anywhere}
@media (max-width:760px){
 table.cards thead{display:none} table.cards,table.cards tbody,table.cards tr,table.cards td{display:block;width:100%}
 table.cards tr{border:1px solid #ccc;border-radius:6px;margin:0 0 10px;padding:4px}
 table.cards td{border:none;padding:2px 4px;text-align:left;white-space:normal} table.cards td:empty{display:none}
 table.cards td::before{content:attr(data-label) ": ";font-weight:600;color:#555}
 table.cards tr.sub{border:none} table.cards tr.sub th{display:block}}
"""


def esc(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return esc(v)


def table(columns: list[str], rows: list[list[str]], numeric: set[int] = frozenset(), cards: bool = True) -> str:
    """Cells are HTML already. Columns in `numeric` align right."""
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f'<td data-label="{esc(c)}"{" class=num" if i in numeric else ""}>{cell}</td>'
                                    for i, (c, cell) in enumerate(zip(columns, row))) + "</tr>" for row in rows)
    return f'<table{" class=cards" if cards else ""}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _change(metric: str, start: float | None, latest: float | None) -> str:
    if start is None or latest is None or not (math.isfinite(start) and math.isfinite(latest)):
        return ""
    delta = latest - start
    better = METRICS[metric].better if metric in METRICS else "none"
    good = {"higher": delta > 0, "lower": delta < 0, "zero": latest == 0}.get(better)
    if delta == 0:
        return '<span class="muted">no change</span>'
    word = "" if good is None else (' <span class="better">better</span>' if good
                                                 else ' <span class="worse">worse</span>')
    return f"{delta:+.4g}{word}"


def metric_name(metric: str) -> str:
    """The name in <code>, breakable only after its dots and underscores."""
    return "<code>" + esc(metric).replace(".", ".<wbr>").replace("_", "_<wbr>") + "</code>"


METRIC_COLUMNS = ["metric", "what it means", "better", "at start", "latest", "change"]
CLASSES = {2: " class=nowrap", 3: " class=num", 4: " class=num", 5: " class=num"}


def metrics_table(data: RunData) -> str:
    order = [m for p in PANELS for m in p.metrics] + sorted(m for m in data.trend if m not in METRICS)
    section_of = {m: p.section for p in PANELS for m in p.metrics}
    current, body = None, []
    for metric in order:
        values = data.trend.get(metric)
        if not values:
            continue
        section = section_of.get(metric, "other")
        if section != current:
            current = section
            body.append(f'<tr class="sub"><th colspan="6">{esc(SECTIONS[section][0])}</th></tr>')
        known = METRICS.get(metric)
        start = values[0][1] if values[0][0] == 0 else None
        cells = [metric_name(metric), esc(known.meaning) if known else "(no description)",
                 esc(BETTER_TEXT[known.better]) if known else "", fmt(start),
                 f"{fmt(values[-1][1])} <span class=muted>(cycle {values[-1][0]})</span>",
                 _change(metric, start, values[-1][1])]
        body.append("<tr>" + "".join(f'<td data-label="{lab}"{CLASSES.get(i, "")}>{c}</td>'
                                     for i, (lab, c) in enumerate(zip(METRIC_COLUMNS, cells))) + "</tr>")
    head = "".join(f"<th>{c}</th>" for c in METRIC_COLUMNS)
    return f'<table class="cards metrics"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def settings_change(before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    """'learning rate 0.001 → 0.002; examples per cycle 8 → 12', or the settings kept."""
    before, after = before or {}, after or {}
    changed = [f"{SETTINGS.get(k, k)} {fmt(before.get(k))} → {fmt(after.get(k))}"
               for k in list(before) + [k for k in after if k not in before] if before.get(k) != after.get(k)]
    if changed:
        return esc("; ".join(changed)).replace("→", "&rarr;")
    kept = ", ".join(f"{SETTINGS.get(k, k)} {fmt(v)}" for k, v in before.items())
    return f'<span class="muted">unchanged ({esc(kept)})</span>'


def action_text(action: str) -> str:
    parts = action.split("+")
    return "<b>" + esc(action) + "</b>: " + esc("; ".join(ACTIONS.get(p, "(not a known action)") for p in parts))


def decisions_table(data: RunData) -> str:
    rows = [[fmt(d["cycle"]), fmt(d["step"]), action_text(d["action"]), esc(d["reason"]),
             settings_change(d["before"], d["after"])] for d in data.decisions]
    return table(["cycle", "after step", "decision", "why", "settings for the next cycle"], rows, {0, 1})


CYCLE_COLUMNS = [  # header, explanation
    ("cycle", "cycle number; 0 is the baseline measured before training"),
    ("try", "attempt, 0 for the first: a rolled-back cycle is tried again with the same number"),
    ("outcome", "committed (kept), rolled_back (undone), failed, or running"),
    ("steps", "optimizer steps still in the model's lineage"),
    ("accepted: accept / pushback / derail / general / self", "scenarios accepted, by kind"),
    ("rejected", "scenarios the screen rejected (all reasons)"),
    ("learning rate", "the cycle's learning rate"),
    ("general share planned → trained", "share of general examples the cycle planned, and trained"),
    ("mean loss", "mean training loss over the cycle's steps"),
    ("perplexity", "forget.perplexity after the cycle"),
    ("balanced", "q1.balanced after the cycle"),
    ("sycophancy", "q1.sycophancy after the cycle"),
]


def cycles_table(data: RunData) -> str:
    rows = [[fmt(c["number"]), fmt(c["attempt"]), esc(c["status"]), fmt(c["steps"]),
             " / ".join(fmt(c[k] or 0) for k in ("n_accept", "n_pushback", "n_derail", "n_general", "n_self")),
             fmt(c["n_rejected"]), fmt(c["lr"]),
             f'{fmt(c["planned_general_share"])} &rarr; {fmt(c["general_share"])}', fmt(c["mean_loss"]),
             fmt(c["perplexity"]), fmt(c["balanced"]), fmt(c["sycophancy"])] for c in data.cycles]
    legend = "".join(f"<li><b>{esc(h)}</b>: {esc(why)}</li>" for h, why in CYCLE_COLUMNS)
    return (table([h for h, _ in CYCLE_COLUMNS], rows, {0, 1, 3, 5, 6, 8, 9, 10, 11})
            + f'<details><summary>What the columns mean</summary><ul>{legend}</ul></details>')


def _clip(text: str) -> str:
    if len(text) <= MAX_CHARS:
        return esc(text)
    return esc(text[:MAX_CHARS]) + f' <span class="muted">… ({len(text) - MAX_CHARS} more characters)</span>'


def example_card(ex: dict[str, Any]) -> str:
    try:
        kind = f"{ex['kind']} ({KIND_MEANINGS[ScenarioKind(ex['kind'])]})"
    except ValueError:
        kind = ex["kind"]
    rejected = ex["status"] == "rejected"
    messages = ex["messages"] or []
    unread = "parse_error" in (ex.get("meta") or {})  # no conversation: the prompt and the raw draft
    shown = 1 if unread else MAX_MESSAGES
    hidden = len(messages) - shown
    turns = "".join(f'<div class="turn {esc(m.get("role"))}"><b>{esc(m.get("role"))}</b>: {_clip(m.get("content", ""))}</div>'
                    for m in messages[-shown:])
    more = (f'<div class="muted">({hidden} earlier message{"s" if hidden > 1 else ""} not shown)</div>'
            if hidden > 0 else "")
    if unread:
        more = ('<div class="muted">The model\'s draft could not be read as a conversation, so this shows the '
                f"end of the instructions it was given and the text it wrote.</div>{more}")
    reply = "what the model wrote" if unread else "reply"
    reason = f'<div class="reason">rejected: {esc(ex["reject_reason"])}</div>' if rejected else ""
    return (f'<div class="example {esc(ex["status"])}"><div class="head">{esc(ex["status"])} · {esc(kind)}</div>'
            f'<div class="muted">written by {esc(ex["source"])}, cycle {fmt(ex["cycle"])}, scenario {ex["id"]}</div>'
            f'{reason}{more}{turns}<div class="turn assistant"><b>{reply} ({"not trained" if rejected else "trained"})'
            f'</b>: {_clip(ex["target"] or "")}</div></div>')


def examples_section(data: RunData) -> str:
    accepted = "".join(example_card(e) for e in data.accepted_examples) or "<p>No scenario was accepted yet.</p>"
    counts = table(["why (rule)", "kind", "written by", "how many", "an example reason"],
                   [[f"<code>{esc(r['rule'])}</code>", esc(r["kind"]), esc(r["source"]), fmt(r["n"]), esc(r["example"])]
                    for r in data.rejections], {3})
    rejected = "".join(example_card(e) for e in data.rejected_examples)
    rejected_part = (f"<p>Every candidate failing a screening rule is stored with the rule and its problem "
                     f"(<code>rule: problem</code>; the rules are in docs/dreaming.md).</p>{counts}"
                     f'<div class="examples">{rejected}</div>' if data.rejections
                     else "<p>No candidate was rejected in this run.</p>")
    return (f'<h3>Accepted (trained on)</h3><p class="lead">The newest of each kind. Training only learns the '
            f'reply; the conversation before it is context.</p><div class="examples">{accepted}</div>'
            f"<h3>Rejected, and why</h3>{rejected_part}")


def figure(plot: Plot) -> str:
    width, height = plot.size
    return (f'<figure data-xlabel="{esc(plot.xlabel)}" data-ylabel="{esc(plot.ylabel)}" '
            f'data-xticks="{esc(" ".join(plot.xticks))}" data-metrics="{esc(" ".join(plot.metrics))}">'
            f'<img src="{esc(plot.path.name)}" width="{width}" height="{height}" alt="{esc(plot.title)}">'
            f"<figcaption>{esc(plot.caption)}</figcaption></figure>")


def plots_sections(plots: list[Plot]) -> str:
    out = []
    for key, (heading, intro) in SECTIONS.items():
        mine = [p for p in plots if p.section == key]
        if mine:
            out.append(f'<section id="{key}"><h2>{esc(heading)}</h2><p class="lead">{esc(intro)}</p>'
                       f'<div class="grid">{"".join(figure(p) for p in mine)}</div></section>')
    return "".join(out)


def render_html(data: RunData, plots: list[Plot]) -> str:
    run = data.run
    committed = sum(c["status"] == "committed" for c in data.cycles)
    rolled = sum(c["status"] == "rolled_back" for c in data.cycles)
    accepted = sum(sum(c[k] or 0 for k in ("n_accept", "n_pushback", "n_derail", "n_general", "n_self"))
                   for c in data.cycles)
    facts = [("run", f"{run.id} <b>{esc(run.name)}</b>"), ("status", esc(run.status)), ("model", esc(run.model_path)),
             ("seed", fmt(run.seed)), ("started", f"{run.started_at:%Y-%m-%d %H:%M} UTC"),
             ("cycles", f"{committed} committed, {rolled} rolled back"),
             ("optimizer steps", f"{len(data.steps)} in the lineage"),
             ("scenarios", f"{accepted} accepted, {sum(c['n_rejected'] or 0 for c in data.cycles)} rejected")]
    nav = " ".join(f'<a href="#{k}">{esc(v[0])}</a>' for k, v in SECTIONS.items()
                   if any(p.section == k for p in plots))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>dreamd report: run {run.id} ({esc(run.name)})</title><style>{CSS}</style></head><body>
<h1>dreamd report: run {run.id} ({esc(run.name)})</h1>
<p class="lead">dreamd trains a language model in cycles. Each cycle it <em>dreams</em> short conversations
(scenarios) that teach one behaviour: carry out sound directions, push back on flawed ones, ignore
instructions hidden in a task. It screens them, trains on the accepted ones, then measures the model on
fixed held-out probes it never trains on. A controller reads those numbers and decides the next cycle's
settings, or undoes the cycle. <b>Cycle 0</b> is the measurement before the first cycle; a rolled-back
cycle's numbers are left out of the plots (the model's lineage only).</p>
<dl class="facts">{"".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)}</dl>
<nav><b>Sections:</b> <a href="#metrics">Metrics at a glance</a> {nav} <a href="#decisions">Controller decisions</a>
<a href="#examples">Example scenarios</a> <a href="#cycles">Cycles</a></nav>
<section id="metrics"><h2>Metrics at a glance</h2><p class="lead">Each number as measured before training
(start) and after the newest cycle, with what it means and which way is better.</p>{metrics_table(data)}</section>
{plots_sections(plots)}
<section id="decisions"><h2>Controller decisions</h2><p class="lead">After every cycle the controller compares
the metrics with the start and the previous cycle. Decisions other than keep and wait are also drawn as
dashed lines on the plots.</p>{decisions_table(data)}</section>
<section id="examples"><h2>Example scenarios</h2>{examples_section(data)}</section>
<section id="cycles"><h2>Cycles</h2><p class="lead">One row per cycle attempt, rolled-back ones
included.</p>{cycles_table(data)}</section>
</body></html>
"""


# ---- loading from the store, writing OUT/ -----------------------------------------------------

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
                         "pass --run with the id or name of one of its runs")
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
