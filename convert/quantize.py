"""Which tensors are quantized, at what width, and how that is recorded: the way mlx-lm's `quantize_model` records
it, so `mlx_lm.load`, our loader, and `mlx.nn.quantize` with a class_predicate reading the record all rebuild the
same module tree. Also the reverse, for re-quantizing an MLX-quantized checkpoint: its packed tensors read back as
floats.

Record (config.json "quantization", copied to "quantization_config"):
    {"group_size": 64, "bits": 4, "mode": "affine",
     "model.layers.0.router.proj": {"group_size": 64, "bits": 8},   # a module with its own width
     "model.layers.0.per_layer_projection": false}                   # quantizable module left in float
Every module not listed is quantized with the defaults iff MLX can quantize it (Linear, Embedding, SwitchLinear).
"""

from __future__ import annotations

import mlx.core as mx

from .safetensors_io import Tensor

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
MIN_BITS = {"router.proj": 8}  # the MoE router stays at ≥ 8 bits (its top-k is sensitive), as in mlx-lm


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
    """Paths of the modules of an MLX model that MLX can quantize (Linear, Embedding, SwitchLinear)."""
    return {path for path, m in model.named_modules() if hasattr(m, "to_quantized") and path}


def plan(module: str, shape: tuple, bits: int, group_size: int):
    """(bits, group_size) for a quantizable module's weight, or None when it must stay in float."""
    if len(shape) < 2 or shape[-1] % group_size:
        return None
    for suffix, at_least in MIN_BITS.items():
        if module.endswith(suffix):
            return max(bits, at_least), group_size
    return bits, group_size


def quantize(module: str, weight: mx.array, bits: int, group_size: int) -> dict[str, mx.array]:
    wq, scales, biases = mx.quantize(weight, group_size=group_size, bits=bits, mode="affine")
    return {f"{module}.weight": wq, f"{module}.scales": scales, f"{module}.biases": biases}


def record(bits: int, group_size: int, overrides: dict) -> dict:
    """mlx-lm's config entry: the defaults, then per-module entries ({bits, group_size} or False)."""
    return {"group_size": group_size, "bits": bits, "mode": "affine", **dict(sorted(overrides.items()))}


class Quantizer:
    """Quantizes the `.weight` of the modules in `quantizable` (norms, `layer_scalar`, router scales and
    `token_ordering` are never among them) and collects the per-module record entries."""

    def __init__(self, bits: int | None, group_size: int, quantizable: set[str]):
        self.bits, self.group_size, self.quantizable = bits, group_size, quantizable
        self.overrides: dict[str, dict | bool] = {}

    def __call__(self, name: str, value: mx.array) -> dict[str, mx.array]:
        module = name.removesuffix(".weight")
        if not self.bits or not name.endswith(".weight") or module not in self.quantizable:
            return {name: value}
        chosen = plan(module, value.shape, self.bits, self.group_size)
        if chosen is None:
            self.overrides[module] = False
            return {name: value}
        if module.endswith(tuple(MIN_BITS)):
            self.overrides[module] = {"group_size": chosen[1], "bits": chosen[0]}
        return quantize(module, value, *chosen)

    def record(self) -> dict | None:
        return record(self.bits, self.group_size, self.overrides) if self.bits else None


def unpack(tensors: list[Tensor], rec: dict | None) -> list[Tensor]:
    """The tensors of an MLX checkpoint as float ones: each quantized `<p>.weight` (with `<p>.scales`, `<p>.biases`)
    becomes one `<p>.weight` of its logical shape, dequantized when read, with the widths its record gives."""
    by_name = {t.name: t for t in tensors}
    packed = {t.name.removesuffix(".scales") for t in tensors
              if t.name.endswith(".scales") and t.name.removesuffix(".scales") + ".weight" in by_name}
    if packed and not isinstance(rec, dict):
        raise QuantizeError("the checkpoint has quantized weights but config.json has no quantization record")
    out = []
    for t in tensors:
        base = t.name.rsplit(".", 1)[0]
        if base not in packed:
            out.append(t)
        elif t.name.endswith(".weight"):
            out.append(_unpacked(t, by_name[base + ".scales"], by_name.get(base + ".biases"), rec, base))
    return out


def _unpacked(w: Tensor, scales: Tensor, biases: Tensor | None, rec: dict, module: str) -> Tensor:
    params = rec[module] if isinstance(rec.get(module), dict) else rec
    bits, group_size = params.get("bits", rec.get("bits")), params.get("group_size", rec.get("group_size"))
    mode = params.get("mode", rec.get("mode", "affine"))
    if not isinstance(bits, int) or not isinstance(group_size, int) or bits <= 0 or group_size <= 0:
        raise QuantizeError(f"quantization record gives no bits/group_size for {module}")
    cols = w.shape[-1] * 32 // bits
    if cols % group_size or tuple(scales.shape) != (*w.shape[:-1], cols // group_size) or \
            (mode == "affine" and biases is None):
        raise QuantizeError(f"{module}: its packed shapes do not match the quantization record "
                            f"({bits} bits, group size {group_size}, mode {mode})")

    def read():
        return mx.dequantize(w.read(), scales.read(), biases.read() if biases is not None else None,
                             group_size=group_size, bits=bits, mode=mode)

    return Tensor(w.name, (*w.shape[:-1], cols), read)
