"""Reading and writing dreamd's config: TOML file + DREAMD_* environment -> a validated Config
(config.py holds the schema), and a Config back to TOML.

    cfg = load_config(Path("dreamd.toml"))      # UsageError (exit 2), one line, on any bad input
    path.write_text(to_toml(cfg))
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dreamd.config import Config
from dreamd.errors import UsageError

ENV_PREFIX = "DREAMD_"


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sections = [name for name in Config.model_fields if name != "source"]
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        if "__" not in key:
            rest = key[len(ENV_PREFIX):].lower()
            section = next((sec for sec in sections if rest.startswith(sec + "_")), None)
            if section is not None:  # DREAMD_TRAIN_LR: one underscore, silently ignored before
                field = rest[len(section) + 1:].upper()
                raise UsageError(f"environment variable {key} is not read: section and field are "
                                 f"joined by two underscores, {ENV_PREFIX}{section.upper()}__{field}")
            continue
        path = key[len(ENV_PREFIX):].lower().split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _parse_env_value(raw)
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def _describe_allowed(err: dict[str, Any]) -> str | None:
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        return f"allowed: {ctx['expected']}"
    bounds = [f"{name} {ctx[k]}" for k, name in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
              if k in ctx]
    if bounds:
        return "allowed: " + " and ".join(bounds)
    if err["type"] == "extra_forbidden":
        return "this key is unknown here; check its spelling and section (see docs/config.md)"
    if err["type"] == "finite_number":
        return "allowed: a finite number (no inf or nan)"
    return None


def format_validation_error(exc: ValidationError, where: str, environ: dict[str, str] | None = None) -> str:
    """One line: field, bad value, what is wrong and what is allowed, where it came from (the
    environment variable by name when the value came from one)."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    field = ".".join(loc) or "(top level)"
    variable = next((k for k in (environ or {}) if k.startswith(ENV_PREFIX)
                     and k[len(ENV_PREFIX):].lower().split("__") == loc[: len(k[len(ENV_PREFIX):].split("__"))]),
                    None)
    if variable:
        where = f"environment variable {variable}"
    value = err.get("input")
    shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
    message = err["msg"].removeprefix("Value error, ")
    allowed = _describe_allowed(err)
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"config error in {where}: {field} = {shown}: {message}{'; ' + allowed if allowed else ''}{more}"


def _resolve_paths(cfg: Config, base: Path) -> Config:
    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (base / p).resolve()

    cfg.run.state_dir = fix(cfg.run.state_dir)
    cfg.model.path = fix(cfg.model.path)
    for section, name in (("dream", "spec_file"), ("dream", "seed_corpus"), ("dream", "replay_corpus"),
                          ("dream", "taxonomy_file"),
                          ("eval", "heldout_text"), ("schedule", "idle_activity_file")):
        sec = getattr(cfg, section)
        setattr(sec, name, fix(getattr(sec, name)))
    return cfg


def _read_toml(path: Path) -> dict[str, Any]:
    """The file's TOML table; every way a file can be unreadable is one UsageError line."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}; pass an existing file to --config "
                         "or create one with `dreamd init DIR`") from None
    except IsADirectoryError:
        raise UsageError(f"config file {path} is a directory; pass the dreamd.toml inside it") from None
    except PermissionError:
        raise UsageError(f"config file {path} is not readable by this user; fix its permissions "
                         "(the service user must be able to read it)") from None
    except OSError as exc:  # a symlink loop, an I/O error, a name too long
        raise UsageError(f"config file {path} cannot be read: {exc.strerror or exc}; "
                         "check the path and the file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UsageError(f"config file {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); "
                         "save it as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}; fix the syntax") from None


def load_config(path: Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Read TOML (optional) + DREAMD_* env overrides into a validated Config.

    Raises UsageError (exit code 2) with one line naming the field, the value and what is
    allowed. Relative paths in the file are taken from the file's directory.
    """
    environ = dict(os.environ if environ is None else environ)
    data: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        data = _read_toml(Path(path))
    env = _env_overrides(environ)
    if env:
        where += " + DREAMD_* environment"
    try:
        cfg = Config.model_validate(_merge(data, env))
    except ValidationError as exc:
        raise UsageError(format_validation_error(exc, where, environ)) from None
    cfg.source = Path(path).resolve() if path else None
    base = Path(path).resolve().parent if path else Path.cwd()
    cfg = _resolve_paths(cfg, base)
    _check_state_dir(cfg.run.state_dir, where)
    return cfg


def _check_state_dir(state_dir: Path, where: str) -> None:
    """run.state_dir must be a directory this user can use, or not exist yet (it is made)."""
    if state_dir.exists() and not state_dir.is_dir():
        raise UsageError(f"run.state_dir {state_dir} (from {where}) is a file, not a directory; point "
                         "run.state_dir at a directory (it is created when missing)")
    if state_dir.is_dir() and not os.access(state_dir, os.R_OK | os.W_OK | os.X_OK):
        raise UsageError(f"run.state_dir {state_dir} (from {where}) is not readable and writable by this "
                         "user; fix its owner/permissions (the service user must own it)")


def to_toml(cfg: Config) -> str:
    """Write a config back as TOML (used by `dreamd init`, `dreamd config` and beside
    checkpoints), the store URL's password redacted (Config.redacted)."""
    lines: list[str] = []
    for section, value in cfg.redacted().model_dump(mode="json", exclude_none=True).items():
        lines.append(f"[{section}]")
        for k, v in value.items():
            lines.append(f"{k} = {toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def check_model_dir(path: Path) -> None:
    """model.path is a directory with a config.json, or one UsageError line. Cheap (no torch):
    `dreamd run` checks it before loading anything, so a wrong path is said at once."""
    if not path.exists():
        raise UsageError(f"model directory {path} does not exist; set model.path to a local "
                         "transformers model directory (dreamd never downloads models)")
    if not path.is_dir():
        raise UsageError(f"model.path {path} is a file, not a directory; point model.path at the "
                         "directory holding config.json")
    if not (path / "config.json").is_file():
        raise UsageError(f"model directory {path} has no config.json; point model.path at a "
                         "directory written by save_pretrained()")
