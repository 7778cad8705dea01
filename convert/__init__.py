"""The converter (installed as `gemma_mlx.convert`): Hugging Face Gemma 4 checkpoints → MLX dirs."""

from .pipeline import ConvertError, convert, is_mlx_checkpoint

__all__ = ["ConvertError", "convert", "is_mlx_checkpoint"]
