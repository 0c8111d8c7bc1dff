"""Config: defaults from the design, TOML + env precedence, one-line errors with exit code 2,
and every TOML file the repo ships parses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dreamd.config import Config
from dreamd.config_file import load_config, to_toml
from dreamd.errors import UsageError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_follow_the_design():
    cfg = Config()
    assert cfg.train.lr == 1e-5
    assert cfg.mix.general_share == 0.25
    assert cfg.optimizer.name == "apollo"
    assert cfg.optimizer.scale is None  # n/r, derived per matrix (APOLLO, arXiv 2412.05270)


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            if field.exclude:
                continue
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, Config.__mro__[1]):
                yield from walk(ann)
            else:
                yield f"{model.__name__}.{name}", field.description
    undocumented = [name for name, doc in walk(Config) if not doc]
    assert not undocumented


def test_toml_then_env_precedence(tmp_path):
    path = tmp_path / "d.toml"
    path.write_text('[train]\nlr = 3e-5\nbatch_size = 8\n[model]\npath = "m"\n')
    cfg = load_config(path, environ={"DREAMD_TRAIN__LR": "5e-5", "DREAMD_STORE__URL": "sqlite:///x.db"})
    assert cfg.train.lr == 5e-5          # env wins over the file
    assert cfg.train.batch_size == 8     # file wins over the default
    assert cfg.store.url == "sqlite:///x.db"
    assert cfg.model.path == tmp_path / "m"  # relative to the file


@pytest.mark.parametrize("body, field, allowed", [
    ("[train]\nlr = -1\n", "train.lr", "> 0"),
    ("[mix]\ngeneral_share = 0.1\n", "mix.general_share", ">= 0.25"),
    ("[optimizer]\nname = 'sgd'\n", "optimizer.name", "'apollo' or 'adamw'"),
    ("[train]\nlearning_rate = 1e-5\n", "train.learning_rate", "unknown"),
    ("[train]\nlr_min = 1e-3\nlr_max = 1e-4\n", "train", "lr_min"),
    ("[screen]\nnear_dup_read_budget = -1\n", "screen.near_dup_read_budget", 'or "all"'),
    ("[screen]\nnear_dup_read_budget = 'none'\n", "screen.near_dup_read_budget", 'or "all"'),
])
def test_bad_values_name_field_value_and_allowed(tmp_path, body, field, allowed):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(UsageError) as exc:
        load_config(path, environ={})
    msg = str(exc.value)
    assert "\n" not in msg
    assert field in msg and allowed in msg and str(path) in msg


def test_bad_env_value_is_a_usage_error():
    with pytest.raises(UsageError, match="train.batch_size"):
        load_config(None, environ={"DREAMD_TRAIN__BATCH_SIZE": "zero"})


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nlr = 'fast'\n")
    proc = subprocess.run([sys.executable, "-m", "dreamd", "config", "--config", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "train.lr" in lines[0] and '"fast"' in lines[0]
    assert "Traceback" not in proc.stderr


def test_cli_missing_config_and_broken_toml(tmp_path):
    for args, expect in ((["--config", str(tmp_path / "nope.toml")], "not found"),):
        proc = subprocess.run([sys.executable, "-m", "dreamd", "history", *args], capture_output=True, text=True)
        assert proc.returncode == 2 and expect in proc.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nlr=")
    proc = subprocess.run([sys.executable, "-m", "dreamd", "history", "--config", str(broken)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "not valid TOML" in proc.stderr


def test_round_trip_through_toml(tmp_path):
    cfg = Config()
    cfg.train.lr = 2e-5
    path = tmp_path / "rt.toml"
    path.write_text(to_toml(cfg))
    back = load_config(path, environ={})
    assert back.train.lr == 2e-5 and back.dream.spec == cfg.dream.spec


SHIPPED = sorted(p for p in REPO.rglob("*.toml")
                 if not any(part.startswith(".") for part in p.relative_to(REPO).parts)
                 and p.name != "pyproject.toml")


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_every_shipped_toml_parses(path):
    load_config(path, environ={})


def test_some_toml_is_shipped():
    assert any(p.parent.name == "deploy" for p in SHIPPED)


def test_docs_config_md_is_current():
    from dreamd.config_docs import config_reference

    assert (REPO / "docs" / "config.md").read_text() == config_reference(), (
        "regenerate: python -c \"from dreamd.config_docs import config_reference; "
        "open('docs/config.md','w').write(config_reference())\"")


# ---- what passes validation must run: the runtime's limits are the schema's ---------------------

RUNTIME_BREAKERS = [  # each once passed validation and then crashed or failed a run
    ("DREAMD_MIX__ACCEPT", "inf", "finite number"),
    ("DREAMD_MIX__PUSHBACK", "1e308", "<= 1000"),  # weights summed to inf -> NaN -> int()
    ("DREAMD_OPTIMIZER__BETAS", "[1, 2]", "< 1.0"),
    ("DREAMD_OPTIMIZER__BETAS", "[0.9, nan]", "finite number"),
    ("DREAMD_OPTIMIZER__WEIGHT_DECAY", "inf", "finite number"),  # was a misleading canary mismatch
    ("DREAMD_OPTIMIZER__WEIGHT_DECAY", "1e30", "<= 1.0"),
    ("DREAMD_CONTROLLER__EXAMPLES_FACTOR", "inf", "finite number"),  # OverflowError when speeding up
    ("DREAMD_CONTROLLER__LR_FACTOR", "1e308", "<= 10.0"),
    ("DREAMD_TRAIN__LR_MAX", "1e308", "<= 0.01"),
    ("DREAMD_SCHEDULE__EVERY_MINUTES", "inf", "finite number"),
    ("DREAMD_SCHEDULE__EVERY_MINUTES", "1e308", "<= 527040"),
    ("DREAMD_SCHEDULE__MISFIRE_GRACE_MINUTES", "1e308", "<= 527040"),  # OverflowError in the schedule
    ("DREAMD_SCHEDULE__IDLE_POLL_SECONDS", "inf", "finite number"),
    ("DREAMD_RUN__NAME", "run\udcff", "not UTF-8"),  # UnicodeEncodeError at the store
]


@pytest.mark.parametrize("variable,raw,allowed", RUNTIME_BREAKERS)
def test_values_the_runtime_cannot_hold_are_refused_in_one_line(variable, raw, allowed):
    with pytest.raises(UsageError) as info:
        load_config(None, environ={variable: raw})
    message = str(info.value)
    assert "\n" not in message and allowed in message
    assert f"environment variable {variable}" in message  # the variable by name, not only the key
    assert message.count("finite number") <= 2 and "Value error" not in message


def test_schedule_at_the_bounds_still_builds(tmp_path):
    from datetime import datetime, timedelta, timezone

    cfg = load_config(None, environ={"DREAMD_SCHEDULE__MISFIRE_GRACE_MINUTES": "527040",
                                     "DREAMD_SCHEDULE__EVERY_MINUTES": "527040"})
    now = datetime.now(timezone.utc)
    assert now + timedelta(minutes=cfg.schedule.misfire_grace_minutes) > now  # no OverflowError


def test_unreadable_config_files_are_one_line_usage_errors(tmp_path):
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[run]\nname = "caf\xe9"\n')
    loop = tmp_path / "loop.toml"
    loop.symlink_to(loop)
    cases = {latin1: "is not UTF-8 text (byte 0xe9 on line 2)", tmp_path: "is a directory",
             loop: "cannot be read"}
    for path, expected in cases.items():
        with pytest.raises(UsageError) as info:
            load_config(path, environ={})
        assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)
    for path in cases:  # the CLI: exit 2, one line, no traceback
        proc = subprocess.run([sys.executable, "-m", "dreamd", "config", "--config", str(path)],
                              capture_output=True, text=True)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr


def test_sighup_with_a_broken_file_keeps_the_running_config(tmp_path):
    from dreamd.service.reload import reload_config

    path = tmp_path / "dreamd.toml"
    path.write_text('[train]\nlr = 2e-5\n')
    current = load_config(path, environ={})
    for broken in (b'[train]\nlr = 3e-5\n# \xff\n', b'[schedule]\nmisfire_grace_minutes = 1e308\n'):
        path.write_bytes(broken)
        result = reload_config(current, environ={})
        assert result.error and result.config.train.lr == 2e-5



def test_a_reload_during_an_in_place_save_waits_for_the_file_and_never_reads_it_empty(tmp_path):
    """An editor saving in place truncates, then writes: a SIGHUP landing in between once read an
    empty file, which is valid TOML (all defaults), and reset every live field. The reload waits
    for the save to finish; a file that stays empty is refused."""
    import threading

    from dreamd.service.reload import reload_config

    path = tmp_path / "dreamd.toml"
    path.write_text("[mix]\nexamples_per_cycle = 8\n")
    current = load_config(path, environ={})
    path.write_bytes(b"")                                   # the save has truncated the file ...
    threading.Timer(0.2, path.write_text, ("[mix]\nexamples_per_cycle = 12\n",)).start()
    result = reload_config(current, environ={})             # ... and writes it 0.2 s later
    assert not result.error and result.config.mix.examples_per_cycle == 12, result.summary()
    path.write_bytes(b"")
    result = reload_config(result.config, environ={})
    assert result.error and "is empty" in result.error and result.config.mix.examples_per_cycle == 12

# ---- the command line, as a new user meets it ---------------------------------------------------


def _dreamd(*args, env=None, cwd=None, shell=None):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("DREAMD_")} | (env or {})
    if shell:
        return subprocess.run(shell, shell=True, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    return subprocess.run([sys.executable, "-m", "dreamd", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_cli_version_help_and_refusals(tmp_path):
    from importlib.metadata import version

    assert _dreamd("--version").stdout.strip() == f"dreamd {version('dreamd')}"
    assert "dream-loop training daemon" in _dreamd("--help").stdout
    once = _dreamd("once", "--cycles", "2")  # was silently one cycle
    assert once.returncode == 2 and "unrecognized arguments: --cycles 2" in once.stderr
    typo = _dreamd("config", env={"DREAMD_TRAIN_LR": "1e-4"}, cwd=tmp_path)  # was silently ignored
    assert typo.returncode == 2 and "DREAMD_TRAIN__LR" in typo.stderr.splitlines()[-1]


def test_config_explain_is_toml():
    out = _dreamd("config", "--explain").stdout
    for python in ("PosixPath(", "None", "True", "False", "(0.9, 0.999)"):
        assert python not in out.split("#")[0] and f"= {python}" not in out, python
    assert 'run.state_dir = "state"' in out and "optimizer.betas = [0.9, 0.999]" in out
    assert "engine.enforce_eager = true" in out


def test_a_closed_pipe_is_not_a_traceback(capsys):
    """`dreamd history | head`: the reader is gone before dreamd writes; it was a traceback."""
    import io
    import os
    from contextlib import redirect_stdout

    from dreamd.cli import main

    read_end, write_end = os.pipe()
    os.close(read_end)
    with io.TextIOWrapper(io.FileIO(write_end, "w"), write_through=True) as out, redirect_stdout(out):
        assert main(["config", "--explain"]) == 141
    assert "Traceback" not in capsys.readouterr().err


def test_a_missing_model_dir_is_said_before_torch_loads(tmp_path):
    """It took ~20 s (torch, transformers, vLLM imports) to learn that model.path is wrong."""
    code = ("import sys; from dreamd.cli import main; rc = main(['run', '--now']); "
            "print(rc, 'torch' in sys.modules)")
    done = _dreamd(shell=f"{sys.executable} -c \"{code}\"", cwd=tmp_path)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr
    assert "model directory" in done.stderr and "does not exist" in done.stderr
