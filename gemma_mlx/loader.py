"""Loading: a converted (or already-MLX) checkpoint dir, a Hugging Face dir, or a hub id → target / drafter.

A dir in Hugging Face layout, or a hub id, is converted once into the cache dir (`GEMMA_MLX_HOME`, default
`~/.cache/gemma-mlx`) and loaded from there afterwards. Weights and quantization are read with mlx-lm's
`load_model` given our own model classes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import dequantize_model, load_model, load_tokenizer

from .convert.safetensors_io import SafetensorsError, open_checkpoint
from .convert.weights import vision_settings_of
from .models.gemma4_vision import Vision, VisionConfig
from .draft_length import K_MAX
from .models import ConfigError, family, matmul, model_kind
from .models.gemma4_assistant import Drafter, DrafterConfig, check_pair
from .models.gemma4_text import Target, text_config_of
from .pipeline import Split, SplitError, layer_bytes, plan

CONVERSION = 3  # v2: GGUFs get a chat template; v3: multimodal wrappers keep their vision tower


class LoadError(ValueError):
    """A model that cannot be loaded; the message is one line for the user."""


def cache_home() -> Path:
    return Path(os.environ.get("GEMMA_MLX_HOME", Path.home() / ".cache" / "gemma-mlx"))


def read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise LoadError(f"{path}: no config.json (not a model directory)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise LoadError(f"{path}/config.json: unreadable ({e})") from None


def resolve(source: str | Path, dtype: str | None = None, progress: bool = True) -> Path:
    """A loadable MLX dir for `source`: itself if already MLX, else its conversion in the cache dir (in `dtype`, by
    default the backend's fast one: `convert.default_dtype()`)."""
    from .convert import convert, default_dtype, is_mlx_checkpoint

    path = Path(source).expanduser()
    if path.is_dir():
        check_weights(path)
        if is_mlx_checkpoint(path):
            return path
    if not path.is_dir() and path.suffix != ".gguf" and (path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") != 1):
        raise LoadError(f"{source}: no such model directory (and not a hub id like 'google/gemma-4-e2b-it')")
    local = path.exists()
    dtype = dtype or default_dtype()
    # CONVERSION bumps when the converter writes more, so old conversions are redone
    tag = hashlib.sha256(f"{path.resolve() if local else source}|{dtype}|{CONVERSION}".encode()).hexdigest()[:12]
    name = (path.name if local else str(source).replace("/", "--")) + f"-{dtype}-{tag}"
    out = cache_home() / "converted" / name
    if not (out / "config.json").exists():
        from .convert import ConvertError

        try:
            convert(str(source), out, dtype=dtype, progress=progress)
        except ConvertError as e:
            raise LoadError(str(e)) from None
    check_weights(out)
    return out


def check_weights(path: Path) -> dict:
    """Every weight file's header parsed and its byte ranges checked against the file's size (headers only): a
    truncated download or a damaged file is one line here, not a failure deep inside the load. Returns the
    checkpoint's tensor -> file map (`open_checkpoint`)."""
    if not (path / "config.json").exists():
        return {}  # read_config says so
    try:
        return open_checkpoint(path)
    except SafetensorsError as e:
        raise LoadError(f"{path}: {e}: re-download or re-convert it") from None


@dataclass
class Description:
    """A checkpoint as its files describe it (config.json and weight headers, or a GGUF's metadata): `gemma-mlx
    info` without converting or loading anything."""

    path: Path
    raw: dict  # config.json (for a GGUF: the config its conversion writes)
    config: object  # TextConfig, DrafterConfig or Gemma3Config
    parameters: int  # weights' elements (quantized ones unpacked; scales and biases not counted)
    nbytes: int
    dtypes: list  # as the files name them: F32, BF16, U32 (packed quantized), Q4_K, ...
    sizes: list | None  # (tensor name, bytes) of an MLX or Hugging Face dir: what a pipeline split places

    @property
    def is_drafter(self) -> bool:
        return isinstance(self.config, DrafterConfig)


def describe(source: str | Path) -> Description:
    """Describe a model dir (MLX or Hugging Face), a Gemma 3 GGUF file or a hub id (downloaded, not converted)."""
    from .convert import ConvertError
    from .convert.gguf import GGUFError, describe_gguf
    from .convert.source import SourceError, resolve_source

    path = Path(source).expanduser()
    try:
        sizes = None
        if path.suffix == ".gguf" and path.is_file():
            raw, tensors = describe_gguf(path)
        else:
            if not path.is_dir():
                path = resolve_source(str(source), progress=True)
            raw = read_config(path)
            bits = (raw.get("quantization") or {}).get("bits")
            files = check_weights(path)
            tensors = [(f.dtype(k), _elements(k, f.shape(k), f.dtype(k), bits), _nbytes(f, k))
                       for k, f in files.items()]
            sizes = [(k, _nbytes(f, k)) for k, f in files.items()]
        config = family(raw).config_of(raw)
    except (ConfigError, GGUFError, SourceError, ConvertError) as e:
        raise LoadError(f"{source}: {e}") from None
    return Description(path, raw, config, sum(n for _, n, _ in tensors), sum(b for _, _, b in tensors),
                       sorted({t for t, n, _ in tensors if n}), sizes)


def _nbytes(f, name: str) -> int:
    start, end = f.entries[name]["data_offsets"]
    return end - start


def _elements(name: str, shape, dtype: str, bits) -> int:
    """Parameters a tensor holds: quantization's scales and biases count none, a packed uint32 32 // bits each."""
    if name.endswith((".scales", ".biases")):
        return 0
    n = math.prod(shape)
    return n * 32 // bits if dtype == "U32" and bits else n


def _classes(config: dict):
    """mlx-lm's get_model_classes: the family's Model and its config (mlx-lm calls `from_dict` on the raw dict)."""
    fam = family(config)
    return fam.Model, type("Args", (), {"from_dict": staticmethod(fam.config_of)})


def load_checkpoint(path: Path, lazy: bool = False) -> nn.Module:
    """A Target or a Drafter from an MLX dir, whichever its config says (`lazy`: weights read when first used)."""
    raw = read_config(path)
    try:
        model_kind(raw)
        model, _ = load_model(path, lazy=lazy, get_model_classes=_classes)
    except ConfigError as e:
        raise LoadError(f"{path}: {e}") from None
    except (ValueError, FileNotFoundError) as e:
        raise LoadError(f"{path}: {str(e).splitlines()[0]}") from None
    return model


def eos_ids(path: Path, raw: dict) -> list[int]:
    """Every end-of-sequence id: config and generation_config (Gemma 4 has several)."""
    ids = []
    sources = [raw, text_config_of(raw)]
    gen = path / "generation_config.json"
    if gen.exists():
        sources.append(json.loads(gen.read_text()))
    for src in sources:
        e = src.get("eos_token_id")
        for i in e if isinstance(e, list) else [e]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def load_target(source, dtype: str | None = None, progress: bool = True, group=None):
    """(Target, tokenizer wrapper, path) for a target source; with a distributed `group`, this rank's part of a
    pipeline split (pipeline.py), only its weights read."""
    path = resolve_in_turn(source, dtype, progress, group)
    model = load_checkpoint(path, lazy=group is not None)
    if isinstance(model, Drafter):
        raise LoadError(f"{source} is a drafter ({model.config.model_type}), not a target model")
    if group is not None:
        split_target(model, path, group)
    try:
        tokenizer = load_tokenizer(path, eos_token_ids=eos_ids(path, read_config(path)))
    except Exception as e:  # tokenizers raise many kinds; the user needs the one line
        raise LoadError(f"{path}: cannot load the tokenizer ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    matmul.calibrate(model.projection_weights(), K_MAX + 1, cache_home() / "matmul.json")  # a verify's rows: 1 + K
    return model, tokenizer, path


def resolve_in_turn(source, dtype: str | None, progress: bool, group) -> Path:
    """`resolve`; in a distributed group rank 0 first (ranks on one machine then find its conversion), and only it
    shows progress."""
    if group is None:
        return resolve(source, dtype, progress)
    path = resolve(source, dtype, progress) if group.rank() == 0 else None
    mx.eval(mx.distributed.all_sum(mx.array(1), group=group))
    return path or resolve(source, dtype, progress=False)


def split_target(model: Target, path: Path, group):
    """Keep this rank's part of the target (pipeline.plan over the checkpoint's weight bytes) and read its weights."""
    sizes = [(name, _nbytes(f, name)) for name, f in check_weights(path).items()]
    n = model.config.num_hidden_layers
    try:
        split = Split(plan(model.config, group.size(), layer_bytes(sizes, n)), group)
    except SplitError as e:
        raise LoadError(f"{path}: {e}") from None
    model.pipeline(split)
    mx.eval(model.parameters())
    split.share_layout(sum(v.nbytes for _, v in tree_flatten(model.parameters())))


def load_vision(path) -> tuple[Vision, dict]:
    """The vision tower and its projection of a converted multimodal target (`vision/` beside its weights), and its
    config (vision_config, the image token ids, soft tokens per image)."""
    d = Path(path) / "vision"
    if (d / "config.json").is_file():
        raw, weights = vision_settings(path), mx.load(str(d / "model.safetensors"))
    else:
        raw, weights = wrapper_vision(Path(path))
    model = Vision(VisionConfig.from_dict(raw["vision_config"], raw["text_hidden_size"]))
    if rec := raw.get("quantization"):  # the layers the converter quantized: those with scales
        nn.quantize(model, rec["group_size"], rec["bits"], class_predicate=lambda p, m: f"{p}.scales" in weights)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model, raw


def wrapper_vision(path: Path) -> tuple[dict, dict]:
    """The vision tower of an MLX multimodal wrapper as mlx-vlm writes it (`vision_tower.…` beside
    `language_model.…`, maybe quantized): (its config, float weights)."""
    from .convert.quantize import unpack
    from .convert.safetensors_io import tensors
    from .convert.weights import vision_name

    raw = vision_settings(path)
    if raw is None:
        raise LoadError(f"{path} has no vision tower, so it cannot take images (convert the multimodal gemma4 "
                        "checkpoint to get one)")
    config = read_config(path)
    source = unpack(tensors(open_checkpoint(path)), config.get("quantization"))
    return raw, {n: t.read() for t in source if (n := vision_name(t.name))}


def vision_settings(path) -> dict | None:
    """The vision config of a target dir (the converter's vision/config.json, or an MLX wrapper's config.json):
    vision_config, text_hidden_size, the image token ids, soft tokens per image, and `processor`, the image
    processor's settings (processor_config.json or preprocessor_config.json); None without a vision tower."""
    d = Path(path) / "vision" / "config.json"
    raw = json.loads(d.read_text()) if d.is_file() else vision_settings_of(read_config(Path(path)))
    if raw is None:
        return None
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (Path(path) / name).is_file():
            config = json.loads((Path(path) / name).read_text())
            raw["processor"] = config.get("image_processor", config)
            break
    return raw


def load_drafter(source, target: Target, dtype: str | None = None, progress: bool = True) -> Drafter:
    path = resolve_in_turn(source, dtype, progress, target.split.group)
    model = load_checkpoint(path, lazy=not target.split.last)  # under a split only the last rank drafts
    if not isinstance(model, Drafter):
        raise LoadError(f"{source} is a target model, not a drafter (gemma4_assistant)")
    if target.split.last and mx.default_device() == mx.cpu and any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
        # MLX's CPU kernels for quantized matmuls and embedding gathers at a drafter's sizes are ~3x slower than
        # float32 ones (a demo draft step: 13 ms 4-bit, 4.5 ms fp32): a quantized drafter is kept small on disk and
        # runs in float32 on the CPU backend (on Metal and CUDA, as stored)
        dequantize_model(model)
        model.set_dtype(mx.float32)
        mx.eval(model.parameters())  # now, in this thread: a lazy graph cannot be evaluated from another (a server's)
    check_pair(target.config, model.config)
    return model
