"""OpenBLAS preloading (gemma_mlx/_blas.py): which library MLX's cblas calls resolve to, in fresh processes."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from gemma_mlx import _blas

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the preload is Linux-only")

PROBE = textwrap.dedent("""
    import time
    import gemma_mlx
    from gemma_mlx import _blas
    import mlx.core as mx
    a = mx.random.normal((1024, 1024)); mx.eval(a)
    t0 = time.perf_counter(); mx.eval(a @ a); dt = time.perf_counter() - t0
    print(_blas.status); print(dt)
""")


def probe(env_extra: dict) -> tuple[str, float]:
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    status, seconds = out.stdout.strip().splitlines()[-2:]
    return status, float(seconds)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the cpu extra installs ngsolve-openblas on x86-64 only")
def test_the_wheel_openblas_is_preferred():
    status, seconds = probe({})
    assert "ngsolve_openblas" in status and status.startswith("using OpenBLAS"), status
    assert seconds < 0.5  # a reference BLAS takes seconds for 1024³


def test_a_wheel_that_does_not_load_falls_back_to_the_system_openblas(tmp_path):
    system = next((p for p in _blas.SYSTEM_CANDIDATES if os.path.exists(p)), None)
    if system is None:
        pytest.skip("no system OpenBLAS")
    fake = tmp_path / "ngsolve_openblas"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "libopenblas_broken.so").write_text("not a library")
    status, seconds = probe({"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert "could not load" in status and "libopenblas_broken.so" in status, status
    assert status.endswith(f"using OpenBLAS from {system}"), status
    assert seconds < 0.5


def test_disabled_preload_says_so():
    status, _ = probe({"GEMMA_MLX_NO_OPENBLAS": "1"})
    assert "disabled" in status
