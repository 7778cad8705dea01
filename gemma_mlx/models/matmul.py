"""x @ W.T for a few rows, in whichever of its two forms the CPU's BLAS does faster.

Decoding and verifying multiply 1 to K+1 rows by each weight. A BLAS can do that as x @ W.T (its sgemm, which may
repack W on every call) or as (W @ x.T).T (W streamed once), and which is faster depends on the BLAS and the CPU:
on one x86-64 machine MKL's x @ W.T cost 4x the other form for four rows through the 262144-row head, on another
the other form cost 2.5x x @ W.T for two rows through every layer (bench/README.md). So on the CPU backend
`calibrate` times both forms for each weight shape and row count a round can have, and `linear` takes the faster.
The choice is kept in GEMMA_MLX_HOME per CPU, BLAS and MLX version, so it is measured once per machine. On Metal and
CUDA `linear` is x @ W.T.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

import mlx.core as mx

WEIGHT_FIRST: set = set()  # (out, in, dtype name, rows) where (W @ x.T).T was the faster form
CALIBRATED: set = set()  # (out, in, dtype name) measured in this process


def linear(x: mx.array, weight: mx.array) -> mx.array:
    rows = x.size // x.shape[-1]
    if (*weight.shape, str(weight.dtype), rows) not in WEIGHT_FIRST:
        return x @ weight.T
    return (weight @ x.reshape(rows, -1).T).T.reshape(*x.shape[:-1], weight.shape[0])


def seconds(weight: mx.array, rows: int, weight_first: bool, repeats: int = 3) -> float:
    """The best of `repeats` timed products of `rows` rows by `weight`, in one form."""
    x = mx.random.normal((rows, weight.shape[1])).astype(weight.dtype)
    mx.eval(x)
    product = (lambda: (weight @ x.T).T) if weight_first else (lambda: x @ weight.T)
    mx.eval(product())
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(product())
        best = min(best, time.perf_counter() - start)
    return best


def machine() -> str:
    from .. import _blas

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return f"{cpu} | {os.cpu_count()} cpus | {_blas.status} | mlx {mx.__version__}"


def calibrate(weights, max_rows: int, store: Path | None = None, timer=seconds):
    """For each weight (an mx.array; one per shape is enough) and 2..max_rows rows, use the faster form from now on.
    Choices already in `store` (a JSON file) for this machine are read, not measured; new ones are added to it."""
    if mx.default_device() != mx.cpu:
        return
    known = _read(store)
    mine = known.setdefault(machine(), {})
    changed = False
    for w in weights:
        shape = (*w.shape, str(w.dtype))
        name = "x".join(map(str, w.shape)) + f" {w.dtype}"
        if shape in CALIBRATED and name in mine:
            continue
        if name not in mine or len(mine[name]["measured"]) < max_rows - 1:
            faster = [r for r in range(2, max_rows + 1) if timer(w, r, True) < timer(w, r, False)]
            mine[name], changed = {"measured": list(range(2, max_rows + 1)), "weight_first": faster}, True
        WEIGHT_FIRST.difference_update({e for e in WEIGHT_FIRST if e[:3] == shape})
        WEIGHT_FIRST.update((*shape, r) for r in mine[name]["weight_first"])
        CALIBRATED.add(shape)
    if changed and store is not None:
        _write(store, known)


def _read(store: Path | None) -> dict:
    try:
        data = json.loads(store.read_text()) if store is not None and store.exists() else {}
    except (OSError, ValueError):  # unreadable or damaged: measure again
        return {}
    return data if isinstance(data, dict) else {}


def _write(store: Path, data: dict):
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f".{store.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(store)
    except OSError:  # a read-only home: the choice holds for this process only
        pass
