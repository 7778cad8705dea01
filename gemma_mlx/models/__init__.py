"""The model families, one file per model_type as in mlx-lm's models/ (`gemma4_text.py`, `gemma3_text.py`,
`gemma4_assistant.py`; `moe.py` and `base.py` shared), and the one registry of model types that the loader and the
converter read. Each family module has its config dataclass at the top, `Model` (the nn.Module) and
`config_of(raw config.json) -> config`."""

from __future__ import annotations

import importlib

from .base import ConfigError

TARGETS = {"gemma4_text": "gemma4_text", "gemma4": "gemma4_text", "gemma4_unified": "gemma4_text",
           "gemma4_unified_text": "gemma4_text", "gemma3_text": "gemma3_text", "gemma3": "gemma3_text"}
DRAFTERS = {"gemma4_assistant": "gemma4_assistant", "gemma4_unified_assistant": "gemma4_assistant"}


def model_kind(raw: dict) -> str:
    """'target' or 'drafter', or a ConfigError naming the unknown model_type."""
    mt = raw.get("model_type")
    if mt in TARGETS:
        return "target"
    if mt in DRAFTERS:
        return "drafter"
    raise ConfigError(f"unknown model_type {mt!r} (supported: {', '.join([*TARGETS, *DRAFTERS])})")


def family_name(raw: dict) -> str:
    """The family module's name for a config: gemma4_text, gemma3_text or gemma4_assistant."""
    return {**TARGETS, **DRAFTERS}[raw.get("model_type")] if model_kind(raw) else ""


def family(raw: dict):
    """The family module of a config (imported on first use, as mlx-lm does)."""
    return importlib.import_module(f"{__name__}.{family_name(raw)}")
