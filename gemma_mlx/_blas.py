"""Give MLX a fast BLAS on Linux: load one before MLX with RTLD_GLOBAL.

The `mlx[cpu]` wheel links a reference BLAS whose float32 matmuls are 17-60x slower than an optimised one. A BLAS
loaded with RTLD_GLOBAL before `mlx.core` is imported takes over MLX's `cblas_*` calls. In order of preference:

- Intel MKL from the `mkl` wheel (the `mkl` extra, x86-64 Linux only). Decoding is matmuls of 1 to K+1 rows against
  weights read from memory, and there MKL is about twice as fast as OpenBLAS. Also, it is the MKL that torch's CPU
  wheel links, so torch (the test oracle) works in the same process. With OpenBLAS 0.3.33 it did not: its
  `cblas_sgemm_batch` replaced MKL's inside torch, and torch's bmm crashed. MKL runs on GNU OpenMP, the runtime torch
  uses, when the system has it.
- Debian's `libopenblas0-pthread` (`make install` installs it on Linux).

`GEMMA_MLX_BLAS=mkl|openblas|reference` picks one (reference: preload nothing); by default the best one found.
Processes of one `mlx.launch` on the same host (a pipeline tried on one machine) share its cores: each BLAS gets
cores / local ranks threads, since spinning OpenMP threads of several processes on the same cores made every round
of a split model ~10x slower.
This must run before the first `import mlx.core` in the process; `gemma_mlx/__init__.py` calls it first thing.
"""

import ctypes
import json
import os
import sys
from importlib import metadata

OPENBLAS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)

# What happened, for `--verbose` and `gemma-mlx info` to report once.
status = "not Linux: MLX uses its own backend"


def mkl_path() -> str | None:
    """libmkl_rt from the installed `mkl` wheel, if any."""
    try:
        files = metadata.files("mkl") or []
    except metadata.PackageNotFoundError:
        return None
    found = [os.path.normpath(f.locate()) for f in files if f.name.startswith("libmkl_rt.so")]
    return next((p for p in found if os.path.exists(p)), None)


def _threading_layer() -> str:
    """GNU OpenMP (torch's runtime) if the system has it, else the Intel OpenMP that the `mkl` wheel brings."""
    try:
        ctypes.CDLL("libgomp.so.1", mode=ctypes.RTLD_GLOBAL)
        return "GNU"
    except OSError:
        return "INTEL"


def candidates(choice: str):
    """(name, path) of the BLAS libraries to try, best first; `choice`: "" for any, or "mkl" / "openblas"."""
    if choice in ("", "mkl") and (path := mkl_path()):
        yield "MKL", path
    if choice in ("", "openblas"):
        yield from (("OpenBLAS", p) for p in OPENBLAS if os.path.exists(p))


def local_ranks() -> int:
    """How many processes of this mlx.launch (or mpirun) run on this host: 1 when not launched."""
    if n := os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE"):
        return int(n)
    path, rank = os.environ.get("MLX_HOSTFILE"), os.environ.get("MLX_RANK")
    if not path or rank is None:
        return 1
    try:  # the ring backend's hostfile: one list of "ip:port" per rank
        with open(path) as f:
            hosts = [addresses[0].rsplit(":", 1)[0] for addresses in json.load(f)]
        return hosts.count(hosts[int(rank)])
    except (OSError, ValueError, TypeError, IndexError, KeyError, AttributeError):
        return 1  # another backend's file (JACCL names devices): one rank per host


def share_cores():
    """Each of n local ranks gets cores / n BLAS threads (unless the user set them)."""
    if (n := local_ranks()) > 1:
        threads = str(max(1, (os.cpu_count() or 1) // n))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(var, threads)


def preload_blas() -> str:
    global status
    if not sys.platform.startswith("linux"):
        return status
    share_cores()
    notes, choice = [], os.environ.get("GEMMA_MLX_BLAS", "").lower()
    if choice not in ("", "mkl", "openblas", "reference"):
        notes.append(f"GEMMA_MLX_BLAS={choice!r} is not one of mkl, openblas, reference: ignored")
        choice = ""
    if choice == "reference":
        status = "GEMMA_MLX_BLAS=reference: MLX uses its reference BLAS (slow)"
        return status
    if "mlx.core" in sys.modules:
        status = "mlx.core was imported before gemma_mlx: no BLAS preloaded (import gemma_mlx first)"
        return status
    for name, path in candidates(choice):
        if name == "MKL":
            os.environ.setdefault("MKL_THREADING_LAYER", _threading_layer())  # read when MKL loads
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            notes.append(f"could not load {name} at {path}: {e}")
            continue
        status = "; ".join(notes + [f"using {name} from {path}"])
        return status
    wanted = {"mkl": "MKL (pip install mkl)", "openblas": "OpenBLAS"}.get(choice, "MKL or OpenBLAS")
    status = "; ".join(notes + [f"no {wanted} found (make install sets one up): MLX uses its reference BLAS (slow)"])
    return status
