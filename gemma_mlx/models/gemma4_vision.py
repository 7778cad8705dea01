"""Gemma 4's vision tower (`gemma4_vision`) and its projection into the text model's embedding space.

An image arrives as patches (the image processor's `pixel_values`: [B, patches, 3·p·p] in [0, 1], and
`pixel_position_ids`: each patch's (x, y) in the patch grid, (-1, -1) for padding). The tower:

    patches·2 − 1 → input_proj + learned x and y position embeddings →
    N encoder layers (bidirectional attention over the image's patches, axial 2-D RoPE: the first half of each head
      rotated by x, the second by y; q, k and v RMS-normed, scale 1; sandwich norms; GeGLU MLP) →
    average pooling of k×k patch blocks (k² = patches / soft tokens) × √hidden → padding dropped →
    (standardize) → embed_vision: RMSNorm without scale, Linear to the text hidden size.

The result is one soft token per pooled block, [soft tokens, text hidden]: what replaces the image's placeholder
tokens in the text model's input. Names follow the checkpoint's (`vision_tower.…`, `embed_vision.…`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .base import Linear, RMSNorm, geglu, rms_norm, sandwich_norms


@dataclass
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "axial", "rope_theta": 100.0})
    text_hidden_size: int = 0  # embed_vision's output: the text model's hidden size

    @classmethod
    def from_dict(cls, vision: dict, text_hidden_size: int) -> "VisionConfig":
        names = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in vision.items() if k in names and v is not None})
        config.text_hidden_size = text_hidden_size
        if config.rope_parameters.get("rope_type", "axial") != "axial":
            raise ValueError(f"vision rope {config.rope_parameters} is not supported (axial only)")
        return config


class ClippableLinear(nn.Module):
    """A bias-free Linear, its input and output clamped to the checkpoint's ranges when it has them."""

    def __init__(self, n_in: int, n_out: int, clipped: bool):
        super().__init__()
        self.linear = Linear(n_in, n_out, bias=False)
        if clipped:  # the checkpoint's values replace these
            self.input_min, self.input_max = mx.array(-mx.inf), mx.array(mx.inf)
            self.output_min, self.output_max = mx.array(-mx.inf), mx.array(mx.inf)

    def __call__(self, x: mx.array) -> mx.array:
        if "input_min" in self:
            return mx.clip(self.linear(mx.clip(x, self.input_min, self.input_max)), self.output_min, self.output_max)
        return self.linear(x)


def axial_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x [B, T, heads, D]: its first half rotated by the patches' x angles, its second by their y angles, each half
    as non-interleaved RoPE (rotate-half). cos, sin: [B, T, 1, D/2] per half, stacked on the last axis."""
    out = []
    for part, c, s in zip(mx.split(x, 2, axis=-1), mx.split(cos, 2, axis=-1), mx.split(sin, 2, axis=-1)):
        a, b = mx.split(part, 2, axis=-1)
        out.append(part * c + mx.concatenate([-b, a], axis=-1) * s)
    return mx.concatenate(out, axis=-1)


def rope_angles(positions: mx.array, head_dim: int, theta: float) -> tuple[mx.array, mx.array]:
    """(cos, sin) [B, T, 1, D] of the patch positions [B, T, 2]: per axis, angles pos · θ^(−2i/(D/2)) repeated twice
    (rotate-half layout), the x half then the y half."""
    half = head_dim // 2
    inv_freq = 1.0 / theta ** (mx.arange(0, half, 2, dtype=mx.float32) / half)
    angles = positions.astype(mx.float32)[..., None] * inv_freq  # [B, T, 2, half/2]
    x, y = angles[:, :, 0], angles[:, :, 1]
    angles = mx.concatenate([x, x, y, y], axis=-1)[:, :, None, :]
    return mx.cos(angles), mx.sin(angles)


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.eps = c.num_attention_heads, c.num_key_value_heads, c.head_dim, \
            c.rms_norm_eps
        self.q_proj = ClippableLinear(c.hidden_size, c.num_attention_heads * c.head_dim, c.use_clipped_linears)
        self.k_proj = ClippableLinear(c.hidden_size, c.num_key_value_heads * c.head_dim, c.use_clipped_linears)
        self.v_proj = ClippableLinear(c.hidden_size, c.num_key_value_heads * c.head_dim, c.use_clipped_linears)
        self.o_proj = ClippableLinear(c.num_attention_heads * c.head_dim, c.hidden_size, c.use_clipped_linears)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: mx.array) -> mx.array:
        B, T, _ = x.shape
        q = axial_rope(self.q_norm(self.q_proj(x).reshape(B, T, self.heads, -1)), cos, sin)
        k = axial_rope(self.k_norm(self.k_proj(x).reshape(B, T, self.kv_heads, -1)), cos, sin)
        v = rms_norm(self.v_proj(x).reshape(B, T, self.kv_heads, -1), None, self.eps)
        o = mx.fast.scaled_dot_product_attention(*(t.transpose(0, 2, 1, 3) for t in (q, k, v)), scale=1.0, mask=mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, T, -1))


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.gate_proj = ClippableLinear(c.hidden_size, c.intermediate_size, c.use_clipped_linears)
        self.up_proj = ClippableLinear(c.hidden_size, c.intermediate_size, c.use_clipped_linears)
        self.down_proj = ClippableLinear(c.intermediate_size, c.hidden_size, c.use_clipped_linears)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x)))


class VisionLayer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.self_attn = VisionAttention(c)
        self.mlp = VisionMLP(c)
        sandwich_norms(self, c.hidden_size, c.rms_norm_eps)

    def __call__(self, x, cos, sin, mask):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class PatchEmbedder(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.input_proj = Linear(3 * c.patch_size**2, c.hidden_size, bias=False)
        self.position_embedding_table = mx.ones((2, c.position_embedding_size, c.hidden_size))

    def __call__(self, patches: mx.array, positions: mx.array, padding: mx.array) -> mx.array:
        clamped = mx.maximum(positions, 0)
        pos = self.position_embedding_table[0][clamped[..., 0]] + self.position_embedding_table[1][clamped[..., 1]]
        return self.input_proj(2 * (patches - 0.5)) + mx.where(padding[..., None], 0.0, pos)


class VisionEncoder(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layers = [VisionLayer(c) for _ in range(c.num_hidden_layers)]


class VisionTower(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        self.patch_embedder = PatchEmbedder(c)
        self.encoder = VisionEncoder(c)
        if c.standardize:
            self.std_bias, self.std_scale = mx.zeros((c.hidden_size,)), mx.ones((c.hidden_size,))

    def __call__(self, patches: mx.array, positions: mx.array) -> mx.array:
        """[B, patches, 3·p·p], [B, patches, 2] -> the images' pooled features, padding dropped: [soft tokens, D]."""
        c = self.config
        padding = mx.all(positions == -1, axis=-1)  # [B, T]
        x = self.patch_embedder(patches, positions, padding)
        cos, sin = rope_angles(positions, c.head_dim, c.rope_parameters.get("rope_theta", 100.0))
        mask = mx.where(padding[:, None, None, :], -mx.inf, 0.0).astype(x.dtype)  # padding keys are not attended
        for layer in self.encoder.layers:
            x = layer(x, cos, sin, mask)
        x = mx.where(padding[..., None], 0.0, x)
        pooled, valid = pool(x, positions, patches.shape[1] // c.pooling_kernel_size**2)
        pooled = pooled.astype(mx.float32) * math.sqrt(c.hidden_size)
        keep = np.flatnonzero(np.array(valid).reshape(-1))  # the blocks that hold image patches, image by image
        pooled = pooled.reshape(-1, pooled.shape[-1])[mx.array(keep)]
        if c.standardize:
            pooled = (pooled - self.std_bias) * self.std_scale
        return pooled.astype(x.dtype)


def pool(x: mx.array, positions: mx.array, length: int) -> tuple[mx.array, mx.array]:
    """Average over k×k blocks of the patch grid (k² = patches / length), by each patch's position: [B, length, D]
    and which of the `length` outputs received a patch (the others are padding)."""
    T = x.shape[1]
    if length == T:
        return x, ~mx.all(positions == -1, axis=-1)
    k = int(math.isqrt(T // length))
    if k * k * length != T:
        raise ValueError(f"cannot pool {T} patches to {length} soft tokens")
    clamped = mx.maximum(positions, 0)
    width = mx.max(clamped[..., 0], axis=-1, keepdims=True) + 1
    block = clamped[..., 0] // k + (width // k) * (clamped[..., 1] // k)  # [B, T]
    weights = (block[..., None] == mx.arange(length)).astype(mx.float32) / (k * k)  # [B, T, length]
    return weights.transpose(0, 2, 1) @ x.astype(mx.float32), mx.any(weights != 0, axis=1)


class VisionEmbedder(nn.Module):
    """embed_vision: soft tokens into the text model's embedding space."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.eps = c.rms_norm_eps
        self.embedding_projection = Linear(c.hidden_size, c.text_hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.embedding_projection(rms_norm(x, None, self.eps))


class Vision(nn.Module):
    """The tower and its projection: images (as patches) -> soft tokens in the text embedding space."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.vision_tower = VisionTower(c)
        self.embed_vision = VisionEmbedder(c)

    def __call__(self, patches: mx.array, positions: mx.array) -> mx.array:
        return self.embed_vision(self.vision_tower(patches, positions))
