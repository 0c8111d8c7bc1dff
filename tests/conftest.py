"""Shared pytest fixtures.

Store fixtures run the same test on SQLite (a real file under tmp_path) and, when
DREAMD_TEST_PG_URL is set, on PostgreSQL, e.g.

    DREAMD_TEST_PG_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test .venv/bin/pytest tests/test_store.py

Each PostgreSQL test gets a database of its own (CREATE DATABASE dreamd_t_<hex>, dropped after),
so tests never see each other's rows. The role in the URL needs CREATEDB.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from dreamd.store import Store

# One torch thread per test process (and its subprocesses): tiny models are dominated by
# per-op overhead, and on a loaded 2-core box the default pool made hybrid-model tests 30-60x
# slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

PG_URL_ENV = "DREAMD_TEST_PG_URL"


def init_setup(root: Path) -> Path:
    """`dreamd init` (tiny llama) for the tests of the loop's mechanics (cycle, daemon, faults,
    controller, dreaming), with engine.kind = 'transformers' written into its config: those
    tests restart the daemon dozens of times, and vLLM's CPU engine costs ~10 s per start.
    vLLM itself is tested by tests/test_vllm_real.py (engine checks and a `dreamd once`)."""
    from dreamd.config_file import load_config, to_toml
    from dreamd.init import init_dir

    cfg_path = init_dir(root, arch="llama")
    cfg = load_config(cfg_path, environ={})
    cfg.engine.kind = "transformers"
    text = cfg_path.read_text()
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    cfg.model.path, cfg.run.state_dir = Path("model"), Path("state")
    cfg_path.write_text(header + to_toml(cfg))
    return root


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`dreamd init` once per test module (init_setup: tiny llama, transformers engine). Each
    module gets its own, so no module sees another's runs."""
    root = tmp_path_factory.mktemp("init")
    init_setup(root)
    return root


@pytest.fixture
def daemons() -> Iterator[list]:
    """Collects tests.daemon_process.DaemonProcess objects and SIGKILLs any still alive when
    the test ends."""
    started: list = []
    yield started
    for d in started:
        d.kill()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of an empty store: a SQLite file, or a fresh PostgreSQL database (skipped unless
    DREAMD_TEST_PG_URL names a server)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state' / 'dreamd.sqlite'}"
        return
    admin_url = os.environ.get(PG_URL_ENV)
    if not admin_url:
        pytest.skip(f"{PG_URL_ENV} not set")
    name = f"dreamd_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")  # CREATE DATABASE needs it
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """An open, migrated `dreamd.store.Store` on each backend."""
    opened = Store.open(store_url)
    opened.upgrade()
    yield opened
    opened.close()
