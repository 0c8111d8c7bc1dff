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


def test_a_resumed_cycles_bar_starts_where_it_stopped(monkeypatch) -> None:
    """It started at 0/6 and ended at 3/6 for a cycle resumed with 3 batches left."""
    import dreamd.log as log_module

    monkeypatch.setattr(log_module, "interactive", lambda: True)
    progress = log_module.StepProgress()
    progress.start(4, 6, done=3)
    try:
        assert (progress.bar.n, progress.bar.total) == (3, 6)
        for _ in range(3):
            progress.step(1.0)
        assert progress.bar.n == progress.bar.total
    finally:
        progress.close()


def test_cache_format_future_warnings_stay_out_of_the_terminal(recwarn) -> None:
    import warnings

    from dreamd.log import setup_logging

    setup_logging()
    warnings.warn("Passing a tuple of `past_key_values` is deprecated", FutureWarning, stacklevel=1)
    warnings.warn("something else entirely", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in recwarn.list] == ["something else entirely"]
