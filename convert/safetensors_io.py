"""Reading safetensors one tensor at a time, so a conversion holds one input tensor (never a whole shard or model),
with the checks that catch a truncated or corrupt file before anything is written: headers are parsed here (sizes,
dtypes, byte ranges against the file size), tensor data is read by MLX (which also handles bf16)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
          "U8": np.uint8, "BOOL": np.bool_}
INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 2**20


class SafetensorsError(ValueError):
    pass


def read_header(path: Path) -> tuple[dict, int]:
    """(header, offset of the data) of a safetensors file; the header is only parsed, not checked."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError(f"{path.name}: truncated (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(path.stat().st_size - 8, MAX_HEADER_BYTES):
                raise SafetensorsError(f"{path.name}: corrupt or truncated header")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path.name}: unreadable safetensors header ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path.name}: corrupt header (not a JSON object)")
    return header, 8 + n


class SafetensorsFile:
    """One file: its checked header, and its tensors on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        header, self.data_start = read_header(self.path)
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header
        size = self.path.stat().st_size
        end = 0
        for name, e in header.items():
            try:
                dtype, shape, (lo, hi) = e["dtype"], [int(d) for d in e["shape"]], e["data_offsets"]
            except (TypeError, KeyError, ValueError):
                raise SafetensorsError(f"{self.path.name}: corrupt header entry for {name}") from None
            if dtype not in DTYPES:
                raise SafetensorsError(f"{self.path.name}: tensor {name} has unsupported dtype {dtype}")
            nbytes = np.dtype(DTYPES[dtype]).itemsize * int(np.prod(shape, dtype=np.int64))
            if not 0 <= lo <= hi or hi - lo != nbytes:
                raise SafetensorsError(f"{self.path.name}: corrupt header (tensor {name} has the wrong byte size)")
            end = max(end, hi)
        if self.data_start + end != size:
            raise SafetensorsError(f"{self.path.name}: truncated or corrupt (data is {size - self.data_start} bytes, "
                                   f"the header says {end})")

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def get(self, name: str) -> mx.array:
        """The tensor, lazily: MLX reads its bytes straight into the array when it is evaluated (one copy, and only
        this tensor: the other arrays of the file are dropped unread)."""
        try:
            return mx.load(str(self.path), format="safetensors")[name]
        except (RuntimeError, ValueError, KeyError) as e:
            raise SafetensorsError(f"{self.path.name}: cannot read tensor {name} ({e})") from None


@dataclass
class Tensor:
    """A tensor of the source checkpoint: its name, its (logical) shape, and how to read it."""

    name: str
    shape: tuple[int, ...]
    read: Callable[[], mx.array]


def checkpoint_files(path: Path) -> list[Path]:
    """The weight files of a dir: those its index names, else every *.safetensors."""
    index = Path(path) / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise SafetensorsError(f"{INDEX}: unreadable ({type(e).__name__})") from None
        missing = [n for n in names if not (Path(path) / n).is_file()]
        if missing:
            raise SafetensorsError(f"{INDEX} names {missing[0]}, which is missing")
        return [Path(path) / n for n in names]
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise SafetensorsError(f"{path}: no *.safetensors weight files")
    return files


def open_checkpoint(path: Path) -> dict[str, SafetensorsFile]:
    """tensor name -> the file holding it, for every weight file of a dir (headers read and checked, no data)."""
    where: dict[str, SafetensorsFile] = {}
    for f in checkpoint_files(path):
        st = SafetensorsFile(f)
        for k in st.keys():
            if k in where:
                raise SafetensorsError(f"tensor {k} appears in both {where[k].path.name} and {f.name}")
            where[k] = st
    index = Path(path) / INDEX
    if index.exists():
        listed = set(json.loads(index.read_text())["weight_map"])
        if listed != set(where):
            k = sorted(listed ^ set(where))[0]
            raise SafetensorsError(f"{INDEX} and the weight files disagree about tensor {k}")
    return where


def tensors(checkpoint: dict[str, SafetensorsFile]) -> list[Tensor]:
    return [Tensor(k, f.shape(k), lambda k=k, f=f: f.get(k)) for k, f in sorted(checkpoint.items())]


def peek_names(path: Path) -> tuple[set[str], set[str]]:
    """(tensor names, `format` metadata values) of a dir's weight files, read from headers only, unchecked; empty
    sets when there is nothing readable."""
    names, formats = set(), set()
    for f in sorted(Path(path).glob("*.safetensors")):
        try:
            header, _ = read_header(f)
        except SafetensorsError:
            continue
        formats.add(str((header.pop("__metadata__", None) or {}).get("format")))
        names |= set(header)
    return names, formats
