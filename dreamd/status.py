"""`dreamd history` and `dreamd status`: read-only views of the store and the running daemon.

Both work without the daemon running (the store is the source of truth); `status` adds what only
the live process knows (phase, step, paused, next cycle and why not now) from the status file the
daemon rewrites at every phase change and step boundary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from dreamd.config import Config
from dreamd.files import write_atomic

STATUS_FILE = "status.json"

HISTORY_COLUMNS = [
    ("number", "cycle", "{}"), ("status", "status", "{}"), ("steps", "steps", "{}"),
    ("n_accept", "acc", "{}"), ("n_pushback", "push", "{}"), ("n_derail", "derail", "{}"),
    ("n_general", "gen", "{}"), ("n_rejected", "rej", "{}"), ("general_share", "gen%", "{:.0%}"),
    ("mean_loss", "loss", "{:.4f}"), ("lr", "lr", "{:.1e}"), ("perplexity", "ppl", "{:.1f}"),
    ("arith_em", "arith", "{:.2f}"), ("balanced", "judge", "{:.2f}"), ("sycophancy", "syco", "{:.2f}"),
]


def _open_store(cfg: Config):
    from dreamd.store.record import Store

    return Store.open_existing(cfg.store_url, busy_timeout_ms=cfg.store.busy_timeout_ms)


def _fmt(fmt: str, value: Any) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


FLEET_COLUMNS = [
    ("run_id", "run", "{}"), ("name", "name", "{}"), ("status", "status", "{}"), ("host", "host", "{}"),
    ("pid", "pid", "{}"), ("last_cycle", "cycle", "{}"), ("last_cycle_status", "cycle status", "{}"),
    ("last_cycle_started_at", "cycle started (UTC)", "{:%Y-%m-%d %H:%M:%S}"), ("steps", "steps", "{}"),
    ("mean_loss", "loss", "{:.4f}"), ("perplexity", "ppl", "{:.1f}"), ("balanced", "judge", "{:.2f}"),
    ("sycophancy", "syco", "{:.2f}"), ("model_path", "model", "{}"),
]


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]] = HISTORY_COLUMNS) -> str:
    header = [title for _, title, _ in columns]
    body = [[_fmt(fmt, r.get(key)) for key, _, fmt in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])


def print_fleet(cfg: Config, as_json: bool = False) -> int:
    """`dreamd status --all`: every run in the store (the fleet view), whichever daemon or
    machine runs it. host/pid name the process that took the run up last: it is running only
    while the run's status is 'running'."""
    store = _open_store(cfg)
    rows = store.fleet()
    if as_json:
        print(json.dumps(rows, default=str, indent=1))
    elif not rows:
        print(f"dreamd: no runs in {store.url} yet; start one with `dreamd run`")
    else:
        print(f"{len(rows)} run{'s' if len(rows) != 1 else ''} in store {store.url}")
        print(format_table(rows, FLEET_COLUMNS))
    return 0


def print_history(cfg: Config, as_json: bool = False, limit: int = 50) -> int:
    store = _open_store(cfg)
    run = store.latest_run(cfg.run.name)
    if run is None:
        print(f"dreamd: no run named {cfg.run.name!r} in {store.url} yet; start one with `dreamd run`")
        return 0
    rows = store.cycle_summary(run.id)[-limit:]
    if as_json:
        print(json.dumps(rows, default=str, indent=1))
        return 0
    print(f"run {run.id} {run.name!r} ({run.status}{', paused' if run.paused else ''}), store {store.url}")
    print(format_table(rows))
    return 0


def write_status(state_dir: Path, **fields: Any) -> None:
    """The daemon's live status (atomic replace; read by `dreamd status`)."""
    write_atomic(Path(state_dir) / STATUS_FILE, json.dumps(fields, default=str), durable=False)


def read_status(state_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(state_dir) / STATUS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def record_pause_offline(cfg: Config, paused: bool) -> str:
    """`dreamd pause|resume` with no daemon running: the flag file decides how the next start
    comes up, and the run it will resume gets the same runs.paused and an events row (a daemon
    also pauses at start for runs.paused alone, so a stale True would undo `dreamd resume`).
    Returns the line to print."""
    from dreamd.errors import UsageError
    from dreamd.service.control import PauseFlag

    kind = "pause" if paused else "resume"
    flag = PauseFlag(cfg.run.state_dir)
    if paused:
        flag.set(f"dreamd {kind}")
    else:
        flag.clear()
    line = (f"dreamd: no daemon running for {cfg.run.state_dir}; the next start comes up "
            f"{'paused' if paused else 'running'}")
    try:
        store = _open_store(cfg)
    except UsageError:
        return line + " (no run in the store yet)"
    run = store.find_resumable_run(cfg.run.name)
    if run is None:
        return line + f" (no run named {cfg.run.name!r} to mark yet)"
    store.set_paused(run.id, paused)
    store.add_event(run.id, kind, {"requested_by": f"dreamd {kind}", "daemon": "not running",
                                   "changed": True})
    return line + f" (run {run.id} marked {'paused' if paused else 'not paused'})"


def request_pause(cfg: Config) -> tuple[int, str]:
    """`dreamd pause` with a daemon running: the pause applies at its next step boundary (the
    next optimizer step or cycle start), which can be minutes away in a long evaluation. The
    request is written to the pause flag first (applied: false), so `dreamd status` says "pause
    requested" at once and a restart before it applies still comes up paused; then SIGUSR1.
    Returns the daemon's pid and what to expect."""
    import signal

    from dreamd.service.control import PauseFlag, signal_daemon

    flag = PauseFlag(cfg.run.state_dir)
    live = read_status(cfg.run.state_dir) or {}
    if live.get("paused") or flag.read() is not None:
        return signal_daemon(cfg.run.state_dir, signal.SIGUSR1), "already paused or requested"
    flag.set("dreamd pause", applied=False)
    try:
        pid = signal_daemon(cfg.run.state_dir, signal.SIGUSR1)
    except BaseException:
        flag.clear()
        raise
    return pid, f"{PAUSE_PENDING}; `dreamd status` shows when it has"


PAUSE_PENDING = "pause requested, takes effect at the next step"


def print_status(cfg: Config, as_json: bool = False) -> int:
    from dreamd.service.control import daemon_status

    daemon = daemon_status(cfg.run.state_dir)
    live = read_status(cfg.run.state_dir) if daemon.running else None
    if live and live.get("pid") not in (None, daemon.pid):
        live = None                    # left by an earlier process; this one has not written yet
    out: dict[str, Any] = {"daemon": "running" if daemon.running else "not running",
                           "pid": daemon.pid if daemon.running else None}
    if daemon.stale_pid is not None:  # after a kill -9 or a crash: say so, do not look clean
        out["pidfile"] = f"stale: {daemon.stale_reason} (left by a process that died; the next start replaces it)"
    if live:
        out.update(live)
    run_paused = False
    try:
        store = _open_store(cfg)
        run = store.latest_run(cfg.run.name)
        if run is not None:
            last = store.last_committed_cycle(run.id)
            run_paused = bool(run.paused)
            out.update(run_id=run.id, run_status=run.status,
                       last_committed_cycle=last.number if last else None)
            if run.status == "running" and not daemon.running:
                out["run_status"] = "running in the store, but no daemon runs it (it died; the next start resumes it)"
    except Exception as exc:  # status must answer even when the store cannot
        out["store"] = f"unreadable: {exc}"
    # A live daemon's applied state wins; without one, the flag file (or runs.paused, which
    # also pauses a start) says how the next start comes up.
    flag = daemon.paused
    out["paused"] = bool(live["paused"]) if live else (flag is not None or run_paused)
    out["paused_by"] = ({"source": flag.source, "at": flag.paused_at} if flag is not None and out["paused"]
                        else {"source": "store (runs.paused)", "at": None} if out["paused"] else None)
    # A pause asked for but not applied yet (`dreamd pause` wrote its request; a signal sent by
    # hand shows once the daemon next reports): it applies at the next step boundary.
    requested = live is not None and not out["paused"] and (
        bool(live.get("pause_requested")) or (flag is not None and not flag.applied))
    out["pause_pending"] = (f"{PAUSE_PENDING} (requested by {flag.source} at {flag.paused_at})"
                            if requested and flag is not None and not flag.applied
                            else PAUSE_PENDING if requested else None)
    out["why_not_running"] = why_not_running(out, live)
    if as_json:
        print(json.dumps(out, default=str, indent=1))
    else:
        for k, v in out.items():
            if k == "paused_by" and v:  # words, not a Python dict: 'SIGUSR1 at 2026-...'
                v = v["source"] + (f" at {v['at']}" if v["at"] else "")
            elif isinstance(v, dict):
                v = ", ".join(f"{key} {val}" for key, val in v.items() if val is not None)
            print(f"{k:>22}: {'-' if v is None else v}")
    sys.stdout.flush()
    return 0


def why_not_running(out: dict[str, Any], live: dict[str, Any] | None) -> str | None:
    """Why no cycle is running now, in words; None while one runs."""
    paused = ""
    if out["paused"]:
        by = out["paused_by"]
        paused = f"paused by {by['source']}" + (f" at {by['at']}" if by["at"] else "") + \
            "; `dreamd resume` lets cycles run again"
    if out["daemon"] != "running":
        head = "no daemon running (start it: `dreamd run` or `systemctl start dreamd`)"
        return f"{head}; the next start comes up {paused}" if paused else head
    if paused:
        return paused
    phase = (live or {}).get("phase")
    if phase == "waiting":
        return (live or {}).get("block_reason") or "waiting for the schedule"
    if phase in (None, "starting", "ready"):
        return "starting: store migrations, model load, resume"
    if phase == "stopped":
        return "stopping"
    return None
