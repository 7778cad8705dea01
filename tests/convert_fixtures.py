"""Tiny Hugging Face Gemma 4 checkpoints for the converter tests, built with transformers 5.23.0 at test time, and
their reference logits. 

Importing this module applies the oracle's work-around for transformers 5.23.0's `kv_sharing_modes` (it raises for
an all-shared assistant and marks no "store" layer for an unshared target).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma4AssistantConfig,
    Gemma4AssistantForCausalLM,
    Gemma4AudioConfig,
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4VisionConfig,
    GenerationConfig,
)

from transformers.models.gemma4_unified import configuration_gemma4_unified as _U  # noqa: E402

import oracle  # noqa: F401,E402  (applies transformers 5.23.0's kv_sharing_modes patch, spec §5)

# --- configs ----------------------------------------------------------------------------------------------------

S, F = "sliding_attention", "full_attention"
BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, global_head_dim=32, layer_types=[S, S, F, S, S, F], sliding_window=8,
            hidden_size_per_layer_input=0, vocab_size_per_layer_input=512, final_logit_softcapping=30.0,
            max_position_embeddings=512, bos_token_id=2, eos_token_id=1, pad_token_id=0)
TARGETS = {  # name -> Gemma4TextConfig kwargs over BASE
    "plain": {},
    "moe": dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32),
    "kvshared": dict(num_kv_shared_layers=2, use_double_wide_mlp=True),
    # Gemma4ForConditionalGeneration (tiny vision + audio towers) around a PLE + kv-shared + double-wide text stack
    "wrapper": dict(hidden_size_per_layer_input=8, num_kv_shared_layers=2, use_double_wide_mlp=True),
}
# Only config-level (no checkpoint): further geometries the layout tables are checked on.
LAYOUT_ONLY = {
    "ple": dict(hidden_size_per_layer_input=8),
    "keqv": dict(attention_k_eq_v=True, num_global_key_value_heads=1),
    "untied": dict(tie_word_embeddings=False),
    "e2blike": dict(num_hidden_layers=8, layer_types=[S, S, S, F, S, S, S, F], num_kv_shared_layers=3,
                    use_double_wide_mlp=True, hidden_size_per_layer_input=8),
    "moe-ple-shared": dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
                           hidden_size_per_layer_input=8, num_kv_shared_layers=2, use_double_wide_mlp=True),
}
EOS_IDS = [1, 106]
PLACEHOLDER_IDS = range(500, 503)  # image/audio/video ids of the wrapper: never use them in text prompts


def text_config(name: str) -> dict:
    return {**BASE, **{**TARGETS, **LAYOUT_ONLY}[name]}


def wrapper_config(text: dict) -> Gemma4Config:
    return Gemma4Config(
        text_config=Gemma4TextConfig(**text),
        vision_config=Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, head_dim=16, patch_size=4,
                                         position_embedding_size=64, pooling_kernel_size=2),
        audio_config=Gemma4AudioConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       output_proj_dims=48, subsampling_conv_channels=[8, 4], conv_kernel_size=3),
        image_token_id=500, audio_token_id=501, video_token_id=502, boi_token_id=503, eoi_token_id=504,
        boa_token_id=505, eoa_token_index=506)


def assistant_config(ordered: bool = True) -> Gemma4AssistantConfig:
    """A 4-layer assistant [S, S, S, F] for the plain target: d=32, the target's KV geometry and window."""
    t = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, global_head_dim=32, layer_types=[S, S, S, F], sliding_window=8,
             hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, final_logit_softcapping=None,
             max_position_embeddings=512, num_kv_shared_layers=4)
    return Gemma4AssistantConfig(text_config=Gemma4TextConfig(**t), backbone_hidden_size=64,
                                 use_ordered_embeddings=ordered, num_centroids=16, centroid_intermediate_top_k=4)


# --- builders ---------------------------------------------------------------------------------------------------


def perturb(model, seed: int):
    """Random non-degenerate weights: norms 1±0.2, scalars in [0.5, 1.5], embeddings N(0, 0.1²), matrices
    N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not torch.is_floating_point(p) or p.ndim == 0 or "inv_freq" in name or name.endswith("embed_scale"):
                continue
            if name.endswith(("layer_scalar", "per_expert_scale")):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def save_tokenizer(out: Path):
    """A 512-token word-level tokenizer (Gemma's special ids) that transformers and mlx-lm load."""
    special = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 105: "<start_of_turn>", 106: "<end_of_turn>"}
    vocab = {special.get(i, f"w{i}"): i for i in range(512)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(special.values()))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>")))
    (out / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")


def build_target(name: str, out: Path) -> Path:
    """A target checkpoint (fp32 safetensors, save_pretrained) + tokenizer + generation_config (eos [1, 106])."""
    seed = 100 + sorted(TARGETS).index(name)
    torch.manual_seed(seed)
    text = text_config(name)
    if name == "wrapper":
        model = Gemma4ForConditionalGeneration(wrapper_config(text)).eval()
    else:
        model = Gemma4ForCausalLM(Gemma4TextConfig(**text)).eval()
    perturb(model, seed)
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=list(EOS_IDS), pad_token_id=0)
    model.save_pretrained(out)
    save_tokenizer(Path(out))
    return Path(out)


def build_assistant(out: Path, ordered: bool = True) -> Path:
    """A gemma4_assistant checkpoint; ordered: centroid head with token_ordering = a random permutation (int64)."""
    cfg = assistant_config(ordered)
    torch.manual_seed(7)
    model = Gemma4AssistantForCausalLM(cfg).eval()
    perturb(model, 7)
    if ordered:
        perm = torch.randperm(512, generator=torch.Generator().manual_seed(8))
        model.masked_embedding.token_ordering.copy_(perm)
    model.generation_config.num_assistant_tokens = 4  # HF crashes on int(None) otherwise
    model.save_pretrained(out)
    save_tokenizer(Path(out))
    return Path(out)


def build_unified_assistant(out: Path) -> Path:
    """A gemma4_unified_assistant (text_config gemma4_unified_text, whose full layers default to head_dim 512)."""
    from transformers import Gemma4UnifiedAssistantConfig, Gemma4UnifiedAssistantForCausalLM

    t = _U.Gemma4UnifiedTextConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   layer_types=[S, S, S, F], sliding_window=8, final_logit_softcapping=None,
                                   max_position_embeddings=512, num_kv_shared_layers=4)
    cfg = Gemma4UnifiedAssistantConfig(text_config=t, backbone_hidden_size=64, use_ordered_embeddings=True,
                                       num_centroids=16, centroid_intermediate_top_k=4)
    torch.manual_seed(9)
    model = Gemma4UnifiedAssistantForCausalLM(cfg).eval()
    perturb(model, 9)
    model.generation_config.num_assistant_tokens = 4
    model.save_pretrained(out)
    return Path(out)


def to_bf16(src: Path, out: Path) -> Path:
    """The same checkpoint stored in bf16, as Gemma 4 ships on the hub."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    w = load_file(str(out / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in w.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    return Path(out)


@torch.no_grad()
def hf_logits(path: Path, ids: list[int]) -> np.ndarray:
    """Logits [T, V] of the transformers model (fp32, eager attention) on one sequence."""
    assert not set(ids) & set(PLACEHOLDER_IDS)
    kind = json.loads((Path(path) / "config.json").read_text())["model_type"]
    cls = Gemma4ForConditionalGeneration if kind == "gemma4" else Gemma4ForCausalLM
    model = cls.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()
    # output_hidden_states=True sidesteps transformers 5.23.0's crash on a kv-shared target without PLE
    out = model(torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    return out.logits[0].float().numpy()
