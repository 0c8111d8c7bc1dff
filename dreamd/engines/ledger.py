"""Per-phase timings and GPU memory of one cycle: where the seconds and the bytes went.

Every phase (generate, sleep, wake, push, train, checkpoint, canary, ...) is timed with
`ledger.phase(name)`. On CUDA the phase boundaries synchronise the device first, because kernels
are asynchronous: without it a push's copies would be billed to whatever phase comes next.
Free device memory (torch.cuda.mem_get_info, driver-wide) is read before and after; on CPU it is
None. `rows()` gives dicts with the columns of the store's `phases` table.

Overhead share = (sleep + wake + push) / cycle seconds: the price of sharing one GPU between the
engine and the trainer. vllm-project/vime 442 measured 15.0 s of 18.9 s (79%) for a colocated
Qwen3-0.6B step, which is why small models should not sleep at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import torch

OVERHEAD_PHASES = ("sleep", "wake", "push")
"""Phases that exist only because the engine and the trainer share the GPU."""


def cuda_free_bytes() -> int | None:
    """Free device memory in bytes, or None without CUDA. Does not create a CUDA context on
    machines that have none (torch.cuda.is_available() is checked first)."""
    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info()[0])


def cuda_synchronize() -> None:
    # Only when a context exists: synchronising would otherwise create one (~300 MB per GPU).
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@dataclass
class PhaseRecord:
    name: str
    started_at: datetime
    seconds: float = 0.0
    mem_free_before: int | None = None
    mem_free_after: int | None = None
    tokens: int | None = None
    """Tokens produced in the phase (generation); set inside the `with` block."""

    @property
    def tokens_per_s(self) -> float | None:
        if self.tokens is None or self.seconds <= 0:
            return None
        return self.tokens / self.seconds


class PhaseLedger:
    """Times phases of one cycle. Not thread-safe; one ledger per cycle."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 free_bytes: Callable[[], int | None] = cuda_free_bytes,
                 synchronize: Callable[[], None] = cuda_synchronize) -> None:
        self._clock = clock
        self._free_bytes = free_bytes
        self._synchronize = synchronize
        self.records: list[PhaseRecord] = []
        self._first_start: float | None = None
        self._last_end: float | None = None

    @contextmanager
    def phase(self, name: str, tokens: int | None = None) -> Iterator[PhaseRecord]:
        """Time the block as phase `name`. Set `record.tokens` inside it for tokens/s.

        A phase that raises is still recorded (its seconds are real), then the error propagates.
        """
        self._synchronize()
        record = PhaseRecord(name=name, started_at=datetime.now(UTC), tokens=tokens,
                             mem_free_before=self._free_bytes())
        start = self._clock()
        if self._first_start is None:
            self._first_start = start
        try:
            yield record
        finally:
            self._synchronize()
            end = self._clock()
            record.seconds = end - start
            record.mem_free_after = self._free_bytes()
            self._last_end = end
            self.records.append(record)

    def seconds(self, *names: str) -> float:
        """Total seconds of the named phases (all phases when no name is given)."""
        return sum(r.seconds for r in self.records if not names or r.name in names)

    def wall_seconds(self) -> float:
        """From the start of the first phase to the end of the last (gaps included)."""
        if self._first_start is None or self._last_end is None:
            return 0.0
        return self._last_end - self._first_start

    def overhead_share(self, cycle_seconds: float | None = None) -> float | None:
        """(sleep + wake + push) / cycle seconds; cycle seconds default to `wall_seconds()`.
        None when nothing was timed."""
        total = self.wall_seconds() if cycle_seconds is None else cycle_seconds
        if total <= 0:
            return None
        return self.seconds(*OVERHEAD_PHASES) / total

    def rows(self) -> list[dict[str, object]]:
        """One dict per phase with the `phases` table's columns: name, started_at, seconds,
        mem_free_before, mem_free_after, tokens_per_s."""
        return [dict(name=r.name, started_at=r.started_at, seconds=r.seconds,
                     mem_free_before=r.mem_free_before, mem_free_after=r.mem_free_after,
                     tokens_per_s=r.tokens_per_s) for r in self.records]
