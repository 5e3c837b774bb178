"""Reading raw photos safely: every file becomes an RGB image or a reject with a reason.

Nothing here raises for a bad file. Handled: files that are not images
(whatever their name), truncated/corrupt files, decompression bombs (refused
from the header, before any pixel is decoded), huge JPEGs (decoded at a
reduced scale by libjpeg's DCT scaling), CMYK, grayscale, 16-bit, palette
and alpha images (converted to 8-bit RGB).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

# A photo of a face needs nothing like this many pixels; anything above is a bomb or an error.
MAX_PIXELS = 100_000_000


@dataclass
class Loaded:
    image: Image.Image | None  # RGB, 8-bit
    scale: float = 1.0  # original pixels per loaded pixel (DCT-scaled JPEGs load smaller)
    size: tuple[int, int] = (0, 0)  # the original (width, height)
    converted: str | None = None  # e.g. "CMYK->RGB"
    reject: str | None = None


def load_rgb(path: str, max_side: int = 2000) -> Loaded:
    """Open `path` as 8-bit RGB, reading large JPEGs at a reduced scale close to `max_side`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            size = img.size
            if size[0] * size[1] > MAX_PIXELS:
                return Loaded(None, size=size, reject=f"decompression bomb ({size[0] * size[1]} pixels)")
            scale = 1.0
            if img.format == "JPEG" and max(size) > max_side:
                # libjpeg decodes at 1/2, 1/4 or 1/8 scale almost for free.
                img.draft("RGB", (max(1, size[0] * max_side // max(size)), max(1, size[1] * max_side // max(size))))
                scale = size[0] / img.size[0]
            img.load()
    except FileNotFoundError:
        return Loaded(None, reject="file vanished")
    except UnidentifiedImageError:
        return Loaded(None, reject="not an image")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL refuses from the header: "Image size (N pixels) exceeds limit ..."
        found = re.search(r"\((\d+) pixels\)", str(exc))
        return Loaded(None, reject=f"decompression bomb ({found.group(1)} pixels)" if found else "decompression bomb")
    except (OSError, SyntaxError, ValueError) as exc:  # PIL: "image file is truncated", broken chunks
        return Loaded(None, reject=f"corrupt or truncated ({_short(exc)})")
    except Exception as exc:  # a decoder bug must not end the shard either
        return Loaded(None, reject=f"unreadable ({type(exc).__name__}: {_short(exc)})")
    try:
        rgb, converted = to_rgb(img)
    except Exception as exc:
        return Loaded(None, reject=f"unsupported image mode {img.mode} ({_short(exc)})")
    return Loaded(rgb, scale, size, converted)


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def conversion_label(img: Image.Image) -> str | None:
    """What to_rgb will do to this image (from its header alone), e.g. "CMYK->RGB"; None for RGB."""
    if img.mode == "RGB":
        return None
    return f"{img.mode}->RGB (alpha on white)" if _has_alpha(img) else f"{img.mode}->RGB"


def conversion_of(path: str) -> str | None:
    """conversion_label of a file, reading only its header (for crops a rerun reuses)."""
    try:
        with Image.open(path) as img:
            return conversion_label(img)
    except Exception:
        return None


def to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    label = conversion_label(img)
    if label is None:
        return img, None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB"), label
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background, label
    return img.convert("RGB"), label


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:120] if text else type(exc).__name__
