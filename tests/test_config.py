"""Config: defaults from the design, TOML + env precedence, one-line errors with exit code 2,
and every TOML file the repo ships parses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dreamd.config import Config, load_config, to_toml
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
