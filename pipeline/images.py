"""Decoding a user's image bytes into the model's input: RGB uint8 squares, or a counted skip."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


# Leading bytes of image formats: a file that starts like an image but does not open is corrupt.
_MAGIC = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


class SkipSample(Exception):
    """An input that is skipped and counted under `reason`; the run goes on."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited onto black (the embedded digits' background);
    16-bit and float images are rescaled from their own range, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode.startswith("I;16"):
            scaled = arr / 257.0
        elif hi > lo:
            scaled = (arr - lo) * (255.0 / (hi - lo))
        else:
            scaled = np.zeros_like(arr)
        img = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def decode_image(data: bytes, size: int, min_side: int = 8) -> np.ndarray:
    """Bytes -> (size, size, 3) uint8: center-crop to a square, then resize (bicubic).

    Raises SkipSample with reason `empty_file`, `not_an_image`, `corrupt_image`, `too_large`
    (over PIL's decompression-bomb limit) or `too_small` (shorter side under `min_side` pixels).
    """
    if not data:
        raise SkipSample("empty_file")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SkipSample("too_large", str(exc)) from exc
    except Image.UnidentifiedImageError as exc:
        reason = "corrupt_image" if data.startswith(_MAGIC) else "not_an_image"
        raise SkipSample(reason, str(exc)) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise SkipSample("corrupt_image", str(exc)) from exc
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    w, h = img.size
    if min(w, h) < min_side:
        raise SkipSample("too_small", f"{w}x{h} is under {min_side} pixels")
    img = _to_rgb(img)
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes; deterministic (no timestamps or text chunks)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
