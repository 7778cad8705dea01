"""Load an OpenBLAS before MLX on Linux.

The `mlx[cpu]` wheel links a reference BLAS whose float32 matmuls are 17-60x slower than OpenBLAS. Loading an
OpenBLAS with RTLD_GLOBAL before `mlx.core` is imported makes MLX's `cblas_*` calls resolve to it. This must run
before the first `import mlx.core` in the process; `gemma_mlx/__init__.py` calls it first thing.

Candidates, best first: the DYNAMIC_ARCH OpenBLAS 0.3.33 of the `ngsolve-openblas` wheel (the `cpu` extra on x86-64
Linux; plain `cblas_*` symbol names, unlike scipy-openblas32's `scipy_` ones), whose small-M sgemm kernels make a
verify forward of K+1 tokens cheaper than Debian bookworm's 0.3.21 does (README, Performance); then Debian's
`libopenblas0-pthread`. Both need the system's libgfortran5 (Debian's OpenBLAS package brings it).
"""

import ctypes
import glob
import importlib.util
import os
import sys

SYSTEM_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)

# What happened, for `--verbose` and `gemma-mlx info` to report once.
status = "not Linux: MLX uses its own backend"


def wheel_candidates() -> list[str]:
    """The OpenBLAS of the ngsolve-openblas wheel, if installed (found without importing it: its __init__ loads
    the library itself and only prints a failure)."""
    spec = importlib.util.find_spec("ngsolve_openblas")
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(p for d in spec.submodule_search_locations for p in glob.glob(os.path.join(d, "libopenblas*.so*")))


def preload_openblas() -> str:
    global status
    if not sys.platform.startswith("linux"):
        return status
    if os.environ.get("GEMMA_MLX_NO_OPENBLAS"):
        status = "OpenBLAS preload disabled by GEMMA_MLX_NO_OPENBLAS: MLX uses its reference BLAS (slow)"
        return status
    if "mlx.core" in sys.modules:
        status = "mlx.core was imported before gemma_mlx: OpenBLAS not preloaded (import gemma_mlx first)"
        return status
    failures = []
    for path in wheel_candidates() + [p for p in SYSTEM_CANDIDATES if os.path.exists(p)]:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            failures.append(f"could not load {path}: {e}")
            continue
        status = "; ".join(failures + [f"using OpenBLAS from {path}"])
        return status
    status = "; ".join(failures + ["OpenBLAS not found (make install, or pip install ngsolve-openblas and apt-get "
                                   "install libgfortran5): MLX uses its reference BLAS (slow)"])
    return status
