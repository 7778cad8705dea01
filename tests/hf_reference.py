"""The oracle: tiny random Gemma 4 checkpoints built with transformers 5.23.0 at test time, and its reference
computations (spec §7). The only module that imports torch/transformers; gemma_mlx never does.

transformers 5.23.0 needs two patches to run MTP at all (spec §5, "bugs found"): `kv_sharing_modes` raises for an
all-shared assistant and marks no "store" layer for an unshared target. A kv-shared target without PLE crashes in
a plain forward unless `output_hidden_states=True`, which every call here passes.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
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

S, F = "sliding_attention", "full_attention"
_orig_modes = _C.Gemma4TextConfig.kv_sharing_modes


def _kv_sharing_modes(self):
    n, shared = self.num_hidden_layers, self.num_kv_shared_layers or 0
    if shared >= n:  # assistant: every layer reuses the target's KV
        return ["reuse"] * n
    if shared == 0:  # unshared target: the last layer of each type stores its KV for the assistant
        modes = [None] * n
        for t in set(self.layer_types):
            modes[n - 1 - self.layer_types[::-1].index(t)] = "store"
        return modes
    return _orig_modes.fget(self)


_C.Gemma4TextConfig.kv_sharing_modes = property(_kv_sharing_modes)

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, global_head_dim=32, layer_types=[S, S, F, S, S, F], sliding_window=8,
            hidden_size_per_layer_input=0, vocab_size_per_layer_input=512, final_logit_softcapping=30.0,
            max_position_embeddings=512, bos_token_id=2, eos_token_id=1, pad_token_id=0)
VARIANTS = {
    "plain": {},
    "nosoftcap": dict(final_logit_softcapping=None),
    "kvshared": dict(num_kv_shared_layers=2, use_double_wide_mlp=True),
    "ple": dict(hidden_size_per_layer_input=8),
    "moe": dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32),
    "moe8": dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32),  # batch tests
    "keqv": dict(attention_k_eq_v=True, num_global_key_value_heads=1),
    "e2blike": dict(num_hidden_layers=8, layer_types=[S, S, S, F, S, S, S, F], num_kv_shared_layers=3,
                    use_double_wide_mlp=True, hidden_size_per_layer_input=8),
    # the multimodal wrapper's text stack (PLE + kv sharing), saved as Gemma4ForConditionalGeneration
    "mm": dict(hidden_size_per_layer_input=8, num_kv_shared_layers=2, use_double_wide_mlp=True),
}
EOS_IDS = [1, 106]  # Gemma 4 generation configs carry several end ids (<eos>, <end_of_turn>)


def text_config(name: str) -> dict:
    return {**BASE, **VARIANTS[name]}


def perturb(model, seed: int):
    """Random but non-degenerate weights (spec §7.1): norms 1±0.2, scalars in [0.5, 1.5], embeddings N(0, 0.1²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not torch.is_floating_point(p) or p.ndim == 0 or "inv_freq" in name or name.endswith("embed_scale"):
                continue
            if name.endswith("layer_scalar") or name.endswith("per_expert_scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def _seed(name: str) -> int:
    return 100 + sorted(VARIANTS).index(name)


def calm(model, seed: int = 7):
    """Condition a random net like a trained one, for the quantization-agreement tests. Random Gemma 4 nets are
    chaotic: attention scale 1.0 on RMS-normalised q·k gives logits up to ±head_dim, every block rewrites the
    residual stream, and 512 equal-norm embedding rows leave top-1 margins of ~0.2σ, so a 1% weight error flips a
    third of the top-1 tokens, which says nothing about a quantizer. Trained nets have moderate attention logits,
    blocks that edit the stream by a fraction, and embedding rows of uneven norm. Here: q/k norm weights ×0.3,
    post-block norm weights ×0.1, embedding row norms log-normal (σ = 0.8)."""
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


def build_target(name: str, out: Path) -> Path:
    """A target checkpoint; `name` is a variant, optionally suffixed "-calm" (see `calm`)."""
    out = Path(out)
    name, calmed = name.removesuffix("-calm"), name.endswith("-calm")
    torch.manual_seed(_seed(name))
    if name == "mm":
        cfg = Gemma4Config(
            text_config=Gemma4TextConfig(**text_config(name)),
            vision_config=Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, head_dim=16, patch_size=4,
                                             position_embedding_size=64, pooling_kernel_size=2),
            audio_config=Gemma4AudioConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           output_proj_dims=48, subsampling_conv_channels=[8, 4], conv_kernel_size=3),
            image_token_id=500, audio_token_id=501, video_token_id=502, boi_token_id=503, eoi_token_id=504,
            boa_token_id=505, eoa_token_index=506)
        model = Gemma4ForConditionalGeneration(cfg).eval()
    else:
        model = Gemma4ForCausalLM(Gemma4TextConfig(**text_config(name))).eval()
    perturb(model, _seed(name))
    if calmed:
        calm(model)
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=EOS_IDS, pad_token_id=0)
    model.save_pretrained(out)
    save_tokenizer(out)
    return out


def build_drafter(name: str, ordered: bool, out: Path) -> Path:
    """A gemma4_assistant for target `name`: d=32, 4 layers [S,S,S,F], KV geometry copied from the target."""
    t = text_config(name)
    at = dict(vocab_size=t["vocab_size"], hidden_size=32, intermediate_size=64, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=t["num_key_value_heads"], head_dim=t["head_dim"],
              global_head_dim=t["global_head_dim"], layer_types=[S, S, S, F], sliding_window=t["sliding_window"],
              hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, final_logit_softcapping=None,
              max_position_embeddings=512, num_kv_shared_layers=4)
    if t.get("attention_k_eq_v"):
        at.update(attention_k_eq_v=True, num_global_key_value_heads=t["num_global_key_value_heads"])
    cfg = Gemma4AssistantConfig(text_config=Gemma4TextConfig(**at), backbone_hidden_size=t["hidden_size"],
                                use_ordered_embeddings=ordered, num_centroids=16, centroid_intermediate_top_k=4)
    seed = 200 + _seed(name) + int(ordered)
    torch.manual_seed(seed)
    model = Gemma4AssistantForCausalLM(cfg).eval()
    perturb(model, seed)
    if ordered:
        perm = torch.randperm(t["vocab_size"], generator=torch.Generator().manual_seed(seed + 1))
        model.masked_embedding.token_ordering.copy_(perm)
    model.generation_config.num_assistant_tokens = 4  # HF crashes on int(None) otherwise
    out = Path(out)
    model.save_pretrained(out)
    save_tokenizer(out)
    return out


# --- a tiny tokenizer with a Gemma-style chat template ------------------------------------------------------

SPECIAL = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 105: "<start_of_turn>", 106: "<end_of_turn>"}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def vocabulary() -> list[str]:
    """512 pieces: the special tokens at Gemma's ids, single characters, then common words (SentencePiece '▁')."""
    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()\n")
    words = ("the of and to in is it you that he was for on are with as his they be at one have this from or had by "
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
             "field rest correct able pound done beauty drive stood contain front teach week final gave green oh "
             "quick develop sleep warm free minute strong special mind behind clear tail produce fact street inch "
             "lot nothing course stay wheel full force blue object decide surface deep moon island foot yet busy "
             "test record boat common gold possible plane age dry wonder laugh thousand ago ran check game shape yes "
             "miss brought heat snow bed bring sit perhaps fill east weight language among").split()
    pieces = iter(["▁"] + chars + ["▁" + w for w in words])  # every text can be spelled with the first pieces
    vocab = [SPECIAL.get(i) or next(pieces, f"<unused{i}>") for i in range(512)]
    assert len(set(vocab)) == 512
    return vocab


def save_tokenizer(out: Path):
    vocab = {p: i for i, p in enumerate(vocabulary())}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix="", max_input_chars_per_word=64))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.add_special_tokens(list(SPECIAL.values()))
    tok.save(str(Path(out) / "tokenizer.json"))
    (Path(out) / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", add_bos_token=True, add_eos_token=False, chat_template=CHAT_TEMPLATE), indent=1))


# --- reference computations (fp32, eager attention) ---------------------------------------------------------


@lru_cache(maxsize=None)
def _load(path: str):
    cfg = json.loads((Path(path) / "config.json").read_text())
    cls = {"gemma4": Gemma4ForConditionalGeneration, "gemma4_assistant": Gemma4AssistantForCausalLM}.get(
        cfg["model_type"], Gemma4ForCausalLM)
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@torch.no_grad()
def hf_forward(path, ids: list[int]):
    """(logits [T, V], final-norm hidden [T, H]) of a full-sequence forward."""
    out = _load(str(path))(torch.tensor([ids]), output_hidden_states=True)
    return out.logits[0].numpy(), out.hidden_states[-1][0].numpy()


@torch.no_grad()
def hf_greedy(path, ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain greedy continuation (no early stop)."""
    model = _load(str(path))
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                         do_sample=False, output_hidden_states=True, return_dict_in_generate=True,
                         eos_token_id=None, pad_token_id=0)
    return out.sequences[0, len(ids):].tolist()


@torch.no_grad()
def hf_shared_kv(path, ids: list[int]) -> dict:
    """The producer-layer K/V the assistant reads after a forward over ids: {layer_type: (K, V)} [1, kv, S, D]."""
    out = _load(str(path))(torch.tensor([ids]), output_hidden_states=True, return_shared_kv_states=True)
    return {t: (k.numpy(), v.numpy()) for t, (k, v) in out.shared_kv_states.items()}


@torch.no_grad()
def hf_embed_scaled(path, token_id: int) -> np.ndarray:
    """E[x]·√H of the target (the first half of the assistant's input, spec §2.3)."""
    model = _load(str(path))
    return model.get_input_embeddings()(torch.tensor([[token_id]]))[0, 0].numpy()


@torch.no_grad()
def hf_drafter_call(path, inputs_embeds: np.ndarray, position: int, shared_kv: dict):
    """One Gemma4AssistantForCausalLM call as the candidate generator makes it: (logits [V], projected hidden [H])."""
    model = _load(str(path))
    kv = {t: (torch.from_numpy(k), torch.from_numpy(v)) for t, (k, v) in shared_kv.items()}
    out = model(inputs_embeds=torch.from_numpy(inputs_embeds.astype(np.float32)),
                position_ids=torch.tensor([[position]]), shared_kv_states=kv, use_cache=False)
    return out.logits[0, -1].numpy(), out.last_hidden_state[0, -1].numpy()
