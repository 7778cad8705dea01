"""The oracle: tiny random Gemma 4 checkpoints built with transformers 5.23.0 at test time, and reference computations
on them (spec §7). This is the ONLY module that imports torch/transformers; gemma_mlx never imports it.

Importing it patches transformers 5.23.0 (spec §5, "transformers 5.23.0 bugs found"):
- `Gemma4TextConfig.kv_sharing_modes` raises for an all-shared assistant (`num_kv_shared_layers ==
  num_hidden_layers`), so `Gemma4AssistantForCausalLM` cannot even be built -> every layer "reuse";
- the same property marks no "store" layer for an unshared target (`num_kv_shared_layers == 0`), so
  `shared_kv_states` comes back empty -> the last layer of each type "store"s (what the property's own comment says).
A third bug, a kv-shared target without PLE crashing in a plain forward / generate (`_maybe_slice_kv_shared_inputs`
indexes `per_layer_inputs` unconditionally), is avoided by passing `output_hidden_states=True` to every call here
(logits unchanged). A fourth, `num_assistant_tokens=None` -> `int(None)`, by always setting it on drafters.

All reference computations are fp32 with `attn_implementation="eager"` and return numpy arrays.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, processors
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
from transformers.models.gemma4 import configuration_gemma4 as _C

__all__ = [
    "S", "F", "BASE", "VARIANTS", "TARGETS", "EOS_IDS", "MM_PLACEHOLDER_IDS", "SPECIAL", "CHAT_TEMPLATE",
    "GEMMA4_SPECIAL", "GEMMA4_TOOLS_TEMPLATE",
    "text_config", "perturb", "calm", "build_target", "drafter_config", "build_drafter", "vocabulary",
    "save_tokenizer",
    "load_model", "clear_cache", "hf_forward", "hf_greedy", "hf_shared_kv", "hf_drafter_call", "hf_embed_scaled",
    "hf_assisted_greedy",
]

# --- transformers 5.23.0 patches ----------------------------------------------------------------------------


def _patch_kv_sharing_modes():
    prop = _C.Gemma4TextConfig.kv_sharing_modes
    if getattr(prop.fget, "_gemma_mlx_patched", False):
        return
    orig = prop.fget

    def kv_sharing_modes(self):
        n, shared = self.num_hidden_layers, self.num_kv_shared_layers or 0
        if shared >= n:  # assistant: every layer reuses the target's K/V
            return ["reuse"] * n
        if shared == 0:  # unshared target: the last layer of each type stores its K/V for the assistant
            modes = [None] * n
            for t in set(self.layer_types):
                modes[n - 1 - self.layer_types[::-1].index(t)] = "store"
            return modes
        return orig(self)

    kv_sharing_modes._gemma_mlx_patched = True
    _C.Gemma4TextConfig.kv_sharing_modes = property(kv_sharing_modes)
    from transformers.models.gemma4_unified import configuration_gemma4_unified as unified

    unified.Gemma4UnifiedTextConfig.kv_sharing_modes = property(kv_sharing_modes)  # same bug, same code


_patch_kv_sharing_modes()

# --- configurations -----------------------------------------------------------------------------------------

S, F = "sliding_attention", "full_attention"
BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, global_head_dim=32, layer_types=[S, S, F, S, S, F], sliding_window=8,
            hidden_size_per_layer_input=0, vocab_size_per_layer_input=512, final_logit_softcapping=30.0,
            max_position_embeddings=512, bos_token_id=2, eos_token_id=1, pad_token_id=0)
VARIANTS = {  # name -> Gemma4TextConfig kwargs over BASE
    "plain": {},
    "nosoftcap": dict(final_logit_softcapping=None),
    "kvshared": dict(num_kv_shared_layers=2, use_double_wide_mlp=True),  # modes [-, -, store, store, reuse, reuse]
    "ple": dict(hidden_size_per_layer_input=8),
    "moe": dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32),
    "keqv": dict(attention_k_eq_v=True, num_global_key_value_heads=1),
    "e2blike": dict(num_hidden_layers=8, layer_types=[S, S, S, F, S, S, S, F], num_kv_shared_layers=3,
                    use_double_wide_mlp=True, hidden_size_per_layer_input=8),
}
# Further targets `build_target` knows: "moe8" (Gemma4ForCausalLM) and "mm" (Gemma4ForConditionalGeneration whose
# text stack is plain + PLE 8 + kv sharing 2 + double-wide, with 1-layer vision and audio towers).
EXTRA = {
    "moe8": dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32),
    # the 12B unified text stack (Gemma4UnifiedForCausalLM: no PLE, no MoE), with kv sharing and double-wide MLPs
    "unified": dict(num_kv_shared_layers=2, use_double_wide_mlp=True),
    "mm": dict(hidden_size_per_layer_input=8, num_kv_shared_layers=2, use_double_wide_mlp=True),
}
TARGETS = (*VARIANTS, *EXTRA)
# Fixed seed per target (kept equal to the values the earlier tests/hf_reference.py derived, so checkpoints match).
SEEDS = {name: 100 + i for i, name in enumerate(sorted(TARGETS))}
MM_PLACEHOLDER_IDS = range(500, 503)  # image/audio/video ids of the "mm" wrapper (build_mm.py); HF maps them to <pad>
EOS_IDS = [1, 106]  # like real Gemma 4 generation configs: several end ids (<eos>, <end_of_turn>)


def text_config(name: str) -> dict:
    """Gemma4TextConfig kwargs of a target (a VARIANTS name, "moe8" or "mm"; a "-calm" suffix is ignored)."""
    name = name.removesuffix("-calm")
    if name not in SEEDS:
        raise KeyError(f"unknown oracle target {name!r}; known: {', '.join(TARGETS)}")
    return {**BASE, **VARIANTS.get(name, EXTRA.get(name))}


def perturb(model, seed: int):
    """Random but non-degenerate weights (spec §7.1, build.py): norm weights 1±0.2, `layer_scalar` and
    `per_expert_scale` in [0.5, 1.5], embeddings N(0, 0.1²) (so greedy output is not one repeated token), linear and
    expert weights N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not torch.is_floating_point(p) or p.ndim == 0 or "inv_freq" in name or name.endswith("embed_scale"):
                continue
            if name.endswith("layer_scalar") or name.endswith("per_expert_scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif p.ndim == 1:  # norm weights, router.scale
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:  # fan_in is the last dim
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def calm(model, seed: int = 7):
    """Condition a random net like a trained one (targets named "<variant>-calm", for quantization-agreement tests).
    Random Gemma 4 nets are chaotic: attention scale 1.0 on RMS-normalised q·k gives logits up to ±head_dim, every
    block rewrites the residual stream, and 512 equal-norm embedding rows leave top-1 margins of ~0.2σ, so a 1% weight
    error flips a third of the top-1 tokens. Here: q/k norm weights ×0.3, post-block norm weights ×0.1, embedding row
    norms log-normal (σ = 0.8)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.mul_(0.3)
            elif name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight",
                                "post_per_layer_input_norm.weight")):
                p.mul_(0.1)
            elif name.endswith("embed_tokens.weight"):
                p.mul_(torch.exp(0.8 * torch.randn(p.shape[0], 1, generator=g)))


# --- builders -----------------------------------------------------------------------------------------------


def _mm_config(text: dict) -> Gemma4Config:
    return Gemma4Config(
        text_config=Gemma4TextConfig(**text),
        vision_config=Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, head_dim=16, patch_size=4,
                                         position_embedding_size=64, pooling_kernel_size=2),
        audio_config=Gemma4AudioConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       output_proj_dims=48, subsampling_conv_channels=[8, 4], conv_kernel_size=3),
        image_token_id=500, audio_token_id=501, video_token_id=502, boi_token_id=503, eoi_token_id=504,
        boa_token_id=505, eoa_token_index=506)  # 500-502 = MM_PLACEHOLDER_IDS


def build_target(name: str, out_dir) -> Path:
    """Save a target checkpoint (fp32 safetensors via save_pretrained) + tokenizer + generation_config.json
    (eos [1, 106]) into out_dir and return it. `name`: a VARIANTS key, "moe8" (MoE, 8 experts top-2) or "mm"
    (Gemma4ForConditionalGeneration); a "-calm" suffix additionally applies `calm`."""
    out = Path(out_dir)
    base, calmed = name.removesuffix("-calm"), name.endswith("-calm")
    text = text_config(base)
    seed = SEEDS[base]
    torch.manual_seed(seed)
    if base == "mm":
        model = Gemma4ForConditionalGeneration(_mm_config(text)).eval()
    elif base == "unified":
        from transformers.models.gemma4_unified import Gemma4UnifiedForCausalLM, Gemma4UnifiedTextConfig

        text = {k: v for k, v in text.items() if k not in ("hidden_size_per_layer_input", "vocab_size_per_layer_input")}
        model = Gemma4UnifiedForCausalLM(Gemma4UnifiedTextConfig(**text)).eval()
    else:
        model = Gemma4ForCausalLM(Gemma4TextConfig(**text)).eval()
    perturb(model, seed)
    if calmed:
        calm(model)
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=list(EOS_IDS), pad_token_id=0)
    model.save_pretrained(out)
    save_tokenizer(out)
    return out


def drafter_config(target_name: str, ordered: bool) -> Gemma4AssistantConfig:
    """Assistant for a target (build.py's `assistant_for`): d=32, 4 layers [S,S,S,F], 4 heads, the target's KV
    geometry (kv heads, head dims, k_eq_v + global kv heads) and sliding window; ordered: 16 centroids, top-4."""
    t = text_config(target_name)
    at = dict(vocab_size=t["vocab_size"], hidden_size=32, intermediate_size=64, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=t["num_key_value_heads"], head_dim=t["head_dim"],
              global_head_dim=t["global_head_dim"], layer_types=[S, S, S, F], sliding_window=t["sliding_window"],
              hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, final_logit_softcapping=None,
              max_position_embeddings=512, num_kv_shared_layers=4)
    if t.get("attention_k_eq_v"):
        at.update(attention_k_eq_v=True, num_global_key_value_heads=t["num_global_key_value_heads"])
    return Gemma4AssistantConfig(text_config=Gemma4TextConfig(**at), backbone_hidden_size=t["hidden_size"],
                                 use_ordered_embeddings=ordered, num_centroids=16, centroid_intermediate_top_k=4)


def build_drafter(target_name: str, ordered: bool, out_dir) -> Path:
    """Save a Gemma4AssistantForCausalLM for `target_name` (see `drafter_config`; ordered: token_ordering = a random
    permutation of the vocabulary) with generation_config.num_assistant_tokens = 4, + tokenizer; return out_dir."""
    base = target_name.removesuffix("-calm")
    cfg = drafter_config(base, ordered)
    seed = 200 + SEEDS[base] + int(ordered)
    torch.manual_seed(seed)
    model = Gemma4AssistantForCausalLM(cfg).eval()
    perturb(model, seed)
    if ordered:
        perm = torch.randperm(cfg.get_text_config().vocab_size, generator=torch.Generator().manual_seed(seed + 1))
        model.masked_embedding.token_ordering.copy_(perm)
    model.generation_config.num_assistant_tokens = 4  # HF crashes on int(None) otherwise
    out = Path(out_dir)
    model.save_pretrained(out)
    save_tokenizer(out)
    return out


# --- a tiny Gemma-style tokenizer ---------------------------------------------------------------------------

SPECIAL = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 105: "<start_of_turn>", 106: "<end_of_turn>"}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# Gemma 4's turn and tool tokens at their real ids (and image tokens at the mm checkpoint's), and a chat template of
# ours in Gemma 4's format (the checkpoints' own template renders the same markers; this one is shorter): tools
# declared in the system turn, the model's calls, the tools' results, an image part as <|image|>.
GEMMA4_SPECIAL = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>",
                  49: "<tool_call|>", 50: "<|tool_response>", 51: "<tool_response|>", 52: '<|"|>', 105: "<|turn>",
                  106: "<turn|>", 500: "<|image|>", 503: "<|image>", 504: "<image|>"}  # the mm checkpoint's image ids
GEMMA4_TOOLS_TEMPLATE = (
    "{% macro value(v) %}{% if v is string %}<|\"|>{{ v }}<|\"|>{% else %}{{ v | tojson }}{% endif %}"
    "{% endmacro %}"
    "{{ bos_token }}"
    "{% if tools %}<|turn>system\n{% for t in tools %}<|tool>declaration:{{ t['function']['name'] }}"
    "{description:<|\"|>{{ t['function']['description'] }}<|\"|>}<tool|>{% endfor %}<turn|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}"
    "<|tool_response>response:{{ m['name'] or 'unknown' }}{value:{{ value(m['content']) }}{{ '}' }}<tool_response|>"
    "{% else %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% for c in m['tool_calls'] or [] %}<|tool_call>call:{{ c['function']['name'] + '{' }}"
    "{% for k, v in c['function']['arguments'] | dictsort %}{{ k }}:{{ value(v) }}{{ ',' if not loop.last }}"
    "{% endfor %}{{ '}' }}<tool_call|>{% endfor %}"
    "{% if m['content'] is string %}{{ m['content'] | trim }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|image|>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<turn|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)
_WORDS = (
    "the of and to in is it you that he was for on are with as his they be at one have this from or had by "
    "hot but some what there we can out other were all your when up use word how said an each she which do "
    "their time if will way about many then them would write like so these her long make thing see him two "
    "has look more day could go come did my sound no most number who over know water than call first "
    "people may down side been now find any new work part take get place made live where after back little "
    "only round man year came show every good me give our under name very through just form much great "
    "think say help low line before turn cause same mean differ move right boy old too does tell sentence "
    "set three want air well also play small end put home read hand port large spell add even land here "
    "must big high such follow act why ask men change went light kind off need house picture try us again "
    "animal point mother world near build self earth father head stand own page should country found answer "
    "school grow study still learn plant cover food sun four thought let keep eye never last door between "
    "city tree cross since hard start might story saw far sea draw left late run while press close night "
    "real life few stop open seem together next white children begin got walk example ease paper often "
    "always music those both mark book letter until mile river car feet care second group carry took rain "
    "eat room friend began idea fish mountain north once base hear horse cut sure watch color face wood "
    "main enough plain girl usual young ready above ever red list though feel talk bird soon body dog "
    "family direct pose leave song measure state product black short numeral class wind question happen "
    "complete ship area half rock order fire south problem piece told knew pass farm top whole king size "
    "heard best hour better true during hundred am remember step early hold west ground interest reach "
    "fast five sing listen six table travel less morning ten simple several vowel toward war lay against "
    "pattern slow center love person money serve appear road map science rule govern pull cold notice "
    "voice fall power town fine certain fly unit lead cry dark machine note wait plan figure star box noun "
    "field rest correct able pound done beauty drive stood contain front teach week final gave green oh"
).split()


def vocabulary(special: dict = SPECIAL) -> list[str]:
    """512 pieces: the special tokens at Gemma's ids (0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, 105 <start_of_turn>,
    106 <end_of_turn>), then "▁", printable ASCII letters/digits/punctuation and "\\n" (so any ASCII text without
    rare symbols can be spelled), then SentencePiece-style word pieces "▁word". Every id decodes to readable text.
    With GEMMA4_SPECIAL, Gemma 4's tokens take their ids, `{`, `}`, `_` and `"` are pieces too, and the last words
    are left out."""
    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()\n")
    extra = list('{}_"') if special is GEMMA4_SPECIAL else []
    pieces = iter(["▁"] + chars + extra + ["▁" + w for w in _WORDS])
    vocab = [special.get(i) or next(pieces) for i in range(512)]
    assert len(set(vocab)) == 512 and (special is not SPECIAL or next(pieces, None) is None)
    return vocab


def save_tokenizer(out_dir, gemma4_tools: bool = False) -> None:
    """tokenizer.json + tokenizer_config.json (+ chat template) laid out like Gemma's: spaces normalised to "▁", no
    dummy prefix, a SentencePiece-style (Unigram) model preferring the longest pieces, unknown characters -> <unk>,
    <bos> prepended, and Gemma's decoder (Replace ▁ -> " ", ByteFallback, Fuse), so mlx-lm picks its
    SPMStreamingDetokenizer exactly as for the real checkpoints. Loads with transformers.AutoTokenizer and mlx-lm.
    gemma4_tools: Gemma 4's turn and tool tokens (GEMMA4_SPECIAL) and GEMMA4_TOOLS_TEMPLATE."""
    out = Path(out_dir)
    special = GEMMA4_SPECIAL if gemma4_tools else SPECIAL
    vocab = vocabulary(special)
    # Viterbi maximises the summed score: -1 per piece (fewest pieces win), a small bonus for longer pieces.
    scores = [(p, 0.0 if i in special else -1.0 + 1e-3 * len(p)) for i, p in enumerate(vocab)]
    tok = Tokenizer(models.Unigram(scores, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", 2)])
    tok.add_special_tokens(list(special.values()))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", add_bos_token=True, add_eos_token=False, model_max_length=512,
        chat_template=GEMMA4_TOOLS_TEMPLATE if gemma4_tools else CHAT_TEMPLATE), indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps(dict(
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=[t for i, t in special.items() if i > 3]), indent=1))


# --- reference computations (fp32, eager attention) ---------------------------------------------------------

_MODELS: dict = {}


def _key(path) -> tuple:
    p = Path(path).resolve()
    weights = sorted(p.glob("*.safetensors"))
    return str(p), tuple(w.stat().st_mtime_ns for w in weights)


def load_model(path, dtype=torch.float32):
    """The transformers model of a checkpoint dir (class from config.json's model_type), fp32 unless asked, eager,
    eval; cached by path and dtype (a rebuilt checkpoint at the same path is reloaded)."""
    key = _key(path) + (dtype,)
    if key not in _MODELS:
        cfg = json.loads((Path(path) / "config.json").read_text())
        from transformers.models.gemma4_unified import Gemma4UnifiedForCausalLM

        cls = {"gemma4": Gemma4ForConditionalGeneration, "gemma4_assistant": Gemma4AssistantForCausalLM,
               "gemma4_unified_text": Gemma4UnifiedForCausalLM}.get(cfg["model_type"], Gemma4ForCausalLM)
        model = cls.from_pretrained(str(key[0]), dtype=dtype, attn_implementation="eager").eval()
        if cls is Gemma4AssistantForCausalLM and model.generation_config.num_assistant_tokens is None:
            model.generation_config.num_assistant_tokens = 4
        _MODELS[key] = model
    return _MODELS[key]


def clear_cache():
    _MODELS.clear()


def _ids(ids) -> torch.Tensor:
    return torch.tensor([list(map(int, ids))], dtype=torch.long)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).numpy().copy()


def _check_placeholders(path, ids, what="ids"):
    """The "mm" wrapper treats its multimodal placeholder ids (MM_PLACEHOLDER_IDS) specially: HF replaces them by
    <pad> before both embedding lookups, so its text path differs from a plain text model on them. Refuse instead of
    producing a silently different reference."""
    if isinstance(load_model(path), Gemma4ForConditionalGeneration):
        bad = sorted({int(i) for i in ids} & set(MM_PLACEHOLDER_IDS))
        if bad:
            raise ValueError(f"{what} contain(s) {bad}: multimodal placeholder ids of the mm oracle "
                             f"({MM_PLACEHOLDER_IDS.start}-{MM_PLACEHOLDER_IDS.stop - 1}), which HF maps to <pad>")


@torch.no_grad()
def _target_forward(path, ids, dtype=torch.float32, **kw):
    _check_placeholders(path, ids)
    # output_hidden_states=True: avoids the kv-shared-without-PLE crash, and hidden_states[-1] is the final-norm hidden
    return load_model(path, dtype)(_ids(ids), output_hidden_states=True, use_cache=False, **kw)


def hf_forward(path, ids, dtype=torch.float32) -> tuple[np.ndarray, np.ndarray]:
    """Full-sequence target forward (CausalLM or the multimodal wrapper's text path): (logits [T, V] after the
    softcap, final-norm hidden [T, H]); `dtype=torch.float64` for the exact result fp32 rounding is measured from."""
    out = _target_forward(path, ids, dtype)
    return _np(out.logits[0]), _np(out.hidden_states[-1][0])


def _no_eos_config(model, max_new_tokens: int) -> GenerationConfig:
    gc = copy.deepcopy(model.generation_config)
    gc.eos_token_id = None  # no stopping and no min-length eos suppression: pure argmax continuation
    gc.pad_token_id = 0
    gc.do_sample = False
    gc.max_new_tokens = max_new_tokens
    gc.min_new_tokens = None
    gc.max_length = None
    gc.output_hidden_states = True  # the kv-shared-without-PLE work-around
    gc.return_dict_in_generate = True
    return gc


@torch.no_grad()
def hf_greedy(path, ids, max_new_tokens: int) -> list[int]:
    """Plain greedy continuation: argmax of a full forward, one token at a time, never stopping early.
    (`generate` cannot be told "no eos": an unset eos_token_id is refilled from the model's generation config, and
    min_new_tokens would suppress the eos logit instead of letting the argmax pick it.)"""
    model = load_model(path)
    _check_placeholders(path, ids)
    seq = list(ids)
    for _ in range(max_new_tokens):
        logits = model(_ids(seq), output_hidden_states=True).logits[0, -1]
        seq.append(int(logits.argmax()))
    new = seq[len(ids):]
    _check_placeholders(path, new[:-1], "the greedy continuation")
    return new


@torch.no_grad()
def hf_assisted_greedy(target_path, drafter_path, ids, max_new_tokens: int, num_assistant_tokens: int = 4) -> list[int]:
    """HF assisted greedy generation (target + MTP assistant, eos disabled); equals `hf_greedy` (spec §7.3)."""
    target, drafter = load_model(target_path), load_model(drafter_path)
    drafter.generation_config.num_assistant_tokens = num_assistant_tokens
    _check_placeholders(target_path, ids)
    out = target.generate(_ids(ids), generation_config=_no_eos_config(target, max_new_tokens),
                          assistant_model=drafter)
    new = out.sequences[0, len(ids):].tolist()
    _check_placeholders(target_path, new[:-1], "the greedy continuation")
    return new


def hf_shared_kv(path, ids) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The target's `shared_kv_states` after a forward over ids (spec §1.4): {"sliding_attention": (K, V),
    "full_attention": (K, V)}, each [1, kv_heads, len(ids), head_dim] (K after k_norm + RoPE, V after v_norm) — the
    K/V of the last producer layer of each type, which is what the assistant reads."""
    out = _target_forward(path, ids, return_shared_kv_states=True)
    return {t: (_np(k), _np(v)) for t, (k, v) in dict(out.shared_kv_states).items()}


@torch.no_grad()
def hf_embed_scaled(target_path, token_id: int) -> np.ndarray:
    """The target's scaled embedding row E[x]·sqrt(H) [H] (the first half of the assistant's input, spec §2.3)."""
    emb = load_model(target_path).get_input_embeddings()
    return _np(emb(torch.tensor([[int(token_id)]]))[0, 0])


@torch.no_grad()
def hf_drafter_call(assistant_path, inputs_embeds, position: int, shared_kv: dict,
                    attention_mask: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One `Gemma4AssistantForCausalLM.forward` as HF's SinglePositionMultiTokenCandidateGenerator makes it
    (spec §2.3/§2.4): inputs_embeds [1, 1, 2H] = [E_t[x]·sqrt(H), g], position_ids [[position]], the given shared K/V
    (numpy, as from `hf_shared_kv`, possibly sliced), use_cache=False, and — as `generate` does — an all-ones 2-D
    attention mask (as long as the full-attention K/V; `attention_mask=False` passes None, which is equivalent).
    Returns (logits [V] (ordered heads: unselected tokens = min(selected) - 1), projected hidden [H] = the next g)."""
    model = load_model(assistant_path)
    kv = {t: (torch.from_numpy(np.ascontiguousarray(k, dtype=np.float32)),
              torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))) for t, (k, v) in shared_kv.items()}
    x = torch.from_numpy(np.asarray(inputs_embeds, dtype=np.float32).reshape(1, 1, -1))
    mask = torch.ones(1, kv[F][0].shape[2], dtype=torch.long) if attention_mask else None
    out = model(inputs_embeds=x, attention_mask=mask, position_ids=torch.tensor([[int(position)]]),
                shared_kv_states=kv, use_cache=False)
    return _np(out.logits[0, -1]), _np(out.last_hidden_state[0, -1])
