"""The converter (installed as `gemma_mlx.convert`): Hugging Face Gemma 4 checkpoints (and Gemma 3 GGUF files) →
MLX dirs that `mlx_lm.load` and gemma-mlx load.

    convert(src, out, dtype="bf16", quantize=None, group_size=64, force=False, progress=True) -> Path
    is_mlx_checkpoint(dir) -> bool
"""

from .pipeline import ConvertError, convert
from .source import is_mlx_checkpoint

__all__ = ["ConvertError", "convert", "is_mlx_checkpoint"]
