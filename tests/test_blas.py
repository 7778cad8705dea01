"""Which BLAS MLX runs on (gemma_mlx/_blas.py): MKL from the `mkl` extra on x86-64 Linux, OpenBLAS otherwise, and the
torch oracle still working in the same process. Each case is a fresh process: the preload happens once, at import."""

import json
import os
import platform
import subprocess
import sys

import pytest

from gemma_mlx import _blas

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the BLAS preload is Linux-only")

PROBE = r"""
import json, gemma_mlx, mlx.core as mx, numpy as np
from gemma_mlx import _blas
a, b = mx.random.normal((300, 200)), mx.random.normal((200, 100))
err = float(np.abs(np.array(a @ b) - np.array(a).astype(np.float64) @ np.array(b).astype(np.float64)).max())
maps = open("/proc/self/maps").read()
out = dict(status=_blas.status, err=err, mkl="libmkl_rt" in maps, openblas="libopenblas" in maps)
if TORCH:
    import torch
    x, y = torch.randn(4, 64, 32), torch.randn(4, 32, 16)
    out["bmm_err"] = float((torch.bmm(x, y) - torch.einsum("bij,bjk->bik", x.double(), y.double())).abs().max())
print(json.dumps(out))
"""


def probe(blas: str | None, torch: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GEMMA_MLX_BLAS", "MKL_THREADING_LAYER")}
    if blas is not None:
        env["GEMMA_MLX_BLAS"] = blas
    r = subprocess.run([sys.executable, "-c", f"TORCH = {torch}\n{PROBE}"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the mkl wheel is x86-64 only")
def test_mkl_is_preferred_and_torch_still_works():
    assert _blas.mkl_path() is not None, "the test extra installs mkl on x86-64 Linux"
    out = probe(None, torch=True)
    assert out["status"].startswith("using MKL from"), out["status"]
    assert out["mkl"] and not out["openblas"]
    assert out["err"] < 1e-3
    assert out["bmm_err"] < 1e-4  # OpenBLAS 0.3.33's cblas_sgemm_batch in torch's place crashed this bmm


def test_openblas_on_request_and_reference_on_request():
    if any(os.path.exists(p) for p in _blas.OPENBLAS):
        out = probe("openblas")
        assert out["status"].startswith("using OpenBLAS from") and out["openblas"] and not out["mkl"]
        assert out["err"] < 1e-3
    out = probe("reference")
    assert "reference BLAS" in out["status"] and not out["openblas"] and not out["mkl"]
    assert out["err"] < 1e-3


def test_unknown_choice_is_said_and_ignored():
    out = probe("fastest")
    assert "GEMMA_MLX_BLAS='fastest' is not one of" in out["status"] and "using" in out["status"]
