"""Ground-truth defect masks at the evaluation resolution, as `sanf extract` stores them in a cache's test split.

**Geometry.** Extraction resizes the whole image to the model's input size (no crop, ``preprocess.py``), and pixel
metrics compare maps and masks at ``eval_resolution(input size)`` (``maps/head.py``). A mask is mapped the same
way: the whole mask onto the whole ``h x w`` grid, whatever its own size or aspect ratio.

**Coverage.** A mask is decoded with PIL (converted to 8-bit grey, EXIF orientation applied as for images) and
binarised: a pixel above 127 is defective (MVTec's masks are 0/255). Each cell of the ``h x w`` grid then gets
its *coverage*: the exact fraction of its area that lies on defective mask pixels, as uint8 ``round(255 *
fraction)`` (halves up), 0 = no defect pixel, 255 = fully defective. This is an exact area average (the integral
image evaluated at the cells' fractional edges): within one level (PIL's fixed-point rounding) of PIL's ``BOX``
resize of the 0/255 image when the mask's size is a whole multiple of the grid's. PIL's ``BOX`` itself is not
used: at other ratios it counts a mask pixel wholly or not at all, and upsampling with it is nearest-neighbour
(a 40 px mask on a 56 px grid), neither of which is the area a cell covers.

**The rule** a later stage applies (:data:`RULE`): a pixel at the evaluation resolution is defective when at
least half of it is covered, i.e. ``coverage >= DEFECT_COVERAGE`` (128; exactly half rounds to 128).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import SanfError

DEFECT_COVERAGE = 128
RULE = ("a pixel at the evaluation resolution is defective when at least half of it is covered "
        "(coverage >= 128 of 255)")


def _cell_means(x: np.ndarray, n_out: int) -> np.ndarray:
    """Along axis 0 of ``x`` (n_in, ...): the mean of each of ``n_out`` equal cells laid over the whole axis, cell
    ``k`` spanning ``[k n_in / n_out, (k + 1) n_in / n_out)`` and a pixel cut by an edge counted by the fraction of
    it inside; float64 (n_out, ...). A cell touches at most ``ceil(n_in / n_out) + 1`` pixels: one weighted gather
    per such offset."""
    n_in = x.shape[0]
    if n_in % n_out == 0:  # whole pixels per cell (1024 px masks at 256): the same means, summed in blocks
        return x.reshape(n_out, n_in // n_out, *x.shape[1:]).sum(axis=1, dtype=np.float64) / (n_in // n_out)
    edges = np.arange(n_out + 1, dtype=np.float64) * n_in / n_out  # whole-pixel edges come out exact
    first = np.floor(edges[:-1]).astype(np.int64)
    out = np.zeros((n_out, *x.shape[1:]))
    for d in range(-(-n_in // n_out) + 1):
        j = first + d
        weight = np.clip(np.minimum(edges[1:], j + 1) - np.maximum(edges[:-1], j), 0, None)  # overlap length
        if not weight.any():
            continue
        out += weight.reshape(-1, *([1] * (x.ndim - 1))) * x[np.minimum(j, n_in - 1)]
    return out * (n_out / n_in)


def _area_average(binary: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Fraction (float64 ``size``) of each cell of a ``size`` grid laid over the whole ``binary`` (H, W) image
    that lies on ones (nonzero)."""
    rows = _cell_means(np.asarray(binary) != 0, size[0])  # (h, W)
    return _cell_means(rows.T, size[1]).T


def coverage(binary: np.ndarray, resolution) -> np.ndarray:
    """uint8 coverage ``(h, w)`` of a binary ``(H, W)`` mask (nonzero = defective) at ``resolution`` (module
    docstring): ``round(255 * covered fraction)``, halves up."""
    h, w = int(resolution[0]), int(resolution[1])
    if h < 1 or w < 1:
        raise SanfError(f"a mask resolution must be positive, got {h}x{w}")
    frac = _area_average(np.asarray(binary) != 0, (h, w))
    # + 1e-9: a fraction of exactly one half that float arithmetic put a hair below it still rounds up
    return np.clip(np.floor(frac * 255 + 0.5 + 1e-9), 0, 255).astype(np.uint8)


def read_mask(path: str | os.PathLike, resolution) -> np.ndarray:
    """The mask file at ``path`` as uint8 coverage ``(h, w)`` at ``resolution`` (module docstring); an unreadable
    file is a one-line :class:`SanfError` naming it."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            grey = np.asarray(img.convert("L"))
    except Exception as exc:  # any decoder failure: the file is named, no traceback
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise SanfError(f"cannot read ground-truth mask {path}: {reason}; fix or remove the file (a defect image "
                        "without a mask file is stored as 'mask unknown')") from None
    if grey.ndim != 2 or grey.size == 0:
        raise SanfError(f"cannot read ground-truth mask {path}: it is empty")
    return coverage(grey > 127, resolution)


def load_masks(dataset, order, resolution, progress=None) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """The masks of ``dataset`` in the listing order ``order`` (positions, e.g. ``dataset.order_by_label()``):
    ``(coverage uint8 (n, h, w), known bool (n,), refs)``. A normal image (ref ``""``) is all zeros and known; a
    defect image without a mask (ref ``None``) all zeros and not known. ``progress(k)`` is called after each mask.
    """
    h, w = int(resolution[0]), int(resolution[1])
    order = np.asarray(order, dtype=np.int64)
    masks = np.zeros((len(order), h, w), np.uint8)
    known = np.zeros(len(order), bool)
    refs: list[str | None] = []
    root = Path(dataset.root) if dataset.root is not None else None
    for row, i in enumerate(order):
        ref = dataset.mask_ref(int(i))
        refs.append(ref)
        if ref is not None:
            known[row] = True
            if ref:
                masks[row] = read_mask(root / ref, (h, w))
        if progress is not None:
            progress(1)
    return masks, known, refs
