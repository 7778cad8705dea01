"""What SRC is: a local dir or a Hugging Face hub id (fetched with huggingface_hub), its config.json, and whether it
is already an MLX checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .safetensors_io import peek_names

SIDE_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja", "chat_template.json", "generation_config.json", "processor_config.json",
              "preprocessor_config.json")
ALLOW_PATTERNS = ["config.json", *SIDE_FILES, "*.safetensors", "*.safetensors.index.json"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MLX_KEY = re.compile(r"^language_model\.|\.switch_glu\.|\.scales$")  # mlx-lm / mlx-vlm names, quantized tensors


class SourceError(ValueError):
    pass


def resolve_source(src: str, progress: bool = True) -> Path:
    """A local dir as is; a hub id ("org/name") downloaded (only the files a conversion needs) into the hub cache."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise SourceError(f"{src}: not a directory")
    if not HUB_ID.match(str(src)):
        raise SourceError(f"{src}: no such directory, and not a hub id like 'google/gemma-4-e2b-it'")
    import huggingface_hub
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        return Path(huggingface_hub.snapshot_download(repo_id=str(src), allow_patterns=ALLOW_PATTERNS))
    except Exception as e:  # offline, unknown or gated repo, ...: one line for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SourceError(f"cannot download {src} from the Hugging Face hub: {first} "
                          "(offline? point at a local dir instead)") from None
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()


def read_config(path: Path) -> dict:
    f = Path(path) / "config.json"
    try:
        raw = json.loads(f.read_text())
    except FileNotFoundError:
        raise SourceError(f"{path}: no config.json (not a model directory)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        why = str(e).splitlines()[0] if isinstance(e, json.JSONDecodeError) else type(e).__name__
        raise SourceError(f"{f}: unreadable ({why})") from None
    if not isinstance(raw, dict):
        raise SourceError(f"{f}: not a JSON object")
    return raw


def is_mlx_checkpoint(path) -> bool:
    """True for a dir whose weights are in MLX form already (ours, mlx-lm's, mlx-community's): its config carries
    mlx-lm's "quantization" record, or its safetensors say format "mlx", or its tensor names are MLX ones
    (`language_model.model.…`, `….switch_glu.…`, `….scales`). Reads config.json and the headers only; never raises."""
    path = Path(path)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raw = None
    if isinstance(raw, dict) and "quantization" in raw:
        return True
    names, formats = peek_names(path)
    return "mlx" in formats or any(MLX_KEY.search(k) for k in names)
