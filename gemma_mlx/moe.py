"""The MoE experts of Gemma 4 (spec §1.3.5) with expert-union verification.

mlx-lm's SwitchGLU computes every (token, expert) pair as its own product, so a verify step over B×(K+1) tokens
reads expert weights B×(K+1)×top_k times even when tokens share experts. For multi-token steps this module routes
all tokens, groups them by expert, and runs each selected expert once over all its tokens (`gather_mm` /
`gather_qmm` with one right-hand matrix per distinct expert): the cost grows with the number of distinct experts.
Single-token decode keeps SwitchGLU's path (top_k distinct experts; nothing to share). Parameter names are
mlx-lm's (`experts.switch_glu.{gate,up,down}_proj`), quantized or not.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.gemma4_text import GeGLU
from mlx_lm.models.switch_layers import SwitchGLU


class Experts(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.switch_glu = SwitchGLU(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts,
                                    activation=GeGLU(), bias=False)
        self.union = True  # False: mlx-lm's per-pair path everywhere (for the bench's comparison)

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        """x [..., H], indices/weights [..., top_k] -> [..., H]."""
        tokens = int(np.prod(x.shape[:-1]))
        if tokens == 1 or not self.union:
            return (self.switch_glu(x, indices) * weights[..., None]).sum(-2)
        return self._union(x, indices, weights)

    def _union(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        shape, k = x.shape, indices.shape[-1]
        x = x.reshape(-1, shape[-1])
        flat = np.array(indices).reshape(-1)  # routing must be known on the host to group tokens (one sync)
        order = np.argsort(flat, kind="stable")
        experts, starts, counts = np.unique(flat[order], return_index=True, return_counts=True)
        if len(experts) > 0.8 * len(flat):  # little sharing: grouping would only add gathers
            return (self.switch_glu(x, indices.reshape(-1, k)) * weights.reshape(-1, k, 1)).sum(-2).reshape(shape)
        groups = int(counts.max())
        rank = np.arange(len(flat)) - np.repeat(starts, counts)  # position of each sorted pair in its group
        group_of = np.repeat(np.arange(len(experts)), counts)
        table = np.zeros((len(experts), groups), dtype=np.int32)  # token index per (expert, slot); pad = token 0
        table[group_of, rank] = order // k
        slot = np.empty(len(flat), dtype=np.int32)  # where each (token, choice) pair's output lands
        slot[order] = group_of * groups + rank
        e = mx.array(experts.astype(np.int32))
        xg = x[mx.array(table)]  # [U, G, H]
        s = self.switch_glu
        y = s.down_proj(s.activation(s.up_proj(xg, e), s.gate_proj(xg, e)), e)  # each distinct expert once: [U, G, H]
        y = y.reshape(-1, shape[-1])[mx.array(slot)].reshape(-1, k, shape[-1])
        return (y * weights.reshape(-1, k, 1)).sum(1).reshape(shape)
