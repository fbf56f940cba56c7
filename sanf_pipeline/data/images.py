"""Decoding one image file (or its bytes) into an RGB ``uint8`` array of shape (H, W, 3).

Everything a real image folder throws at a pipeline is handled here, once:

* EXIF orientation is applied (a phone photo comes out the way it is shown);
* grayscale, bilevel, palette, RGBA/LA (alpha dropped, as torchvision's and timm's loaders do),
  CMYK and YCbCr images become RGB;
* 16-bit images ("I;16*") are scaled to 8 bits with ``round(v / 257)`` rather than clipped;
  32-bit integer ("I") images are treated the same when their values fit in 16 bits and are
  min-max scaled otherwise; float ("F") images in [0, 1] are scaled by 255, others min-max scaled;
* animated images (GIF, APNG, WebP) give their first frame;
* empty, truncated, unreadable, non-image and decompression-bomb files raise
  :class:`~sanf_pipeline.errors.BadImageError` with a short reason.

Truncation is detected because the whole image is decoded (``img.load()``) with Pillow's
``LOAD_TRUNCATED_IMAGES`` left off.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

T = TypeVar("T")

ImageSource = str | os.PathLike | bytes | bytearray | memoryview

#: File name suffixes (lower case) that folder readers treat as images.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
     ".pbm", ".pnm"}
)

#: Largest accepted image, in pixels (Pillow's default ``Image.MAX_IMAGE_PIXELS``, ~178 M).
#: Anything larger is refused as a possible decompression bomb. Read at call time, so it can
#: be changed (or monkeypatched in tests).
MAX_PIXELS = 178_956_970

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I;16S")


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def load_or_reason(load: Callable[[], T]) -> tuple[T | None, str]:
    """``(load(), "")``, or ``(None, reason)`` when the image behind ``load`` is bad: the one rule extraction and
    scoring share for a file that cannot be turned into model input (it is skipped and listed, never a crash)."""
    from ..errors import BadImageError

    try:
        return load(), ""
    except BadImageError as exc:
        reason = exc.reason
    except Exception as exc:  # any decoder failure on a user's file is a bad image, not a crash
        reason = f"{type(exc).__name__}: {exc}"
    return None, reason or "unreadable"


def decode_image(source: ImageSource, *, name: str | None = None) -> np.ndarray:
    """Decode ``source`` (a path or the file's bytes) into a writable, C-contiguous uint8 (H, W, 3).

    ``name`` is only used in error messages (default: the path, or ``"<bytes>"``).
    Raises :class:`BadImageError` for anything that is not a complete, decodable image.
    """
    from ..errors import BadImageError

    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        data = bytes(source)
    else:
        label = name or os.fspath(source)
        data = _read_bytes(Path(source), label)
    if not data:
        raise BadImageError(label, "empty file (0 bytes)")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pillow's chatter ("Corrupt EXIF data", ...)
        # Pillow warns between MAX_IMAGE_PIXELS and twice that; make it an error like the rest.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                _check_size(img, label)
                img.load()  # decodes the first frame fully: truncated data raises here
                img = _apply_exif_orientation(img)
                return _to_rgb_array(img, label)
        except BadImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImageError(label, f"possible decompression bomb ({e})") from None
        except UnidentifiedImageError:
            raise BadImageError(label, "not a recognised image format") from None
        except MemoryError:
            raise BadImageError(label, "image too large to decode in memory") from None
        except Exception as e:  # Pillow plugins raise OSError, SyntaxError, ValueError, EOFError, ...
            reason = str(e).strip() or type(e).__name__
            if "truncated" in reason.lower() or isinstance(e, EOFError):
                reason = f"truncated image data ({reason})"
            else:
                reason = f"corrupt image data ({reason})"
            raise BadImageError(label, reason) from None


def _read_bytes(path: Path, label: str) -> bytes:
    from ..errors import BadImageError

    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadImageError(label, "file not found") from None
    except IsADirectoryError:
        raise BadImageError(label, "is a directory, not a file") from None
    except PermissionError:
        raise BadImageError(label, "permission denied") from None
    except OSError as e:
        raise BadImageError(label, f"cannot read file ({e.strerror or e})") from None


def _check_size(img: Image.Image, label: str) -> None:
    from ..errors import BadImageError

    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadImageError(label, f"image has no pixels ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise BadImageError(
            label, f"possible decompression bomb: {w}x{h} = {w * h:,} pixels exceeds the limit of "
            f"{MAX_PIXELS:,}"
        )


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(img)
    except Exception:  # unreadable EXIF: keep the stored orientation rather than reject the image
        return img
    return img if out is None else out


def _to_rgb_array(img: Image.Image, label: str) -> np.ndarray:
    """Any decoded Pillow image -> uint8 (H, W, 3)."""
    from ..errors import BadImageError

    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES or mode.startswith("I;16"):
        gray = scale_16bit_to_8bit(np.asarray(img))
    elif mode == "I":
        arr = np.asarray(img, dtype=np.int64)
        if arr.size and arr.min() >= 0 and arr.max() <= 65535:
            gray = scale_16bit_to_8bit(arr)
        else:
            gray = minmax_to_8bit(arr)
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        finite = arr[np.isfinite(arr)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            gray = np.clip(np.rint(np.nan_to_num(arr) * 255.0), 0, 255).astype(np.uint8)
        else:
            gray = minmax_to_8bit(arr)
    else:
        if mode != "RGB":
            try:
                img = img.convert("RGB")
            except (ValueError, OSError) as e:
                raise BadImageError(label, f"unsupported image mode {mode!r} ({e})") from None
        return np.array(img, dtype=np.uint8, order="C")  # a writable copy (asarray is read-only)
    return gray_to_rgb(gray)


def scale_16bit_to_8bit(arr: np.ndarray) -> np.ndarray:
    """Map 0..65535 onto 0..255 with rounding (``round(v / 257)``; 65535 -> 255, 257 -> 1)."""
    a = np.asarray(arr).astype(np.uint32)
    return ((a + 128) // 257).astype(np.uint8)


def minmax_to_8bit(arr: np.ndarray) -> np.ndarray:
    """Linearly map the finite range of ``arr`` onto 0..255 (a constant image becomes 0)."""
    a = np.asarray(arr, dtype=np.float64)
    finite = np.isfinite(a)
    out = np.zeros(a.shape, dtype=np.float64)
    if finite.any():
        lo, hi = a[finite].min(), a[finite].max()
        if hi > lo:
            out[finite] = (a[finite] - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """uint8 (H, W) -> uint8 (H, W, 3), C-contiguous."""
    g = np.asarray(gray, dtype=np.uint8)
    return np.ascontiguousarray(np.repeat(g[:, :, None], 3, axis=2))
