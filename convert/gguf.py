"""GGUF input: a llama.cpp Gemma 3 file → an MLX dir our loader (and mlx-lm) reads.

    convert_gguf("gemma-3-270m-q4_k_m.gguf", out_dir, dtype="fp32")

Read with gguf-py's GGUFReader; every tensor is dequantized to fp32 (gguf.quants.dequantize: Q4_K, Q5_0, Q6_K,
Q8_0, F16, BF16, ...) and cast to `dtype` (optionally re-quantized with MLX's affine quantization). What a GGUF
does differently from a Hugging Face checkpoint, and what is done about it:
- tensor names are llama.cpp's (gguf-py `MODEL_TENSORS[GEMMA3]`): mapped by NAMES below to ours (= HF, mlx-lm);
- llama.cpp's converter stores every Gemma norm weight as w + 1 (it folds Gemma's x·(1 + w) into x·w'): the 1 is
  subtracted here, so the weights are HF's again (and mlx-lm's, which also applies 1 + w);
- the config is metadata (`gemma3.*`); what llama.cpp hard-codes for Gemma 3 rather than stores (sliding pattern 6,
  local RoPE base 10k, query_pre_attn_scalar) falls back to the same values, through Gemma3Config's HF defaults;
- there is no tokenizer.json: one is built from the vocabulary (tokenizer.ggml.tokens / token_type) as a
  SentencePiece-style BPE with byte fallback, with tokenizer_config.json (bos/eos, add_bos, and the file's chat
  template; a Gemma 3 file without one, like Google's base checkpoints, gets Gemma 3's turn template, GEMMA3_CHAT).
The output is written into a temp dir and renamed at the end (writer.atomic_dir).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from gemma_mlx.models.base import FULL, SLIDING
from gemma_mlx.models.gemma3_text import Gemma3Config, Gemma3Target

from . import quantize as q
from .weights import expected_params
from .writer import ShardWriter, atomic_dir

DTYPES = {"bf16": mx.bfloat16, "fp16": mx.float16, "fp32": mx.float32}

# llama.cpp tensor name (gguf-py TENSOR_NAMES for MODEL_ARCH.GEMMA3) → ours; `blk.N.` ↔ `model.layers.N.`.
NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp token types


# Gemma 3's chat template (Google's tokenizer_config.json; llama.cpp's GEMMA3_CHAT_TEMPLATE): the system prompt goes
# into the first user turn, the assistant's role is "model", every turn ends with <end_of_turn>.
GEMMA3_CHAT = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}{{ raise_exception('Invalid content type') }}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


class GGUFError(ValueError):
    """A GGUF that cannot be converted; the message is one line for the user and nothing was written."""


def convert_gguf(gguf_path, out_dir, dtype: str = "bf16", quantize: int | None = None, group_size: int = 64,
                 force: bool = False, progress: bool = False) -> Path:
    """Convert a Gemma 3 GGUF file into an MLX dir at `out_dir` (fp32/bf16/fp16, optionally 4/8-bit)."""
    try:
        from gguf.quants import dequantize
    except ImportError:
        raise GGUFError("reading GGUF files needs the `gguf` package (pip install gguf)") from None
    if dtype not in DTYPES:
        raise GGUFError(f"--dtype {dtype} is not supported (use bf16, fp16 or fp32)")
    try:
        q.check_request(quantize, group_size)
    except q.QuantizeError as e:
        raise GGUFError(str(e)) from None
    path, out = Path(gguf_path), Path(out_dir)
    if out.exists() and not force:
        raise GGUFError(f"{out} already exists (use --force to replace it)")
    reader = _open(path)
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    raw = gemma3_config(meta, set(tensors))
    cfg = Gemma3Config.from_dict(raw)  # ConfigError for what the runtime cannot run
    model = Gemma3Target(cfg)
    expected = expected_params(model)
    plan = tensor_plan(tensors, expected)
    tokenizer, tokenizer_config = build_tokenizer(meta)

    quantizable = q.quantizable_modules(model) if quantize else set()
    cfg_out = cfg.to_dict()
    overrides = {}
    with atomic_dir(out, force) as tmp:
        writer = ShardWriter(tmp)
        for name, ours in _progress(plan, progress, f"converting {path.name}"):
            t = tensors[name]
            try:
                value = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(expected[ours])
            except NotImplementedError:
                raise GGUFError(f"tensor {name}: gguf-py cannot dequantize {t.tensor_type.name}") from None
            if ours.endswith("norm.weight"):
                value = value - 1.0  # llama.cpp stores Gemma norms as w + 1
            for k, v in _to_mlx(ours, mx.array(value).astype(DTYPES[dtype]), quantize, group_size, quantizable,
                                overrides).items():
                writer.add(k, v)
        writer.close()
        if quantize:
            cfg_out["quantization"] = cfg_out["quantization_config"] = q.record(quantize, group_size, overrides)
        (tmp / "config.json").write_text(json.dumps(cfg_out, indent=2))
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
        (tmp / "generation_config.json").write_text(json.dumps(
            {k: cfg_out[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}, indent=2))
    return out


def tensor_plan(tensors: dict, expected: dict) -> list[tuple[str, str]]:
    """(GGUF name, our name) of every tensor, checked against the shapes the config implies, none missing."""
    plan = []
    for name, t in tensors.items():
        ours = map_name(name)
        if ours is None or ours not in expected:
            raise GGUFError(f"unexpected tensor {name} (not part of this Gemma 3 config)")
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        if shape != expected[ours]:
            raise GGUFError(f"tensor {name} has shape {list(shape)}, the config implies {list(expected[ours])}")
        plan.append((name, ours))
    missing = sorted(set(expected) - {ours for _, ours in plan})
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise GGUFError(f"missing tensor for {missing[0]}{more}")
    return plan


def describe_gguf(gguf_path) -> tuple[dict, list[tuple[str, int, int]]]:
    """(HF-style config, [(tensor type, elements, bytes)]) of a Gemma 3 GGUF, from its metadata and tensor table
    only (nothing dequantized): what `gemma-mlx info` shows without converting."""
    reader = _open(Path(gguf_path))
    raw = gemma3_config(read_metadata(reader), {t.name for t in reader.tensors})
    return raw, [(t.tensor_type.name, int(t.n_elements), int(t.n_bytes)) for t in reader.tensors]


def _open(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise GGUFError("reading GGUF files needs the `gguf` package (pip install gguf)") from None
    try:
        reader = GGUFReader(path)
    except (OSError, ValueError, IndexError, KeyError) as e:  # gguf-py's ways of rejecting a bad/truncated file
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GGUFError(f"{path}: not a readable GGUF file ({why})") from None
    arch = reader.fields.get("general.architecture")
    if arch is None or arch.contents() != "gemma3":
        raise GGUFError(f"{path.name}: GGUF architecture {arch and arch.contents()!r} is not supported (only gemma3)")
    return reader


def read_metadata(reader) -> dict:
    """Every metadata field as a Python value (arrays as lists; the token list stays a list of str)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def map_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`; None for a name gemma3 does not have."""
    base, dot, suffix = gguf_name.rpartition(".")
    if suffix != "weight":
        return None
    if base.startswith("blk."):
        _, idx, part = base.split(".", 2)
        layer_part = NAMES.get(part)
        if not idx.isdigit() or layer_part is None or layer_part.startswith(("model.", "lm_head")):
            return None
        return f"model.layers.{idx}.{layer_part}.weight"
    ours = NAMES.get(base)
    return f"{ours}.weight" if ours and ours.startswith(("model.", "lm_head")) else None


def gemma3_config(meta: dict, tensor_names: set) -> dict:
    """An HF-style `gemma3_text` config from `gemma3.*` metadata. Keys llama.cpp never writes for Gemma 3 are left
    out, so Gemma3Config applies HF's defaults, which are the values llama.cpp hard-codes."""

    def get(key, default=None):
        return meta.get(f"gemma3.{key}", default)

    def one(key, value):
        if isinstance(value, list):  # llama.cpp allows a per-layer array; Gemma 3 has one value for all layers
            if len(set(value)) != 1:
                raise GGUFError(f"gemma3.{key} differs between layers ({sorted(set(value))}): not supported")
            return value[0]
        return value

    for key in ("embedding_length", "block_count", "feed_forward_length", "attention.head_count"):
        if get(key) is None:
            raise GGUFError(f"GGUF metadata has no gemma3.{key}")
    hidden, layers = get("embedding_length"), get("block_count")
    heads = one("attention.head_count", get("attention.head_count"))
    head_dim = get("attention.key_length", hidden // heads)
    if get("attention.value_length", head_dim) != head_dim:
        raise GGUFError("attention.value_length != attention.key_length: not a Gemma 3 file")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFError("GGUF has no tokenizer.ggml.tokens (no vocabulary)")
    raw = dict(
        model_type="gemma3_text",
        vocab_size=len(tokens),
        hidden_size=hidden,
        intermediate_size=one("feed_forward_length", get("feed_forward_length")),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=one("attention.head_count_kv", get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id", 2),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id", 0),
        eos_token_id=eos_ids(meta, tokens),
    )
    for key, field in (("context_length", "max_position_embeddings"),
                       ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
                       ("attention.sliding_window", "sliding_window"),
                       ("rope.freq_base", "rope_theta"),
                       ("rope.freq_base_swa", "rope_local_base_freq"),
                       ("final_logit_softcapping", "final_logit_softcapping"),
                       ("attn_logit_softcapping", "attn_logit_softcapping")):
        if get(key) is not None:
            raw[field] = get(key)
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        raw["rope_scaling"] = {"rope_type": scaling, "factor": get("rope.scaling.factor", 1.0)}
    pattern = get("attention.sliding_window_pattern")
    if isinstance(pattern, list):  # per layer: True = sliding
        raw["layer_types"] = [SLIDING if p else FULL for p in pattern]
    elif pattern is not None:
        raw["sliding_window_pattern"] = pattern
    # llama.cpp: f_attention_scale = 1/√(hidden/heads) for the 27B (62 layers), else 1/√head_dim
    scale = get("attention.scale")
    raw["query_pre_attn_scalar"] = (scale**-2 if scale else hidden // heads if layers == 62 else head_dim)
    return raw


def eos_ids(meta: dict, tokens: list) -> list[int]:
    """The file's EOS, plus <end_of_turn> (Gemma 3's generation_config ends on both)."""
    ids = [meta.get("tokenizer.ggml.eos_token_id", 1)]
    if "<end_of_turn>" in tokens and tokens.index("<end_of_turn>") not in ids:
        ids.append(tokens.index("<end_of_turn>"))
    return ids


def _to_mlx(name, value, bits, group_size, quantizable, overrides) -> dict:
    module = name.removesuffix(".weight")
    if bits and module in quantizable:
        chosen = q.plan(module, value.shape, bits, group_size)
        if chosen is None:
            overrides[module] = False
            return {name: value}
        if chosen != (bits, group_size):
            overrides[module] = {"group_size": chosen[1], "bits": chosen[0]}
        return q.quantize(module, value, *chosen)
    return {name: value}


def _progress(items, enabled: bool, label: str):
    if not enabled:
        yield from items
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(label, total=len(items))
        for item in items:
            yield item
            bar.advance(task)


# --- tokenizer ------------------------------------------------------------------------------------------------


def build_tokenizer(meta: dict):
    """(tokenizers.Tokenizer, tokenizer_config dict) from a SentencePiece (`llama`) GGUF vocabulary, laid out as
    Gemma's own tokenizer.json: normalizer ' ' → '▁', BPE with byte fallback (<0xNN> pieces), merges recovered
    from the vocabulary, control tokens special, user-defined tokens (\\n runs, HTML tags) matched whole."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.processors import TemplateProcessing

    if meta.get("tokenizer.ggml.model") != "llama":
        raise GGUFError(f"tokenizer model {meta.get('tokenizer.ggml.model')!r} is not supported (SentencePiece only)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    # llama.cpp writes SentencePiece's user-defined whitespace pieces with real spaces; the vocabulary spells ▁.
    pieces = ["\u2581" * len(t) if t and set(t) == {" "} else t for t in tokens]
    vocab = {p: i for i, p in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise GGUFError("the GGUF vocabulary has duplicate tokens")

    def special(key, default):
        i = meta.get(f"tokenizer.ggml.{key}", default)
        return None if i is None else tokens[i]

    bos, eos, unk, pad = (special("bos_token_id", 2), special("eos_token_id", 1), special("unknown_token_id", 3),
                          special("padding_token_id", 0))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges_from_vocab(pieces), unk_token=unk, fuse_unk=True,
                        byte_fallback=True, dropout=None))
    replace = normalizers.Replace(" ", "\u2581")
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if prefix else replace
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, p, ty in zip(tokens, pieces, types) if ty == USER_DEFINED and t == p])
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    template = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
    pair = template + " " + template.replace("$A:0", "$B:1").replace(":0", ":1")
    tok.post_processor = TemplateProcessing(single=template, pair=pair,
                                            special_tokens=[(t, vocab[t]) for t in {bos, eos} if t])
    config = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=bos, eos_token=eos, unk_token=unk,
                  pad_token=pad, add_bos_token=add_bos, add_eos_token=add_eos, clean_up_tokenization_spaces=False,
                  spaces_between_special_tokens=False, padding_side="left",
                  model_max_length=meta.get("gemma3.context_length", 131_072))
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    elif meta.get("general.architecture") == "gemma3" and {"<start_of_turn>", "<end_of_turn>"} <= set(tokens):
        config["chat_template"] = GEMMA3_CHAT
    return tok, config


def merges_from_vocab(pieces: list[str]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece BPE vocabulary: every split of a piece into two pieces, ranked by the
    merged piece's position (SentencePiece orders BPE pieces by merge order; Gemma's scores do not, the -1000 of
    user-defined pieces being the case in point), longer left part first among one piece's splits."""
    vocab = set(pieces)
    merges = []
    for piece in pieces:
        for cut in range(len(piece) - 1, 0, -1):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    return merges
