"""Reading raw photos safely: every file becomes an RGB image or a reject with a reason.

Nothing here raises for a bad file. Handled: files that are not images
(whatever their name), truncated/corrupt files, decompression bombs (refused
from the header, before any pixel is decoded), animated and multi-page images
(GIF, APNG, WebP, TIFF: refused from their headers; an MPO is a JPEG), huge JPEGs (decoded at a
reduced scale by libjpeg's DCT scaling), CMYK, grayscale, 16-bit, palette
and alpha images (converted to 8-bit RGB).
"""

from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from facenet import confine
from facenet.errors import first_line

# A photo of a face needs nothing like this many pixels; anything above is a bomb or an error. JPEGs are
# decoded at a reduced scale (a few MB whatever their size); other formats decode whole, so their cap
# bounds the memory a small file can take (40 MP RGB: 120 MB, plus one 16-bit plane when converted).
MAX_PIXELS = 100_000_000
MAX_FULL_DECODE_PIXELS = 40_000_000
MAX_FILE_BYTES = 64 << 20
# A phone's JPEG is often an MPO (the photo plus a preview or a depth map): PIL reads its primary image, which
# is a JPEG like any other (DCT scaling included).
JPEG_FORMATS = ("JPEG", "MPO")


@dataclass
class Loaded:
    image: Image.Image | None  # RGB, 8-bit
    scale: float = 1.0  # original pixels per loaded pixel (DCT-scaled JPEGs load smaller)
    size: tuple[int, int] = (0, 0)  # the original (width, height)
    converted: str | None = None  # e.g. "CMYK->RGB"
    reject: str | None = None


def load_rgb(path: str, max_side: int = 2000, roots: confine.Roots | None = None) -> Loaded:
    """Open `path` as 8-bit RGB, reading large JPEGs at a reduced scale close to `max_side`. With `roots`
    the file must resolve inside them and be a regular file (checked as it is opened)."""
    try:
        data = confine.read_bytes(path, roots, "image", MAX_FILE_BYTES)
    except FileNotFoundError:
        return Loaded(None, reject="file vanished")
    except confine.Refused as exc:
        return Loaded(None, reject=f"refused ({str(exc).split(': ', 1)[-1]})")
    except OSError as exc:
        return Loaded(None, reject=f"unreadable ({first_line(exc, 120)})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            size = img.size
            pixels = size[0] * size[1]
            jpeg = img.format in JPEG_FORMATS
            if pixels > MAX_PIXELS or (not jpeg and pixels > MAX_FULL_DECODE_PIXELS):
                return Loaded(None, size=size, reject=f"decompression bomb ({pixels} pixels)")
            frames = animated(img)
            if frames:
                return Loaded(None, size=size, reject=f"animated image ({frames}); only still images are read")
            scale = 1.0
            if jpeg and max(size) > max_side:
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
        return Loaded(None, reject=f"corrupt or truncated ({first_line(exc, 120)})")
    except Exception as exc:  # a decoder bug must not end the shard either
        return Loaded(None, reject=f"unreadable ({type(exc).__name__}: {first_line(exc, 120)})")
    try:
        rgb, converted = to_rgb(img)
    except Exception as exc:
        return Loaded(None, reject=f"unsupported image mode {img.mode} ({first_line(exc, 120)})")
    return Loaded(rgb, scale, size, converted)


def animated(img: Image.Image) -> str | None:
    """'N frames' (or '2 or more frames' where counting them would walk the whole file) for an open image
    whose file holds an animation or several pages; None for a still one. From the header, or for GIF and
    TIFF from a walk to the second frame's header, without decoding a pixel. A JPEG decoder reads an MPO's
    primary image only, so an MPO is still."""
    if img.format in JPEG_FORMATS or not getattr(img, "is_animated", False):
        return None
    if img.format in ("PNG", "WEBP"):  # the count is in the header (APNG's acTL, WebP's ANIM)
        return f"{img.n_frames} frames"
    return "2 or more frames"  # GIF, TIFF: n_frames walks every frame; a 3 KB GIF can hold thousands


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def conversion_label(img: Image.Image) -> str | None:
    """What to_rgb will do to this image (from its header alone), e.g. "CMYK->RGB"; None for RGB."""
    if img.mode == "RGB":
        return None
    return f"{img.mode}->RGB (alpha on white)" if _has_alpha(img) else f"{img.mode}->RGB"


def conversion_of(path: str, roots: confine.Roots | None = None) -> str | None:
    """conversion_label of a file, reading only its header (for crops a rerun reuses)."""
    try:
        with os.fdopen(confine.open_regular(path, roots, "image"), "rb") as fh, Image.open(fh) as img:
            return conversion_label(img)
    except Exception:
        return None


def to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    label = conversion_label(img)
    if label is None:
        return img, None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # In place on one array (no float64 copies: a 40 MP 16-bit image stays under 200 MB).
        arr = np.asarray(img)
        if img.mode.startswith("I;16"):
            out = arr.astype(np.uint32)
            out *= 255
            out += 32767
            out //= 65535
        else:
            arr = arr.astype(np.float32)
            top = 65535.0 if arr.max() > 255 else 255.0
            arr *= 255.0 / top
            arr += 0.5
            out = np.clip(arr, 0, 255, out=arr)
        return Image.fromarray(out.astype(np.uint8)).convert("RGB"), label
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background, label
    return img.convert("RGB"), label


