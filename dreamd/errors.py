"""Errors a user can cause. The CLI prints them as one line and exits with their code."""


class DreamdError(Exception):
    """An error the CLI prints as one line (what, where, how to fix) and exits with its code.
    The codes tell systemd the truth: 2 is not worth a restart (RestartPreventExitStatus=2),
    anything else is (Restart=on-failure)."""

    exit_code = 1


class UsageError(DreamdError):
    """A mistake in how dreamd was called or configured (bad config, missing model dir, a
    store this user cannot write). A restart cannot fix it. Exit code 2."""

    exit_code = 2


class StoreUnavailable(DreamdError):
    """The store cannot be used right now (server down or restarting, connection lost, locked
    past the timeout, disk full) and retries ran out. Nothing committed is lost; a restart
    resumes from the last checkpoint once the store is back. Exit code 75 (EX_TEMPFAIL)."""

    exit_code = 75


class CycleFailed(Exception):
    """A cycle could not complete (canary mismatch, repeated non-finite loss); the cycle row is
    marked failed with this message, and the daemon rolls back to the last good checkpoint."""


class ControllerHalt(CycleFailed):
    """max_rollbacks_in_a_row rollbacks without a commit: the controller stops the run."""


class CheckpointFailed(Exception):
    """A checkpoint could not be written (disk full, I/O error). The save removed its temp dir
    and never touched the previous checkpoint; the daemon says so in one line and exits 1."""
