"""`dreamd run`: the service loop. Signals, schedule, systemd notifications, cycles.

    pidfile -> signal handlers -> open run (migrations, model, resume) -> READY=1
    while not stopped:
        step boundary (pause blocks here, watchdog fed) -> reload on SIGHUP
        schedule says run?  no -> sleep until the next decision (any signal wakes us)
                            yes -> run_cycle (pause/stop honoured at every optimizer step)
        cycle failed (NaN losses, ...) -> back to the last checkpoint; 3 in a row -> pause
        controller halt -> back to the last checkpoint, pause
        checkpoint write failed (disk full) -> one error line, exit 1 (systemd restarts us)
    STOPPING=1 -> run row 'stopped' (or 'finished' after run.cycles) -> summary line -> exit 0

Progress: every phase reports a Progress (RunHooks.on_progress; train steps and the wait are
counted here) and `publish` shows it on STATUS=, in status.json and, on a TTY, as one line.

WATCHDOG=1 is sent only from places that prove the loop moves: step boundaries, the schedule
wait and the pause wait; a cycle stuck inside one step starves it and systemd restarts us.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from dreamd.config import Config
from dreamd.cycle import StopRequested, run_cycle
from dreamd.errors import CheckpointFailed, ControllerHalt, CycleFailed
from dreamd.log import Progress, TerminalProgress, get_logger
from dreamd.run import Run, RunHooks, RunState, open_run
from dreamd.status import write_status

log = get_logger("dreamd.daemon")

# Failed cycles in a row (CycleFailed: non-finite losses, dream budget, canary) after which the
# daemon pauses itself instead of retrying: each attempt costs a full dream + train, and a cause
# that survives two rollbacks to the last good checkpoint is not transient.
MAX_FAILED_CYCLES_IN_A_ROW = 3

# Progress reaches the terminal, STATUS= and the status file at most this often (a template
# dreamer writes hundreds of candidates a second); a new stage or part and a finished count
# always do. One status file write costs ~4 ms on a loaded 2-core box: at 1/s that is <0.5% of
# the loop (benchmarks/progress_overhead.py, docs/benchmarks.md).
PROGRESS_SPACING_S = 1.0


@dataclass
class Tally:
    """What this process did, for the end-of-run summary."""

    committed: int = 0
    rolled_back: int = 0
    failed: int = 0
    steps: int = 0
    """Optimizer steps trained (those a rollback undid included)."""
    examples: int = 0


def waiting_progress(decision: Any, now: datetime) -> Progress:
    """'next cycle in 41 min (next slot 14:00 CET (every 60 min))': the wait, counted down per tick."""
    if decision.next_time is None:
        return Progress("next check soon", note=decision.reason)
    left = max(0.0, (decision.next_time - now).total_seconds())
    span = f"{left:.0f} s" if left < 90 else f"{left / 60:.0f} min" if left < 5400 else f"{left / 3600:.1f} h"
    return Progress(f"next cycle in {span}", note=decision.reason)


class Daemon:
    def __init__(self, cfg: Config, *, once: bool = False, use_schedule: bool = True,
                 process_exits: bool = False):
        from dreamd.service.control import ControlState
        from dreamd.service.notify import SystemdNotifier

        self.cfg = cfg
        self.once = once
        self.use_schedule = use_schedule and not once
        self.process_exits = process_exits
        """The process exits when run() returns (the CLI): the control signals stay held."""
        self.notifier = SystemdNotifier(unset_environment=True)
        self.control = ControlState(cfg.run.state_dir, on_event=self._on_control_event,
                                    on_pause_change=self._on_pause_change)
        self.current: Run | None = None
        """The run being served, once open_run has built it."""
        self.state: RunState | None = None
        self.phase = "starting"
        self.step: int | None = None
        """The last optimizer step trained (train_steps.step), None before the first."""
        self.now: Progress | None = None
        """How far the phase under way is (None: a phase without a count)."""
        self._shown_at = 0.0
        self._shown_pause_request = False
        self.block_reason = ""
        self._said_waiting: tuple[str, Any] | None = None
        self._resumed_batches: int | None = None
        self._train_steps: list[int] | None = None
        """[steps trained, steps planned] of the cycle in its train phase."""
        self.next_cycle_at: datetime | None = None
        self.started_at = time.monotonic()
        self.cycle_number: int | None = None
        """The number of the cycle under way (set as it starts, kept until the next one)."""
        self.tally = Tally()
        # Waits (paused, between scheduled cycles) wake at least 4 times per WatchdogSec to ping.
        watchdog = self.notifier.watchdog_s
        self.pause_tick_s = 1.0 if watchdog is None else min(1.0, watchdog / 4)
        self.wait_tick_s = 10.0 if watchdog is None else min(10.0, watchdog / 4)
        self.terminal = TerminalProgress()

    # ---- callbacks from the control state (run at step boundaries, never in a handler) ------
    def _on_control_event(self, event: Any) -> None:
        log.info("control", action=event.kind, source=event.source, changed=event.changed, step=self.step)
        if event.kind == "stop" and event.changed:
            # Tell systemd at once: the step, checkpoint and commit still to come may take a while.
            self.notifier.stopping(status=f"stopping ({event.source}): finishing the step, checkpoint")
        if self.current is not None:
            self.current.store.add_event(self.current.run_id, event.kind, event.detail)

    def _on_pause_change(self, paused: bool, event: Any) -> None:
        if self.current is not None:
            self.current.store.set_paused(self.current.run_id, paused)
        self.publish("paused" if paused else self.phase)

    # ---- what the terminal, systemd and `dreamd status` see ----------------------------------
    def publish(self, phase: str | None = None, progress: Progress | None = None) -> None:
        """Show the phase and its progress everywhere at once: the terminal line (a TTY only),
        STATUS= ('cycle 3: dream accepted 11/24 (written 14)') and the status file. A new phase
        drops the previous phase's progress."""
        from dreamd.service.notify import status_line

        if phase is not None and phase != "paused" and phase != self.phase:
            self.phase, self.now = phase, None
        if progress is not None:
            self.now = progress
        self._shown_at = time.monotonic()
        self._shown_pause_request = self.control.pause_requested
        shown = "paused" if self.control.paused else self.phase
        cycle = self.cycle_number if self.cycle_number is not None else self.state.cycle + 1 if self.state else None
        detail = self.now.text() if self.now is not None else ""
        self.terminal.show(status_line(shown, cycle), self.now)
        self.notifier.status(status_line(shown, cycle, detail))
        write_status(self.cfg.run.state_dir, pid=os.getpid(), phase=shown, cycle=cycle, step=self.step,
                     progress=detail or None, paused=self.control.paused,
                     pause_requested=self.control.pause_requested, next_cycle_at=self.next_cycle_at,
                     block_reason=self.block_reason, run_id=self.current.run_id if self.current else None,
                     updated_at=datetime.now(timezone.utc))

    def _on_progress(self, progress: Progress) -> None:
        """RunHooks.on_progress: shown at most every PROGRESS_SPACING_S, except the first of a
        phase and a finished count. The baseline evaluation belongs to the start."""
        if self.state is None and self.phase == "starting" and self.now is not None \
                and self.now.what.startswith("baseline evaluation"):
            progress = Progress(f"baseline evaluation: {progress.what}", progress.done, progress.total)
        finished = progress.done is not None and progress.done == progress.total
        # A pause signalled by hand (no `dreamd pause` request file) shows as pending at once.
        pending_news = self.control.pause_requested and not self._shown_pause_request
        if self.now is None or finished or pending_news or progress.what != self.now.what or \
                time.monotonic() - self._shown_at >= PROGRESS_SPACING_S:
            self.publish(progress=progress)
        else:
            self.now = progress
        self.notifier.progress()

    def heartbeat(self) -> None:
        self.notifier.progress()
        self.publish()

    def _on_step(self, res: Any) -> None:
        self.step = res.step
        self.tally.steps += 1
        self.tally.examples += len(res.scenario_ids)
        if self._train_steps is not None:  # 'cycle 12: train step 40/96 (loss 1.234)'
            self._train_steps[0] += 1
            done, total = self._train_steps
            self._on_progress(Progress("step", done, total, note="" if res.skipped else f"loss {res.loss:.4g}"))
        self.notifier.progress()
        self.control.step_boundary(heartbeat=self.heartbeat, heartbeat_every=self.pause_tick_s)

    def _on_phase(self, name: str, cycle_id: int | None) -> None:
        self._train_steps = None
        if self.state is None:  # before READY=1: the start's own evaluation, said as a stage
            return
        if name == "train":
            from dreamd.train.mix import batch_sizes

            steps = len(batch_sizes(self.state.settings.examples_per_cycle, self.cfg.train.batch_size))
            left = self._resumed_batches  # a stopped cycle taken up again: its count starts where it stopped
            done = max(0, steps - left) if left is not None else 0
            self._train_steps = [done, steps]
            self.publish(name, Progress("step", done, steps))
            return
        self.publish(name)

    # ---- the loop ------------------------------------------------------------------------
    def run(self) -> int:
        from dreamd.service.control import Pidfile
        from dreamd.service.schedule import Schedule
        from dreamd.store.db import TRANSIENT_ERRORS, store_failure

        # Everything the daemon creates (state dir, store, checkpoints, status files) is the
        # service user's alone: 0700 directories, 0600 files, whatever umask it inherited.
        os.umask(os.umask(0o077) | 0o077)
        self.cfg.run.state_dir.mkdir(parents=True, exist_ok=True)
        with Pidfile(self.cfg.run.state_dir):
            # Replace the previous process's status file at once: `dreamd status` must not show
            # its last phase while this one migrates the store and loads the model.
            self.publish("starting")
            self.control.install()
            try:
                hooks = RunHooks(on_step=self._on_step, on_phase=self._on_phase, on_progress=self._on_progress,
                                 should_stop=lambda: self.control.should_stop)
                self.current, self.state = self._open_run(hooks)
                # The interval grid continues from the last cycle start, across restarts.
                schedule = Schedule(self.cfg.schedule,
                                    last_started=self.current.store.last_cycle_started(self.current.run_id))
                flagged = self.control.pause_flag is not None and self.control.pause_flag.read() is not None
                if self.current.store.run_paused(self.current.run_id) and not flagged:
                    # runs.paused without the flag file (a fresh state dir on a shared store). With
                    # the flag its own pause request is already queued: one events row, not two.
                    self.control.request_pause("store")
                self.step = self.current.trainer.last_step
                self.notifier.ready(status="ready")
                self.publish("ready")
                import torch  # noqa: PLC0415 (loaded by now; the CLI's quick commands never get here)

                log.info("daemon.ready", run_id=self.current.run_id, cycle=self.state.cycle,
                         step=self.step, seconds=round(time.monotonic() - self.started_at, 1),
                         pid_state_dir=str(self.cfg.run.state_dir),
                         engine=type(self.current.engine).__name__, torch_threads=torch.get_num_threads())
                return self._loop(schedule)
            except TRANSIENT_ERRORS as exc:
                # Retries ran out (a long outage, a full disk): one line, exit 75, and systemd
                # restarts dreamd, which resumes from the last checkpoint once the store is back.
                raise store_failure(exc, self.cfg.store_url, self.cfg.store.busy_timeout_ms,
                                    "while running" if self.current is not None else "while starting") from None
            except BaseException as exc:
                self._record_crash(exc)
                raise
            finally:
                self.control.close(process_exits=self.process_exits)

    def _record_crash(self, exc: BaseException) -> None:
        """Best effort, for an exception that ends the process (a bug, a usage error found
        late): an events row 'error' says why and the run says 'stopped' (not 'running': no
        process runs it; not 'failed': the next start resumes it from its last checkpoint). A
        store that cannot take it is left as it is."""
        run = self.current
        if run is None or isinstance(exc, (KeyboardInterrupt, SystemExit)):
            return
        try:
            run.store.add_event(run.run_id, "error", {"error": type(exc).__name__, "message": str(exc)[:2000]})
            run.store.set_run_status(run.run_id, "stopped")
        except Exception as also:  # noqa: BLE001 - already failing; say so and keep the first error
            log.warning("daemon.crash_not_recorded", error=str(also)[:200])

    def _open_run(self, hooks: RunHooks) -> tuple[Run, RunState]:
        """open_run, then store calls retry with backoff (at start a failing store is said at
        once, in one line, by run()'s handler)."""
        run, state = open_run(self.cfg, hooks)
        run.store.transient_retries = self.cfg.store.connect_retries
        return run, state

    def _loop(self, schedule: Any) -> int:
        run, cfg = self.current, self.cfg
        done = 0
        failed_in_a_row = 0
        finished = failed = False
        while True:
            self.control.step_boundary(heartbeat=self.heartbeat, heartbeat_every=self.pause_tick_s)
            if self.control.should_stop:
                break
            if self.control.take_reload():
                schedule = self._reload(schedule)
            if self.use_schedule and self.state.pending is None:
                now = datetime.now(timezone.utc)
                decision = schedule.next_decision(now)
                self.block_reason, self.next_cycle_at = decision.reason, decision.next_time
                if not decision.run_now:
                    self.cycle_number = None  # waiting for the next one: 'cycle 4: waiting ...'
                    self.publish("waiting", waiting_progress(decision, now))
                    said = (decision.reason, decision.next_time)
                    if said != self._said_waiting:  # once per new wait, not per tick
                        self._said_waiting = said
                        log.info("schedule.waiting", reason=decision.reason,
                                 next_cycle_at=decision.next_time.astimezone().strftime("%Y-%m-%d %H:%M %Z")
                                 if decision.next_time else None)
                    wait = 30.0 if decision.next_time is None else (decision.next_time - now).total_seconds()
                    # Wake at least every 10 s (or WatchdogSec / 4) to feed the watchdog and
                    # re-check idleness.
                    self.control.sleep(max(0.05, min(wait, self.wait_tick_s)))
                    self.notifier.progress()
                    continue
                schedule.cycle_started(now)
            self.block_reason, self.next_cycle_at = "", None
            self._said_waiting = None
            if run.claim is not None:
                run.claim.check()  # still the run's one writer (a PostgreSQL restart drops the lock)
            self._resumed_batches = len(self.state.pending["batches"]) if self.state.pending else None
            self.cycle_number = self.state.pending["number"] if self.state.pending else self.state.cycle + 1
            try:
                result = run_cycle(run, self.state)
            except StopRequested:
                break
            except ControllerHalt as exc:
                # The controller gave up (rollbacks in a row): back to the last good checkpoint,
                # then pause so a person looks; the pause survives restarts.
                self.tally.failed += 1
                run.store.add_event(run.run_id, "halt", {"reason": str(exc)})
                self._recover_after_failure(exc)
                self.control.request_pause("controller halt")
                if self.once:
                    failed = True
                    break
                continue
            except CycleFailed as exc:
                self.tally.failed += 1
                run.store.add_event(run.run_id, "cycle_failed", {"error": str(exc)})
                self._recover_after_failure(exc)
                failed_in_a_row += 1
                if self.once:
                    failed = True
                    break
                if failed_in_a_row >= MAX_FAILED_CYCLES_IN_A_ROW:
                    # Not transient (a NaN weight, a broken engine): retrying burns a dream+train
                    # per attempt and fills the store with failed cycles. Pause for a person.
                    self.control.request_pause(f"{failed_in_a_row} failed cycles in a row")
                    failed_in_a_row = 0
                continue
            except CheckpointFailed as exc:
                return self._checkpoint_failed(exc)
            if result.status == "stopped":
                break
            if result.status == "rolled_back":
                # The controller undid the cycle (weights are back at the last checkpoint); it
                # does not count towards run.cycles, and the retry runs with its new settings.
                self.tally.rolled_back += 1
                self.publish("rolled_back")
                if self.once:
                    break
                continue
            done += 1
            self.tally.committed = done
            failed_in_a_row = 0
            self.publish("committed")
            if self.once or (cfg.run.cycles and done >= cfg.run.cycles):
                finished = not self.once
                break
        stop_reason = self.control.stop_source or ("once" if self.once else f"{done} cycles done")
        self.notifier.stopping(status=f"stopping: {stop_reason}")
        run.store.add_event(run.run_id, "stop", {"reason": stop_reason, "cycles_this_process": done,
                                                 "step": run.trainer.last_step})
        run.store.set_run_status(run.run_id, "finished" if finished else "stopped")
        self.step = run.trainer.last_step
        self.publish("stopped")
        self.terminal.close()
        log.info("daemon.stopped", **self.summary(stop_reason))
        return 1 if failed else 0

    def summary(self, reason: str) -> dict[str, Any]:
        """The end-of-run line: why it stopped, this process's cycles (committed, rolled back,
        failed), optimizer steps and examples trained, its time, each headline metric from the
        run's start to now, and the commands to look further."""
        from dreamd.cycle import HEADLINE_METRICS

        run, t = self.current, self.tally
        start = run.store.start_metrics(run.run_id)
        moved = {name.replace(".", "_"): f"{start[name]:.4g}->{self.state.history[name][-1]:.4g}"
                 for name in HEADLINE_METRICS if name in start and self.state.history.get(name)}
        source = f" --config {self.cfg.source}" if self.cfg.source else ""
        return dict(reason=reason, cycles=t.committed, rolled_back=t.rolled_back, failed=t.failed,
                    steps=t.steps, examples=t.examples, seconds=round(time.monotonic() - self.started_at, 1),
                    step=run.trainer.last_step, run_id=run.run_id, **moved,
                    see=f"dreamd history{source}; dreamd report{source}")

    def _checkpoint_failed(self, exc: CheckpointFailed) -> int:
        """A checkpoint could not be written (disk full, I/O error): checkpoint.py removed its
        temp dir and never touched the previous checkpoint, and run_cycle marked the cycle
        failed. Say so in one line and exit 1: systemd restarts the service (Restart=on-failure)
        and the restart resumes from the previous checkpoint once there is room."""
        from dreamd.train.checkpoint import read_manifest

        run = self.current
        latest = run.checkpoints.latest()
        kept = f"the previous checkpoint {latest.name} is intact" if latest else \
            "there is no previous checkpoint: a restart begins at model.path"
        need = f" (a checkpoint takes {read_manifest(latest)['bytes'] / 2**20:.0f} MiB)" if latest else ""
        line = (f"checkpoint write failed in {run.checkpoints.root}: {' '.join(str(exc).split())}; "
                f"{kept}; free disk space{need} and restart")
        run.store.add_event(run.run_id, "error", {"error": "CheckpointFailed", "message": line})
        log.error("checkpoint.failed", error=line)
        self.notifier.stopping(status="stopping: checkpoint write failed")
        run.store.set_run_status(run.run_id, "stopped")
        self.publish("stopped")
        return 1

    def _recover_after_failure(self, exc: CycleFailed) -> None:
        """A failed cycle (non-finite losses, dream budget exhausted, canary mismatch): go back to
        the last good checkpoint so the next cycle starts from known-good weights."""
        log.error("cycle.rollback", error=str(exc))
        self.current.roll_back(self.state, reason=str(exc))

    def _reload(self, schedule: Any) -> Any:
        from dreamd.service.reload import reload_config

        self.notifier.reloading()
        result = reload_config(self.cfg)
        self.current.store.add_event(self.current.run_id, "reload", result.to_json())
        log.info("daemon.reload", summary=result.summary())
        # Live fields apply from the next cycle: the loop state follows a changed mix, and the
        # live lr is clamped into the (possibly new) controller bounds.
        self.cfg = self.current.cfg = result.config
        settings = self.state.settings
        if "mix.examples_per_cycle" in result.applied:
            settings = replace(settings, examples_per_cycle=self.cfg.mix.examples_per_cycle)
        if "mix.general_share" in result.applied:
            settings = replace(settings, general_share=self.cfg.mix.general_share)
        self.state.settings = settings.clamped(self.cfg.train)
        # The run's parts built at start hold their own config: hand them the new one. The trainer reads
        # only train.max_nonfinite_steps live (every other train.* field is refused). The
        # screener compiles its patterns and thresholds once, so a screen.* change rebuilds it,
        # with the dreamer that feeds its near-duplicate index.
        self.current.trainer.cfg = self.cfg.train
        if any(name.startswith("screen.") for name in result.applied):
            self.current.rebuild_dreaming()
        self.notifier.ready(status="reloaded")
        return schedule.with_config(self.cfg.schedule)


def run_daemon(cfg: Config, *, once: bool = False, schedule: bool = True) -> int:
    return Daemon(cfg, once=once, use_schedule=schedule, process_exits=True).run()
