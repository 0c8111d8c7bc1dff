"""Errors a user can cause. The CLI prints them as one line and exits with their code."""


class UsageError(Exception):
    """A mistake in how dreamd was called or configured (bad config, missing model dir,
    unreachable store). Message: what, where, how to fix. Exit code 2."""

    exit_code = 2


class CycleFailed(Exception):
    """A cycle could not complete (canary mismatch, repeated non-finite loss); the cycle row is
    marked failed with this message, and the daemon rolls back to the last good checkpoint."""


class ControllerHalt(CycleFailed):
    """max_rollbacks_in_a_row rollbacks without a commit: the controller stops the run."""


class CheckpointFailed(Exception):
    """A checkpoint could not be written (disk full, I/O error). The save removed its temp dir
    and never touched the previous checkpoint; the daemon says so in one line and exits 1."""
