"""Pictures of anomaly maps: the jet colour map, a map blended over its image with the predicted and ground-truth
regions drawn as contours and an optional title band, a map alone as an RGBA layer (``rgba_map``), contact sheets of
such pictures, a small colour bar, and the atomic writes of a picture (PNG) and of a raw map (``.npy``). Pure numpy +
PIL: matplotlib is too slow to import and to draw with once per image.

Colours: the predicted region's contour is white (255, 255, 255), the ground-truth region's is magenta
(255, 0, 255), a colour jet never produces; backgrounds (title band, grid cells, colour-bar labels) are dark grey.
"""

from __future__ import annotations

import functools
import os
import secrets
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import SanfError

PREDICTED = (255, 255, 255)
TRUTH = (255, 0, 255)
BACKGROUND = (24, 24, 24)
TEXT = (255, 255, 255)
ELLIPSIS = "\u2026"
CELL_PAD = 4  # grid: px of background around each tile's box

# matplotlib's 'jet' segment data (x, value) per channel: the knots of the piecewise-linear map
_JET = (((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
        ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
        ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)))


# ------------------------------------------------------------------------------------------------ colours
def jet(values) -> np.ndarray:
    """uint8 ``(..., 3)`` jet colours of ``values`` in [0, 1] (clipped; NaN -> 0, as the lowest value)."""
    x = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0).clip(0.0, 1.0)
    flat = x.reshape(-1)
    rgb = np.stack([np.interp(flat, *np.transpose(knots)) for knots in _JET], axis=-1)
    return np.rint(rgb * 255.0).astype(np.uint8).reshape(*x.shape, 3)


@functools.lru_cache(maxsize=1)
def _jet_lut() -> np.ndarray:
    # 4096 levels: 1/16 of a uint8 step per level at jet's steepest, so overlays match jet() to rounding
    return jet(np.linspace(0.0, 1.0, 4096, dtype=np.float32))


def colour_range(amap, run_scale=None) -> tuple[float, float]:
    """The ``(vmin, vmax)`` a map is coloured on: the run's fixed scale when it has one (pictures then compare),
    else the map's own finite range; ``(0, 0)`` for a map with no finite value (nothing to show)."""
    if run_scale is not None:
        return float(run_scale[0]), float(run_scale[1])
    a = np.asarray(amap, np.float64)
    finite = a[np.isfinite(a)]
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)


def scale(amap, vmin: float, vmax: float) -> np.ndarray:
    """float32 ``(amap - vmin) / (vmax - vmin)`` clipped to [0, 1]; NaN -> 0. ``vmax <= vmin`` (a constant map's
    range) gives all 0: nothing stands out, so nothing is coloured as anomalous."""
    if not (np.isfinite(vmin) and np.isfinite(vmax)):
        raise SanfError(f"the colour range must be finite numbers, got vmin={vmin}, vmax={vmax}")
    a = np.asarray(amap, dtype=np.float32)
    if vmax <= vmin:
        return np.zeros(a.shape, np.float32)
    out = (a - np.float32(vmin)) * np.float32(1.0 / (vmax - vmin))
    return np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0).clip(0.0, 1.0)


# ------------------------------------------------------------------------------------------------ geometry
def _erode(m: np.ndarray) -> np.ndarray:
    # a pixel survives if its 4 neighbours are in the region; outside the image counts as outside the region
    out = m.copy()
    out[1:] &= m[:-1]
    out[:-1] &= m[1:]
    out[:, 1:] &= m[:, :-1]
    out[:, :-1] &= m[:, 1:]
    out[[0, -1], :] = False
    out[:, [0, -1]] = False
    return out


def contour(region, width: int = 1) -> np.ndarray:
    """bool ``(H, W)``: the inner boundary of ``region``, its pixels within ``width`` 4-neighbour steps of a pixel
    outside it or of the image border (width 1: region pixels with a 4-neighbour outside it or on the border)."""
    m = np.asarray(region, dtype=bool)
    if m.ndim != 2:
        raise SanfError(f"a region must be a 2-D (H, W) mask, got shape {m.shape}")
    if int(width) < 1:
        raise SanfError(f"contour width must be at least 1 px, got {width}")
    inner = m
    for _ in range(int(width)):
        inner = _erode(inner)
    return m & ~inner


def _as_rgb(image, what: str = "image") -> np.ndarray:
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise SanfError(f"the {what} must be uint8, got {a.dtype}")
    if a.ndim >= 2 and 0 in a.shape[:2]:
        raise SanfError(f"the {what} is empty (shape {a.shape})")
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=-1)
    if a.ndim == 3 and a.shape[2] in (3, 4):
        return np.ascontiguousarray(a[..., :3])  # RGBA: alpha dropped; maps are drawn over the colours as stored
    raise SanfError(f"the {what} must be (H, W), (H, W, 3) or (H, W, 4), got shape {a.shape}")


# ------------------------------------------------------------------------------------------------ text
@functools.lru_cache(maxsize=16)
def _font(size: int):
    return ImageFont.load_default(size=size)


def _fit(text: str, font, room: float) -> str:
    """``text`` on one line, cut to end in '…' where it is wider than ``room`` px."""
    text = " ".join(str(text).split())
    if font.getlength(text) <= room:
        return text
    lo, hi = 0, len(text)  # longest prefix that fits with the ellipsis: binary search, few measurements
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if font.getlength(text[:mid].rstrip() + ELLIPSIS) <= room else (lo, mid - 1)
    return text[:lo].rstrip() + ELLIPSIS if lo else ""


def _band(text: str, width: int, size: int, align: str = "left", right: str = "") -> np.ndarray:
    """uint8 ``(size + 2 pad, width, 3)``: a dark band with ``text`` (left or centred) and ``right`` (right-aligned)
    in white, vertically centred."""
    pad = max(2, size // 4)
    h = size + 2 * pad
    img = Image.new("RGB", (width, h), BACKGROUND)
    font, draw = _font(size), ImageDraw.Draw(img)
    top, bottom = font.getbbox("Ag")[1::2]
    y = (h - (bottom - top)) / 2 - top  # the same baseline whatever the letters, so captions line up
    if right:
        draw.text((width - pad - font.getlength(right), y), right, font=font, fill=TEXT)
    line = _fit(text, font, width - 2 * pad - (font.getlength(right + "  ") if right else 0))
    if line:
        draw.text((pad if align == "left" else (width - font.getlength(line)) / 2, y), line, font=font, fill=TEXT)
    return np.asarray(img)


def title_size(width: int) -> int:
    """Font size (px) of the title band over a ``width`` px wide picture: ~40 characters across, 10 to 40 px."""
    return int(np.clip(width // 40, 10, 40))


# ------------------------------------------------------------------------------------------------ pictures
def overlay(image, amap, *, vmin: float, vmax: float, alpha: float = 0.5, region=None, truth=None,
            title: str | None = None) -> np.ndarray:
    """uint8 RGB ``(H', W, 3)``: jet(scale(amap, vmin, vmax)) blended over ``image`` as
    ``(1 - alpha) image + alpha colour``; the predicted ``region`` drawn as a white contour and the ground-truth
    ``truth`` as a magenta one on top (2 px wide for images over 512 px on the longer side, else 1 px); with a
    ``title``, a dark band of ``title_size(W)`` px text above the image (``H' > H``), else ``H' = H``.

    ``image``: uint8 (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA (alpha dropped); ``amap``, ``region``,
    ``truth``: (H, W), the image's own resolution."""
    rgb = _as_rgb(image)
    hw = rgb.shape[:2]
    a = np.asarray(amap)
    if a.shape != hw:
        raise SanfError(f"the anomaly map is {a.shape} but the image is {hw}; resize the map to the image first")
    if not 0.0 <= alpha <= 1.0:
        raise SanfError(f"alpha must be in [0, 1], got {alpha}")
    lut = _jet_lut()
    index = (scale(a, vmin, vmax) * np.float32(len(lut) - 1) + np.float32(0.5)).astype(np.int32)
    out = np.take(lut.astype(np.float32) * np.float32(alpha), index, axis=0)  # take: faster than fancy indexing
    out += rgb.astype(np.float32) * np.float32(1.0 - alpha)
    out = np.rint(out, out=out).astype(np.uint8)
    width = 2 if max(hw) > 512 else 1
    for mask, colour in ((region, PREDICTED), (truth, TRUTH)):
        if mask is not None:
            if np.shape(mask) != hw:
                raise SanfError(f"a region mask is {np.shape(mask)} but the image is {hw}")
            out[contour(mask, width)] = colour
    if title is not None:
        out = np.concatenate([_band(title, hw[1], title_size(hw[1])), out], axis=0)
    return out


def rgba_map(amap, vmin: float, vmax: float) -> np.ndarray:
    """uint8 ``(H, W, 4)``: the map alone as a layer to lay over its image: RGB = jet(scale(amap, vmin, vmax)) and
    alpha = that scaled value * 255, so normal pixels are transparent and the most anomalous opaque."""
    a = np.asarray(amap)
    if a.ndim != 2:
        raise SanfError(f"an anomaly map must be 2-D (H, W), got shape {a.shape}")
    s = scale(a, vmin, vmax)
    lut = _jet_lut()
    out = np.empty((*a.shape, 4), np.uint8)
    out[..., :3] = np.take(lut, (s * np.float32(len(lut) - 1) + np.float32(0.5)).astype(np.int32), axis=0)
    out[..., 3] = np.rint(s * np.float32(255.0)).astype(np.uint8)
    return out


def _fit_tile(rgb: np.ndarray, box: int) -> Image.Image:
    h, w = rgb.shape[:2]
    s = box / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    method = Image.Resampling.LANCZOS if s < 1 else Image.Resampling.BILINEAR
    return Image.fromarray(rgb).resize(size, method)


def caption_size(tile: int) -> int:
    """Font size (px) of a grid caption under a ``tile`` px box: at least 10 px."""
    return max(10, tile // 16)


def grid(tiles, *, columns: int = 4, tile: int = 192, captions=None) -> np.ndarray:
    """uint8 RGB contact sheet ``(rows cell_h, cols cell_w, 3)``, ``cols = min(columns, len(tiles))``, rows as
    needed, filled row by row. A cell is ``cell_w = tile + 2 CELL_PAD`` wide; its tile (uint8, any size) is resized
    to fit ``tile x tile`` keeping its aspect ratio and centred in the cell's top ``cell_w x cell_w`` square; with
    ``captions`` (one per tile), a caption band of ``caption_size(tile) + 2 max(2, size // 4)`` px (centred text,
    cut with '…') follows, so ``cell_h = cell_w + band``; without, ``cell_h = cell_w``."""
    tiles = list(tiles)
    if not tiles:
        raise SanfError("a grid needs at least one picture")
    if int(columns) < 1 or int(tile) < 8:
        raise SanfError(f"a grid needs columns >= 1 and tile >= 8 px, got columns={columns}, tile={tile}")
    if captions is not None and len(captions) != len(tiles):
        raise SanfError(f"{len(captions)} captions for {len(tiles)} pictures; give one caption per picture")
    cols = min(int(columns), len(tiles))
    rows = -(-len(tiles) // cols)
    cell_w = tile + 2 * CELL_PAD
    band_h = 0 if captions is None else _band("", cell_w, caption_size(tile)).shape[0]
    cell_h = cell_w + band_h
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), BACKGROUND)
    for i, t in enumerate(tiles):
        x0, y0 = (i % cols) * cell_w, (i // cols) * cell_h
        pic = _fit_tile(_as_rgb(t, f"grid picture {i}"), tile)
        sheet.paste(pic, (x0 + (cell_w - pic.width) // 2, y0 + (cell_w - pic.height) // 2))
        if captions is not None:
            band = _band(captions[i], cell_w, caption_size(tile), align="centre")
            sheet.paste(Image.fromarray(band), (x0, y0 + cell_w))
    return np.asarray(sheet).copy()


def colorbar(vmin: float, vmax: float, *, width: int, height: int = 14) -> np.ndarray:
    """uint8 RGB ``(height + label band, width, 3)``: a left-to-right jet bar of ``height`` px over a dark band with
    ``vmin`` at the left end and ``vmax`` at the right (3 significant digits)."""
    if int(width) < 16 or int(height) < 1:
        raise SanfError(f"a colour bar needs width >= 16 and height >= 1 px, got {width} x {height}")
    bar = np.broadcast_to(jet(np.linspace(0.0, 1.0, int(width))), (int(height), int(width), 3))
    labels = _band(f"{vmin:.3g}", int(width), max(10, int(height) - 2), right=f"{vmax:.3g}")
    return np.concatenate([bar, labels], axis=0)


# ------------------------------------------------------------------------------------------------ files
def _write_atomic(path, write) -> None:
    """``write(fh)`` into ``.<name>.<pid>.<random>.tmp`` beside ``path``, then replace ``path`` with it: a reader
    sees the old file or the whole new one, never half; the temp file is removed whatever goes wrong."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise SanfError(f"cannot write {path}: {exc.strerror or exc}; check the folder exists, is writable "
                            f"and the disk has space") from None
        raise


def save_png(path, rgb) -> None:
    """Write a uint8 (H, W), (H, W, 3) or (H, W, 4) picture as a PNG at ``path``, atomically."""
    a = np.asarray(rgb)
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise SanfError(f"a PNG picture must be uint8 (H, W), (H, W, 3) or (H, W, 4), got {a.dtype} {a.shape}")
    img = Image.fromarray(np.ascontiguousarray(a))
    _write_atomic(path, lambda fh: img.save(fh, format="PNG"))


def save_raw_map(path, amap) -> None:
    """Write a raw anomaly map as ``.npy``, atomically: float32 (H, W) at the image's own resolution, values in the
    model's map units (unscaled, before any colour range), no pickles."""
    a = np.asarray(amap, dtype=np.float32)
    if a.ndim != 2:
        raise SanfError(f"an anomaly map must be 2-D (H, W), got shape {a.shape}")
    _write_atomic(path, lambda fh: np.save(fh, a, allow_pickle=False))


def load_raw_map(path) -> np.ndarray:
    """A map written by ``save_raw_map``: float32 (H, W)."""
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise SanfError(f"cannot read the anomaly map {path}: {exc}") from None
    if not isinstance(a, np.ndarray) or a.ndim != 2 or a.dtype != np.float32:
        raise SanfError(f"{path} is not a raw anomaly map (float32 (H, W)); it is damaged or another file")
    return a
