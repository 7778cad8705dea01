"""convert(src, out): read the config → resolve it → check every tensor's name and shape against the layout the
config implies → stream the tensors (rename, split, cast, quantize) into shards in a temp dir → write the config and
tokenizer files → rename the temp dir to `out`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx

from ..models import ConfigError, family_name, model_kind
from ..models.gemma4_assistant import DrafterConfig
from ..models.gemma4_text import WRAPPERS, TextConfig, text_config_of
from . import quantize as q
from . import weights as w
from .safetensors_io import SafetensorsError, open_checkpoint, tensors
from .source import SIDE_FILES, SourceError, is_mlx_checkpoint, read_config, resolve_source
from .writer import ShardWriter, atomic_dir

DTYPES = {"bf16": mx.bfloat16, "fp16": mx.float16, "fp32": mx.float32}


class ConvertError(ValueError):
    """A conversion that cannot be done; the message is one line for the user, and nothing was written."""


def default_dtype() -> str:
    """The fast float type on the backend in use: fp32 on MLX's CPU backend (where bf16 and fp16 matmuls decode
    about 4x slower), bf16 on Metal and CUDA."""
    return "fp32" if mx.default_device() == mx.cpu else "bf16"


def convert(src, out, dtype: str | None = None, quantize: int | None = None, group_size: int = 64,
            force: bool = False, progress: bool = True) -> Path:
    """Convert a Hugging Face Gemma 4 target or assistant (local dir or hub id), or a Gemma 3 GGUF file, into an MLX
    dir at `out` (bf16/fp16/fp32 floats, by default `default_dtype()`, optionally 4/8-bit affine quantized with group
    size 32/64/128); an MLX checkpoint only when re-quantizing it. Returns `out`."""
    from .gguf import GGUFError, convert_gguf

    dtype = dtype or default_dtype()
    try:
        if str(src).endswith(".gguf"):
            return convert_gguf(src, out, dtype, quantize, group_size, force, progress)
        return _convert(str(src), Path(out).expanduser(), dtype, quantize, group_size, force, progress)
    except (ConfigError, SafetensorsError, SourceError, q.QuantizeError, w.WeightsError, GGUFError) as e:
        raise ConvertError(_one_line(str(e))) from None
    except OSError as e:  # disk full, permissions, a file vanishing mid-read: the temp dir is already gone
        raise ConvertError(_one_line(f"conversion failed: {e}")) from None


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _convert(src: str, out: Path, dtype: str, bits: int | None, group_size: int, force: bool, progress: bool):
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype} is not supported (use bf16, fp16 or fp32)")
    q.check_request(bits, group_size)
    if out.exists() and not force:
        raise ConvertError(f"{out} already exists (use --force to replace it)")
    path = resolve_source(src, progress)
    raw = read_config(path)
    mlx = is_mlx_checkpoint(path)
    if mlx and not bits:
        raise ConvertError(f"{src} is already an MLX checkpoint: load it as is, or re-quantize it (--quantize 4|8)")

    model_type, kind = raw.get("model_type"), model_kind(raw)
    hf_quant = raw.get("quantization_config") or (raw.get("text_config") or {}).get("quantization_config")
    if not mlx and hf_quant:
        method = hf_quant.get("quant_method", "unknown method") if isinstance(hf_quant, dict) else hf_quant
        raise ConvertError(f"{src} is a pre-quantized Hugging Face checkpoint ({method}): convert the unquantized "
                           "release (and pass --quantize to quantize it here)")
    if family_name(raw) == "gemma3_text":
        raise ConvertError(f"model_type {model_type}: Gemma 3 converts from a GGUF file only (pass the .gguf path)")
    if kind == "target":
        cfg = TextConfig.from_dict(text_config_of(raw))
        layout, what = w.target_layout(cfg), "target config"
        wrapper = model_type in WRAPPERS  # multimodal wrappers: text under model.language_model.
        names_of = lambda k: w.target_names(k, cfg, wrapper=wrapper, mlx=mlx)  # noqa: E731
        cfg_out = cfg.to_dict()
        cfg_out["eos_token_id"] = _eos_ids(path, raw, cfg)
    else:
        if raw.get("tie_word_embeddings", True) is False:
            raise ConvertError(f"{model_type} with an untied LM head (tie_word_embeddings=false) is not supported")
        cfg = DrafterConfig.from_dict(raw)
        layout, what = w.drafter_layout(cfg), "assistant config"
        names_of = w.drafter_names
        cfg_out = cfg.to_dict()

    source = tensors(open_checkpoint(path))
    if mlx:
        source = q.unpack(source, raw.get("quantization") or raw.get("quantization_config"))
    plan = w.plan(source, names_of, layout, what)  # every name and shape checked before a byte is written
    quantizer = q.Quantizer(bits, group_size, layout.quantizable)
    with atomic_dir(out, force) as tmp:
        writer = ShardWriter(tmp)
        for tensor, names in _progress(plan, progress, f"converting {path.name}"):
            for name, value in w.split(names, tensor.read()):
                for k, v in quantizer(name, _cast(name, value, DTYPES[dtype])).items():
                    writer.add(k, v)
        writer.close()
        if kind == "target" and wrapper and raw.get("vision_config"):
            _write_vision(source, raw, tmp / "vision", DTYPES[dtype], bits, group_size)
        if rec := quantizer.record():
            cfg_out["quantization"] = cfg_out["quantization_config"] = rec
        for name in SIDE_FILES:
            if (path / name).is_file():
                shutil.copyfile(path / name, tmp / name)
        (tmp / "config.json").write_text(json.dumps(cfg_out, indent=2) + "\n")  # last: the dir is complete
    return out


def _write_vision(source, raw: dict, out: Path, dtype, bits: int | None, group_size: int):
    """The vision tower and embed_vision with their config, in `vision/`: the target loads without them, and they
    load when an image arrives. Quantized as the target is (its linear layers whose width the group size divides)."""
    named = {n: t for t in source if (n := w.vision_name(t.name))}
    if not named:
        return
    linears = {n.removesuffix(".weight") for n in named if n.endswith((".linear.weight", "input_proj.weight",
                                                                       "embedding_projection.weight"))}
    quantizer = q.Quantizer(bits, group_size, linears)
    weights = {}
    for name, t in named.items():
        weights.update(quantizer(name, _cast(name, t.read(), dtype)))
    out.mkdir()
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    cfg = w.vision_settings_of(raw)
    if rec := quantizer.record():
        cfg["quantization"] = rec
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _cast(name: str, value: mx.array, dtype) -> mx.array:
    """Floats to the requested dtype; `token_ordering` (an index table) to int32; other integers as they are."""
    if name.endswith("token_ordering"):
        return value.astype(mx.int32)
    return value.astype(dtype) if mx.issubdtype(value.dtype, mx.floating) else value


def _eos_ids(path: Path, raw: dict, cfg: TextConfig) -> list[int]:
    """Every end id: the config's and generation_config.json's (Gemma 4 has several)."""
    ids = list(cfg.eos_token_id or [])
    gen = path / "generation_config.json"
    if gen.exists():
        e = json.loads(gen.read_text()).get("eos_token_id")
        ids += [i for i in (e if isinstance(e, list) else [e]) if isinstance(i, int) and i not in ids]
    return ids


def _progress(items, enabled: bool, label: str):
    if not enabled:
        yield from items
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=len(items))
        for item in items:
            yield item
            bar.advance(task)
