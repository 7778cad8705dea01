"""The Python API: `load` a target (+ drafter), then `generate` / `stream_generate` text, or `generate_batch` for
several prompts at once.

    import gemma_mlx
    engine = gemma_mlx.load("path/to/target", drafter="path/to/assistant")
    print(gemma_mlx.generate(engine, "Why is the sky blue?", max_tokens=100).text)

An Engine keeps the caches of its finished generations (prefix_cache.py, as the server does, up to `cache_mb`): a
prompt that extends an earlier prompt + reply prefills only the new tokens (`reuse_cache=False` forgets them all
first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import mlx.core as mx
import numpy as np

from . import image, pipeline
from .loader import LoadError, load_drafter, load_target, load_vision, vision_settings
from .models.gemma4_assistant import Drafter, PairError
from .models.gemma4_text import Target
from .sampling import SamplingParams
from .draft_length import DraftLength
from .decode import Decoder
from .prefix_cache import PrefixCache
from .speculative import Stats


class ChatTemplateError(ValueError):
    """Chat messages for a checkpoint without a chat template; the message says what to do instead."""


@dataclass
class Engine:
    target: Target
    tokenizer: object  # mlx_lm TokenizerWrapper
    drafter: Optional[Drafter] = None
    chunk: int = 256
    cache_mb: float = 1024
    path: Optional[Path] = None  # the converted target's dir (its vision/ is loaded for the first image)
    prefix_cache: PrefixCache = field(init=False)
    auto_draft: DraftLength = field(init=False)  # K = auto learns across calls: warm-up is paid once per engine

    def __post_init__(self):
        self.prefix_cache = PrefixCache(int(self.cache_mb * 2**20))
        self.auto_draft = DraftLength()
        self.vision = None

    @property
    def has_vision(self) -> bool:
        """A vision tower to load: the converter's vision/, or an MLX multimodal wrapper's own."""
        return self.path is not None and vision_settings(self.path) is not None

    @property
    def eos_ids(self) -> frozenset:
        return frozenset(self.tokenizer.eos_token_ids)

    def encode(self, prompt, tools: Optional[list] = None) -> list[int]:
        """A string (BOS added), chat messages [{"role", "content"}] (chat template applied, with OpenAI-style
        `tools` if given), or token ids."""
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        if prompt and isinstance(prompt[0], dict):
            if not getattr(self.tokenizer, "chat_template", None):
                raise ChatTemplateError("this checkpoint has no chat template, so it cannot take chat messages: "
                                        "give it text to continue (--raw in the CLI, /v1/completions in the server)")
            from jinja2 import TemplateError

            try:
                return list(self.tokenizer.apply_chat_template(prompt, tools=tools, add_generation_prompt=True,
                                                               tokenize=True))
            except TemplateError as e:  # the template's own checks (roles must alternate, ...)
                raise ChatTemplateError(f"the chat template refused the messages: {e}") from None
        return list(prompt)

    def encode_images(self, prompt, tools: Optional[list] = None) -> tuple[list[int], Optional[tuple]]:
        """`encode`, and for chat messages with image parts (image.image_parts) the images: each image's token
        expanded to its soft tokens, and (where [1, T], soft tokens) for Decoder.add; (ids, None) without images."""
        if not (prompt and isinstance(prompt, list) and isinstance(prompt[0], dict)):
            return self.encode(prompt, tools), None
        messages, sources = image.image_parts(prompt)
        ids = self.encode(messages, tools)
        if not sources:
            return ids, None
        if self.vision is None:
            if self.path is None:
                raise LoadError("this engine was not loaded from a dir, so it has no vision tower")
            self.vision = load_vision(self.path)
        vision, cfg = self.vision
        patches = [image.to_patches(s if hasattr(s, "convert") else image.read_image(s), *image.geometry(cfg),
                                    cfg.get("processor"))
                   for s in sources]
        if ids.count(cfg["image_token_id"]) != len(sources):
            raise image.ImageError(f"the chat template wrote {ids.count(cfg['image_token_id'])} image tokens for "
                                   f"{len(sources)} images")
        ids = image.expand(ids, cfg["image_token_id"], cfg["boi_token_id"], cfg["eoi_token_id"],
                           [n for _, _, n in patches])
        features = vision(mx.array(np.stack([p for p, _, _ in patches])), mx.array(np.stack([q for _, q, _ in patches])))
        mx.eval(features)  # here: the server decodes in another thread, and MLX's streams are per thread
        return ids, (np.array([[t == cfg["image_token_id"] for t in ids]]), features)


def load(target, drafter=None, dtype: str | None = None, progress: bool = True, group=None) -> Engine:
    """Load a target and optionally its MTP drafter (a local dir, a converted dir or a hub id; a hub id or a Hugging
    Face dir is converted once, in `dtype`: by default fp32 on MLX's CPU backend, bf16 on Metal and CUDA). A drafter
    that does not fit the target (hidden size, vocabulary, KV geometry) is refused with the reason (PairError).

    `group` (`pipeline.join()` under mlx.launch): split the target's layers across its processes (pipeline.py);
    rank 0 drives the engine, every other rank runs `follow(engine)`."""
    model, tokenizer, path = load_target(target, dtype, progress, group)
    engine = Engine(model, tokenizer, path=path)
    vision = vision_settings(path)
    if vision and getattr(model.config, "use_bidirectional_attention", None) == "vision":
        engine.chunk = max(engine.chunk, image.geometry(vision)[1])  # an image in one prefill chunk
    if drafter is not None:
        engine.drafter = load_drafter(drafter, model, dtype, progress)
    return engine


def follow(engine: Engine):
    """A pipeline rank other than 0: build the decoders rank 0 opens and repeat what they do, until it quits."""

    def build(setup: dict) -> Decoder:
        return Decoder(engine.target, engine.drafter, SamplingParams(**setup["params"]), None, setup["eos_ids"],
                       engine.tokenizer, setup["chunk"], prefix_cache=engine.prefix_cache if setup["prefix"] else None)

    pipeline.follow(engine.target.split, build)


@dataclass
class Piece:
    """One streamed step: new text (may be empty while a stop string might be starting), its tokens, the stats
    so far, and why generation finished (None while running; "stop" or "length" at the end)."""

    text: str
    tokens: list
    stats: Stats
    finish_reason: Optional[str] = None


@dataclass
class Generation:
    text: str
    tokens: list
    stats: Stats
    finish_reason: str

    def __str__(self):
        return self.text


def draft_length(engine: Engine, draft_tokens) -> DraftLength:
    """`"auto"` (the engine's, which keeps what it measured across calls) or a fixed K (0 = plain decoding)."""
    if draft_tokens in ("auto", None):
        return engine.auto_draft if engine.drafter is not None else DraftLength(fixed=0)
    return DraftLength(fixed=int(draft_tokens))  # K > 0 without a drafter is refused where it runs


def stream_generate(engine: Engine, prompt, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                    top_k: int = 0, min_p: float = 0.0, draft_tokens="auto", stop=(), seed: int | None = None,
                    reuse_cache: bool = True) -> Iterator[Piece]:
    tokens, images = engine.encode_images(prompt)
    if not reuse_cache:
        engine.prefix_cache.clear()
    decoder = Decoder(engine.target, engine.drafter, SamplingParams(temperature, top_p, top_k, min_p),
                      draft_length(engine, draft_tokens), engine.eos_ids, engine.tokenizer, engine.chunk,
                      prefix_cache=engine.prefix_cache)
    try:
        row = decoder.add(tokens, max_tokens, stop_list(stop), seed, images)
        for new in decoder.follow(row):
            yield Piece(row.stream.take(), new, row.stats, row.finish_reason)
    finally:
        decoder.close()


def generate(engine: Engine, prompt, **kwargs) -> Generation:
    """Generate to completion; returns text, tokens, stats and finish reason."""
    text, tokens, piece = "", [], None
    for piece in stream_generate(engine, prompt, **kwargs):
        text += piece.text
        tokens += piece.tokens
    return Generation(text, tokens, piece.stats, piece.finish_reason)


def generate_batch(engine: Engine, prompts, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                   top_k: int = 0, min_p: float = 0.0, draft_tokens="auto", stop=(), seed=None) -> list:
    """Generate for several prompts at once (strings, chat messages or token ids, as `generate` takes); returns
    one `Generation` per prompt, in order. Each row is what `generate` gives for that prompt alone: greedy, the same
    tokens; sampling, the same distribution, and with a seed the same tokens (`seed`: every row's, or a list of
    one per prompt)."""
    decoder = Decoder(engine.target, engine.drafter, SamplingParams(temperature, top_p, top_k, min_p),
                      draft_length(engine, draft_tokens), engine.eos_ids, engine.tokenizer, engine.chunk)
    seeds = seed if isinstance(seed, (list, tuple)) else [seed] * len(prompts)
    rows = []
    for p, s in zip(prompts, seeds):
        tokens, images = engine.encode_images(p)
        rows.append(decoder.add(tokens, max_tokens, stop_list(stop), s, images))
    while decoder.rows:
        decoder.step()
    decoder.close()
    return [Generation(r.stream.text, r.tokens, r.stats, r.finish_reason) for r in rows]


def stop_list(stop) -> list[str]:
    return [s for s in ([stop] if isinstance(stop, str) else stop) if s]


__all__ = ["Engine", "Generation", "LoadError", "PairError", "Piece", "generate", "generate_batch", "load",
           "stream_generate"]
