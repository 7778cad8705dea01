"""Where a checkpoint comes from: a local dir, or a Hugging Face hub id fetched with huggingface_hub."""

from __future__ import annotations

import re
from pathlib import Path

ALLOW_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                  "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "*.safetensors",
                  "model.safetensors.index.json"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    (enable_progress_bars if progress else disable_progress_bars)()
    try:
        return Path(snapshot_download(str(src), allow_patterns=ALLOW_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated repo, ...: one line for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SourceError(f"cannot download {src} from the Hugging Face hub: {first} "
                          "(offline? point at a local dir instead)") from None
