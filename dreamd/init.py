"""`dreamd init DIR`: a complete setup for a machine without a GPU, made locally.

DIR/model/      tiny random-initialised causal LM + tokenizer trained here (chat template), or
                a real model converted from a local GGUF file (`--gguf PATH`, `--model NAME`)
DIR/dreamd.toml config whose relative paths point into DIR, fitted to the model
DIR/state/      the SQLite store (migrated), later checkpoints, pidfile, pause flag

Nothing is downloaded. The tiny tokenizer is trained on the bundled corpus plus a few thousand
template-dreamed scenarios, so the words the loop trains on are a few tokens each, as they would
be with a real model's tokenizer. A GGUF is converted once (dreamd/gguf.py, cached) and its
files are hard-linked into DIR/model.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from dreamd.config import Config
from dreamd.config_file import load_config, to_toml
from dreamd.dream.scenario import ScenarioKind
from dreamd.errors import UsageError
from dreamd.tiny import VLLM_HEAD_DIM, Arch, bundled_corpus, write_tiny_model_dir

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
    # A random-initialised tiny model is far from a pretrained LLM: the real-model lr of 1e-5 (docs/efficacy.md) would move
    # it too little to see in three cycles, so the demo trains at 1e-3 (lr_max 3e-3).
    cfg.train.lr_max = 3e-3
    cfg.train.lr = 1e-3
    cfg.train.warmup_steps = 4
    cfg.optimizer.rank = 16
    cfg.optimizer.update_proj_gap = 50
    cfg.eval.perplexity_max_tokens = 2048
    cfg.eval.arithmetic_n = 16
    return cfg


# A real model's first cycles follow the seed plan: 20 behavioural examples at lr 1e-5, one
# pass; the controller may go up to 50 examples and lr 1e-4. Batches of 4 hold >= 25% general
# data each (mix.py), so 20 behavioural examples come with 7 general ones: 27 per cycle.
REAL_EXAMPLES_PER_CYCLE = 27
REAL_MAX_LEN = 2048  # max_seq_len / max_model_len cap: dreamed examples are far shorter


def real_model_config(facts: dict, *, name: str, seed: int) -> Config:
    """A config fitted to a real (pretrained) model from its `models.model_facts`."""
    cfg = Config()
    cfg.run.name = name
    cfg.run.seed = seed
    cfg.run.state_dir = Path("state")
    cfg.run.threads = 0  # auto: half the usable cores (one on a 2-core box)
    cfg.model.path = Path("model")
    cfg.model.max_seq_len = min(int(facts["context_length"]), REAL_MAX_LEN)
    cfg.engine.kind = "auto"  # vLLM where it serves, else transformers
    cfg.engine.max_model_len = cfg.model.max_seq_len
    cfg.dream.source = "mixed"  # the model writes half the behavioural candidates
    # A generate call lasts as long as its longest row: on CPU, budgets of 256 tokens keep a
    # batch of 8 at ~1 min (135M, 1 thread) and still fit what the dreamer asks for.
    cfg.dream.situation_max_tokens = 256
    cfg.dream.reply_max_tokens = 256
    cfg.dream.judge_max_tokens = 64
    # Self-fact scenarios are checked by computation against the model's config, not by the
    # model's own self-check: the kind a small model writes acceptably most often.
    cfg.mix.self_facts = 0.25
    cfg.train.lr = 1e-5
    cfg.train.lr_max = 1e-4
    # APOLLO rank ~ hidden / 4 in multiples of 16 (576 -> 144), within 16..256.
    cfg.optimizer.rank = max(16, min(256, int(facts["hidden_size"]) // 4 // 16 * 16))
    cfg.mix.examples_per_cycle = REAL_EXAMPLES_PER_CYCLE
    cfg.controller.examples_min = 20
    cfg.controller.examples_max = 50
    return cfg


def _prepare_root(root: Path, force: bool) -> Path:
    cfg_path = root / "dreamd.toml"
    if cfg_path.exists() and not force:
        raise UsageError(f"{root} already holds a dreamd setup ({cfg_path}); pass --force to "
                         "overwrite it or choose another DIR")
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root} is a file; pass a directory (new or empty) as DIR")
    if force:
        for sub in ("model", "state"):
            shutil.rmtree(root / sub, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    return cfg_path


def _write_config_and_store(cfg_path: Path, header: str, cfg: Config) -> Path:
    cfg_path.write_text(
        f"# dreamd config written by `dreamd init` ({header}).\n"
        "# Every field: `dreamd config --explain`. Relative paths are from this file's directory.\n\n"
        + to_toml(cfg)
    )
    cfg = load_config(cfg_path)
    from dreamd.store import Store

    cfg.run.state_dir.mkdir(parents=True, exist_ok=True)
    Store.open(cfg.store_url, busy_timeout_ms=cfg.store.busy_timeout_ms).upgrade()
    return cfg_path


def init_dir(root: Path, *, arch: Arch = "llama", hidden: int = 64, layers: int = 4, seed: int = 0,
             force: bool = False) -> Path:
    root = Path(root)
    cfg_path = _prepare_root(root, force)
    # Heads of 32 (linear-attention heads of 64): shapes vLLM's CPU kernels can serve too.
    write_tiny_model_dir(root / "model", arch, texts=tokenizer_texts(seed), hidden=hidden,
                         layers=layers, seed=seed, head_dim=VLLM_HEAD_DIM)
    return _write_config_and_store(cfg_path, f"{arch}, hidden {hidden}, {layers} layers",
                                   demo_config(arch, seed))


def init_from_gguf(root: Path, *, gguf: Path | None = None, model: str | None = None, seed: int = 0,
                   dtype: str = "float32", force: bool = False, cache: bool = True) -> Path:
    """DIR set up for a real model: the GGUF file `gguf` (or the named model's installed file)
    converted to DIR/model (from the conversion cache unless cache=False), a config fitted to
    it, the store. Bad files and names are one-line UsageErrors, checked before DIR is touched."""
    from dreamd.gguf import convert_cached, convert_gguf, gguf_metadata, link_or_copy_tree, named_model_gguf

    if (gguf is None) == (model is None):
        raise UsageError("pass exactly one of --gguf PATH and --model NAME")
    source = named_model_gguf(model) if model is not None else Path(gguf)
    gguf_metadata(source)  # a bad file fails here, before DIR is made or cleared
    root = Path(root)
    cfg_path = _prepare_root(root, force)
    if cache:
        link_or_copy_tree(convert_cached(source, dtype), root / "model")
    else:
        convert_gguf(source, root / "model", dtype)
    from transformers import AutoConfig

    from dreamd.models import model_facts

    facts = model_facts(AutoConfig.from_pretrained(root / "model", local_files_only=True))
    name = model or source.stem.lower()
    return _write_config_and_store(
        cfg_path, f"{name}: {facts['architecture']}, {facts['num_layers']} layers, hidden "
        f"{facts['hidden_size']}, converted from {source.name} as {dtype}",
        real_model_config(facts, name=name, seed=seed))
