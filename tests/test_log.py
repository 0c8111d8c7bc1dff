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
    from dreamd.log import Progress, TerminalProgress

    monkeypatch.setattr(log_module, "interactive", lambda: True)
    progress = TerminalProgress()
    progress.show("cycle 4: train", Progress("step", 3, 6))
    try:
        assert (progress.bar.n, progress.bar.total) == (3, 6)
        for done in range(4, 7):
            progress.show("cycle 4: train", Progress("step", done, 6, note="loss 1.0"))
        assert progress.bar.n == progress.bar.total
    finally:
        progress.close()


def test_one_line_per_phase_and_none_off_a_terminal(monkeypatch, capsys) -> None:
    """Every phase shows through the same line: a count becomes a bar, a stage without one a
    described line; a new phase closes the one before; off a terminal nothing is drawn."""
    import dreamd.log as log_module
    from dreamd.log import Progress, TerminalProgress

    monkeypatch.setattr(log_module, "interactive", lambda: True)
    term = TerminalProgress()
    term.show("starting", Progress("load model", 1, 6))
    first = term.bar
    term.show("starting", Progress("build engine", 2, 6))
    assert term.bar is first and term.bar.n == 2               # the same line moves on
    term.show("waiting", Progress("next cycle in 41 min", note="next slot 14:00"))
    assert term.bar is not first and first.disable and term.bar.total is None  # closed, a new line
    assert "next cycle in 41 min" in term.bar.desc
    term.show("cycle 1: checkpoint", None)                     # no count: the line ends
    assert term.bar is None
    monkeypatch.setattr(log_module, "interactive", lambda: False)
    capsys.readouterr()
    term.show("cycle 1: train", Progress("step", 1, 2))
    assert term.bar is None and capsys.readouterr().err == ""


def test_progress_text() -> None:
    from dreamd.log import Progress

    assert Progress("accepted", 11, 24, note="written 14").text() == "accepted 11/24 (written 14)"
    assert Progress("behaviour", 2, 6).text() == "behaviour 2/6"
    assert Progress("next cycle in 41 min").text() == "next cycle in 41 min"


def test_cache_format_future_warnings_stay_out_of_the_terminal(recwarn) -> None:
    import warnings

    from dreamd.log import setup_logging

    setup_logging()
    warnings.warn("Passing a tuple of `past_key_values` is deprecated", FutureWarning, stacklevel=1)
    warnings.warn("something else entirely", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in recwarn.list] == ["something else entirely"]
