"""Gemma 4's vision tower against transformers 5.23.0's on the tiny multimodal checkpoint (tests/oracle.py "mm"):
the soft tokens an image becomes, in the text model's embedding space, within 1e-4 in fp32."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

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
