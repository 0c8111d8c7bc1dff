"""Logging: structlog, JSON lines when stderr is not a terminal (systemd's journal, CI), readable
console lines with progress bars when it is."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import structlog


def interactive() -> bool:
    return sys.stderr.isatty() and os.environ.get("DREAMD_LOG_FORMAT", "") != "json"


class StderrLogger:
    """structlog's logger: each line goes to sys.stderr as it is at the call. PrintLoggerFactory
    binds the stream object of the moment it is configured, so a CLI call under a replaced
    stderr (pytest's capture, a redirect that is closed later) left every later log line
    writing to a closed file: "ValueError: I/O operation on closed file"."""

    def msg(self, message: str) -> None:
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


class StepProgress:
    """A tqdm bar of the current cycle's optimizer steps, shown only on a terminal (journald and
    CI get the JSON lines instead)."""

    def __init__(self) -> None:
        self.bar = None

    def start(self, cycle: int, total: int, done: int = 0) -> None:
        """A bar of `total` steps, `done` of them already trained (a resumed cycle)."""
        if not interactive():
            return
        from tqdm import tqdm

        self.close()
        self.bar = tqdm(total=total, initial=done, desc=f"cycle {cycle}", unit="step", leave=True, file=sys.stderr)

    def step(self, loss: float | None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
