"""The wheel's package list stays in step with the source tree (it is explicit because
migrations/ is mapped in as dreamd_migrations)."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_source_folder_is_packaged():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.relative_to(REPO).parts) for p in (REPO / "dreamd").rglob("*")
               if p.is_dir() and p.name != "__pycache__" and any(p.iterdir())}
    on_disk |= {"dreamd", "dreamd_migrations", "dreamd_migrations.versions"}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
