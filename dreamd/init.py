"""`dreamd init DIR`: a complete setup for a machine without a GPU, made locally.

DIR/model/      tiny random-initialised causal LM + tokenizer trained here (chat template)
DIR/dreamd.toml config whose relative paths point into DIR
DIR/state/      the SQLite store (migrated), later checkpoints, pidfile, pause flag

Nothing is downloaded. The tokenizer is trained on the bundled corpus plus a few thousand
template-dreamed scenarios, so the words the loop trains on are a few tokens each, as they would
be with a real model's tokenizer.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from dreamd.config import Config, load_config, to_toml
from dreamd.dream.scenario import ScenarioKind
from dreamd.errors import UsageError
from dreamd.tiny import Arch, bundled_corpus, write_tiny_model_dir

# Scenarios drawn per kind for tokenizer training: enough to cover the grammar's vocabulary
# (~0.5 s of dreaming), small next to the corpus so the tokenizer stays general.
TOKENIZER_SAMPLES_PER_KIND = 400


def tokenizer_texts(seed: int) -> list[str]:
    from dreamd.dream.templates import TemplateDreamer

    dreamer = TemplateDreamer(spec="", seed=seed)
    rng = random.Random(seed)
    texts = [bundled_corpus()]
    for kind in (ScenarioKind.ACCEPT, ScenarioKind.PUSHBACK, ScenarioKind.DERAIL, ScenarioKind.GENERAL):
        texts += [dreamer.dream(kind, rng).text for _ in range(TOKENIZER_SAMPLES_PER_KIND)]
    return texts


def demo_config(arch: Arch, seed: int) -> Config:
    cfg = Config()
    cfg.run.name = f"demo-{arch}"
    cfg.run.seed = seed
    cfg.run.state_dir = Path("state")
    cfg.model.path = Path("model")
    cfg.model.max_seq_len = 1024
    # A random-initialised tiny model is far from a pretrained LLM: DESIGN.md's 1e-5 would move
    # it too little to see in three cycles, so the demo trains at 1e-3 (lr_max 3e-3).
    cfg.train.lr_max = 3e-3
    cfg.train.lr = 1e-3
    cfg.train.warmup_steps = 4
    cfg.optimizer.rank = 16
    cfg.optimizer.update_proj_gap = 50
    cfg.eval.perplexity_max_tokens = 2048
    cfg.eval.arithmetic_n = 16
    return cfg


def init_dir(root: Path, *, arch: Arch = "llama", hidden: int = 64, layers: int = 4, seed: int = 0,
             force: bool = False) -> Path:
    root = Path(root)
    cfg_path = root / "dreamd.toml"
    if cfg_path.exists() and not force:
        raise UsageError(f"{root} already holds a dreamd setup ({cfg_path}); pass --force to "
                         "overwrite it or choose another DIR")
    if force:
        for sub in ("model", "state"):
            shutil.rmtree(root / sub, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    write_tiny_model_dir(root / "model", arch, texts=tokenizer_texts(seed), hidden=hidden,
                         layers=layers, seed=seed)
    cfg_path.write_text(
        f"# dreamd config written by `dreamd init` ({arch}, hidden {hidden}, {layers} layers).\n"
        "# Every field: `dreamd config --explain`. Relative paths are from this file's directory.\n\n"
        + to_toml(demo_config(arch, seed))
    )
    cfg = load_config(cfg_path)
    from dreamd.store import Store

    cfg.run.state_dir.mkdir(parents=True, exist_ok=True)
    Store.open(cfg.store_url, busy_timeout_ms=cfg.store.busy_timeout_ms).upgrade()
    return cfg_path
