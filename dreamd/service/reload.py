"""SIGHUP config reload: which fields may change while a run is live, and which are refused.

Live fields apply at the next cycle start; every other changed field is refused with a reason
that says why and what to do instead, and the running config keeps its old value. The rules:

    schedule.*                      when cycles run: read before each cycle
    mix.*                           the next cycle's example count, general share, kind weights
    screen.*                        thresholds: screening limits and patterns for new candidates
    train.lr_min, train.lr_max      the controller's lr bounds (it clamps the live lr into them)
    train.max_nonfinite_steps       threshold: NaN/inf steps before a rollback
    engine.canary_atol              threshold: tolerance of the post-push canary
    controller.*                    the controller's thresholds, steps and bounds (next decision)

Everything else shapes the run itself (model, store, engine, optimizer state, probes, the
behaviour spec) and changing it mid-run would make the history incomparable or resume inexact.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dreamd.config import Config
from dreamd.config_file import load_config
from dreamd.errors import UsageError

LIVE_FIELDS: tuple[str, ...] = (
    "schedule.*",
    "controller.*",
    "mix.*",
    "screen.*",
    "train.lr_min",
    "train.lr_max",
    "train.max_nonfinite_steps",
    "engine.canary_atol",
)

_RESTART = "restart the service to apply it (systemctl restart dreamd)"
_NEW_RUN = "start a new run (change run.name) to use it"

# Most specific pattern wins: 'train.lr' before 'train.*'.
REFUSAL_REASONS: dict[str, str] = {
    "run.state_dir": f"the store, checkpoints, pidfile and pause flag live there; {_RESTART}",
    "run.name": f"it names the run being resumed; {_RESTART} (a new name starts a new run)",
    "run.seed": f"the seed is fixed for a run so it can be reproduced; {_NEW_RUN}",
    "run.*": f"read once at start; {_RESTART}",
    "model.*": f"the model is loaded once at start; {_RESTART}",
    "store.*": f"the store connection is opened at start; {_RESTART}",
    "engine.*": ("the generation engine is built once per process (vLLM allows one sleep-mode "
                 f"engine per process); {_RESTART}"),
    "dream.*": ("the dreamer and the behaviour spec are fixed for a run so its cycles stay "
                f"comparable; {_NEW_RUN}"),
    "optimizer.*": ("the optimizer state's shapes and projection sequence depend on it; changing "
                    f"it mid-run breaks exact resume; {_NEW_RUN}"),
    "train.lr": ("the starting lr applies at run start; the controller moves lr within "
                 "[train.lr_min, train.lr_max]: change those instead"),
    "train.*": f"the training step is fixed for a run so resume stays exact; {_NEW_RUN}",
    "eval.*": f"the probes are fixed at run start so every cycle is measured alike; {_NEW_RUN}",
    "checkpoint.*": f"retention and the best metric are read at start; {_RESTART}",
}
_DEFAULT_REASON = f"not a live field (dreamd.service.reload.LIVE_FIELDS); {_RESTART}"


def _matches(pattern: str, name: str) -> bool:
    return name == pattern or (pattern.endswith(".*") and name.startswith(pattern[:-1]))


def is_live(name: str) -> bool:
    """True when the dotted field name (e.g. 'mix.general_share') may change on SIGHUP."""
    return any(_matches(p, name) for p in LIVE_FIELDS)


def refusal_reason(name: str) -> str:
    exact = REFUSAL_REASONS.get(name)
    if exact is not None:
        return exact
    section = name.split(".", 1)[0] + ".*"
    return REFUSAL_REASONS.get(section, _DEFAULT_REASON)


def changed_fields(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """Every dotted field whose value differs: {'mix.general_share': (0.25, 0.4)}."""
    a, b = old.model_dump(), new.model_dump()
    out: dict[str, tuple[Any, Any]] = {}
    for section in sorted(set(a) | set(b)):
        sa, sb = a.get(section), b.get(section)
        if not isinstance(sa, Mapping) or not isinstance(sb, Mapping):
            if sa != sb:
                out[section] = (sa, sb)
            continue
        for name in sorted(set(sa) | set(sb)):
            if sa.get(name) != sb.get(name):
                out[f"{section}.{name}"] = (sa.get(name), sb.get(name))
    return out


def diff_reloadable(old: Config, new: Config) -> tuple[dict[str, tuple[Any, Any]], dict[str, str]]:
    """Split the changes from `old` to `new` into (applied, refused).

    applied: {field: (old value, new value)} for live fields.
    refused: {field: reason} for the rest; their old values stay in force.
    """
    applied: dict[str, tuple[Any, Any]] = {}
    refused: dict[str, str] = {}
    for name, change in changed_fields(old, new).items():
        if is_live(name):
            applied[name] = change
        else:
            refused[name] = refusal_reason(name)
    return applied, refused


@dataclass
class ReloadResult:
    config: Config
    """The config to run with from the next cycle: the old one plus the applied fields."""
    applied: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    """Set when the file could not be read or validated; then nothing changed."""

    def summary(self) -> str:
        """One line for the log and the events row."""
        if self.error:
            return f"reload failed, config unchanged: {self.error}"
        parts = [f"applied {k}: {v[0]!r} -> {v[1]!r}" for k, v in self.applied.items()]
        parts += [f"refused {k}: {why}" for k, why in self.refused.items()]
        return "; ".join(parts) or "reload: no changes"

    def to_json(self) -> dict[str, object]:
        """The events row's detail: each applied field's old and new value, each refused field
        and why, the error of a file that could not be used, and the one-line summary."""
        return {"applied": {k: [v[0], v[1]] for k, v in self.applied.items()}, "refused": dict(self.refused),
                "error": self.error or None, "summary": self.summary()}


def apply_reloadable(old: Config, new: Config) -> ReloadResult:
    """The config `old` becomes when `new` is read on SIGHUP (live fields only)."""
    applied, refused = diff_reloadable(old, new)
    merged = old.model_dump()
    new_values = new.model_dump()
    for name in applied:
        section, _, key = name.partition(".")
        merged[section][key] = new_values[section][key]
    try:
        config = Config.model_validate(merged)
    except ValidationError as exc:
        # A cross-field rule between a live and a refused field: refuse the whole reload.
        return ReloadResult(old, {}, refused, error=f"merged config is invalid: {exc.errors()[0]['msg']}")
    config.source = old.source
    return ReloadResult(config, applied, refused)


SETTLE_S = 1.0       # how long a reload waits for a save in progress to finish
SETTLE_LOOK_S = 0.05  # the gap between two looks at the file's size and mtime


def wait_for_save(path: Path, settle_s: float = SETTLE_S) -> str | None:
    """A SIGHUP can land while an editor saves in place (truncate, then write): the file is then
    empty or still growing, and an empty file is valid TOML that would reset every live field to
    its default. Wait until the file is non-empty and unchanged between two looks; return the
    error line if it stays empty. A file that cannot be looked at is left to load_config."""
    last: tuple[int, int] | None = None
    deadline = time.monotonic() + settle_s
    while True:
        try:
            st = os.stat(path)
        except OSError:
            return None
        now = (st.st_size, st.st_mtime_ns)
        if st.st_size > 0 and now == last:
            return None
        if time.monotonic() >= deadline:
            if st.st_size == 0:
                return (f"config file {path} is empty; a reload never resets the run to defaults: write "
                        "the settings back and send SIGHUP again")
            return None  # still changing after settle_s: read it as it is, load_config judges it
        last = now
        time.sleep(SETTLE_LOOK_S)


def reload_config(current: Config, environ: Mapping[str, str] | None = None) -> ReloadResult:
    """Re-read current.source (and DREAMD_* env) and apply the live fields. Never raises for a
    user mistake: a broken file keeps the running config and says why in `error`."""
    if current.source is not None and (empty := wait_for_save(current.source)):
        return ReloadResult(current, error=empty)
    try:
        new = load_config(current.source, None if environ is None else dict(environ))
    except UsageError as exc:
        return ReloadResult(current, error=str(exc))
    return apply_reloadable(current, new)
