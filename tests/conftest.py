"""Session fixtures: tiny transformers checkpoints (the oracle, tests/oracle.py), their conversions by our converter,
and the loaded MLX models, each built lazily on first use and at most once per session.

tests/ has no __init__.py: it is put on sys.path here so test modules can `from oracle import ...`."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# The oracle's 1e-4 bounds our arithmetic against transformers'. MKL (the `mkl` extra, which the test extra installs)
# rounds the tiny test models' small matmuls more coarsely than OpenBLAS: one test target's logits land 1.3e-4 from
# transformers there, 9e-5 from fp64 (3.6e-5 on OpenBLAS; README "Which BLAS"). So the tests, and the processes they
# start, run on OpenBLAS; tests/test_blas.py runs MKL in processes of its own.
os.environ.setdefault("GEMMA_MLX_BLAS", "openblas")

import gemma_mlx  # noqa: E402,F401  (the BLAS before anything imports mlx.core)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """hf_dir(name) -> Path: transformers checkpoint dir of an oracle target (oracle.TARGETS: a VARIANTS name, "moe8",
    "mm"; suffix "-calm" for the conditioned copy), with tokenizer and generation_config."""
    from oracle import build_target

    made = {}

    def get(name):
        if name not in made:
            made[name] = build_target(name, tmp_path_factory.mktemp("hf") / name)
        return made[name]

    return get


@pytest.fixture(scope="session")
def hf_drafter_dir(tmp_path_factory):
    """hf_drafter_dir(name, ordered) -> Path: transformers checkpoint dir of the gemma4_assistant for target `name`
    (ordered=False: dense LM head; True: centroid/ordered head)."""
    from oracle import build_drafter

    made = {}

    def get(name, ordered):
        ordered = bool(ordered)
        if (name, ordered) not in made:
            made[name, ordered] = build_drafter(name, ordered, tmp_path_factory.mktemp("hf") / f"{name}-a{ordered:d}")
        return made[name, ordered]

    return get


# --- converted MLX models (gemma_mlx.convert + gemma_mlx.loader), built once per session -------------------


@pytest.fixture(scope="session")
def mlx_dir(hf_dir, hf_drafter_dir, tmp_path_factory):
    """Converted fp32 (or quantized) MLX dir of a target, or of a drafter with ordered=True/False."""
    from gemma_mlx.convert import convert

    made = {}

    def get(name, quantize=None, ordered=None):
        key = (name, quantize, ordered)
        if key not in made:
            src = hf_dir(name) if ordered is None else hf_drafter_dir(name, ordered)
            out = tmp_path_factory.mktemp("mlx") / f"{name}-{ordered}-{quantize}"
            made[key] = convert(str(src), out, dtype="fp32", quantize=quantize, progress=False)
        return made[key]

    return get


@pytest.fixture(scope="session")
def mlx_target(mlx_dir):
    from gemma_mlx.loader import load_checkpoint

    loaded = {}

    def get(name, quantize=None):
        if (name, quantize) not in loaded:
            loaded[name, quantize] = load_checkpoint(mlx_dir(name, quantize))
        return loaded[name, quantize]

    return get


@pytest.fixture(scope="session")
def pair(mlx_dir, mlx_target):
    """(target, drafter bound to it), fp32."""
    from gemma_mlx.loader import load_checkpoint

    loaded = {}

    def get(name, ordered):
        if (name, ordered) not in loaded:
            loaded[name, ordered] = load_checkpoint(mlx_dir(name, ordered=ordered))
        return mlx_target(name), loaded[name, ordered]

    return get
