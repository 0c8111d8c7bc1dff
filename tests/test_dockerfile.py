"""Lint of the Dockerfile without a Docker engine: parse it and check what the image promises."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path

import pytest

from dreamd.engines.vllm_compat import MIN_VERSION

ROOT = Path(__file__).resolve().parents[1]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        pending += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    assert not pending, "dangling line continuation at the end"
    return out


@pytest.fixture(scope="module")
def parsed() -> list[tuple[str, str]]:
    return instructions((ROOT / "Dockerfile").read_text())


def _args(parsed, word: str) -> list[str]:
    return [rest for w, rest in parsed if w == word]


def _build_args(parsed) -> dict[str, str]:
    return dict(a.split("=", 1) for a in _args(parsed, "ARG") if "=" in a)


def test_known_instructions_only(parsed) -> None:
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "VOLUME", "ENTRYPOINT", "CMD", "STOPSIGNAL"}
    assert {w for w, _ in parsed} <= known
    assert parsed[0][0] in ("ARG", "FROM")


def test_bases_match_the_pinned_vllm(parsed) -> None:
    args = _build_args(parsed)
    assert args["VARIANT"] == "gpu"
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-(cudnn-)?runtime-ubuntu24\.04", args["CUDA_IMAGE"])
    assert args["CPU_IMAGE"] == "python:3.11-slim"
    assert args["TORCH_VERSION"] == "2.11.0"
    assert tuple(int(x) for x in args["VLLM_VERSION"].split(".")) == MIN_VERSION
    froms = _args(parsed, "FROM")
    assert froms == ["${CUDA_IMAGE} AS base-gpu", "${CPU_IMAGE} AS base-cpu", "base-${VARIANT}"]
    runs = " ".join(_args(parsed, "RUN"))
    assert "python3.12 -m venv" in runs
    assert '"torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cu130' in runs
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in runs


def test_installs_dreamd_editable_with_the_vllm_extra(parsed) -> None:
    runs = " ".join(_args(parsed, "RUN"))
    assert 'pip install -e ".[vllm]" "vllm==${VLLM_VERSION}"' in runs
    assert "pip install -e ." in runs
    extras = json.dumps(__import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert '"vllm"' in extras  # the extra the image names exists in pyproject.toml
    copied = [shlex.split(a)[:-1] for a in _args(parsed, "COPY")]
    for paths in copied:
        for path in paths:
            assert (ROOT / path).exists(), f"COPY {path}: not in the repository"
    assert ["migrations"] in copied  # found relative to the package by the editable install


def test_runs_the_daemon_as_a_non_root_user_on_a_volume(parsed) -> None:
    users = _args(parsed, "USER")
    assert users and users[-1] not in ("root", "0")
    assert json.loads(_args(parsed, "VOLUME")[-1]) == ["/var/lib/dreamd"]
    command = json.loads(_args(parsed, "ENTRYPOINT")[-1]) + json.loads(_args(parsed, "CMD")[-1])
    assert command == ["dreamd", "run", "--config", "/var/lib/dreamd/dreamd.toml"]
    env = " ".join(_args(parsed, "ENV"))
    assert "HF_HUB_OFFLINE=1" in env and "VLLM_ENABLE_V1_MULTIPROCESSING=0" in env
    # the USER comes after every RUN (nothing installed as the service user) and owns the volume
    order = [w for w, _ in parsed]
    assert order.index("USER") > max(i for i, w in enumerate(order) if w == "RUN")
    assert "chown dreamd:dreamd /var/lib/dreamd" in " ".join(_args(parsed, "RUN"))


def test_dockerignore_keeps_what_the_image_copies() -> None:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert ".venv" in patterns and ".git" in patterns
    for needed in ("pyproject.toml", "README.md", "alembic.ini", "dreamd/engines/vllm.py",
                   "migrations/env.py", "docs"):
        assert not any(fnmatch.fnmatch(needed, p) or needed.startswith(p + "/") for p in patterns), needed
