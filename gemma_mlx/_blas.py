"""Load the system OpenBLAS before MLX on Linux.

The `mlx[cpu]` wheel links a reference BLAS whose float32 matmuls are 17-60x slower than OpenBLAS. Loading Debian's
`libopenblas0-pthread` with RTLD_GLOBAL before `mlx.core` is imported makes MLX's `cblas_*` calls resolve to it.
This must run before the first `import mlx.core` in the process; `gemma_mlx/__init__.py` calls it first thing.
"""

import ctypes
import os
import sys

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)

# What happened, for `--verbose` and `gemma-mlx info` to report once.
status = "not Linux: MLX uses its own backend"


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
    for path in CANDIDATES:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as e:
                status = f"could not load OpenBLAS at {path}: {e}"
                continue
            status = f"using OpenBLAS from {path}"
            return status
    status = "OpenBLAS not found (apt-get install libopenblas0-pthread): MLX uses its reference BLAS (slow)"
    return status
