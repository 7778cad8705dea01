"""The converter (installed as `gemma_mlx.convert`): Hugging Face Gemma 4 checkpoints (and Gemma 3 GGUF files) →
MLX dirs that `mlx_lm.load` and gemma-mlx load.

    convert(src, out, dtype=None, quantize=None, group_size=64, force=False, progress=True) -> Path
    default_dtype() -> "fp32" on MLX's CPU backend, "bf16" on Metal and CUDA (what dtype=None means)
    is_mlx_checkpoint(dir) -> bool
"""

from .pipeline import ConvertError, convert, default_dtype
from .source import is_mlx_checkpoint

__all__ = ["ConvertError", "convert", "default_dtype", "is_mlx_checkpoint"]
