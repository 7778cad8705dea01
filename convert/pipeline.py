"""convert(src, out): read config → resolve it → check every tensor's name and shape → stream tensors (rename,
split, cast, quantize) into shards in a temp dir → write config + tokenizer → rename. Spec §1.2, §1.5, §2.2, §6."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx

from gemma_mlx.config import ConfigError, DrafterConfig, TextConfig, model_kind, text_config_of

from . import quantize as q
from .safetensors_io import SafetensorsError, file_format, open_checkpoint
from .source import SourceError, resolve_source
from .weights import (drafter_model, expected_params, map_drafter_key, map_target_key, split_tensor,
                      target_model)
from .writer import atomic_dir, ShardWriter

DTYPES = {"bf16": mx.bfloat16, "fp16": mx.float16, "fp32": mx.float32}
SIDE_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja", "chat_template.json", "generation_config.json")


class ConvertError(ValueError):
    """A conversion that cannot be done; the message is one line for the user and nothing was written."""


def is_mlx_checkpoint(path) -> bool:
    """True for dirs written by MLX (ours, mlx-lm's, mlx-community's): their safetensors say format "mlx"."""
    try:
        return file_format(Path(path)) == "mlx"
    except SafetensorsError:
        return False


def read_config(path: Path) -> dict:
    f = path / "config.json"
    try:
        raw = json.loads(f.read_text())
    except FileNotFoundError:
        raise ConvertError(f"{path}: no config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{f}: unreadable ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConvertError(f"{f}: not a JSON object")
    return raw


def convert(src, out, dtype: str = "bf16", quantize: int | None = None, group_size: int = 64, force: bool = False,
            progress: bool = True) -> Path:
    """Convert a Hugging Face Gemma 4 target or assistant (local dir or hub id), or a Gemma 3 GGUF file, into an
    MLX dir at `out`."""
    from .gguf import GGUFError, convert_gguf

    try:
        if str(src).endswith(".gguf"):
            return convert_gguf(src, out, dtype, quantize, group_size, force, progress)
        return _convert(str(src), Path(out), dtype, quantize, group_size, force, progress)
    except (ConfigError, SafetensorsError, SourceError, q.QuantizeError, GGUFError) as e:
        raise ConvertError(str(e)) from None


def _convert(src, out, dtype, bits, group_size, force, progress) -> Path:
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype} is not supported (use bf16, fp16 or fp32)")
    q.check_request(bits, group_size)
    if out.exists() and not force:
        raise ConvertError(f"{out} already exists (use --force to replace it)")
    path = resolve_source(src, progress)
    raw = read_config(path)
    kind = model_kind(raw)
    if str(raw.get("model_type", "")).startswith("gemma4_unified"):
        raise ConvertError(f"{raw['model_type']}: not supported (see README, 'Not supported')")
    if is_mlx_checkpoint(path):
        raise ConvertError(f"{src} is already an MLX checkpoint: load it as is (gemma_mlx.load / gemma-mlx chat)")
    if kind == "target":
        cfg = TextConfig.from_dict(text_config_of(raw))
        model, map_key = target_model(cfg), lambda k: map_target_key(k, cfg)
        cfg_out = cfg.to_dict()
        cfg_out["eos_token_id"] = _eos_ids(path, raw, cfg)
    else:
        cfg = DrafterConfig.from_dict(raw)
        model, map_key = drafter_model(cfg), lambda k: map_drafter_key(k, cfg)
        cfg_out = cfg.to_dict()
    expected = expected_params(model)
    sources = open_checkpoint(path)
    plan = _plan(sources, map_key, expected)
    quantizable = q.quantizable_modules(model) if bits else set()
    with atomic_dir(out, force) as tmp:
        writer = ShardWriter(tmp)
        overrides = {}
        for src_key, names in _progress(plan, progress, f"converting {path.name}"):
            value = sources[src_key].get(src_key)
            for name, tensor in split_tensor(src_key, value, names):
                for k, v in _convert_tensor(name, tensor, DTYPES[dtype], bits, group_size, quantizable,
                                            overrides).items():
                    writer.add(k, v)
            del value
        writer.close()
        if bits:
            cfg_out["quantization"] = cfg_out["quantization_config"] = q.record(bits, group_size, overrides)
        (tmp / "config.json").write_text(json.dumps(cfg_out, indent=2))
        for name in SIDE_FILES:
            if (path / name).exists():
                shutil.copy(path / name, tmp / name)
    return out


def _plan(sources: dict, map_key, expected: dict) -> list[tuple[str, list[str]]]:
    """Every source tensor with the names it becomes; fails on a missing, unexpected or wrong-shape tensor before
    a byte is written."""
    plan, seen = [], set()
    for key in sorted(sources):
        names = map_key(key)
        if names is None:
            continue
        shape = sources[key].shape(key)
        if len(names) == 2:  # fused gate_up: [E, 2I, H] -> two [E, I, H]
            shape = shape[:-2] + (shape[-2] // 2, shape[-1])
        for name in names:
            if name not in expected:
                raise ConvertError(f"unexpected weight {key} (not part of this {_what(expected)} config)")
            if tuple(shape) != expected[name]:
                raise ConvertError(f"weight {key} has shape {list(sources[key].shape(key))}, the config implies "
                                   f"{list(expected[name])}")
            seen.add(name)
        plan.append((key, names))
    missing = sorted(set(expected) - seen)
    if missing:
        raise ConvertError(f"missing weight {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return plan


def _what(expected: dict) -> str:
    return "assistant" if "pre_projection.weight" in expected else "target"


def _convert_tensor(name, value, dtype, bits, group_size, quantizable, overrides) -> dict:
    if name.endswith("token_ordering"):
        return {name: value.astype(mx.int32)}  # an index table: integer, never quantized
    if mx.issubdtype(value.dtype, mx.floating):
        value = value.astype(dtype)
    module = name.removesuffix(".weight")
    if bits and name.endswith(".weight") and module in quantizable:
        chosen = q.plan(module, value.shape, bits, group_size)
        if chosen is None:
            overrides[module] = False
            return {name: value}
        if chosen != (bits, group_size):
            overrides[module] = {"group_size": chosen[1], "bits": chosen[0]}
        return q.quantize(module, value, *chosen)
    return {name: value}


def _eos_ids(path: Path, raw: dict, cfg: TextConfig) -> list[int]:
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
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(label, total=len(items))
        for item in items:
            yield item
            bar.advance(task)
