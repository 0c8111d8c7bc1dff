"""Assemble the parts a cycle needs, once per process, and resume from the newest checkpoint.

Order matters and is visible here: store (migrated) -> run row -> newest complete checkpoint ->
model (from that checkpoint, else from model.path) -> trainer (its state restored) -> engine ->
dreamer and screener. Everything the cycle calls lives on `Parts`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dreamd.config import Config
from dreamd.cycle import LoopState
from dreamd.log import get_logger

log = get_logger("dreamd.loop")


@dataclass
class Parts:
    cfg: Config
    store: Any                     # dreamd.store.record.Store
    run_id: int
    model: Any                     # transformers PreTrainedModel (trained in place)
    tokenizer: Any
    engine: Any                    # dreamd.engines.base.Engine
    trainer: Any                   # dreamd.train.trainer.Trainer
    dreamer: Any                   # dreamd.dream.routing.RoutingDreamer
    screener: Any                  # dreamd.dream.screen.Screener
    checkpoints: Any               # dreamd.service.checkpoint.CheckpointDir
    on_step: Callable[[Any], None] = field(default=lambda res: None)
    """Called after every optimizer step (the daemon: pause/stop at step boundaries, watchdog)."""
    on_phase: Callable[[str, int | None], None] = field(default=lambda name, cycle: None)
    """Called when a phase starts (the daemon: systemd STATUS=)."""
    should_stop: Callable[[], bool] = field(default=lambda: False)
    """Polled at step boundaries and between dreamed candidates (the daemon: SIGTERM/SIGINT)."""
    probes: Any = None
    """dreamd.evals.probes.ProbeSuite: the run's fixed probes and their start-of-run state."""
    window: Any = None
    """The current cycle's engines.window.TrainingWindow (rollback pushes through it)."""
    peak_step_bytes: int | None = None
    """Largest per-step peak memory seen (CUDA: max_memory_allocated), for the sleep decision."""

    def peak_above_weights(self) -> int | None:
        """Measured training memory beyond the weights, once a CUDA step has run."""
        if self.peak_step_bytes is None or next(self.model.parameters()).device.type != "cuda":
            return None
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return max(0, self.peak_step_bytes - weights)

    def rebuild_dreaming(self) -> None:
        """(Re)build the dreamer and screener from self.cfg, as one unit: dream.source picks the
        writers, the screener gets every rule (near duplicates included), and the probes'
        hold-out wraps both. At start and after a SIGHUP that changed screen.*."""
        from dreamd.dream.routing import open_dreaming

        dreamer, screener = open_dreaming(self.cfg, self.store, self.run_id, self.engine, self.model.config)
        if self.probes is not None:
            dreamer = self.probes.hold_out(dreamer, screener)
        self.dreamer, self.screener = dreamer, screener

    @property
    def model_config(self) -> Any:
        return self.model.config

    @contextmanager
    def phase(self, cycle_id: int | None, name: str) -> Iterator[None]:
        """Time a phase and write its phases row (also when it fails)."""
        self.on_phase(name, cycle_id)
        started, t0 = datetime.now(timezone.utc), time.perf_counter()
        try:
            yield
        finally:
            self.store.add_phase(self.run_id, cycle_id, name, started, time.perf_counter() - t0)

    def evaluate(self, cycle_id: int | None = None) -> tuple[dict[str, float], dict[str, Any]]:
        """Forgetting metrics plus every probe metric (Q1, margins, Q3, steering, calibration,
        code answers; docs/sql.md "Metric names"), and their details for evals.detail_json.
        With a cycle id the probes are also checked against what that cycle trained."""
        from dreamd.evals.forgetting import forgetting_metrics

        metrics = forgetting_metrics(self.model, self.tokenizer, self.engine, self.cfg.eval, self.cfg.run.seed)
        details: dict[str, Any] = {}
        if self.probes is not None:
            measured = self.probes.measure(self.model, self.tokenizer, self.engine, self.cfg.run.seed,
                                           self.store, self.run_id, cycle_id)
            metrics.update(measured.metrics)
            details.update(measured.details)
        return metrics, details

    def checkpoint(self, cycle_id: int, state: LoopState, metrics: dict[str, float]) -> Path:
        """Atomic checkpoint, its row, then retention (pruned rows marked 'deleted')."""
        # cycle_id: a restart after a crash between the save and the rows below settles them.
        loop_state = {**state.to_json(), "step": self.trainer.step, "cycle_id": cycle_id}
        saved = self.checkpoints.save(model=self.model, tokenizer=self.tokenizer,
                                      trainer_state=self.trainer.state_dict(), loop_state=loop_state,
                                      config=self.cfg, metrics=metrics)
        self.store.add_checkpoint(self.run_id, cycle_id, self.trainer.step, saved.path, saved.sha256,
                                  saved.bytes)
        removed = {str(p) for p in self.checkpoints.prune()}
        for row in self.store.complete_checkpoints(self.run_id):
            if row.path in removed:
                self.store.set_checkpoint_status(row.id, "deleted")
        return saved.path


def open_parts(cfg: Config) -> tuple[Parts, LoopState]:
    """Build every part and the loop state, resuming the run of this name if one is unfinished."""
    from dreamd.engines.select import make_engine
    from dreamd.models import apply_threads, load_model, resolve_device
    from dreamd.service.checkpoint import CheckpointDir, load_checkpoint
    from dreamd.store.record import Store
    from dreamd.train.trainer import Trainer

    threads = apply_threads(cfg.run.threads)
    cfg.run.state_dir.mkdir(parents=True, exist_ok=True)
    # ---- store: reachable now, or a clear error; migrations before anything else --------------
    store = Store.open(cfg.store_url, busy_timeout_ms=cfg.store.busy_timeout_ms)
    store.upgrade()

    # ---- run: resume the unfinished run of this name, or start one ---------------------------
    run = store.find_resumable_run(cfg.run.name)
    if run is None:
        run_id = store.start_run(cfg.run.name, cfg.resolved_json(), cfg.model.path, cfg.run.seed)
        store.add_event(run_id, "start", {"model": str(cfg.model.path)})
    else:
        run_id = run.id
        store.set_run_status(run_id, "running")

    # ---- newest complete checkpoint decides where the weights come from ----------------------
    checkpoints = CheckpointDir(cfg.run.state_dir / "checkpoints" / f"run-{run_id}",
                                keep_last=cfg.checkpoint.keep_last, best_metric=cfg.checkpoint.best_metric,
                                best_mode=cfg.checkpoint.best_mode)
    checkpoints.remove_stale_temps()
    latest = checkpoints.latest()
    device = resolve_device(cfg.run.device)
    # A process starts with a random torch seed (torch.initial_seed() differs per process), so
    # the RNG states saved in checkpoints differed between two runs of one config. Seed every
    # global RNG from run.seed; a resume restores the checkpoint's states over these below.
    seed_global_rngs(cfg.run.seed)
    model_cfg = cfg.model if latest is None else replace_path(cfg, latest)
    model, tokenizer = load_model(model_cfg, device)
    # The engine before the optimizer: vLLM sizes its KV cache against the memory free now.
    engine = make_engine(cfg, model, tokenizer, threads=threads)
    trainer = Trainer(model, cfg.train, cfg.optimizer, seed=cfg.run.seed)

    if latest is None:
        state = LoopState(run_id=run_id, lr=cfg.train.lr, general_share=cfg.mix.general_share,
                          examples_per_cycle=cfg.mix.examples_per_cycle)
    else:
        ck = load_checkpoint(latest, map_location=device)
        trainer.load_state_dict(ck.trainer_state)
        ck.restore_rng()
        fields = {k: v for k, v in ck.loop_state.items() if k in LoopState.__dataclass_fields__}
        state = LoopState(**fields)
        settle_checkpoint_rows(store, run_id, latest, ck)
        # Steps are 0-based: a checkpoint after `trainer.step` steps holds steps 0..step-1.
        gone = store.supersede_after(run_id, trainer.step - 1)
        store.add_event(run_id, "resume", {"checkpoint": latest.name, "step": trainer.step,
                                           "cycle": state.cycle, "superseded": gone._asdict()})
        log.info("run.resumed", run_id=run_id, checkpoint=latest.name, step=trainer.step,
                 cycle=state.cycle, superseded=gone._asdict())
    if run is not None and latest is None:
        gone = store.supersede_after(run_id, -1)
        store.add_event(run_id, "resume", {"checkpoint": None, "step": 0, "superseded": gone._asdict()})

    parts = Parts(cfg=cfg, store=store, run_id=run_id, model=model, tokenizer=tokenizer, engine=engine,
                  trainer=trainer, dreamer=None, screener=None, checkpoints=checkpoints)

    # ---- probes: drawn once per run (stored, status 'probe'), held out of training by a
    # screening rule, and measured before the first cycle (the baseline, evals.cycle_id NULL) ----
    from dreamd.controller import start_metrics
    from dreamd.dream.templates import TemplateDreamer
    from dreamd.evals.suite import ProbeSuite

    parts.probes = ProbeSuite.open(store, run_id, cfg.run.state_dir, TemplateDreamer(spec=cfg.spec_text))
    parts.rebuild_dreaming()
    if latest is None and not start_metrics(store, run_id):
        with parts.phase(None, "evaluate"):
            metrics, details = parts.evaluate()
        store.add_evals(run_id, None, metrics, details=details)
    return parts, state


def settle_checkpoint_rows(store: Any, run_id: int, path: Path, loaded: Any) -> None:
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


def replace_path(cfg: Config, path: Path):
    """The model config pointing at a checkpoint directory (saved with save_pretrained)."""
    return cfg.model.model_copy(update={"path": path})


def rollback_to_latest(parts: Parts, state: LoopState, reason: str, *, record: bool = True) -> LoopState:
    """Restore weights, optimizer and loop state from the newest complete checkpoint (the last
    good cycle), supersede everything after it, and record the rollback. Without a checkpoint
    the run's starting weights (model.path) are the last good state."""
    from dreamd.models import load_model
    from dreamd.service.checkpoint import load_checkpoint
    from dreamd.train.trainer import Trainer

    latest = parts.checkpoints.latest()
    source = latest if latest is not None else parts.cfg.model.path
    fresh, _ = load_model(parts.cfg.model.model_copy(update={"path": source}), str(parts.trainer.device))
    with torch_no_grad():
        for name, p in parts.model.named_parameters():
            p.copy_(fresh.get_parameter(name))
    del fresh
    # The engine must serve the restored weights too (a sleeping vLLM is woken first); the
    # canary checks it. On CPU the engine shares the model's storage and this is a check only.
    from dreamd.cycle import open_window

    window = parts.window if parts.window is not None else open_window(parts)
    window.after_train(parts.model)
    parts.window = None
    before = {"lr": state.lr, "general_share": state.general_share,
              "examples_per_cycle": state.examples_per_cycle, "step": parts.trainer.step}
    parts.trainer = Trainer(parts.model, parts.cfg.train, parts.cfg.optimizer, seed=parts.cfg.run.seed)
    if latest is not None:
        ck = load_checkpoint(latest, map_location=str(parts.trainer.device))
        parts.trainer.load_state_dict(ck.trainer_state)
        fields = {k: v for k, v in ck.loop_state.items() if k in LoopState.__dataclass_fields__}
        restored = LoopState(**fields)
    else:
        restored = LoopState(run_id=state.run_id, lr=parts.cfg.train.lr, general_share=parts.cfg.mix.general_share,
                             examples_per_cycle=parts.cfg.mix.examples_per_cycle)
    parts.store.supersede_after(parts.run_id, parts.trainer.step - 1)
    after = {"lr": restored.lr, "general_share": restored.general_share,
             "examples_per_cycle": restored.examples_per_cycle, "step": parts.trainer.step}
    if record:  # the controller records its own rollback decision, with the metrics behind it
        parts.store.add_decision(parts.run_id, None, "rollback", reason, before, after,
                                 {"checkpoint": latest.name if latest else None})
    return restored


def torch_no_grad():
    import torch

    return torch.no_grad()
