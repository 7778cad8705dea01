"""Images in: a file or bytes to the vision tower's input, as Gemma 4's image processor makes it (Pillow and numpy,
no torch).

    image = read_image("photo.jpg")                 # RGB; ImageError with one clear line otherwise
    pixels, positions, soft_tokens = to_patches(image, patch_size=16, soft_tokens=280, pooling=3)

The image is resized (bicubic, aspect ratio kept) to the largest size whose sides are multiples of pooling ×
patch_size and that has at most soft_tokens × pooling² patches, scaled to [0, 1], and cut into patches (each patch
row by row, channels last); `positions` holds each patch's (x, y) in the patch grid, and both are padded to
soft_tokens × pooling² rows ((-1, -1) positions). The image then takes `soft_tokens` = patches / pooling² places in
the prompt.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import numpy as np

MAX_PIXELS = 64_000_000  # a larger image is refused before it is decoded (a 20000 x 20000 PNG would take 1.2 GB)
SOFT_TOKENS = (70, 140, 280, 560, 1120)  # the budgets Gemma 4's processor accepts


class ImageError(ValueError):
    """An image that cannot be used; the message says which and why."""


def read_image(source):
    """An RGB image from a path or bytes: not an image, truncated, or larger than MAX_PIXELS is an ImageError."""
    from PIL import Image, UnidentifiedImageError

    name = "the image" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else Path(source))
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except Image.DecompressionBombError:  # Pillow's own limit, far above ours
        raise ImageError(f"{name} has more than {MAX_PIXELS // 1_000_000} megapixels") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"{name} is not an image Pillow can read ({type(e).__name__})") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError(f"{name} is {width} x {height} pixels, more than {MAX_PIXELS // 1_000_000} megapixels")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageError(f"{name} is truncated or corrupt ({str(e) or type(e).__name__})") from None
    return image.convert("RGB")


def target_size(height: int, width: int, patch: int, max_patches: int, pooling: int) -> tuple[int, int]:
    """The largest (height, width), sides multiples of pooling × patch, with at most max_patches patches, keeping
    the aspect ratio (as transformers' get_aspect_ratio_preserving_size)."""
    target_px = max_patches * patch**2
    factor = math.sqrt(target_px / (height * width))
    side = pooling * patch
    h, w = int(math.floor(factor * height / side)) * side, int(math.floor(factor * width / side)) * side
    longest = (max_patches // pooling**2) * side
    if h == 0 and w == 0:
        raise ImageError(f"a {width} x {height} image cannot be resized to a multiple of {side} pixels")
    if h == 0:
        h, w = side, min(int(math.floor(width / height)) * side, longest)
    elif w == 0:
        h, w = min(int(math.floor(height / width)) * side, longest), side
    return h, w


def geometry(settings: dict) -> tuple[int, int, int]:
    """(patch size, soft tokens per image, pooling) from a target's vision settings (loader.vision_settings): the
    image processor's config first, then the vision config's."""
    processor, vision = settings.get("processor", {}), settings["vision_config"]
    return (processor.get("patch_size", vision.get("patch_size", 16)),
            processor.get("max_soft_tokens", settings.get("vision_soft_tokens_per_image", 280)),
            processor.get("pooling_kernel_size", vision.get("pooling_kernel_size", 3)))


def to_patches(image, patch_size: int = 16, soft_tokens: int = 280, pooling: int = 3,
               processor: dict | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(pixels [max_patches, 3·p·p] float32 in [0, 1], positions [max_patches, 2] int32, the image's soft tokens).
    `processor`: the checkpoint's image processor settings (processor_config.json's `image_processor`): its
    resample filter, rescale factor and, with do_normalize, mean and std."""
    from PIL import Image

    processor = processor or {}
    if soft_tokens not in SOFT_TOKENS:
        raise ImageError(f"soft tokens per image must be one of {SOFT_TOKENS}, got {soft_tokens}")
    max_patches = soft_tokens * pooling**2
    h, w = target_size(image.height, image.width, patch_size, max_patches, pooling)
    if (h, w) != (image.height, image.width):
        image = image.resize((w, h), Image.Resampling(processor.get("resample", Image.BICUBIC)))
    pixels = np.asarray(image, dtype=np.float32) * np.float32(processor.get("rescale_factor", 1 / 255))  # [H, W, C]
    if processor.get("do_normalize"):
        mean, std = (np.asarray(processor.get(k, d), np.float32) for k, d in (("image_mean", 0.0), ("image_std", 1.0)))
        pixels = (pixels - mean) / std
    gh, gw = h // patch_size, w // patch_size
    patches = pixels.reshape(gh, patch_size, gw, patch_size, 3).transpose(0, 2, 1, 3, 4).reshape(gh * gw, -1)
    grid_x, grid_y = np.meshgrid(np.arange(gw), np.arange(gh), indexing="xy")
    positions = np.stack([grid_x, grid_y], axis=-1).reshape(-1, 2)
    out_pixels = np.zeros((max_patches, patches.shape[1]), np.float32)
    out_positions = -np.ones((max_patches, 2), np.int32)
    out_pixels[: len(patches)], out_positions[: len(patches)] = patches, positions
    return out_pixels, out_positions, len(patches) // pooling**2


def image_parts(messages: list[dict]) -> tuple[list[dict], list]:
    """(the messages with each image part as {"type": "image"}, which the chat template writes as its image token;
    the images, in order). A part is {"type": "image", "image": path | bytes | PIL image} or OpenAI's
    {"type": "image_url", "image_url": {"url": "data:image/...;base64,..." | a local path}}."""
    out, images = [], []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for p in content:
            if isinstance(p, dict) and p.get("type") in ("image", "image_url"):
                images.append(p.get("image") if p["type"] == "image" else url_image(p.get("image_url")))
                parts.append({"type": "image"})
            else:
                parts.append(p)
        out.append({**m, "content": parts})
    return out, images


def url_image(image_url) -> bytes | str:
    """An OpenAI image_url's image: a data: URL's bytes, or a local path (remote URLs are not fetched)."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise ImageError("image_url must be {\"url\": \"data:image/...;base64,...\"} or a local file")
    if url.startswith("data:"):
        try:
            return base64.b64decode(url.split(",", 1)[1], validate=True)
        except (IndexError, ValueError):
            raise ImageError("the image's data: URL is not base64") from None
    if url.startswith(("http://", "https://")):
        raise ImageError("remote image URLs are not fetched: send the image as a data: URL or a local path")
    return url.removeprefix("file://")


def expand(ids: list[int], image_id: int, boi: int, eoi: int, counts: list[int]) -> list[int]:
    """Each image token the template wrote becomes <boi>, one image token per soft token, <eoi> (as Gemma 4's
    processor does)."""
    out, i = [], 0
    for t in ids:
        if t == image_id:
            out += [boi] + [image_id] * counts[i] + [eoi]
            i += 1
        else:
            out.append(t)
    return out
