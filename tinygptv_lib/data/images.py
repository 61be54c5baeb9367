"""The one image loader used by training, chat and evaluation, and the EVA-CLIP preprocessing.

MiniGPT-v2 (which TinyGPT-V follows) resizes plainly to size x size with bicubic interpolation for
training and evaluation alike, so boxes and left/right answers stay true; no crops, no flips.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white


class ImageLoadError(ValueError):
    """An image that cannot be used; the message names the file and the reason."""


def load_image(source: Union[str, Path, bytes], name: str | None = None) -> Image.Image:
    """Decode a file or bytes into an RGB image: EXIF orientation applied, alpha on white."""
    label = name or (str(source) if not isinstance(source, (bytes, bytearray)) else "<bytes>")
    try:
        if isinstance(source, (bytes, bytearray)):
            if not source:
                raise ImageLoadError(f"{label}: empty image data (0 bytes)")
            img = Image.open(io.BytesIO(source))
        else:
            path = Path(source)
            if not path.is_file():
                raise ImageLoadError(f"{label}: no such image file")
            if path.stat().st_size == 0:
                raise ImageLoadError(f"{label}: empty file (0 bytes)")
            img = Image.open(path)
        img.load()
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{label}: refused, larger than PIL's decompression-bomb limit ({e})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{label}: not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"{label}: cannot decode image ({e})") from None
    img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        return Image.fromarray((arr / hi * 255.0).round().astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def preprocess(img: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> normalised tensor (3, size, size): bicubic resize, CLIP mean/std."""
    img = img.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std
