"""gemma-mlx: Gemma 4 on MLX with its Multi-Token-Prediction drafters, for lossless speculative decoding."""

from ._blas import preload_blas

preload_blas()  # before anything imports mlx.core

from .generate import (ChatTemplateError, Engine, Generation, LoadError, PairError, Piece, generate,  # noqa: E402
                       generate_batch, load, stream_generate)

__all__ = ["ChatTemplateError", "Engine", "Generation", "LoadError", "PairError", "Piece", "generate", "generate_batch",
           "load", "stream_generate"]
