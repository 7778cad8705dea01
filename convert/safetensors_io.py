"""Reading safetensors one tensor at a time (so a conversion holds one tensor in, one shard out), with the checks
that catch truncated or corrupt files before anything is written."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U32": np.uint32, "BOOL": np.bool_}


class SafetensorsError(ValueError):
    pass


class SafetensorsFile:
    """The header of one file, and its tensors on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise SafetensorsError(f"{self.path.name}: truncated (no header)")
                (n,) = struct.unpack("<Q", raw)
                if n > size - 8:
                    raise SafetensorsError(f"{self.path.name}: corrupt or truncated header")
                header = json.loads(f.read(n))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{self.path.name}: unreadable safetensors ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries = header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end != size:
            raise SafetensorsError(f"{self.path.name}: truncated or corrupt (data is {size - self.data_start} bytes, "
                                   f"header says {end})")
        for name, e in header.items():
            if e.get("dtype") not in DTYPES:
                raise SafetensorsError(f"{self.path.name}: tensor {name} has unsupported dtype {e.get('dtype')}")
            itemsize = 2 if e["dtype"] == "BF16" else np.dtype(DTYPES[e["dtype"]]).itemsize
            lo, hi = e["data_offsets"]
            if hi - lo != itemsize * int(np.prod(e["shape"], dtype=np.int64)):
                raise SafetensorsError(f"{self.path.name}: tensor {name} has the wrong byte size")

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple:
        return tuple(self.entries[name]["shape"])

    def get(self, name: str) -> mx.array:
        e = self.entries[name]
        lo, hi = e["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + lo)
            buf = f.read(hi - lo)
        a = np.frombuffer(buf, dtype=DTYPES[e["dtype"]]).reshape(e["shape"])
        if e["dtype"] == "BF16":
            return mx.array(a).view(mx.bfloat16)
        return mx.array(a)


def open_checkpoint(path: Path) -> dict[str, SafetensorsFile]:
    """tensor name -> the file holding it, for every *.safetensors in a dir (index-checked when there is one)."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise SafetensorsError(f"{path}: no *.safetensors files")
    where = {}
    for f in files:
        st = SafetensorsFile(f)
        for k in st.keys():
            if k in where:
                raise SafetensorsError(f"tensor {k} appears in both {where[k].path.name} and {f.name}")
            where[k] = st
    index = Path(path) / "model.safetensors.index.json"
    if index.exists():
        try:
            listed = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise SafetensorsError(f"{index.name}: unreadable ({e})") from None
        missing = sorted(set(listed) - set(where))
        if missing:
            raise SafetensorsError(f"the index lists {missing[0]} but no shard holds it (missing shard?)")
    return where


def file_format(path: Path) -> str | None:
    """The `format` metadata of a dir's first safetensors file ("mlx" for MLX checkpoints, "pt" for HF)."""
    files = sorted(Path(path).glob("*.safetensors"))
    return SafetensorsFile(files[0]).metadata.get("format") if files else None
