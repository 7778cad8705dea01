"""Names and shapes: the tensors a converted checkpoint must hold, computed from the resolved
config, and the map from each source layout's names to them.

Target names are mlx-lm's `gemma4_text.Model` parameter tree exactly (so `mlx_lm.load` reads our output, and
mlx-community checkpoints are the same format); drafter names are the Hugging Face names unchanged. Source layouts:
`gemma4_text` (`model.…`), the multimodal wrapper `gemma4` (`model.language_model.…` plus towers, dropped), the
assistants (no prefix), and already-MLX dirs (`model.…`, or mlx-lm's wrapper form `language_model.model.…`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import mlx.core as mx
from mlx.utils import tree_flatten

from ..models.base import FULL
from ..models.gemma4_assistant import DrafterConfig
from ..models.gemma4_text import TextConfig, text_config_of

# Multimodal parts that a text runtime drops, as HF (`model.` prefix) and as MLX wrappers (no prefix) name them.
TOWERS = ("vision_tower.", "audio_tower.", "embed_vision.", "embed_audio.", "multi_modal_projector.",
          "vision_embedder.")
# Buffers that are never weights: RoPE tables of old exports, the towers' clipped-linear bounds.
BUFFERS = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq", ".input_min", ".input_max", ".output_min",
           ".output_max")
KV_OF_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(?:k_proj|v_proj|k_norm)\.")


class WeightsError(ValueError):
    pass


@dataclass
class Layout:
    """The tensors of a converted model: name -> shape, and the paths of the modules MLX can quantize (Linear,
    Embedding, SwitchLinear), whose `<path>.weight` may be quantized."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    quantizable: set[str] = field(default_factory=set)

    def module(self, path: str, *shape: int):
        self.shapes[f"{path}.weight"] = shape
        self.quantizable.add(path)

    def param(self, name: str, *shape: int):
        self.shapes[name] = shape


def _decoder_layer(lay: Layout, cfg: TextConfig, i: int, p: str):
    """Layer i of a Gemma 4 text stack (target or assistant), under prefix p."""
    H, heads, D, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
    lay.module(p + "self_attn.q_proj", heads * D, H)
    lay.param(p + "self_attn.q_norm.weight", D)
    lay.module(p + "self_attn.o_proj", H, heads * D)
    if i < cfg.first_shared_layer:  # producers own K/V; consumers reuse an earlier layer's
        lay.module(p + "self_attn.k_proj", kv * D, H)
        lay.param(p + "self_attn.k_norm.weight", D)
        if not (cfg.attention_k_eq_v and cfg.layer_types[i] == FULL):
            lay.module(p + "self_attn.v_proj", kv * D, H)
    I = cfg.mlp_size(i)
    lay.module(p + "mlp.gate_proj", I, H)
    lay.module(p + "mlp.up_proj", I, H)
    lay.module(p + "mlp.down_proj", H, I)
    for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"):
        lay.param(p + norm + ".weight", H)
    lay.param(p + "layer_scalar", 1)
    if P := cfg.hidden_size_per_layer_input:
        lay.module(p + "per_layer_input_gate", P, H)
        lay.module(p + "per_layer_projection", H, P)
        lay.param(p + "post_per_layer_input_norm.weight", H)
    if cfg.enable_moe_block:
        E, Im = cfg.num_experts, cfg.moe_intermediate_size
        lay.module(p + "router.proj", E, H)
        lay.param(p + "router.scale", H)
        lay.param(p + "router.per_expert_scale", E)
        lay.module(p + "experts.switch_glu.gate_proj", E, Im, H)
        lay.module(p + "experts.switch_glu.up_proj", E, Im, H)
        lay.module(p + "experts.switch_glu.down_proj", E, H, Im)
        for norm in ("pre_feedforward_layernorm_2", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2"):
            lay.param(p + norm + ".weight", H)


def target_layout(cfg: TextConfig) -> Layout:
    lay = Layout()
    H, N = cfg.hidden_size, cfg.num_hidden_layers
    lay.module("model.embed_tokens", cfg.vocab_size, H)
    if P := cfg.hidden_size_per_layer_input:
        lay.module("model.embed_tokens_per_layer", cfg.vocab_size_per_layer_input, N * P)
        lay.module("model.per_layer_model_projection", N * P, H)
        lay.param("model.per_layer_projection_norm.weight", P)
    for i in range(N):
        _decoder_layer(lay, cfg, i, f"model.layers.{i}.")
    lay.param("model.norm.weight", H)
    if not cfg.tie_word_embeddings:
        lay.module("lm_head", cfg.vocab_size, H)
    return lay


def drafter_layout(cfg: DrafterConfig) -> Layout:
    t, lay = cfg.text, Layout()
    d, H = t.hidden_size, cfg.backbone_hidden_size
    lay.module("pre_projection", d, 2 * H)
    lay.module("post_projection", H, d)
    lay.module("model.embed_tokens", t.vocab_size, d)
    for i in range(t.num_hidden_layers):
        _decoder_layer(lay, t, i, f"model.layers.{i}.")
    lay.param("model.norm.weight", d)
    if cfg.use_ordered_embeddings:
        lay.module("masked_embedding.centroids", cfg.num_centroids, d)
        lay.param("masked_embedding.token_ordering", t.vocab_size)
    return lay


def expected_params(model) -> dict[str, tuple]:
    """name -> shape of every parameter of a lazily built model (MLX allocates nothing until evaluated)."""
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


# --- source names -> converted names ----------------------------------------------------------------------------


def _unwrap(key: str) -> str | None:
    """A wrapper's text-stack name as a `gemma4_text` name (HF: `model.language_model.X`; mlx-lm / mlx-vlm:
    `language_model.model.X`, `language_model.lm_head`); None for its multimodal parts."""
    if key.removeprefix("model.").startswith(TOWERS):
        return None
    if key.startswith("language_model."):
        return key.removeprefix("language_model.")
    if key.startswith("model.language_model."):
        return "model." + key.removeprefix("model.language_model.")
    return key


VISION = ("vision_tower.", "embed_vision.")
VISION_KEYS = ("vision_config", "image_token_id", "boi_token_id", "eoi_token_id", "vision_soft_tokens_per_image")


def vision_settings_of(raw: dict) -> dict | None:
    """What the vision tower needs from a multimodal wrapper's config (vision_config, the image token ids, soft
    tokens per image, the text hidden size it projects to); None without a vision tower."""
    if not raw.get("vision_config"):
        return None
    return {**{k: raw[k] for k in VISION_KEYS if k in raw}, "text_hidden_size": text_config_of(raw)["hidden_size"]}


def vision_name(key: str) -> str | None:
    """A wrapper's vision tensor under gemma4_vision.Vision's name (`vision_tower.…`, `embed_vision.…`; its
    clipped-linear bounds included), or None."""
    key = key.removeprefix("model.")
    if key.startswith(VISION) and not key.endswith(("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")):
        return key
    return None


def target_names(key: str, cfg: TextConfig, wrapper: bool, mlx: bool) -> list[str]:
    """The converted names of a target tensor: [] to drop it, two for a fused expert gate_up."""
    if wrapper or mlx:
        key = _unwrap(key)
        if key is None:
            return []
    if key.endswith(BUFFERS) or (key == "lm_head.weight" and cfg.tie_word_embeddings):
        return []
    if (m := KV_OF_LAYER.search(key)) and int(m.group(1)) >= cfg.first_shared_layer:
        return []  # consumers reuse their producer's K/V; HF lists these as ignorable
    if key.endswith(".experts.gate_up_proj"):
        base = key.removesuffix(".gate_up_proj")
        return [f"{base}.switch_glu.gate_proj.weight", f"{base}.switch_glu.up_proj.weight"]
    if key.endswith(".experts.down_proj"):
        return [key.removesuffix(".down_proj") + ".switch_glu.down_proj.weight"]
    return [key]


def drafter_names(key: str) -> list[str]:
    """The converted names of an assistant tensor (its HF name, unchanged): [] to drop it."""
    if key == "lm_head.weight" or key.endswith(BUFFERS):  # the LM head is tied to model.embed_tokens
        return []
    if KV_OF_LAYER.search(key):  # every assistant layer is a consumer: no K/V of its own
        return []
    return [key]


def split(names: list[str], value):
    """[(name, tensor)] of a source tensor: gate_up_proj [E, 2I, H] -> gate (rows 0…I−1), up (rows I…2I−1)."""
    if len(names) == 1:
        return [(names[0], value)]
    gate, up = mx.split(value, 2, axis=-2)
    return [(names[0], mx.contiguous(gate)), (names[1], mx.contiguous(up))]


def _source_shape(names: list[str], layout: Layout) -> tuple[int, ...]:
    """The shape a source tensor must have to become `names`."""
    shape = layout.shapes[names[0]]
    return shape if len(names) == 1 else (*shape[:-2], 2 * shape[-2], shape[-1])


def plan(tensors, names_of, layout: Layout, what: str) -> list[tuple[object, list[str]]]:
    """[(source tensor, converted names)] for every tensor kept; fails on an unexpected, wrong-shape or missing
    tensor before anything is read or written."""
    out, seen = [], set()
    for t in tensors:
        names = names_of(t.name)
        if not names:
            continue
        for name in names:
            if name not in layout.shapes:
                raise WeightsError(f"unexpected weight {t.name} (not part of this {what})")
            if name in seen:
                raise WeightsError(f"weight {name} appears twice in the checkpoint")
            seen.add(name)
        if tuple(t.shape) != (expected := _source_shape(names, layout)):
            raise WeightsError(f"weight {t.name} has shape {list(t.shape)}, the config implies {list(expected)}")
        out.append((t, names))
    missing = sorted(set(layout.shapes) - seen)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"missing weight {missing[0]}{more}")
    return out
