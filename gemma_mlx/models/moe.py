"""The MoE experts of Gemma 4 with expert-union verification.

mlx-lm's SwitchGLU runs one product per (token, expert) pair: a verify step over B×(K+1) tokens reads expert
weights B×(K+1)×top_k times even when tokens share experts. It sorts the pairs by expert once there are >= 64 of
them (`sorted_indices`), which only Metal's kernel uses; MLX's CPU `gather_mm` / `gather_qmm` still run one M=1
product per pair, sorted or not, and verify steps of a few rows never reach 64 pairs anyway. For multi-token steps
this module routes all tokens, groups them by expert, and runs each selected expert once over all its tokens
(`gather_mm` / `gather_qmm` with one right-hand matrix per distinct expert, M = its token count): the cost grows
with the number of distinct experts, not with tokens×top_k. Experts are bucketed by token count rounded up to a
power of two, so padding rows stay under 2× the real ones (one bucket padded to the busiest expert costs more
than the per-pair path when routing is uneven). Single-token decode keeps SwitchGLU's path (top_k distinct
experts; nothing to share).

Two CPU exceptions, both from MLX's CPU kernels: quantized experts keep the per-pair path there (the CPU
`gather_qmm` costs the same per row whatever M, so grouping only adds the padding rows), and bf16/fp16 experts,
which the CPU `gather_mm` refuses (float32 only), always take the grouped path with each expert's matrix gathered
and multiplied by a plain matmul. Parameter names are mlx-lm's (`experts.switch_glu.{gate,up,down}_proj`),
quantized or not.
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

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        """x [..., H], indices/weights [..., top_k] -> [..., H]."""
        tokens = int(np.prod(x.shape[:-1]))
        on_cpu, quantized = mx.default_device() == mx.cpu, "scales" in self.switch_glu.up_proj
        half_on_cpu = on_cpu and not quantized and self.switch_glu.up_proj.weight.dtype != mx.float32
        if half_on_cpu or (tokens > 1 and not (on_cpu and quantized)):
            return self._grouped(x, indices, weights, matmul=half_on_cpu)
        return (self.switch_glu(x, indices) * weights[..., None]).sum(-2)

    def _grouped(self, x: mx.array, indices: mx.array, weights: mx.array, matmul: bool = False) -> mx.array:
        shape, k = x.shape, indices.shape[-1]
        x = x.reshape(-1, shape[-1])
        flat = np.array(indices).reshape(-1)  # routing must be known on the host to group tokens (one sync)
        order = np.argsort(flat, kind="stable")  # (token, choice) pairs grouped by expert
        experts, starts, counts = np.unique(flat[order], return_index=True, return_counts=True)
        if len(experts) == len(flat) and not matmul:  # no expert shared: grouping would only add gathers
            return (self.switch_glu(x, indices.reshape(-1, k)) * weights.reshape(-1, k, 1)).sum(-2).reshape(shape)
        expert_of = np.repeat(np.arange(len(experts)), counts)  # per sorted pair: which distinct expert
        rank = np.arange(len(flat)) - np.repeat(starts, counts)  # per sorted pair: its place in that expert's group
        size = 1 << np.ceil(np.log2(counts)).astype(np.int64)  # group size per expert: count rounded up to 2^n
        slot = np.empty(len(flat), dtype=np.int64)  # where each (token, choice) pair's output lands
        s, outs, base = self.switch_glu, [], 0
        project = _matmul if matmul else (lambda proj, xg, e: proj(xg, e))
        for g in np.unique(size):
            members = np.nonzero(size == g)[0]
            row = np.zeros(len(experts), dtype=np.int64)
            row[members] = np.arange(len(members))
            pairs = size[expert_of] == g
            table = np.zeros((len(members), g), dtype=np.int32)  # token per (expert, slot); padding = token 0
            table[row[expert_of[pairs]], rank[pairs]] = order[pairs] // k
            slot[order[pairs]] = base + row[expert_of[pairs]] * g + rank[pairs]
            base += len(members) * int(g)
            e = mx.array(experts[members].astype(np.int32))
            xg = x[mx.array(table)]  # [U_g, g, H]
            h = s.activation(project(s.up_proj, xg, e), project(s.gate_proj, xg, e))
            outs.append(project(s.down_proj, h, e).reshape(-1, shape[-1]))  # each expert once over its tokens
        y = (mx.concatenate(outs) if len(outs) > 1 else outs[0])[mx.array(slot)].reshape(-1, k, shape[-1])
        return (y * weights.reshape(-1, k, 1)).sum(1).reshape(shape)


def _matmul(proj, x: mx.array, e: mx.array) -> mx.array:
    """x [U, G, in] times the matrices of experts e [U] of one unquantized SwitchLinear, without gather_mm."""
    return x @ proj.weight[e].swapaxes(-1, -2)
