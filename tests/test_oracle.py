"""Self-checks of the oracle (tests/oracle.py): the tiny checkpoints build and load, the reference functions return
what they promise, the transformers 5.23.0 work-arounds are in effect, and the tokenizer works in both libraries."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from oracle import (
    EOS_IDS, MM_PLACEHOLDER_IDS, SPECIAL, TARGETS, build_target, hf_assisted_greedy, hf_drafter_call,
    hf_embed_scaled, hf_forward, hf_greedy, hf_shared_kv, load_model, text_config,
)

IDS = [2] + np.random.default_rng(0).integers(3, 500, 19).tolist()  # 20 positions > sliding window 8


def weights(path, suffix):
    (key,) = [k for k in load_file(path / "model.safetensors") if k.endswith(suffix)]
    return load_file(path / "model.safetensors")[key]


@pytest.mark.parametrize("name", TARGETS)
def test_target_builds_and_forward_is_consistent(name, hf_dir):
    path = hf_dir(name)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == {"mm": "gemma4", "unified": "gemma4_unified_text"}.get(name, "gemma4_text")
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == EOS_IDS
    t = text_config(name)
    logits, hidden = hf_forward(path, IDS)
    assert logits.shape == (len(IDS), 512) and hidden.shape == (len(IDS), t["hidden_size"])
    assert logits.dtype == hidden.dtype == np.float32 and np.isfinite(logits).all()
    # hidden is the final-norm hidden: the tied head (+ softcap) on it gives the logits
    raw = hidden @ weights(path, "embed_tokens.weight").T
    cap = t["final_logit_softcapping"]
    np.testing.assert_allclose(cap * np.tanh(raw / cap) if cap else raw, logits, atol=1e-4)
    assert len(set(logits.argmax(-1).tolist())) > 3  # non-degenerate
    # greedy with a cache == argmax of a full forward over the result
    new = hf_greedy(path, IDS, 6)
    full, _ = hf_forward(path, IDS + new)
    assert full[len(IDS) - 1:-1].argmax(-1).tolist() == new


def test_builds_are_deterministic(hf_dir, tmp_path):
    again = build_target("moe", tmp_path / "moe")
    a, b = load_file(hf_dir("moe") / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_kv_shared_target_without_ple_runs(hf_dir):
    path = hf_dir("kvshared")
    assert text_config("kvshared")["hidden_size_per_layer_input"] == 0
    assert load_model(path).config.kv_sharing_modes == [None, None, "store", "store", "reuse", "reuse"]
    assert hf_forward(path, IDS)[0].shape == (len(IDS), 512)
    assert len(hf_greedy(path, IDS, 3)) == 3


@pytest.mark.parametrize("name,kv_heads", [("plain", (2, 2)), ("keqv", (2, 1)), ("e2blike", (2, 2)), ("mm", (2, 2))])
def test_shared_kv(name, kv_heads, hf_dir):
    path = hf_dir(name)
    kv = hf_shared_kv(path, IDS)  # non-empty for the unshared targets thanks to the patch
    assert set(kv) == {"sliding_attention", "full_attention"}
    for (layer_type, (k, v)), heads, dim in zip(sorted(kv.items(), reverse=True), kv_heads, (16, 32)):
        assert k.shape == v.shape == (1, heads, len(IDS), dim), layer_type
        assert not np.array_equal(k, v)
    if name == "plain":
        assert load_model(path).config.kv_sharing_modes == [None] * 4 + ["store"] * 2


def test_embed_scaled(hf_dir):
    path = hf_dir("ple")
    e = weights(path, "embed_tokens.weight")
    np.testing.assert_allclose(hf_embed_scaled(path, 7), e[7] * np.sqrt(64), rtol=1e-6)


@pytest.mark.parametrize("name,ordered", [("plain", False), ("e2blike", True), ("keqv", True)])
def test_drafter_call_matches_what_generate_does(name, ordered, hf_dir, hf_drafter_dir):
    """Record the assistant's calls inside HF assisted generation; the first one is rebuilt from the oracle's own
    functions (spec §2.6 invariant: [E_t[x_{L-1}]·√H, h_{L-2}] at position L-1, K/V of the prompt)."""
    target, drafter = hf_dir(name), hf_drafter_dir(name, ordered)
    gen = json.loads((drafter / "generation_config.json").read_text())
    assert gen["num_assistant_tokens"] == 4
    model, calls = load_model(drafter), []
    forward = model.forward

    def record(*args, **kw):
        out = forward(*args, **kw)
        calls.append((kw["inputs_embeds"].numpy().copy(), kw["position_ids"].item(), out.logits[0, -1].numpy().copy(),
                       out.last_hidden_state[0, -1].numpy().copy()))
        return out

    model.forward = record
    try:
        assisted = hf_assisted_greedy(target, drafter, IDS, 8)
    finally:
        del model.forward
    assert assisted == hf_greedy(target, IDS, 8)

    first = hf_greedy(target, IDS, 1)[0]
    _, hidden = hf_forward(target, IDS)
    x = np.concatenate([hf_embed_scaled(target, first), hidden[-1]])[None, None]
    kv = hf_shared_kv(target, IDS)
    logits, projected = hf_drafter_call(drafter, x, len(IDS), kv)
    rec_x, rec_pos, rec_logits, rec_projected = calls[0]
    assert rec_pos == len(IDS)
    np.testing.assert_allclose(x, rec_x, atol=1e-5)
    np.testing.assert_allclose(logits, rec_logits, atol=1e-4)
    np.testing.assert_allclose(projected, rec_projected, atol=1e-4)
    assert logits.shape == (512,) and projected.shape == (text_config(name)["hidden_size"],)
    # the all-ones 2-D mask generate passes is equivalent to none
    np.testing.assert_array_equal(hf_drafter_call(drafter, x, len(IDS), kv, attention_mask=False)[0], logits)
    if ordered:  # 4 of 16 centroids × 32 tokens each selected; the rest is filled with min(selected) - 1
        fill = logits.min()
        assert (logits > fill).sum() == 4 * 32 and np.isclose(fill, logits[logits > fill].min() - 1)


def test_mm_placeholders_are_refused(hf_dir):
    with pytest.raises(ValueError, match="placeholder"):
        hf_forward(hf_dir("mm"), [2, 5, MM_PLACEHOLDER_IDS[0], 7])


def test_tokenizer_in_transformers_and_mlx_lm(hf_dir, hf_drafter_dir):
    from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer
    from mlx_lm.tokenizer_utils import load as mlx_load
    from mlx_lm.utils import load_tokenizer
    from transformers import AutoTokenizer

    text = "Hello world, the quick brown fox!\n  Two  spaces: (1-2); ok?"
    path = hf_dir("plain")
    assert (hf_drafter_dir("plain", False) / "tokenizer.json").exists()
    hf = AutoTokenizer.from_pretrained(path)
    assert (hf.pad_token_id, hf.eos_token_id, hf.bos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
    assert hf.convert_ids_to_tokens([105, 106]) == ["<start_of_turn>", "<end_of_turn>"]
    ids = hf.encode(text)
    assert ids[0] == 2 and 3 not in ids and hf.decode(ids, skip_special_tokens=True) == text
    assert 3 in hf.encode("naïve")  # no byte fallback: characters outside the vocabulary become <unk>
    chat = [{"role": "user", "content": "hi there"}]
    rendered = hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert rendered == "<bos><start_of_turn>user\nhi there<end_of_turn>\n<start_of_turn>model\n"
    chat_ids = hf.encode(rendered, add_special_tokens=False)
    assert chat_ids[:2] == [2, 105] and chat_ids.count(2) == 1 and 106 in chat_ids

    for wrapper in (mlx_load(path), load_tokenizer(path, eos_token_ids=EOS_IDS)):
        assert wrapper.encode(text) == ids
        assert list(wrapper.apply_chat_template(chat, add_generation_prompt=True)) == chat_ids
        assert isinstance(wrapper._detokenizer, SPMStreamingDetokenizer)  # like the real Gemma tokenizer.json
        detok = wrapper.detokenizer
        detok.reset()
        pieces = []
        for i in ids[1:]:
            detok.add_token(i)
            pieces.append(detok.last_segment)
        detok.finalize()
        pieces.append(detok.last_segment)
        assert "".join(pieces) == text and sum(bool(p) for p in pieces) > 10  # streamed, not at the end
    assert set(EOS_IDS) <= set(load_tokenizer(path, eos_token_ids=EOS_IDS).eos_token_ids)

    words = hf.decode(list(range(400, 420)))  # every id decodes to readable text
    assert words.isprintable() and len(words.split()) >= 15
    assert all(hf.convert_ids_to_tokens(i) == tok for i, tok in SPECIAL.items())
