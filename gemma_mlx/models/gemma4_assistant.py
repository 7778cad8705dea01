"""The Gemma 4 MTP drafter (`gemma4_assistant`, `gemma4_unified_assistant`); docs/design.md, "The drafter's inputs".

It owns no K/V projections and no cache: every layer attends to the target's cache of the last producer layer of
its type, read in place. One round drafts K tokens from a single position: the query always sits at position
p = L−1, the first input is [E_target[x]·√H, target final-norm hidden at L−2], and each
next step feeds back the drafter's own projected hidden state and its greedy token.

The K steps of a round are one compiled function per K (`mx.compile`: elementwise ops fused, the graph traced once),
reading whole cache buffers, whose shapes change only when a linear buffer grows, so a trace is reused for
GROW_STEP positions; the masks hide the slots not yet written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from ..cache import KV, TargetCache, attention_mask
from .base import FULL, SLIDING, ConfigError, Embedding, Linear, RMSNorm
from .gemma4_text import DecoderLayer, Target, TextConfig, text_config_of


@dataclass
class DrafterConfig:
    """A Gemma 4 MTP assistant (`gemma4_assistant`). `text` describes the drafter's layers, whose KV
    geometry must be the target's (it attends to the target's cache)."""

    text: TextConfig
    backbone_hidden_size: int
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    model_type: str = "gemma4_assistant"

    @classmethod
    def from_dict(cls, raw: dict) -> "DrafterConfig":
        tc = text_config_of(dict(raw.get("text_config") or {}))  # a unified assistant gets the unified defaults
        n = tc.get("num_hidden_layers", TextConfig.num_hidden_layers)
        if not tc.get("num_kv_shared_layers"):
            tc["num_kv_shared_layers"] = n  # HF: every assistant layer is a consumer
        if tc["num_kv_shared_layers"] != n:
            raise ConfigError("assistant text_config must share KV in every layer (num_kv_shared_layers == layers)")
        tc.setdefault("hidden_size_per_layer_input", 0)
        tc.setdefault("vocab_size_per_layer_input", 0)
        text = TextConfig.from_dict(tc)
        if text.hidden_size_per_layer_input or text.enable_moe_block or text.use_double_wide_mlp:
            raise ConfigError("assistant text_config may not use PLE, MoE or double-wide MLPs")
        if "backbone_hidden_size" not in raw:
            raise ConfigError("assistant config has no backbone_hidden_size")
        return cls(
            text=text,
            backbone_hidden_size=raw["backbone_hidden_size"],
            use_ordered_embeddings=bool(raw.get("use_ordered_embeddings", False)),
            num_centroids=raw.get("num_centroids", 2048),
            centroid_intermediate_top_k=raw.get("centroid_intermediate_top_k", 32),
            model_type=raw.get("model_type", "gemma4_assistant"),
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["text_config"] = d.pop("text")
        return d


class AssistantModel(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        t = cfg.text
        self.embed_tokens = Embedding(t.vocab_size, t.hidden_size)  # the LM head only: never embeds
        # Every layer is a kv-shared consumer (num_kv_shared_layers == num_hidden_layers): q/o projections only.
        self.layers = [DecoderLayer(t, i) for i in range(t.num_hidden_layers)]
        self.norm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps)


class MaskedEmbedding(nn.Module):
    """The centroid head: score C centroids, keep the top k_c, score only their V/C tokens each."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.centroids = Linear(cfg.text.hidden_size, cfg.num_centroids, bias=False)
        self.token_ordering = mx.zeros((cfg.text.vocab_size,), dtype=mx.int32)
        self.top_k = cfg.centroid_intermediate_top_k
        self.num_centroids = cfg.num_centroids

    def candidates(self, h: mx.array, table: nn.Embedding) -> tuple[mx.array, mx.array]:
        """h [B, d] -> (canonical token ids [B, k_c·V/C], their logits)."""
        scores = self.centroids(h)
        top = mx.argpartition(-scores, kth=self.top_k - 1, axis=-1)[:, : self.top_k]  # order irrelevant
        buckets = self.token_ordering.reshape(self.num_centroids, -1)[top].reshape(h.shape[0], -1)
        logits = (table(buckets) @ h[:, :, None]).squeeze(-1)  # rows of the tied matrix E_a
        return buckets, logits


class Drafter(nn.Module):
    """The drafter: its weights and forward. It holds no target and no cache: `draft` is given the target, whose
    token embedding and cache it reads (check_pair says whether it can)."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.config = cfg
        d, H = cfg.text.hidden_size, cfg.backbone_hidden_size
        self.pre_projection = Linear(2 * H, d, bias=False)
        self.post_projection = Linear(d, H, bias=False)
        self.model = AssistantModel(cfg)
        if cfg.use_ordered_embeddings:
            self.masked_embedding = MaskedEmbedding(cfg)
        self._compiled = {}  # (K, the target's embedding) -> the compiled draft loop; "_": not a parameter

    def forward(self, u: mx.array, offset: mx.array, kv: dict, masks: dict):
        """The assistant forward from its input u = [E_target[x]·√H, g] at one query position ([B, 1, 2H]) ->
        (h_n [B, d], g' [B, 1, H]). `kv` and `masks`: what `reads(cache)` and `masks(cache)` return."""
        h, g = self.forward_positions(u, offset, kv, masks)
        return h[:, 0], g

    def forward_positions(self, u: mx.array, offset: mx.array, kv: dict, masks: dict):
        """The same at T query positions at once, all at RoPE offset `offset` ([B, T, 2H] -> [B, T, d], [B, T, H]):
        distillation runs a step from every position of a sequence in one call."""
        h = self.pre_projection(u)
        for layer in self.model.layers:
            h = layer(h, offset, KV(*kv[layer.layer_type]), masks[layer.layer_type])
        h = self.model.norm(h)
        return h, self.post_projection(h)

    def greedy(self, h: mx.array) -> mx.array:
        """The drafted token [B] (drafts are greedy at any temperature: a point-mass proposal, docs/design.md)."""
        if not self.config.use_ordered_embeddings:
            return mx.argmax(self.model.embed_tokens.as_linear(h), axis=-1)
        buckets, logits = self.masked_embedding.candidates(h, self.model.embed_tokens)
        return mx.take_along_axis(buckets, mx.argmax(logits, axis=-1)[:, None], axis=-1)[:, 0]

    def full_logits(self, h: mx.array) -> mx.array:
        """Logits over the whole vocabulary [B, V]; for the centroid head unselected tokens get min(selected) − 1,
        as HF does (only needed to inspect the drafter, never for drafting)."""
        if not self.config.use_ordered_embeddings:
            return self.model.embed_tokens.as_linear(h)
        buckets, logits = self.masked_embedding.candidates(h, self.model.embed_tokens)
        out = mx.full((h.shape[0], self.config.text.vocab_size), logits.min() - 1.0, dtype=logits.dtype)
        return mx.put_along_axis(out, buckets, logits, axis=-1)

    def draft(self, target: Target, x: mx.array, g: mx.array, cache: TargetCache, k: int) -> mx.array:
        """K greedy drafts [B, K] after token x [B, 1] (not yet in `target`'s cache), from g = the target's final-norm
        hidden at the position before x; the drafter reads the target's token embedding and cache. Lazy: nothing is
        evaluated, so drafting and verification form one graph."""
        if k == 0:
            return mx.zeros((x.shape[0], 0), mx.int32)
        offset = mx.array(cache.lengths, dtype=mx.int32)  # p = L−1 for every step of the round
        return self._compiled_steps(k, target)(x, g, offset, self.reads(cache), self.masks(cache))

    def _steps(self, k: int, embed, x: mx.array, g: mx.array, offset: mx.array, kv: dict, masks: dict) -> mx.array:
        """K chained steps; `embed`: the target's scaled token embedding (E[x]·√H)."""
        drafts = []
        for _ in range(k):
            h, g = self.forward(mx.concatenate([embed(x), g], axis=-1), offset, kv, masks)
            x = self.greedy(h)[:, None].astype(mx.int32)
            drafts.append(x)
        return mx.concatenate(drafts, axis=1)

    def _compiled_steps(self, k: int, target: Target):
        """`_steps` for this K and target, compiled once; the weights (the drafter's and the target's embedding)
        are read at each call, so a drafter being trained or reloaded is never stale. The compiled function holds
        the embedding it was built for, so its id in the key is never reused while the entry lives."""
        table = target.model.embed_tokens
        key = (k, id(table))
        if key not in self._compiled:
            self._compiled[key] = mx.compile(partial(self._steps, k, target.model.embed), inputs=[self, table])
        return self._compiled[key]

    def reads(self, cache: TargetCache) -> dict:
        """K/V each drafter layer type attends to: the target's last producer of that type, whole buffers, in
        place."""
        return {t: cache.producer(t).buffer() for t in self.layer_types}

    def masks(self, cache: TargetCache) -> dict:
        """Clean view of the accepted prefix over the slots `reads` gives: full layers see positions ≤ L−2
        (the whole valid cache), sliding layers the W+1 newest of them (one more than the target's own
        window)."""
        last = cache.lengths - 1  # position L−2 of each row
        window = {SLIDING: self.config.text.sliding_window + 1, FULL: None}
        return {t: attention_mask(last, 1, cache.producer(t).buffer_positions(), window[t])
                for t in self.layer_types}

    @property
    def layer_types(self) -> set:
        return {layer.layer_type for layer in self.model.layers}

    def sanitize(self, weights: dict) -> dict:
        return {k: v.astype(mx.int32) if k.endswith("token_ordering") else v for k, v in weights.items()
                if k != "lm_head.weight"}


class PairError(ValueError):
    """A drafter that cannot serve this target; the message says why."""


def check_pair(t, a: DrafterConfig):
    """Called wherever a drafter is paired with a target (loading, distillation). PairError unless a drafter of config `a` can read a target of config `t` (a TextConfig or Gemma3Config)."""
    if a.backbone_hidden_size != t.hidden_size:
        raise PairError(f"drafter backbone_hidden_size {a.backbone_hidden_size} != target hidden_size {t.hidden_size}")
    if a.text.vocab_size != t.vocab_size:
        raise PairError(f"drafter vocab_size {a.text.vocab_size} != target vocab_size {t.vocab_size}")
    for layer_type in set(a.text.layer_types):
        if layer_type not in t.layer_types:
            raise PairError(f"drafter needs a {layer_type} layer the target does not have")
        ti, di = t.producer_for(layer_type), a.text.layer_types.index(layer_type)
        if (t.layer_head_dim(ti), t.layer_kv_heads(ti)) != (a.text.layer_head_dim(di), a.text.layer_kv_heads(di)):
            raise PairError(f"drafter {layer_type} KV geometry (head_dim, kv_heads) "
                            f"{(a.text.layer_head_dim(di), a.text.layer_kv_heads(di))} != target's "
                            f"{(t.layer_head_dim(ti), t.layer_kv_heads(ti))}")
    if a.text.sliding_window != t.sliding_window:
        raise PairError(f"drafter sliding_window {a.text.sliding_window} != target's {t.sliding_window}")


Model = Drafter
config_of = DrafterConfig.from_dict
