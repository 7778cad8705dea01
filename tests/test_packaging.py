"""The wheel: the runtime and the converter (as gemma_mlx.convert), the demo drafter and prompts; no bench."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_gemma_mlx_and_its_converter_and_no_bench(tmp_path):
    src = tmp_path / "src"  # a clean copy: setuptools builds in-tree, and a stale build/ would leak into the wheel
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns("build", ".git", "*.egg-info", "__pycache__", "results",
                                                             ".venv"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    names = zipfile.ZipFile(next(tmp_path.glob("gemma_mlx-*.whl"))).namelist()
    assert {"gemma_mlx/convert/pipeline.py", "gemma_mlx/cli/__init__.py", "gemma_mlx/models/gemma4_text.py"} <= set(names)
    assert "gemma_mlx/demo_drafter/model.safetensors" in names and "gemma_mlx/demo_prompts.json" in names
    assert not any(n.startswith(("bench/", "gemma_mlx/bench/", "convert/", "tests/")) for n in names), names
