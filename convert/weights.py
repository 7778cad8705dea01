"""Hugging Face tensor names → gemma-mlx (= mlx-lm for targets) names, and the table every converted tensor is
checked against: the parameters of our own model classes, instantiated lazily (MLX does not allocate unevaluated
arrays), so the runtime's module tree is the one source of truth for names and shapes."""

from __future__ import annotations

import re

import mlx.core as mx
from mlx.utils import tree_flatten

from gemma_mlx.config import DrafterConfig, TextConfig
from gemma_mlx.drafter import Drafter
from gemma_mlx.target import Target

DROPPED_PREFIXES = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.",
                    "model.multi_modal_projector.", "model.vision_embedder.")
DROPPED_SUFFIXES = ("rotary_emb.inv_freq", "input_min", "input_max", "output_min", "output_max")


def expected_params(model) -> dict[str, tuple]:
    """name -> shape of every parameter of a lazily built model."""
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def target_model(cfg: TextConfig) -> Target:
    return Target(cfg)


def drafter_model(cfg: DrafterConfig) -> Drafter:
    return Drafter(cfg)


def map_target_key(key: str, cfg: TextConfig) -> list[str] | None:
    """The MLX names a HF target tensor becomes (two for a fused expert gate_up), or None to drop it."""
    key = key.replace("model.language_model.", "model.", 1)
    if key.startswith(DROPPED_PREFIXES) or key.endswith(DROPPED_SUFFIXES):
        return None
    if key == "lm_head.weight" and cfg.tie_word_embeddings:
        return None
    m = re.match(r"model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm)\.", key)
    if m and int(m.group(1)) >= cfg.first_shared_layer:  # consumers reuse their producer's K/V (spec §1.4)
        return None
    if key.endswith(".experts.gate_up_proj"):
        base = key.removesuffix(".gate_up_proj")
        return [f"{base}.switch_glu.gate_proj.weight", f"{base}.switch_glu.up_proj.weight"]
    if key.endswith(".experts.down_proj"):
        return [key.removesuffix(".down_proj") + ".switch_glu.down_proj.weight"]
    return [key]


def map_drafter_key(key: str, cfg: DrafterConfig) -> list[str] | None:
    if key == "lm_head.weight":  # tied to model.embed_tokens.weight
        return None
    if key.endswith(DROPPED_SUFFIXES):
        return None
    return [key]


def split_tensor(key: str, value: mx.array, names: list[str]) -> list[tuple[str, mx.array]]:
    """gate_up_proj [E, 2I, H]: rows 0…I−1 are the gate, I…2I−1 the up projection (spec §1.3.5)."""
    if len(names) == 1:
        return [(names[0], value)]
    gate, up = mx.split(value, 2, axis=-2)
    return [(names[0], gate), (names[1], up)]
