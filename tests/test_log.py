"""Logging follows sys.stderr as it is at each call, never a stream that was closed since."""

from __future__ import annotations

import io
import sys

from dreamd.log import get_logger, setup_logging


def test_a_closed_stderr_from_an_earlier_setup_is_never_written(monkeypatch, capsys) -> None:
    earlier = io.StringIO()
    monkeypatch.setattr(sys, "stderr", earlier)
    setup_logging()  # e.g. a CLI call made while stderr was redirected
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    earlier.close()
    now = io.StringIO()
    monkeypatch.setattr(sys, "stderr", now)
    get_logger("t").info("after.close", n=1)  # was: ValueError: I/O operation on closed file
    assert '"after.close"' in now.getvalue() or "after.close" in now.getvalue()
