"""Gemma 4's vision tower against transformers 5.23.0's on the tiny multimodal checkpoint (tests/oracle.py "mm"):
the soft tokens an image becomes, in the text model's embedding space, within 1e-4 in fp32."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from gemma_mlx.loader import load_vision
from gemma_mlx.models.gemma4_vision import Vision, VisionConfig

from oracle import load_model


def patches_of(rng, grids, patch, pad_to):
    """Random images of the given (width, height) patch grids, as the processor gives them: patches in [0, 1] and
    their (x, y) positions, rows padded with (-1, -1) to `pad_to` patches."""
    pixels = np.zeros((len(grids), pad_to, 3 * patch * patch), np.float32)
    positions = -np.ones((len(grids), pad_to, 2), np.int64)
    for b, (w, h) in enumerate(grids):
        n = w * h
        pixels[b, :n] = rng.random((n, 3 * patch * patch))
        positions[b, :n] = [(x, y) for y in range(h) for x in range(w)]
    return pixels, positions


@pytest.fixture(scope="module")
def towers(hf_dir):
    path = hf_dir("mm")
    hf = load_model(path).eval()
    cfg = hf.config
    ours = Vision(VisionConfig.from_dict(cfg.vision_config.to_dict(), cfg.text_config.hidden_size))
    weights = {k.removeprefix("model."): mx.array(v) for k, v in load_file(str(path / "model.safetensors")).items()
               if k.startswith(("model.vision_tower.", "model.embed_vision."))}
    ours.load_weights(list(weights.items()), strict=True)
    return hf, ours


@pytest.mark.parametrize("grids", [[(4, 4)], [(8, 4), (4, 4)], [(6, 6), (2, 4)]], ids=["one", "two", "padded"])
def test_soft_tokens_match_transformers(towers, grids):
    hf, ours = towers
    patch = hf.config.vision_config.patch_size
    pad_to = max(w * h for w, h in grids)
    pixels, positions = patches_of(np.random.default_rng(len(grids)), grids, patch, pad_to)
    with torch.no_grad():
        expected = hf.model.get_image_features(torch.tensor(pixels), torch.tensor(positions)).pooler_output
    expected = torch.cat(list(expected)).numpy()
    got = np.array(ours(mx.array(pixels), mx.array(positions)))
    k2 = hf.config.vision_config.pooling_kernel_size ** 2
    assert got.shape == expected.shape == (sum(w * h for w, h in grids) // k2, hf.config.text_config.hidden_size)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    swapped = np.array(ours(mx.array(pixels), mx.array(np.where(positions >= 0, positions[..., ::-1], -1))))
    assert np.abs(swapped - expected).max() > 1e-2  # x and y are told apart (position table and 2-D RoPE)


# --- the image processor: gemma_mlx/image.py against transformers' Gemma4ImageProcessorPil -----------------------

from gemma_mlx.image import ImageError, read_image, to_patches  # noqa: E402


def png(tmp_path, width, height, seed=0, name="image.png"):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path = tmp_path / name
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("width,height,soft", [(640, 480, 280), (37, 53, 70), (1000, 30, 280), (48, 48, 70),
                                               (300, 2000, 140)])
def test_patches_match_transformers_processor(tmp_path, width, height, soft):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    image = read_image(png(tmp_path, width, height))
    hf = Gemma4ImageProcessorPil(max_soft_tokens=soft)(images=[image])
    pixels, positions, n = to_patches(image, patch_size=16, soft_tokens=soft, pooling=3)
    assert n == hf["num_soft_tokens_per_image"][0] and n <= soft
    np.testing.assert_array_equal(positions, np.asarray(hf["image_position_ids"][0]))
    np.testing.assert_allclose(pixels, np.asarray(hf["pixel_values"][0]), atol=1e-6)


def test_bad_images_are_one_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    good = png(tmp_path, 64, 64).read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    cases = {tmp_path / "notes.txt": "not an image", tmp_path / "cut.png": "truncated", tmp_path / "none.png":
             "no such file"}
    for path, what in cases.items():
        with pytest.raises(ImageError, match=what):
            read_image(path)
    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("L", (20000, 20000)).save(big)  # compresses to ~0.4 MB; decoded it would take 1.2 GB as RGB
    with pytest.raises(ImageError, match="more than 64 megapixels"):
        read_image(big)
    Image.new("L", (9000, 8000)).save(big)  # under Pillow's limit, over ours
    with pytest.raises(ImageError, match="9000 x 8000 pixels, more than 64 megapixels"):
        read_image(big)


# --- a prompt with images through the target: logits against Gemma4ForConditionalGeneration ---------------------

IMAGE, BOI, EOI = 500, 503, 504  # the "mm" checkpoint's image, begin- and end-of-image ids


@pytest.fixture(scope="module", params=["causal", "bidirectional"])
def with_images(request, hf_dir, tmp_path_factory):
    """(transformers model, our target, our vision) for the tiny mm checkpoint: as built (image tokens attend
    causally, as E2B/E4B's), and with use_bidirectional_attention="vision" (as 26B-A4B's and 31B's: an image attends
    to itself both ways in the sliding layers)."""
    from gemma_mlx.convert import convert
    from gemma_mlx.loader import load_checkpoint

    src = hf_dir("mm") if request.param == "causal" else bidirectional_mm(tmp_path_factory.mktemp("mmbidir") / "hf")
    hf = load_model(src).eval()
    converted = convert(str(src), tmp_path_factory.mktemp("mmconv") / "t", dtype="fp32", progress=False)
    return hf, load_checkpoint(converted), load_vision(converted)[0]  # the converter keeps it in vision/


def bidirectional_mm(src):
    """The tiny mm checkpoint (its seed, perturbed as tests/oracle.py builds it) with use_bidirectional_attention
    "vision", saved to `src`."""
    import oracle
    from transformers import GenerationConfig, Gemma4ForConditionalGeneration

    torch.manual_seed(oracle.SEEDS["mm"])
    text = {**oracle.text_config("mm"), "use_bidirectional_attention": "vision"}
    model = Gemma4ForConditionalGeneration(oracle._mm_config(text)).eval()
    oracle.perturb(model, oracle.SEEDS["mm"])
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=list(oracle.EOS_IDS), pad_token_id=0)
    model.save_pretrained(src)
    oracle.save_tokenizer(src)
    return src


def mm_taking_images(mlx_dir, tmp_path):
    """The converted mm target with a tokenizer whose template writes an image part as <|image|> (id 500), and 70
    soft tokens per image (the tiny model's context holds that)."""
    import json
    import shutil

    from oracle import save_tokenizer

    d = tmp_path / "mm"
    shutil.copytree(mlx_dir("mm"), d)
    save_tokenizer(d, gemma4_tools=True)
    cfg = json.loads((d / "vision" / "config.json").read_text())
    (d / "vision" / "config.json").write_text(json.dumps({**cfg, "vision_soft_tokens_per_image": 70}))
    return d


def image_prompt(hf, grids):
    """Text, an image, text, an image, text, as Gemma 4's processor lays it out: <boi> + one image token per soft
    token + <eoi> per image."""
    patch, k2 = hf.config.vision_config.patch_size, hf.config.vision_config.pooling_kernel_size ** 2
    pixels, positions = patches_of(np.random.default_rng(5), grids, patch, max(w * h for w, h in grids))
    ids = [2, 40, 41]
    for i, (w, h) in enumerate(grids):
        ids += [BOI] + [IMAGE] * (w * h // k2) + [EOI] + [60 + i, 61 + i]
    return ids, pixels, positions


def test_logits_with_images_match_transformers(with_images):
    hf, target, vision = with_images
    ids, pixels, positions = image_prompt(hf, [(4, 4), (8, 4)])
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor([ids]), pixel_values=torch.tensor(pixels),
                      image_position_ids=torch.tensor(positions),
                      mm_token_type_ids=torch.tensor([[int(t == IMAGE) for t in ids]])).logits[0].numpy()
    where = np.array([[t == IMAGE for t in ids]])
    features = vision(mx.array(pixels), mx.array(positions))
    logits, _ = target(mx.array([ids]), target.make_cache(1, chunk=64), images=(where, features))
    np.testing.assert_allclose(np.array(logits[0]), expected, atol=1e-4, rtol=1e-4)
    assert (np.array(logits[0]).argmax(-1) == expected.argmax(-1)).all()
    both_ways = target.config.use_bidirectional_attention == "vision"
    for chunk in (8, 9) if both_ways else (5, 8, 9):  # 8 and 9 would cut the second image: moved to its start
        last, _ = target.prefill(mx.array([ids]), target.make_cache(1, chunk=chunk), images=(where, features))
        np.testing.assert_allclose(np.array(last[0, -1]), expected[-1], atol=1e-4, rtol=1e-4)
    text_only, _ = target(mx.array([ids]), target.make_cache(1, chunk=64))  # the image tokens as plain ids
    assert np.abs(np.array(text_only[0, -1]) - expected[-1]).max() > 1e-2


def test_an_image_longer_than_the_chunk_is_refused_when_it_attends_both_ways(with_images):
    hf, target, vision = with_images
    ids, pixels, positions = image_prompt(hf, [(8, 4)])
    where = np.array([[t == IMAGE for t in ids]])
    features = vision(mx.array(pixels), mx.array(positions))
    if target.config.use_bidirectional_attention == "vision":
        with pytest.raises(ValueError, match="an image of 8 soft tokens is longer than the prefill chunk"):
            target.prefill(mx.array([ids]), target.make_cache(1, chunk=4), images=(where, features))
    else:
        target.prefill(mx.array([ids]), target.make_cache(1, chunk=4), images=(where, features))


def test_a_text_only_target_says_it_has_no_vision_tower(mlx_dir):
    from gemma_mlx.loader import LoadError

    with pytest.raises(LoadError, match="has no vision tower"):
        load_vision(mlx_dir("plain"))


def test_greedy_with_an_image_is_transformers_and_mtp_equals_plain(with_images, mlx_dir):
    """Prefill with two images, then decode: the first 16 greedy tokens are transformers' generate(); MTP (a drafter
    right 80% of the time) gives the same tokens as plain decoding, in a batch beside a text-only row too."""
    from bench.controlled import ControlledDrafter
    from gemma_mlx.decode import Decoder
    from gemma_mlx.draft_length import DraftLength
    from gemma_mlx.loader import load_checkpoint

    hf, target, vision = with_images
    ids, pixels, positions = image_prompt(hf, [(4, 4), (8, 4)])
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), pixel_values=torch.tensor(pixels),
                          image_position_ids=torch.tensor(positions),
                          mm_token_type_ids=torch.tensor([[int(t == IMAGE) for t in ids]]), max_new_tokens=16,
                          min_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = out[0, len(ids):].tolist()
    images = (np.array([[t == IMAGE for t in ids]]), vision(mx.array(pixels), mx.array(positions)))
    text = [2, 40, 41, 42, 43, 44]
    drafter = load_checkpoint(mlx_dir("mm", ordered=True))

    text_alone = decode_text(target, text)
    references = {0: ids + expected, 1: text + text_alone}  # by row id: the image row is added first

    def decode(k, with_text_row=False):
        decoder = None
        controlled = ControlledDrafter(drafter, lambda: [references[r.id] for r in decoder.rows], 0.8, seed=k)
        decoder = Decoder(target, controlled if k else None, draft=DraftLength(fixed=k), chunk=16)
        row = decoder.add(ids, 16, images=images)
        other = decoder.add(text, 16) if with_text_row else None
        while decoder.rows:
            decoder.step()
        return row, other

    plain, _ = decode(0)
    assert plain.tokens == expected
    for k in (1, 3):
        row, text_row = decode(k, with_text_row=True)
        assert row.tokens == expected and text_row.tokens == text_alone
        assert row.stats.accepted_tokens > 0  # drafts were taken: the rounds after the image were speculative


def decode_text(target, prompt):
    from gemma_mlx.decode import Decoder
    from gemma_mlx.draft_length import DraftLength

    decoder = Decoder(target, None, draft=DraftLength(fixed=0), chunk=16)
    row = decoder.add(prompt, 16)
    while decoder.rows:
        decoder.step()
    return row.tokens


def test_the_prefix_cache_never_reuses_an_image(with_images):
    """Image tokens are the same ids for any image: a prompt resent with another image must not reuse the first
    one's cache past the text before it."""
    from gemma_mlx.decode import Decoder
    from gemma_mlx.draft_length import DraftLength
    from gemma_mlx.prefix_cache import PrefixCache

    hf, target, vision = with_images
    ids, pixels, positions = image_prompt(hf, [(4, 4)])
    where = np.array([[t == IMAGE for t in ids]])
    other = pixels[:, ::-1].copy()  # the same patches in reverse order: another image

    def decode(pix, kept):
        decoder = Decoder(target, None, draft=DraftLength(fixed=0), chunk=16, prefix_cache=kept)
        row = decoder.add(ids, 8, images=(where, vision(mx.array(pix), mx.array(positions))))
        while decoder.rows:
            decoder.step()
        return row

    kept = PrefixCache(2**30)
    first = decode(pixels, kept)
    again = decode(other, kept)
    assert again.tokens == decode(other, None).tokens != first.tokens
    assert again.stats.prefill_tokens == len(ids) - ids.index(IMAGE)  # only the text before the image was reused
    assert all(IMAGE not in tokens for tokens in kept.entries)


def test_generate_takes_chat_messages_with_images(hf_dir, mlx_dir, tmp_path):
    """gemma_mlx.generate with an image part (a file, a data: URL): the chat template's image token expanded to the
    image's soft tokens as Gemma 4's processor lays them out, and the reply transformers generates from the same
    pixels."""
    import base64

    import gemma_mlx
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    engine = gemma_mlx.load(mm_taking_images(mlx_dir, tmp_path))
    path = png(tmp_path, 40, 24, seed=3)
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    hf = load_model(hf_dir("mm")).eval()
    processed = Gemma4ImageProcessorPil(patch_size=4, pooling_kernel_size=2, max_soft_tokens=70)(
        images=[read_image(path)])
    n = processed["num_soft_tokens_per_image"][0]
    for part in ({"type": "image", "image": str(path)}, {"type": "image_url", "image_url": {"url": url}}):
        messages = [{"role": "user", "content": [{"type": "text", "text": "look at"}, part]}]
        ids, images = engine.encode_images(messages)
        text_ids = engine.encode([{"role": "user", "content": [{"type": "text", "text": "look at"},
                                                               {"type": "image"}]}])
        i = text_ids.index(IMAGE)
        assert ids == text_ids[:i] + [BOI] + [IMAGE] * n + [EOI] + text_ids[i + 1:]
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), pixel_values=torch.tensor(np.asarray(processed["pixel_values"])),
                              image_position_ids=torch.tensor(np.asarray(processed["image_position_ids"])),
                              max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        reply = gemma_mlx.generate(engine, messages, max_tokens=12, reuse_cache=False)
        assert reply.tokens == out[0, len(ids):].tolist()


def test_an_image_to_a_text_only_checkpoint_is_one_clear_error(mlx_dir, tmp_path):
    import gemma_mlx
    from gemma_mlx.loader import LoadError

    engine = gemma_mlx.load(mlx_dir("plain"))
    with pytest.raises(LoadError, match="no vision tower"):
        engine.encode_images([{"role": "user", "content": [{"type": "image", "image": str(png(tmp_path, 8, 8))}]}])
    with pytest.raises(ImageError, match="remote image URLs are not fetched"):
        engine.encode_images([{"role": "user", "content": [{"type": "image_url",
                                                            "image_url": {"url": "https://example.com/a.png"}}]}])


def test_the_server_takes_image_url_parts_and_the_cli_takes_image(hf_dir, mlx_dir, tmp_path):
    """An OpenAI image_url data: URL in the server, `generate --image` in the CLI: the reply gemma_mlx.generate gives
    for the same image; bad images are a 400 / one line."""
    import base64
    import json

    from starlette.testclient import TestClient
    from typer.testing import CliRunner

    import gemma_mlx
    from gemma_mlx.cli import app as cli
    from gemma_mlx.server import build_app

    d = mm_taking_images(mlx_dir, tmp_path)
    engine = gemma_mlx.load(d)
    path = png(tmp_path, 30, 30, seed=4)
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    expected = gemma_mlx.generate(engine, [{"role": "user", "content": [{"type": "image", "image": str(path)},
                                                                        {"type": "text", "text": "what"}]}],
                                  max_tokens=6, reuse_cache=False).text
    app = build_app(engine, "tiny", max_batch=2, draft_tokens=0)
    try:
        with TestClient(app) as http:
            body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                              {"type": "text", "text": "what"}]}],
                    "max_tokens": 6, "temperature": 0}
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected
            body["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64," + base64.b64encode(
                b"not a png").decode()
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 400 and "not an image" in r.json()["error"]["message"]
    finally:
        app.state.scheduler.close()
    result = CliRunner().invoke(cli, ["generate", "--model", str(d), "--drafter", "none", "--prompt", "what",
                                      "--image", str(path), "--max-tokens", "6", "--temp", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["text"] == expected
    result = CliRunner().invoke(cli, ["generate", "--model", str(d), "--drafter", "none", "--prompt", "what",
                                      "--image", str(tmp_path / "missing.png")])
    assert result.exit_code == 1 and "no such file" in result.output and "Traceback" not in result.output


def test_chat_image_attaches_an_image_to_the_next_message(mlx_dir, tmp_path, capsys):
    import gemma_mlx
    from gemma_mlx.cli.chat import Conversation, slash_command, user_message

    path = str(png(tmp_path, 16, 16))
    conv = Conversation(gemma_mlx.load(mlx_dir("mm")), [], "auto")
    slash_command(conv, f"/image {tmp_path / 'missing.png'}")
    slash_command(conv, f"/image {path}")
    assert conv.images == [path] and "no such file" in capsys.readouterr().out
    assert user_message(conv, "what is it") == {"role": "user", "content": [
        {"type": "image", "image": path}, {"type": "text", "text": "what is it"}]}
    assert user_message(conv, "and now") == {"role": "user", "content": "and now"}  # attached once
    text_only = Conversation(gemma_mlx.load(mlx_dir("plain")), [], "auto")
    slash_command(text_only, f"/image {path}")
    assert not text_only.images and "no vision tower" in capsys.readouterr().out


def test_a_quantized_vision_tower_stays_close(hf_dir, tmp_path):
    """`convert --quantize 8` quantizes the tower's linear layers too; its soft tokens stay within 2% of fp32's."""
    from gemma_mlx.convert import convert

    fp = load_vision(convert(str(hf_dir("mm")), tmp_path / "fp", dtype="fp32", progress=False))[0]
    q8_dir = convert(str(hf_dir("mm")), tmp_path / "q8", dtype="fp32", quantize=8, group_size=32, progress=False)
    q8, cfg = load_vision(q8_dir)
    assert cfg["quantization"]["bits"] == 8
    assert any(k.endswith(".scales") for k in load_file(str(q8_dir / "vision" / "model.safetensors")))
    pixels, positions = patches_of(np.random.default_rng(9), [(4, 4)], 4, 16)
    a, b = (np.array(v(mx.array(pixels), mx.array(positions))) for v in (fp, q8))
    assert 0 < np.abs(a - b).max() <= 0.02 * np.abs(a).max()


def test_an_mlx_vlm_wrapper_loads_its_own_vision_tower(hf_dir, tmp_path):
    """mlx-community's multimodal Gemma 4 dirs (mlx-vlm's names: `vision_tower.…` and `language_model.model.…` in
    one file): the tower loads from the dir itself, its soft tokens transformers'."""
    import json

    import gemma_mlx

    src = hf_dir("mm")
    weights = {}
    for k, v in load_file(str(src / "model.safetensors")).items():
        k = k.removeprefix("model.")
        weights["language_model.model." + k.removeprefix("language_model.") if k.startswith("language_model.")
                else k] = mx.array(v)
    d = tmp_path / "mlx-vlm"
    d.mkdir()
    mx.save_safetensors(str(d / "model.safetensors"), weights, metadata={"format": "mlx"})
    (d / "config.json").write_text((src / "config.json").read_text())
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        (d / f).write_bytes((src / f).read_bytes())
    hf = load_model(src).eval()
    pixels, positions = patches_of(np.random.default_rng(2), [(4, 4)], 4, 16)
    with torch.no_grad():
        expected = hf.model.get_image_features(torch.tensor(pixels), torch.tensor(positions)).pooler_output[0].numpy()
    vision, cfg = load_vision(d)
    assert cfg["image_token_id"] == IMAGE and json.loads((d / "config.json").read_text())["vision_config"]
    np.testing.assert_allclose(np.array(vision(mx.array(pixels), mx.array(positions))), expected, atol=1e-4)
    assert gemma_mlx.Engine(None, None, path=d).has_vision


def test_an_engine_for_a_bidirectional_target_prefills_whole_images(hf_dir, tmp_path, monkeypatch):
    """26B-A4B / 31B attend to an image both ways, so an image must be in one prefill chunk: the engine's chunk is at
    least the soft tokens per image (280 by default, above the 256 it uses for text)."""
    import json

    import gemma_mlx

    monkeypatch.setenv("GEMMA_MLX_HOME", str(tmp_path / "home"))  # load() converts HF dirs into its cache
    src = bidirectional_mm(tmp_path / "hf")
    assert json.loads((src / "config.json").read_text()).get("vision_soft_tokens_per_image", 280) == 280
    assert gemma_mlx.load(src).chunk == 280 and gemma_mlx.load(hf_dir("mm")).chunk == 256


def test_the_checkpoints_processor_settings_are_followed(tmp_path):
    """processor_config.json's image_processor (here: normalisation, a bilinear filter, 140 soft tokens) makes the
    same patches as transformers' processor with those settings."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    settings = {"do_normalize": True, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.3, 0.4], "resample": 2,
                "max_soft_tokens": 140, "patch_size": 16, "pooling_kernel_size": 3}
    image = read_image(png(tmp_path, 333, 222, seed=8))
    hf = Gemma4ImageProcessorPil(**settings)(images=[image])
    pixels, positions, n = to_patches(image, 16, 140, 3, settings)
    assert n == hf["num_soft_tokens_per_image"][0]
    np.testing.assert_array_equal(positions, np.asarray(hf["image_position_ids"][0]))
    np.testing.assert_allclose(pixels, np.asarray(hf["pixel_values"][0]), atol=1e-5)
    assert not np.allclose(pixels, to_patches(image, 16, 140, 3)[0], atol=1e-2)  # the settings change the patches
