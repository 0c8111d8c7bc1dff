"""Logging: structlog, JSON lines when stderr is not a terminal (systemd's journal, CI), readable
console lines with a progress line when it is; and `Progress`, what the phase under way reports."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from dataclasses import dataclass

import structlog


def interactive() -> bool:
    return sys.stderr.isatty() and os.environ.get("DREAMD_LOG_FORMAT", "") != "json"


class StderrLogger:
    """structlog's logger: each line goes to sys.stderr as it is at the call. PrintLoggerFactory
    binds the stream object of the moment it is configured, so a CLI call under a replaced
    stderr (pytest's capture, a redirect that is closed later) left every later log line
    writing to a closed file: "ValueError: I/O operation on closed file"."""

    def msg(self, message: str) -> None:
        if TerminalProgress.live:  # lift the progress line, print, put it back
            from tqdm import tqdm

            with tqdm.external_write_mode(file=sys.stderr):
                print(message, file=sys.stderr, flush=True)
            return
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


def setup_logging(level: str = "info") -> None:
    renderer = (structlog.dev.ConsoleRenderer(colors=True) if interactive()
                else structlog.processors.JSONRenderer(sort_keys=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=lambda *args: StderrLogger(),
        cache_logger_on_first_use=False,
    )
    # transformers' deprecation notices about cache formats (past_key_values as tuples: dreamd's
    # frozen-context path passes them on purpose) would land inside the progress bar every step.
    warnings.filterwarnings("ignore", message=r"(?s).*past_key_values", category=FutureWarning)
    # transformers / bitsandbytes chatter (missing optional kernels) is not ours to show each run.
    for noisy in ("transformers", "bitsandbytes", "alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # "Loading weights" / "Writing model shards" bars would interleave with JSON lines.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def get_logger(name: str = "dreamd") -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)


# ---------------------------------------------------------------------------------------------
# Progress of the phase under way: one value, `Progress`, that every long phase reports through
# `RunHooks.on_progress` (startup, dream, train, evaluate; the daemon itself for waiting), and the
# terminal view of it. The daemon hands each value to every consumer at once: the terminal bar
# (here, only on a TTY), systemd's STATUS= and the status file (`dreamd status`).
#
#     starting: load model 2/6                 open_run, one part per stage
#     cycle 3: dream accepted 11/24 (written 14)
#     cycle 3: train step 4/6                  steps of this cycle
#     cycle 3: evaluate behaviour 2/6          parts finished / parts; the named one runs now
#     waiting: next cycle in 41 min            the schedule, counted down per wait tick
#
# `done`/`total` count what is finished (a part is named while it runs); a stage without a known
# size has no total.


@dataclass(frozen=True)
class Progress:
    """How far the phase under way is: `what` it is doing now, `done` of `total`, and a note."""

    what: str
    done: int | None = None
    total: int | None = None
    note: str = ""

    def text(self) -> str:
        """'accepted 11/24 (written 14)', 'load model 2/6', 'next cycle in 41 min'."""
        count = f" {self.done}/{self.total}" if self.done is not None and self.total is not None else \
            f" {self.done}" if self.done is not None else ""
        return f"{self.what}{count}" + (f" ({self.note})" if self.note else "")


class TerminalProgress:
    """One tqdm line on stderr for the phase under way, only on a terminal: journald and CI get
    the JSON log lines and nothing of this. A new phase label closes the line before it."""

    live = 0
    """Lines open now, in this process (the logger lifts them to print a log line)."""

    def __init__(self) -> None:
        self.bar = None
        self.label: str | None = None

    def show(self, label: str, progress: Progress | None) -> None:
        """Show `progress` under `label` ('cycle 3: train', 'starting'); a new label starts a new
        line, and None ends the line."""
        if not interactive():
            return
        if progress is None:  # a phase without a count (ready, checkpoint, committed): the log says it
            self.close()
            return
        from tqdm import tqdm

        total = progress.total
        if self.bar is None or label != self.label or total != self.bar.total:
            self.close()
            self.label = label
            fmt = "{desc} {bar:24} {n_fmt}/{total_fmt}{postfix} [{elapsed}]" if total is not None \
                else "{desc} [{elapsed}]"
            # A fixed size: a terminal that reports 0x0 (some ptys, `script`) made tqdm draw nothing.
            size = shutil.get_terminal_size((100, 24))
            self.bar = tqdm(total=total, leave=True, file=sys.stderr, bar_format=fmt, ncols=size.columns,
                            nrows=size.lines, desc=f"{label} {progress.what}" if total is not None else label,
                            initial=progress.done or 0)
            TerminalProgress.live += 1
        if total is not None:
            self.bar.set_description_str(f"{label} {progress.what}", refresh=False)
            self.bar.set_postfix_str(progress.note, refresh=False)
            self.bar.n = progress.done or 0
        else:
            self.bar.set_description_str(f"{label}: {progress.text()}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.label = None
            TerminalProgress.live -= 1
