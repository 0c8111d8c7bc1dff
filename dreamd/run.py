"""A run: its parts, built once per process, and its state across cycles; open, resume,
checkpoint and roll back live here.

Order matters and is visible in `open_run`: store (migrated) -> run row -> newest complete
checkpoint -> model (from that checkpoint, else from model.path) -> trainer (its state restored)
-> engine -> probes -> dreamer and screener -> the start-of-run evaluation. Everything a cycle
calls lives on `Run`, built complete; everything that carries from cycle to cycle lives in
`RunState`, saved whole in every checkpoint. Resume and rollback restore a checkpoint the same
way (`restore`): weights, optimizer, RNGs and the run state.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dreamd.config import Config, ModelConfig
from dreamd.controller import ControllerDecision, Settings
from dreamd.errors import CheckpointFailed
from dreamd.log import Progress, get_logger

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from dreamd.dream.routing import RoutingDreamer
    from dreamd.dream.screen import Screener
    from dreamd.engines.base import Engine
    from dreamd.engines.window import TrainingWindow
    from dreamd.evals.probes import HeldOutDreamer
    from dreamd.evals.suite import ProbeSuite
    from dreamd.train.checkpoint import CheckpointDir, LoadedCheckpoint
    from dreamd.store.claim import RunClaim
    from dreamd.store.record import Store
    from dreamd.train.trainer import StepResult, Trainer

log = get_logger("dreamd.run")

STARTUP_STAGES = ("open store", "load model", "build engine", "probes", "dreamer", "baseline evaluation")
"""What open_run reports as it goes (Progress: stage k of n); the baseline evaluation runs only
for a run without a checkpoint or start metrics."""


@dataclass
class RunState:
    """Everything that carries across cycles; saved whole in every checkpoint (loop_state.json,
    the settings flattened as lr, general_share, examples_per_cycle) and restored whole."""

    run_id: int
    settings: Settings
    cycle: int = 0                 # number of the last committed cycle
    history: dict[str, list[float]] = field(default_factory=dict)
    """metric -> its values after the committed cycles that measured it (the generated metrics
    only after full-suite cycles: eval.full_every)."""
    pending: dict[str, Any] | None = None
    """A cycle stopped mid-train: {'cycle_id', 'number', 'batches': [[scenario ids]]} left to train."""

    @classmethod
    def fresh(cls, run_id: int, cfg: Config) -> RunState:
        """The state of a run before its first checkpoint: the configured settings."""
        return cls(run_id=run_id, settings=Settings.from_config(cfg))

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> RunState:
        return cls(run_id=saved["run_id"], settings=Settings.from_json(saved), cycle=saved.get("cycle", 0),
                   history=saved.get("history", {}), pending=saved.get("pending"))

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "cycle": self.cycle, **asdict(self.settings), "history": self.history,
                "pending": self.pending}

    def replace_with(self, other: RunState) -> None:
        """Become `other` (in place: the daemon and the cycle hold this object)."""
        for f in fields(self):
            setattr(self, f.name, getattr(other, f.name))


@dataclass
class RunHooks:
    """What the process around the run wants to hear (the daemon: systemd, pause, stop)."""

    on_step: Callable[[StepResult], None] = lambda res: None
    """Called after every optimizer step (the daemon: pause/stop at step boundaries, watchdog)."""
    on_phase: Callable[[str, int | None], None] = lambda name, cycle: None
    """Called when a phase starts (the daemon: systemd STATUS=)."""
    on_progress: Callable[[Progress], None] = lambda progress: None
    """Called as the phase under way moves (startup stages, candidates dreamed, evaluation
    parts); the daemon shows it on a terminal, as STATUS= and in the status file."""
    should_stop: Callable[[], bool] = lambda: False
    """Polled at step boundaries and between dreamed candidates (the daemon: SIGTERM/SIGINT)."""


@dataclass
class Run:
    cfg: Config
    store: Store
    run_id: int
    model: PreTrainedModel
    """Trained in place; the transformers engine serves this very object."""
    tokenizer: PreTrainedTokenizerBase
    engine: Engine
    trainer: Trainer
    checkpoints: CheckpointDir
    probes: ProbeSuite
    """The run's fixed probes and their start-of-run state."""
    dreamer: HeldOutDreamer | RoutingDreamer
    screener: Screener
    hooks: RunHooks = field(default_factory=RunHooks)
    claim: RunClaim | None = None
    """This process's claim on the run in the store (one writer per run)."""
    window: TrainingWindow | None = None
    """The current cycle's training window, from open_window until after_train (a rollback
    inside the cycle pushes the restored weights through it)."""
    peak_step_bytes: int | None = None
    """Largest per-step peak memory seen (CUDA: max_memory_allocated), for the sleep decision."""

    @property
    def model_config(self) -> Any:
        return self.model.config

    def peak_above_weights(self) -> int | None:
        """Measured training memory beyond the weights, once a CUDA step has run."""
        if self.peak_step_bytes is None or next(self.model.parameters()).device.type != "cuda":
            return None
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return max(0, self.peak_step_bytes - weights)

    def rebuild_dreaming(self) -> None:
        """Rebuild the dreamer and screener from self.cfg, as one unit (after a SIGHUP that
        changed screen.*)."""
        self.dreamer, self.screener = open_dreaming(self.cfg, self.store, self.run_id, self.engine,
                                                    self.model, self.tokenizer, self.probes)

    def open_window(self) -> TrainingWindow:
        """The sleep/wake/push/canary sequence around this cycle's training (engines/window.py)."""
        from dreamd.engines.ledger import PhaseLedger
        from dreamd.engines.window import TrainingWindow

        self.window = TrainingWindow.for_config(self.cfg, self.engine, self.model, self.tokenizer, PhaseLedger(),
                                                measured_peak_bytes=self.peak_above_weights())
        return self.window

    @contextmanager
    def phase(self, cycle_id: int | None, name: str) -> Iterator[None]:
        """Time a phase and write its phases row (also when it fails)."""
        self.hooks.on_phase(name, cycle_id)
        started, t0 = datetime.now(timezone.utc), time.perf_counter()
        try:
            yield
        finally:
            self.store.add_phase(self.run_id, cycle_id, name, started, time.perf_counter() - t0)

    def evaluate(self, cycle_id: int | None = None, number: int | None = None) -> tuple[dict[str, float], dict[str, Any]]:
        """One evaluation (evals/suite.py): forgetting plus every probe metric (Q1, margins, Q3,
        steering, calibration, code answers; docs/sql.md "Metric names"), and their details for
        evals.detail_json. The full suite at the run's start (number None) and after every
        eval.full_every-th cycle, the cheap one (no generation) after the others. With a cycle
        id the probes are also checked against what that cycle trained."""
        from dreamd.evals.suite import full_suite_due

        measured = self.probes.measure(self.model, self.tokenizer, self.engine, self.cfg.run.seed,
                                       self.store, self.run_id, cycle_id, eval_cfg=self.cfg.eval,
                                       full=full_suite_due(self.cfg.eval, number),
                                       progress=lambda part, done, parts: self.hooks.on_progress(
                                           Progress(part, done, parts)))
        self.hooks.on_progress(Progress("done", 1, 1))
        return measured.metrics, dict(measured.details)

    def checkpoint(self, cycle_id: int, state: RunState, metrics: dict[str, float]) -> Path:
        """Atomic checkpoint, its row, then retention (pruned rows marked 'deleted'). Any
        failure is raised as CheckpointFailed (the daemon exits; the previous one is intact)."""
        # cycle_id: a restart after a crash between the save and the rows below settles them.
        loop_state = {**state.to_json(), "step": self.trainer.step, "cycle_id": cycle_id}
        try:
            saved = self.checkpoints.save(model=self.model, tokenizer=self.tokenizer,
                                          trainer_state=self.trainer.state_dict(), loop_state=loop_state,
                                          config=self.cfg, metrics=metrics,
                                          write_shards=getattr(self.trainer, "save_shards", None))
            self.store.add_checkpoint(self.run_id, cycle_id, self.trainer.step, saved.path, saved.sha256,
                                      saved.bytes)
            removed = {str(p) for p in self.checkpoints.prune()}
            for row in self.store.complete_checkpoints(self.run_id):
                if row.path in removed:
                    self.store.set_checkpoint_status(row.id, "deleted")
        except Exception as exc:
            raise CheckpointFailed(str(exc)) from exc
        return saved.path

    def serve_restored(self) -> None:
        """The engine serves the restored weights too (a sleeping vLLM is woken first); the
        canary checks it. On CPU the transformers engine shares the model's storage and this is a
        check only; vLLM under torchrun is pushed from the shards on every rank."""
        window = self.window if self.window is not None else self.open_window()
        window.after_train(self.model)
        self.window = None

    def roll_back(self, state: RunState, reason: str, decision: ControllerDecision | None = None) -> RunState:
        """The one way back to the last good state: weights, optimizer, RNGs and `state` (in
        place, also returned) from the newest complete checkpoint, or the run's start (model.path,
        the configured settings, the seeded RNGs) without one; everything after it is superseded
        and the engine serves the restored weights. A controller rollback passes its decision
        (already recorded, with the metrics behind it): the retry gets its slower settings.
        Otherwise (a failed cycle) the rollback is recorded here."""
        from dreamd.models import load_model
        from dreamd.train.checkpoint import load_checkpoint
        from dreamd.train.trainer import Trainer

        latest = self.checkpoints.latest()
        source = latest if latest is not None else self.cfg.model.path
        fresh, _ = load_model(self.cfg.model.model_copy(update={"path": source}), str(self.trainer.device))
        with torch_no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(fresh.get_parameter(name))
        del fresh
        sharded = getattr(self.trainer, "world", None) is not None   # train/distributed.py
        if not sharded:
            self.serve_restored()
        before = {**asdict(state.settings), "step": self.trainer.last_step}
        if not sharded:
            self.trainer = Trainer(self.model, self.cfg.train, self.cfg.optimizer, seed=self.cfg.run.seed)
        if latest is not None:
            restored = restore(self.trainer, load_checkpoint(latest, map_location=str(self.trainer.device)))
        else:
            if sharded:
                self.trainer.reset(dict(self.model.named_parameters()))
            seed_global_rngs(self.cfg.run.seed)
            restored = RunState.fresh(state.run_id, self.cfg)
        if sharded:     # every rank's engine is pushed from the shards, restored just now
            self.serve_restored()
        self.store.supersede_after(self.run_id, self.trainer.step - 1)
        if decision is None:
            after = {**asdict(restored.settings), "step": self.trainer.last_step}
            self.store.add_decision(self.run_id, None, "rollback", reason, before, after,
                                    {"checkpoint": latest.name if latest else None})
        else:
            restored.settings = decision.after
        state.replace_with(restored)
        return state


def restore(trainer: Trainer, ck: LoadedCheckpoint) -> RunState:
    """Optimizer, RNGs and the run state from a loaded checkpoint (the weights are loaded by the
    caller; a sharded trainer loads its shards, on every rank): the same for a resume and a
    rollback."""
    if getattr(trainer, "world", None) is not None:
        trainer.restore_checkpoint(ck.path, ck.trainer_state)
    else:
        trainer.load_state_dict(ck.trainer_state)
    ck.restore_rng()
    return RunState.from_json(ck.loop_state)


def open_run(cfg: Config, hooks: RunHooks | None = None) -> tuple[Run, RunState]:
    """Build every part and the run state, resuming the run of this name if one is unfinished."""
    from dreamd.dream.templates import TemplateDreamer
    from dreamd.engines.ranked import Shards
    from dreamd.engines.select import make_engine
    from dreamd.evals.suite import ProbeSuite
    from dreamd.models import apply_threads, load_model, resolve_device
    from dreamd.train.checkpoint import CheckpointDir, load_checkpoint
    from dreamd.train.distributed import init_world, open_sharded_trainer, torchrun_world
    from dreamd.store.claim import RunClaim
    from dreamd.store.record import Store
    from dreamd.train.trainer import Trainer

    hooks = hooks or RunHooks()

    def stage(name: str) -> None:  # 'starting: load model 2/6' (terminal, STATUS=, status file)
        hooks.on_progress(Progress(name, STARTUP_STAGES.index(name), len(STARTUP_STAGES)))

    threads = apply_threads(cfg.run.threads)
    cfg.run.state_dir.mkdir(parents=True, exist_ok=True)
    stage("open store")
    # ---- store: reachable now, or a clear error; migrations before anything else --------------
    store = Store.open(cfg.store_url, busy_timeout_ms=cfg.store.busy_timeout_ms)
    store.upgrade()
    claim = RunClaim.take(store, cfg.run.name)  # one writer per run, across machines (store/claim.py)

    # ---- run: resume the unfinished run of this name, or start one ---------------------------
    row = store.find_resumable_run(cfg.run.name)
    if row is None:
        run_id = store.start_run(cfg.run.name, cfg.resolved_json(), cfg.model.path, cfg.run.seed)
        store.add_event(run_id, "start", {"model": str(cfg.model.path)})
    else:
        run_id = row.id
        store.set_run_status(run_id, "running")
    store.set_run_process(run_id, socket.gethostname(), os.getpid())

    # ---- newest complete checkpoint decides where the weights come from ----------------------
    checkpoints = CheckpointDir(cfg.run.state_dir / "checkpoints" / f"run-{run_id}",
                                keep_last=cfg.checkpoint.keep_last, best_metric=cfg.checkpoint.best_metric,
                                best_mode=cfg.checkpoint.best_mode)
    checkpoints.remove_stale_temps()
    latest, corrupt = checkpoints.latest_intact(verify=cfg.checkpoint.verify_on_resume)
    for name, problem in corrupt:
        store.add_event(run_id, "checkpoint.skipped", {"checkpoint": name, "reason": problem,
                                                       "set_aside_as": f".corrupt-{name}"})
        log.warning("run.checkpoint_skipped", checkpoint=name, reason=problem)
    device = resolve_device(cfg.run.device)
    world = torchrun_world()    # None: one process, as always; else rank 0 of a sharded run
    if world is not None:
        device = init_world(world, device)
    # A process starts with a random torch seed (torch.initial_seed() differs per process), so
    # the RNG states saved in checkpoints differed between two runs of one config. Seed every
    # global RNG from run.seed; a resume restores the checkpoint's states over these below.
    seed_global_rngs(cfg.run.seed)
    model_cfg = cfg.model if latest is None else model_at(cfg, latest)
    stage("load model")
    model, tokenizer = load_model(model_cfg, device)
    # The engine before the optimizer: vLLM sizes its KV cache against the memory free now.
    # Under torchrun every rank's engine is pushed from the shards: after they are restored.
    stage("build engine")
    if world is None:
        engine = make_engine(cfg, model, tokenizer, threads=threads)
        trainer = Trainer(model, cfg.train, cfg.optimizer, seed=cfg.run.seed)
    else:   # `model` is the full copy rank 0 serves and evaluates; the trainer's is sharded
        trainer = open_sharded_trainer(cfg, world, device, serving=model)

    if latest is None:
        state = RunState.fresh(run_id, cfg)
    else:
        ck = load_checkpoint(latest, map_location=device)
        state = restore(trainer, ck)
        settle_checkpoint_rows(store, run_id, latest, ck)
        # Steps are 0-based: a checkpoint after `trainer.step` steps holds steps 0..step-1.
        gone = store.supersede_after(run_id, trainer.step - 1)
        store.add_event(run_id, "restart", {"checkpoint": latest.name, "step": trainer.last_step,
                                           "cycle": state.cycle, "superseded": gone._asdict()})
        log.info("run.resumed", run_id=run_id, checkpoint=latest.name, step=trainer.last_step,
                 cycle=state.cycle, superseded=gone._asdict())
    if row is not None and latest is None:
        gone = store.supersede_after(run_id, -1)
        store.add_event(run_id, "restart", {"checkpoint": None, "step": None, "superseded": gone._asdict()})
    if world is not None:
        engine = make_engine(cfg, model, tokenizer, threads=threads, shards=Shards.of(trainer))

    # ---- probes: drawn once per run (stored, status 'probe'), held out of training by a
    # screening rule, and measured before the first cycle (the baseline, evals.cycle_id NULL) ----
    stage("probes")
    probes = ProbeSuite.open(store, run_id, cfg.run.state_dir, TemplateDreamer(spec=cfg.spec_text))
    stage("dreamer")
    dreamer, screener = open_dreaming(cfg, store, run_id, engine, model, tokenizer, probes)
    run = Run(cfg=cfg, store=store, run_id=run_id, model=model, tokenizer=tokenizer, engine=engine,
              trainer=trainer, checkpoints=checkpoints, probes=probes, dreamer=dreamer, screener=screener,
              hooks=hooks, claim=claim)
    if latest is None and not store.start_metrics(run_id):
        stage("baseline evaluation")
        with run.phase(None, "evaluate"):
            metrics, details = run.evaluate()
        store.add_evals(run_id, None, metrics, details=details)
    return run, state


def open_dreaming(cfg: Config, store: Store, run_id: int, engine: Engine, model: PreTrainedModel,
                  tokenizer: PreTrainedTokenizerBase, probes: ProbeSuite) -> tuple[HeldOutDreamer, Screener]:
    """The dreamer and screener as one unit: dream.source picks the writers (dream/routing.py),
    held out of the probe domains; the screener runs its one ordered rule list (dream/screen.py)
    with this run's rules: the probes' hold-out, the forgetting probes, near duplicates against
    the store, and the encoding into a training example."""
    from dreamd.dream.routing import open_dreaming as open_writers
    from dreamd.dream.screen import Screener
    from dreamd.evals.forgetting import screen_rule as forgetting_rule
    from dreamd.evals.probes import HELDOUT_DOMAINS, HeldOutDreamer
    from dreamd.train.examples import encode_scenario

    writers, near_dups = open_writers(cfg, store, run_id, engine, HELDOUT_DOMAINS)
    screener = Screener(cfg.screen, seen=lambda h: store.hash_exists(run_id, h) is not None, model_config=model.config,
                        probe=probes.screen_rule(), forgetting=forgetting_rule(cfg.eval),
                        near_dups=near_dups.problem,
                        encode=lambda s: encode_scenario(tokenizer, s, cfg.model.max_seq_len))
    return HeldOutDreamer(writers), screener


def settle_checkpoint_rows(store: Store, run_id: int, path: Path, loaded: LoadedCheckpoint) -> None:
    """Bring the store up to the checkpoint a restart resumes from. A save renames the
    checkpoint into place and then writes its row, prunes old ones and ends the cycle: a crash
    in between (~ms, or a SIGKILL after TimeoutStopSec during a stop) left the cycle 'running',
    so the resume superseded a cycle whose steps are in the weights, and a stopped cycle's
    pending batches could not reopen it. The checkpoint is the truth: add its missing row, mark
    rows of pruned directories 'deleted', and end the cycle as the checkpoint says."""
    loop_state = loaded.loop_state
    cycle_id = loop_state.get("cycle_id")
    rows = store.complete_checkpoints(run_id)
    for row in rows:
        if not Path(row.path).exists():
            store.set_checkpoint_status(row.id, "deleted")
    if cycle_id is None:  # saved before checkpoints named their cycle
        return
    if str(path) not in {row.path for row in rows}:
        store.add_checkpoint(run_id, cycle_id, loop_state["step"], path, loaded.manifest["sha256"],
                             loaded.manifest["bytes"])
    pending = loop_state.get("pending")
    status = "stopped" if pending else "committed"
    if store.settle_cycle(cycle_id, status, error=f"{status} by checkpoint {path.name}; the process "
                          "died before it recorded that" if pending else None):
        store.add_event(run_id, "settled", {"cycle_id": cycle_id, "status": status, "checkpoint": path.name})


def seed_global_rngs(seed: int) -> None:
    """Python's, NumPy's and torch's global RNGs (all CUDA devices too) from one seed."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_at(cfg: Config, path: Path) -> ModelConfig:
    """The model config pointing at a checkpoint directory (saved with save_pretrained)."""
    return cfg.model.model_copy(update={"path": path})


def torch_no_grad():
    import torch

    return torch.no_grad()
