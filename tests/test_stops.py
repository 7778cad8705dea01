"""One token sequence, one text: alone, streamed, as a batch row and from the server, with a tokenizer whose tokens
include byte-fallback pieces (<0x00>…<0xFF>, as Gemma's), so multi-byte characters split across tokens and invalid
UTF-8 come out of the model, as they do from the real ones."""

import json

import numpy as np
import pytest
from mlx_lm.utils import load_tokenizer
from tokenizers import Tokenizer, decoders, models, normalizers, processors

import gemma_mlx
from gemma_mlx.stops import TextStream
from oracle import CHAT_TEMPLATE, SPECIAL

BYTES = [f"<0x{b:02X}>" for b in range(256)]


def byte_fallback_tokenizer(out, size=512):
    """The oracle tokenizer's layout (specials at Gemma's ids, "▁", characters, "▁word" pieces) with 256 byte pieces
    in the middle of the vocabulary, Unigram with byte_fallback and Gemma's decoder."""
    chars = list("abcdefghijklmnopqrstuvwxyz.,!?'\n")
    words = ["▁" + w for w in "the of and to in is it you that he was for on are with as his they be at one".split()]
    pieces = iter(["▁"] + chars + BYTES + words + [f"▁w{i}" for i in range(size)])
    vocab = [SPECIAL.get(i) or next(pieces) for i in range(size)]
    scores = [(p, 0.0 if i in SPECIAL else -1.0 + 1e-3 * len(p)) for i, p in enumerate(vocab)]
    tok = Tokenizer(models.Unigram(scores, unk_id=3, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.add_special_tokens(list(SPECIAL.values()))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", add_bos_token=True, chat_template=CHAT_TEMPLATE)))
    return load_tokenizer(out, eos_token_ids=[1])


@pytest.fixture(scope="module")
def engine(mlx_dir, tmp_path_factory):
    engine = gemma_mlx.load(mlx_dir("e2blike"), drafter=mlx_dir("e2blike", ordered=True))
    engine.tokenizer = byte_fallback_tokenizer(tmp_path_factory.mktemp("bytes"))
    return engine


def test_a_stream_gives_the_same_text_however_its_tokens_arrive(engine):
    """Random sequences heavy in byte pieces (é split as <0xC3><0xA9>, stray continuation bytes, 4-byte emoji):
    all at once, one token at a time, in random chunks: the same text, that of the sequence's bytes."""
    rng = np.random.default_rng(0)
    byte_ids = {engine.tokenizer.convert_tokens_to_ids(b): int(b[3:5], 16) for b in BYTES}
    for _ in range(50):
        ids = rng.integers(4, 100, 40).tolist()
        ids += [engine.tokenizer.convert_tokens_to_ids(b) for b in ("<0xC3>", "<0xA9>", "<0xF0>", "<0x9F>")]
        rng.shuffle(ids)
        whole = TextStream(engine.tokenizer, [1], max_tokens=100)
        whole.add(ids + [1])
        texts = [whole.take()]
        for chunks in ([1] * len(ids), rng.integers(1, 6, len(ids)).tolist()):
            s, out, i = TextStream(engine.tokenizer, [1], max_tokens=100), "", 0
            for n in chunks:
                s.add((ids + [1])[i : i + n])
                out += s.take()
                i += n
            s.add([1])
            texts.append(out + s.take())
        assert texts[0] == texts[1] == texts[2]
        assert sum(t in byte_ids for t in ids) > 2


def test_alone_streamed_batched_and_served_texts_are_byte_identical(engine):
    from starlette.testclient import TestClient

    from gemma_mlx.server import build_app

    prompts = ["the sea and", "it is you", "one of the", "they were at"]
    kwargs = dict(max_tokens=40, temperature=0, draft_tokens=3)
    alone = [gemma_mlx.generate(engine, p, reuse_cache=False, **kwargs) for p in prompts]
    streamed = ["".join(piece.text for piece in gemma_mlx.stream_generate(engine, p, reuse_cache=False, **kwargs))
                for p in prompts]
    batched = gemma_mlx.generate_batch(engine, prompts, **kwargs)
    app = build_app(engine, "tiny", max_batch=4, draft_tokens=3)
    with TestClient(app) as http:
        served = [http.post("/v1/completions", json=dict(prompt=p, max_tokens=40, temperature=0)).json()
                  ["choices"][0]["text"] for p in prompts]
        streamed_served = []
        for p in prompts:
            with http.stream("POST", "/v1/completions", json=dict(prompt=p, max_tokens=40, temperature=0,
                                                                   stream=True)) as r:
                chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            streamed_served.append("".join(c["choices"][0]["text"] for c in chunks))
    app.state.scheduler.close()
    byte_pieces = {engine.tokenizer.convert_tokens_to_ids(b) for b in BYTES}
    assert sum(t in byte_pieces for g in alone for t in g.tokens) > 10  # the model does emit byte pieces
    for i in range(len(prompts)):
        assert batched[i].tokens == alone[i].tokens
        texts = {alone[i].text, streamed[i], batched[i].text, served[i], streamed_served[i]}
        assert len(texts) == 1, texts
