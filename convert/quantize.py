"""Which tensors are quantized, at what width, and how it is recorded (the way mlx-lm records it, so both
`mlx_lm.load` and our loader rebuild the same quantized module tree)."""

from __future__ import annotations

import mlx.core as mx

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
MIN_BITS = {"router.proj": 8}  # the MoE router stays at ≥ 8 bits (its top-k is sensitive)


class QuantizeError(ValueError):
    pass


def check_request(bits, group_size):
    if bits is None:
        return
    if bits not in BITS:
        raise QuantizeError(f"--quantize {bits} is not supported (use 4 or 8)")
    if group_size not in GROUP_SIZES:
        raise QuantizeError(f"--group-size {group_size} is not supported (use 32, 64 or 128)")


def quantizable_modules(model) -> set[str]:
    """Paths of modules MLX can quantize (Linear, Embedding, SwitchLinear). Norms, `layer_scalar`,
    router scales and `token_ordering` are not modules of those kinds, so they are never quantized."""
    return {path for path, m in model.named_modules() if hasattr(m, "to_quantized") and path}


def plan(module: str, shape: tuple, bits: int, group_size: int):
    """(bits, group_size) for a quantizable module's weight, or None when it must stay unquantized."""
    if shape[-1] % group_size:
        return None
    for suffix, at_least in MIN_BITS.items():
        if module.endswith(suffix):
            return max(bits, at_least), group_size
    return bits, group_size


def quantize(module: str, weight: mx.array, bits: int, group_size: int) -> dict[str, mx.array]:
    wq, scales, biases = mx.quantize(weight, group_size=group_size, bits=bits)
    return {f"{module}.weight": wq, f"{module}.scales": scales, f"{module}.biases": biases}


def record(bits: int, group_size: int, overrides: dict) -> dict:
    """mlx-lm's config entry: defaults, plus per-path entries ({bits, group_size} or False)."""
    return {"group_size": group_size, "bits": bits, "mode": "affine", **overrides}
