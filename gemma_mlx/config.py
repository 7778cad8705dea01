"""Model configs, resolved against transformers' defaults (spec §1.1, §1.2, §2.1).

Hugging Face configs may omit fields (HF then applies its own defaults) and transformers 5.23 writes
`per_layer_config` instead of `global_head_dim`. Everything is resolved here, once, into an explicit dataclass;
the converter writes `to_dict()` so a converted checkpoint never depends on anyone's defaults again (and loads in
mlx-lm, whose defaults differ: spec §1.2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Optional

SLIDING, FULL = "sliding_attention", "full_attention"

TARGET_TYPES = ("gemma4_text", "gemma4", "gemma4_unified", "gemma4_unified_text", "gemma3_text", "gemma3")
DRAFTER_TYPES = ("gemma4_assistant", "gemma4_unified_assistant")


class ConfigError(ValueError):
    """A config that gemma-mlx cannot run; the message is one line meant for the user."""


def _default_rope():
    return {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }


@dataclass
class TextConfig:
    """A Gemma 4 text stack (`gemma4_text`); defaults are transformers 5.23.0's `Gemma4TextConfig` defaults."""

    model_type: str = "gemma4_text"
    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: Optional[int] = None
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    pad_token_id: Optional[int] = 0
    eos_token_id: object = 1
    bos_token_id: Optional[int] = 2
    tie_word_embeddings: bool = True
    rope_parameters: dict = field(default_factory=_default_rope)
    attention_bias: bool = False
    sliding_window: int = 512
    layer_types: Optional[list] = None
    final_logit_softcapping: Optional[float] = None
    use_bidirectional_attention: Optional[str] = None
    vocab_size_per_layer_input: int = 262_144
    hidden_size_per_layer_input: int = 256
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    enable_moe_block: bool = False
    use_double_wide_mlp: bool = False
    num_experts: Optional[int] = None
    top_k_experts: Optional[int] = None
    moe_intermediate_size: Optional[int] = None

    @classmethod
    def from_dict(cls, raw: dict) -> "TextConfig":
        raw = dict(raw)
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in raw.items() if k in known})
        cfg.model_type = "gemma4_text"
        cfg._resolve(raw)
        return cfg

    def _resolve(self, raw: dict):
        n = self.num_hidden_layers
        if self.layer_types is None:  # HF default pattern: 5 sliding : 1 full
            self.layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(n)]
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != n:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {n} layers")
        if bad := set(self.layer_types) - {SLIDING, FULL}:
            raise ConfigError(f"unknown layer type {sorted(bad)[0]!r}")
        self.layer_types[-1] = FULL  # HF forces the last layer to full attention
        rope = _default_rope()
        rope.update(self.rope_parameters or {})
        self.rope_parameters = rope
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self._resolve_per_layer_config(raw.get("per_layer_config"))
        if self.use_bidirectional_attention == "all":
            raise ConfigError("use_bidirectional_attention='all' is an embedding model, not a causal LM")
        if self.attention_bias:
            raise ConfigError("attention_bias=true is not a Gemma 4 checkpoint")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"hidden_activation {self.hidden_activation!r} is not supported")
        if self.enable_moe_block and not (self.num_experts and self.top_k_experts and self.moe_intermediate_size):
            raise ConfigError("enable_moe_block needs num_experts, top_k_experts and moe_intermediate_size")
        if not 0 <= self.num_kv_shared_layers <= n:
            raise ConfigError(f"num_kv_shared_layers={self.num_kv_shared_layers} out of range for {n} layers")

    def _resolve_per_layer_config(self, per_layer: Optional[dict]):
        """transformers 5.23 stores `global_head_dim` / global KV heads as per-layer overrides (spec §1.2.1)."""
        if not per_layer:
            return
        full = {int(i) for i, t in enumerate(self.layer_types) if t == FULL}
        head_dims, kv_heads = set(), set()
        for idx, over in per_layer.items():
            if int(idx) not in full:
                raise ConfigError(f"per_layer_config overrides sliding layer {idx}: not supported")
            unknown = set(over) - {"head_dim", "num_key_value_heads"}
            if unknown:
                raise ConfigError(f"per_layer_config field {sorted(unknown)[0]!r} is not supported")
            if "head_dim" in over:
                head_dims.add(over["head_dim"])
            if "num_key_value_heads" in over:
                kv_heads.add(over["num_key_value_heads"])
        if len(head_dims) > 1 or len(kv_heads) > 1:
            raise ConfigError("per_layer_config gives full-attention layers different shapes: not supported")
        if head_dims:
            self.global_head_dim = head_dims.pop()
        if kv_heads:
            self.num_global_key_value_heads = kv_heads.pop()
            if not self.attention_k_eq_v and self.num_global_key_value_heads != self.num_key_value_heads:
                raise ConfigError("full layers with their own KV-head count need attention_k_eq_v: not supported")

    # Derived geometry (one place, used by the model, the cache and the converter).
    def layer_head_dim(self, i: int) -> int:
        return self.global_head_dim if self.layer_types[i] == FULL else self.head_dim

    def layer_kv_heads(self, i: int) -> int:
        if self.layer_types[i] == FULL and self.attention_k_eq_v and self.num_global_key_value_heads:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    @property
    def first_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def producer_for(self, layer_type: str) -> int:
        """Index of the last non-shared layer of a type: KV source of consumers and of the drafter (spec §1.4)."""
        candidates = [i for i in range(self.first_shared_layer) if self.layer_types[i] == layer_type]
        if not candidates:
            raise ConfigError(f"no non-shared {layer_type} layer produces a KV cache")
        return candidates[-1]

    def kv_source(self, i: int) -> int:
        """The layer whose K/V layer i attends to (itself for producers)."""
        return i if i < self.first_shared_layer else self.producer_for(self.layer_types[i])

    def mlp_size(self, i: int) -> int:
        wide = self.use_double_wide_mlp and i >= self.first_shared_layer > 0
        return self.intermediate_size * (2 if wide else 1)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DrafterConfig:
    """A Gemma 4 MTP assistant (`gemma4_assistant`, spec §2.1). `text` describes the drafter's layers, whose KV
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


UNIFIED_DEFAULTS = {"sliding_window": 1024, "max_position_embeddings": 262_144}


def text_config_of(raw: dict) -> dict:
    """The text-stack part of a target config: the wrappers (`gemma4`, `gemma4_unified`) keep it in text_config.
    The 12B unified stack (`gemma4_unified_text`) is the Gemma 4 text stack without PLE or MoE (its decoder layer
    has neither) and with its own defaults."""
    mt = raw.get("model_type")
    text = raw
    if mt in ("gemma4", "gemma4_unified"):
        if "text_config" not in raw:
            raise ConfigError(f"{mt} config has no text_config")
        text = raw["text_config"]
    if mt in ("gemma4_unified", "gemma4_unified_text") or text.get("model_type") == "gemma4_unified_text":
        text = {**UNIFIED_DEFAULTS, **text, "hidden_size_per_layer_input": 0, "enable_moe_block": False}
    return text


def model_kind(raw: dict) -> str:
    """'target' or 'drafter', or a ConfigError naming the unknown model_type."""
    mt = raw.get("model_type")
    if mt in TARGET_TYPES:
        return "target"
    if mt in DRAFTER_TYPES:
        return "drafter"
    raise ConfigError(f"unknown model_type {mt!r} (supported: {', '.join(TARGET_TYPES + DRAFTER_TYPES)})")
