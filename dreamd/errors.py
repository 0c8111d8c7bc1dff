"""Errors a user can cause. The CLI prints them as one line and exits with their code."""


class UsageError(Exception):
    """A mistake in how dreamd was called or configured (bad config, missing model dir,
    unreachable store). Message: what, where, how to fix. Exit code 2."""

    exit_code = 2


class CycleFailed(Exception):
    """A cycle could not complete (canary mismatch, repeated non-finite loss); the cycle row is
    marked failed with this message, and the daemon rolls back to the last good checkpoint."""
