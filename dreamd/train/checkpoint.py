"""Atomic checkpoints: a directory is either complete (its marker exists) or never loaded.

Layout of <root>/ckpt-000012-c5-s200/ (a transformers model directory plus dreamd's state, so a
user can copy it away and `AutoModelForCausalLM.from_pretrained` it):

    config.json, generation_config.json, model.safetensors   model.save_pretrained()
    tokenizer.json, tokenizer_config.json, ...                tokenizer.save_pretrained()
    trainer_state.pt      the trainer's dict (torch.save; loads with weights_only=True)
    rng.pt                python, numpy, torch and CUDA RNG states (weights_only-safe)
    loop_state.json       run_id, cycle, step, ... (the caller's dict)
    dreamd.toml           the resolved config (loads with dreamd.config_file.load_config)
    COMPLETE.json         the marker, written last: sha256, bytes, per-file hashes, metrics

Save protocol (torchtitan's rule): write into <root>/.tmp-<name>-<pid> on the same
filesystem, fsync every file and directory, write the marker last, rename to the final name,
fsync the root. Any failure (ENOSPC, EFBIG, an exception from safetensors, Ctrl-C) removes the
temp dir and re-raises; earlier checkpoints are never touched before the new one is complete.
A crash (SIGKILL, power loss) can leave a temp dir: `remove_stale_temps()` at start removes it.
Pruning renames a checkpoint to a temp name before deleting it, so a crash mid-delete never
leaves a marked directory with missing files.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dreamd.config import Config
from dreamd.config_file import to_toml
from dreamd.files import fsync_path, fsync_tree

MARKER = "COMPLETE.json"
TMP_PREFIX = ".tmp-"
CORRUPT_PREFIX = ".corrupt-"
NAME_PREFIX = "ckpt-"
TRAINER_STATE = "trainer_state.pt"
RNG_STATE = "rng.pt"
LOOP_STATE = "loop_state.json"
CONFIG_TOML = "dreamd.toml"
FORMAT_VERSION = 1
_HASH_CHUNK = 8 << 20  # 8 MiB reads: large enough to run at disk speed, small in memory


# ---------------------------------------------------------------------------------------------
# RNG states (weights_only-safe: tensors, ints, floats, strings, None)


def capture_rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = list(state.get("cuda") or [])
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------
# files, hashes, fsync


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _payload_files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MARKER)


def _combined_sha256(files: Mapping[str, Mapping[str, Any]]) -> str:
    """One hash over all files: sha256 of 'relpath NUL bytes NUL sha256 \\n' lines, sorted."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]['bytes']}\0{files[rel]['sha256']}\n".encode())
    return h.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")


def _torch_save(obj: Any, path: Path, what: str) -> None:
    torch.save(obj, path)
    try:  # fail now, not at resume: mmap makes this read metadata only
        torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - pickle raises many kinds; all mean "not safe"
        raise ValueError(f"{what} cannot be loaded with torch.load(weights_only=True): {exc}; "
                         "store only tensors, numbers, strings, lists and dicts") from exc


# ---------------------------------------------------------------------------------------------
# reading


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def read_manifest(path: Path) -> dict[str, Any]:
    """The marker's content. ValueError when the directory is not a complete checkpoint."""
    try:
        return json.loads((Path(path) / MARKER).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is not a complete checkpoint (no {MARKER}); it is never "
                         "loaded") from None


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under `root`, oldest first (by sequence number)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _seq_of(p.name) is not None and is_complete(p)]
    return sorted(found, key=lambda p: _seq_of(p.name) or 0)


def _seq_of(name: str) -> int | None:
    """The sequence number in a checkpoint's name (ckpt-000012-...), read from the name so a
    garbled marker cannot break the listing."""
    head = name.removeprefix(NAME_PREFIX)[:6]
    return int(head) if name.startswith(NAME_PREFIX) and head.isdigit() else None


def latest_complete(root: Path) -> Path | None:
    """The newest complete checkpoint, or None. Directories without a marker are ignored."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def verify_checkpoint(path: Path) -> None:
    """Recompute every file's sha256; ValueError naming the first file that differs."""
    manifest = read_manifest(path)
    listed, present = set(manifest["files"]), set(_payload_files(Path(path)))
    if listed != present:
        raise ValueError(f"checkpoint {path}: files differ from its manifest "
                         f"(missing {sorted(listed - present)}, extra {sorted(present - listed)})")
    for rel, meta in manifest["files"].items():
        if _file_sha256(Path(path) / rel) != meta["sha256"]:
            raise ValueError(f"checkpoint {path}: {rel} does not match its sha256 (corrupted)")


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from (an unreadable or garbled marker, a
    file missing or extra, a file whose sha256 differs: truncation, one flipped bit), or None
    when every file is as its marker recorded."""
    try:
        verify_checkpoint(path)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        text = str(exc).replace(f"checkpoint {path}: ", "")
        return text if isinstance(exc, ValueError) else f"unreadable marker or files ({type(exc).__name__}: {text})"
    return None


def load_model_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint's *.safetensors files (one or many shards)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@dataclass
class LoadedCheckpoint:
    path: Path
    manifest: dict[str, Any]
    trainer_state: dict[str, Any]
    loop_state: dict[str, Any]
    rng_state: dict[str, Any]
    config_toml: str | None

    def restore_rng(self) -> None:
        restore_rng_state(self.rng_state)


def load_checkpoint(path: Path, *, map_location: str | torch.device = "cpu",
                    verify: bool = False) -> LoadedCheckpoint:
    """Read dreamd's state from a complete checkpoint (weights: from_pretrained(path) or
    load_model_state_dict(path)). `verify=True` re-hashes every file first."""
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_checkpoint(path)
    config = path / CONFIG_TOML
    return LoadedCheckpoint(
        path=path,
        manifest=manifest,
        trainer_state=torch.load(path / TRAINER_STATE, weights_only=True, map_location=map_location),
        loop_state=json.loads((path / LOOP_STATE).read_text()),
        rng_state=torch.load(path / RNG_STATE, weights_only=True, map_location="cpu"),
        config_toml=config.read_text() if config.exists() else None,
    )


# ---------------------------------------------------------------------------------------------
# writing and retention


@dataclass(frozen=True)
class SavedCheckpoint:
    path: Path
    name: str
    seq: int
    sha256: str
    """Combined hash of all files (see _combined_sha256); for the checkpoints table."""
    bytes: int
    """Total size of all files, marker excluded."""
    seconds: float
    """Wall time of the save, fsyncs and hashing included."""
    files: dict[str, dict[str, Any]] = field(default_factory=dict)


class CheckpointDir:
    """The checkpoint root of a run: saves atomically, lists, prunes.

    keep_last: complete checkpoints kept, newest first; best_metric/best_mode: one more is kept,
    the best by that metric among those saved with it.
    """

    def __init__(self, root: Path, *, keep_last: int = 3, best_metric: str | None = None,
                 best_mode: Literal["min", "max"] = "min"):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.best_metric = best_metric
        self.best_mode = best_mode

    def remove_stale_temps(self) -> list[Path]:
        """Delete temp dirs left by a crash (call once at start, before saving)."""
        if not self.root.is_dir():
            return []
        stale = [p for p in self.root.iterdir() if p.name.startswith(TMP_PREFIX)]
        for p in stale:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        return stale

    def _next_seq(self) -> int:
        seqs = [0]
        if self.root.is_dir():
            for p in self.root.iterdir():  # set-aside ones count: a name is never reused
                seq = _seq_of(p.name.removeprefix(CORRUPT_PREFIX))
                if seq is not None:
                    seqs.append(seq)
        return max(seqs) + 1

    def latest(self) -> Path | None:
        return latest_complete(self.root)

    def latest_intact(self, verify: bool = True) -> tuple[Path | None, list[tuple[str, str]]]:
        """The newest complete checkpoint whose files match its marker, and (name, problem) of
        each newer one that did not; those are renamed to .corrupt-<name> (kept for a post
        mortem, never listed, never pruned). verify=False: the newest complete, unchecked."""
        skipped: list[tuple[str, str]] = []
        for path in reversed(complete_checkpoints(self.root)):
            problem = checkpoint_problem(path) if verify else None
            if problem is None:
                return path, skipped
            path.rename(self.root / f"{CORRUPT_PREFIX}{path.name}")
            fsync_path(self.root)
            skipped.append((path.name, problem))
        return None, skipped

    def save(self, *, model: Any, tokenizer: Any | None, trainer_state: Mapping[str, Any],
             loop_state: Mapping[str, Any], config: Config | None = None,
             metrics: Mapping[str, float] | None = None,
             write_shards: Callable[[Path], None] | None = None) -> SavedCheckpoint:
        """Write one checkpoint atomically and return its name, sha256 and size.

        model: anything with save_pretrained(dir) (a transformers PreTrainedModel).
        trainer_state: the trainer's state_dict (must load with weights_only=True).
        loop_state: JSON-serialisable dict (run_id, cycle, step, ...).
        metrics: values kept in the marker; retention picks the best by `best_metric`.
        write_shards: a sharded run's DCP save of every rank's shards into the temp dir
        (train/sharded_checkpoint.py), before the files are hashed and the marker written.
        """
        started = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        seq = self._next_seq()
        cycle, step = loop_state.get("cycle"), loop_state.get("step")
        name = f"{NAME_PREFIX}{seq:06d}" + (f"-c{cycle}" if cycle is not None else "") + \
            (f"-s{step}" if step is not None else "")
        tmp = self.root / f"{TMP_PREFIX}{name}-{os.getpid()}"
        final = self.root / name
        try:
            tmp.mkdir()
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            _torch_save(dict(trainer_state), tmp / TRAINER_STATE, "trainer_state")
            _torch_save(capture_rng_state(), tmp / RNG_STATE, "rng state")
            _write_json(tmp / LOOP_STATE, dict(loop_state))
            if write_shards is not None:
                write_shards(tmp)
            if config is not None:
                (tmp / CONFIG_TOML).write_text(to_toml(config))
            fsync_tree(tmp)
            files = {rel: {"bytes": (tmp / rel).stat().st_size, "sha256": _file_sha256(tmp / rel)}
                     for rel in _payload_files(tmp)}
            manifest = {
                "format": FORMAT_VERSION, "seq": seq, "name": name,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "sha256": _combined_sha256(files), "bytes": sum(f["bytes"] for f in files.values()),
                "files": files, "metrics": dict(metrics or {}), "loop_state": dict(loop_state),
            }
            _write_json(tmp / MARKER, manifest)  # the marker, last
            fsync_path(tmp / MARKER)
            fsync_path(tmp)
            os.rename(tmp, final)
            fsync_path(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return SavedCheckpoint(path=final, name=name, seq=seq, sha256=manifest["sha256"],
                               bytes=manifest["bytes"], seconds=time.monotonic() - started,
                               files=files)

    def best(self, extra_metrics: Mapping[str, float] | None = None) -> Path | None:
        """The best complete checkpoint by best_metric (marker metrics, overridden by
        `extra_metrics`: {checkpoint name: value}); None without a metric."""
        if self.best_metric is None and not extra_metrics:
            return None
        scored: list[tuple[float, int, Path]] = []
        for p in complete_checkpoints(self.root):
            manifest = read_manifest(p)
            value = (extra_metrics or {}).get(p.name, manifest["metrics"].get(self.best_metric or ""))
            if value is not None:
                scored.append((float(value), manifest["seq"], p))
        if not scored:
            return None
        sign = 1.0 if self.best_mode == "min" else -1.0
        # Ties go to the newer checkpoint (higher seq).
        return min(scored, key=lambda s: (sign * s[0], -s[1]))[2]

    def prune(self, extra_metrics: Mapping[str, float] | None = None) -> list[Path]:
        """Delete complete checkpoints beyond the last `keep_last` and the best one.
        Returns the removed paths (mark their rows in the checkpoints table)."""
        complete = complete_checkpoints(self.root)
        keep = set(complete[-self.keep_last:])
        best = self.best(extra_metrics)
        if best is not None:
            keep.add(best)
        removed = []
        for p in complete:
            if p in keep:
                continue
            doomed = self.root / f"{TMP_PREFIX}deleting-{p.name}"
            os.rename(p, doomed)  # atomic: no marked-but-partial directory is ever visible
            fsync_path(self.root)
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(p)
        return removed
