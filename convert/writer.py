"""Writing a converted checkpoint: shards of at most 5 GB with an index, into a hidden temp dir next to the output
that is renamed at the end, so a failed, interrupted or killed conversion never leaves a dir that looks complete."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx

MAX_SHARD_BYTES = 5 * 1024**3
INDEX = "model.safetensors.index.json"


class ShardWriter:
    """Holds converted tensors until the next one would push the shard past the limit, then writes the shard: at
    most one output shard is in memory."""

    def __init__(self, out: Path, max_bytes: int | None = None):
        self.out, self.max_bytes = Path(out), max_bytes or MAX_SHARD_BYTES
        self.pending: dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, value: mx.array):
        mx.eval(value)  # materialize now, so the source tensor it came from can be freed
        if self.pending and self.pending_bytes + value.nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = value
        self.pending_bytes += value.nbytes
        self.total_bytes += value.nbytes

    def flush(self):
        if not self.pending:
            return
        self.shards.append(list(self.pending))
        mx.save_safetensors(str(self.out / f"shard-{len(self.shards):05d}.safetensors"), self.pending,
                            metadata={"format": "mlx"})
        self.pending, self.pending_bytes = {}, 0
        mx.clear_cache()  # hand the shard's buffers back instead of keeping them in MLX's cache

    def close(self):
        """Name the shards model-0000i-of-0000n.safetensors (model.safetensors when one) and write the index."""
        self.flush()
        n = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards, 1):
            final = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / f"shard-{i:05d}.safetensors", self.out / final)
            weight_map.update({k: final for k in names})
        index = {"metadata": {"total_size": self.total_bytes, "format": "mlx"},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.out / INDEX).write_text(json.dumps(index, indent=2))


LOCK = ".converting"  # held (flock) by the conversion writing a temp dir; the kernel drops it when the process dies


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool):
    """Yield a temp dir `.NAME.tmp-*` next to `out` (same filesystem); on success it becomes `out` (an existing
    `out` is replaced only with force: renamed aside, the new dir renamed in, the old one deleted); on any failure or
    interrupt the temp dir is removed. Temp dirs that killed conversions of `out` left behind go first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    lock = open(tmp / LOCK, "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        yield tmp
        if os.path.lexists(out):
            if not force:
                raise FileExistsError(f"{out} already exists (use --force to replace it)")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        (out / LOCK).unlink()  # renamed with the dir, still held: no cleaner could take the dir before this
        lock.close()
    except BaseException:
        lock.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_leftovers(out: Path):
    """Delete `.NAME.tmp-*` / `.NAME.old-*` dirs next to `out` whose conversion is dead (kill -9, power loss): their
    lock is free. A live conversion of the same output holds its lock, and its dir stays."""
    for d in [*out.parent.glob(f".{glob.escape(out.name)}.tmp-*"), *out.parent.glob(f".{glob.escape(out.name)}.old-*")]:
        try:
            with open(d / LOCK, "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        except OSError:  # not a dir of ours any more (removed meanwhile, or unwritable): leave it
            continue
        shutil.rmtree(d, ignore_errors=True)
