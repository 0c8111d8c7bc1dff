"""Record the parts of vLLM's public API that dreamd's adapter calls, in one comparable form.

Two readers produce the same JSON shape:
- `from_source(root)` reads an unpacked vLLM wheel with `ast` (no import, so it runs on a CPU
  machine where vLLM cannot be installed); this is how tests/data/vllm_signatures_<ver>.json
  were made:
      pip download --no-deps --only-binary=:all: --python-version 3.12 \
          --platform manylinux_2_28_x86_64 vllm==0.26.0
      unzip -q vllm-0.26.0-*.whl 'vllm/*.py' -d /tmp/vllm-0.26.0
      python tests/gpu/vllm_signatures.py --source /tmp/vllm-0.26.0 --version 0.26.0 \
          > tests/data/vllm_signatures_0.26.0.json
- `from_installed()` reads the vLLM imported on a GPU host with `inspect`; the GPU test
  compares it with the recorded copy, so a recorded file (and the CPU stand-in checked against
  it) cannot silently drift from the real library.

A parameter is [name, kind, default]. Defaults are kept only when they are literals (numbers,
strings, None, bools, tuples); anything else is recorded as {"expr": ...} and compared by name
and kind only, because `ast` sees `LoadConfig.load_format` where `inspect` sees its value.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import sys
from pathlib import Path
from typing import Any

REQUIRED = "<required>"

# (file, class, method): methods whose full signatures are recorded.
METHODS = {
    "LLM.__init__": ("vllm/entrypoints/llm.py", "LLM", "__init__"),
    "LLM.generate": ("vllm/entrypoints/llm.py", "LLM", "generate"),
    "LLM.chat": ("vllm/entrypoints/llm.py", "LLM", "chat"),
    "LLM.sleep": ("vllm/entrypoints/llm.py", "LLM", "sleep"),
    "LLM.wake_up": ("vllm/entrypoints/llm.py", "LLM", "wake_up"),
    "LLM.reset_prefix_cache": ("vllm/entrypoints/llm.py", "LLM", "reset_prefix_cache"),
    "LLM.apply_model": ("vllm/entrypoints/llm.py", "LLM", "apply_model"),
    "LLM.collective_rpc": ("vllm/entrypoints/llm.py", "LLM", "collective_rpc"),
    "LLM.get_tokenizer": ("vllm/entrypoints/llm.py", "LLM", "get_tokenizer"),
    "RequestOutput.__init__": ("vllm/outputs.py", "RequestOutput", "__init__"),
}
# (file, class): classes whose annotated fields are recorded (dataclasses, msgspec structs).
FIELDS = {
    "SamplingParams": ("vllm/sampling_params.py", "SamplingParams"),
    "CompletionOutput": ("vllm/outputs.py", "CompletionOutput"),
    "Logprob": ("vllm/logprobs.py", "Logprob"),
    "EngineArgs": ("vllm/engine/arg_utils.py", "EngineArgs"),
}
# TypedDicts whose keys (own and inherited from bases in the same file) are recorded.
TYPED_DICTS = {"TokensPrompt": ("vllm/inputs/llm.py", "TokensPrompt")}


def _literal(node: ast.expr | None) -> Any:
    if node is None:
        return REQUIRED
    try:
        return _jsonable(ast.literal_eval(node))
    except ValueError:
        return {"expr": ast.unparse(node)}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value)) if isinstance(value, tuple) else value


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise LookupError(f"class {name} not found")


def _params_from_ast(fn: ast.FunctionDef) -> list[list[Any]]:
    a = fn.args
    out: list[list[Any]] = []
    positional = a.posonlyargs + a.args
    pos_defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for i, (arg, default) in enumerate(zip(positional, pos_defaults)):
        kind = "POSITIONAL_ONLY" if i < len(a.posonlyargs) else "POSITIONAL_OR_KEYWORD"
        out.append([arg.arg, kind, _literal(default)])
    if a.vararg:
        out.append([a.vararg.arg, "VAR_POSITIONAL", REQUIRED])
    for arg, default in zip(a.kwonlyargs, a.kw_defaults):
        out.append([arg.arg, "KEYWORD_ONLY", _literal(default)])
    if a.kwarg:
        out.append([a.kwarg.arg, "VAR_KEYWORD", REQUIRED])
    return out


def _fields_from_ast(cls: ast.ClassDef) -> list[list[Any]]:
    out = []
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if "ClassVar" in ast.unparse(node.annotation):
                continue
            out.append([node.target.id, _literal(node.value)])
    return out


def from_source(root: Path, version: str) -> dict[str, Any]:
    """Signatures read from an unpacked vLLM wheel at `root` (the directory holding vllm/)."""
    trees: dict[str, ast.Module] = {}

    def tree(rel: str) -> ast.Module:
        if rel not in trees:
            trees[rel] = ast.parse((root / rel).read_text())
        return trees[rel]

    out: dict[str, Any] = {"version": version, "methods": {}, "fields": {}, "typed_dicts": {}}
    for key, (rel, cls_name, meth) in METHODS.items():
        cls = _class(tree(rel), cls_name)
        fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == meth)
        out["methods"][key] = _params_from_ast(fn)
    for key, (rel, cls_name) in FIELDS.items():
        out["fields"][key] = _fields_from_ast(_class(tree(rel), cls_name))
    for key, (rel, cls_name) in TYPED_DICTS.items():
        keys: list[str] = []
        pending = [cls_name]
        while pending:
            cls = _class(tree(rel), pending.pop())
            keys += [n.target.id for n in cls.body
                     if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
            pending += [b.id for b in cls.bases if isinstance(b, ast.Name) and b.id != "TypedDict"]
        out["typed_dicts"][key] = sorted(keys)
    return out


def _default(value: Any) -> Any:
    if value is inspect.Parameter.empty:
        return REQUIRED
    try:
        return _jsonable(ast.literal_eval(repr(value)))
    except (ValueError, SyntaxError):
        return {"expr": repr(value)}


def from_installed() -> dict[str, Any]:
    """Signatures of the vLLM importable in this process (GPU hosts)."""
    import dataclasses

    import msgspec
    import vllm
    from vllm.engine.arg_utils import EngineArgs
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput, RequestOutput

    classes = {"LLM": vllm.LLM, "RequestOutput": RequestOutput}
    out: dict[str, Any] = {"version": vllm.__version__, "methods": {}, "fields": {}, "typed_dicts": {}}
    for key, (_, cls_name, meth) in METHODS.items():
        sig = inspect.signature(getattr(classes[cls_name], meth))
        out["methods"][key] = [[p.name, p.kind.name, _default(p.default)] for p in sig.parameters.values()]
    out["fields"]["SamplingParams"] = [
        [f.name, REQUIRED if f.default is msgspec.NODEFAULT and f.default_factory is msgspec.NODEFAULT
         else _default(f.default) if f.default is not msgspec.NODEFAULT else {"expr": "factory"}]
        for f in msgspec.structs.fields(vllm.SamplingParams)]
    for name, cls in (("CompletionOutput", CompletionOutput), ("Logprob", Logprob), ("EngineArgs", EngineArgs)):
        out["fields"][name] = [
            [f.name, _default(f.default) if f.default is not dataclasses.MISSING
             else REQUIRED if f.default_factory is dataclasses.MISSING else {"expr": "factory"}]
            for f in dataclasses.fields(cls)]
    prompt = vllm.TokensPrompt
    out["typed_dicts"]["TokensPrompt"] = sorted(prompt.__required_keys__ | prompt.__optional_keys__)
    return out


def differences(recorded: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Human-readable differences; literal defaults compared only where both sides have one."""
    diffs: list[str] = []

    def same_default(a: Any, b: Any) -> bool:
        return isinstance(a, dict) or isinstance(b, dict) or a == b

    for key, params in recorded["methods"].items():
        got = {p[0]: p for p in actual["methods"].get(key, [])}
        if [p[0] for p in params] != [p[0] for p in actual["methods"].get(key, [])]:
            diffs.append(f"{key}: parameters {[p[0] for p in params]} != {list(got)}")
            continue
        for name, kind, default in params:
            if got[name][1] != kind or not same_default(default, got[name][2]):
                diffs.append(f"{key}({name}): recorded {kind}={default!r}, found {got[name][1]}={got[name][2]!r}")
    for key, fields in recorded["fields"].items():
        got = {f[0]: f[1] for f in actual["fields"].get(key, [])}
        for name, default in fields:
            if name not in got:
                diffs.append(f"{key}.{name}: missing")
            elif key != "EngineArgs" and not same_default(default, got[name]):
                diffs.append(f"{key}.{name}: recorded default {default!r}, found {got[name]!r}")
    for key, keys in recorded["typed_dicts"].items():
        if keys != actual["typed_dicts"].get(key):
            diffs.append(f"{key}: keys {keys} != {actual['typed_dicts'].get(key)}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, help="unpacked wheel root (holds vllm/); default: installed vllm")
    ap.add_argument("--version", help="version label for --source")
    args = ap.parse_args(argv)
    data = from_source(args.source, args.version or "unknown") if args.source else from_installed()
    json.dump(data, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
