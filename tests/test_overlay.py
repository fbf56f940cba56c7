"""Pictures of anomaly maps (``sanf_pipeline.maps.overlay``): jet against matplotlib's, scaling, contours, the
blended overlay and its title band, contact sheets, the colour bar and the atomic PNG / raw-map writes."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from PIL import Image

from sanf_pipeline.errors import SanfError
from sanf_pipeline.maps.overlay import (
    BACKGROUND,
    CELL_PAD,
    PREDICTED,
    TRUTH,
    _fit,
    _font,
    caption_size,
    colorbar,
    contour,
    grid,
    jet,
    load_raw_map,
    overlay,
    save_png,
    save_raw_map,
    scale,
)


def _picture(h=40, w=60, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.random((h, w)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ colours
def test_jet_matches_matplotlib():
    import matplotlib

    cmap = matplotlib.colormaps["jet"]
    x = np.linspace(0.0, 1.0, 256)  # matplotlib's own 256 table entries: no quantisation of its side
    assert np.abs(jet(x).astype(float) - cmap(x)[:, :3] * 255).max() <= 2
    y = np.random.default_rng(0).random(5000)  # between the entries: a finely resampled matplotlib jet
    assert np.abs(jet(y).astype(float) - cmap.resampled(65536)(y)[:, :3] * 255).max() <= 2
    ends = jet([0.0, 1.0])
    assert ends[0, 2] > 100 and ends[0, :2].max() == 0 and ends[1, 0] > 100 and ends[1, 1:].max() == 0


def test_jet_clips_nan_and_keeps_shape():
    assert np.array_equal(jet([-3.0, np.nan, 7.0, np.inf]), jet([0.0, 0.0, 1.0, 1.0]))
    out = jet(np.zeros((2, 5, 7)))
    assert out.shape == (2, 5, 7, 3) and out.dtype == np.uint8


def test_scale_clips_handles_nan_and_an_empty_range():
    s = scale(np.array([-1.0, 0.0, 1.0, 2.0, 3.0, np.nan]), 0.0, 2.0)
    assert s.dtype == np.float32 and np.array_equal(s, np.float32([0, 0, 0.5, 1, 1, 0]))
    assert np.array_equal(scale(np.ones((3, 4)), 1.0, 1.0), np.zeros((3, 4), np.float32))
    assert np.array_equal(scale(np.ones(3), 2.0, 1.0), np.zeros(3, np.float32))
    with pytest.raises(SanfError):
        scale(np.ones(3), 0.0, np.nan)


# ------------------------------------------------------------------------------------------------ contours
def test_contour_of_a_square():
    region = np.zeros((10, 10), bool)
    region[2:8, 2:8] = True
    ring = region.copy()
    ring[3:7, 3:7] = False
    assert np.array_equal(contour(region), ring)
    thick = region.copy()
    thick[4:6, 4:6] = False
    assert np.array_equal(contour(region, width=2), thick)
    assert not contour(np.zeros((5, 5), bool)).any()


def test_contour_counts_the_image_border_as_outside_and_uses_4_neighbours():
    full = np.ones((5, 6), bool)
    border = full.copy()
    border[1:-1, 1:-1] = False
    assert np.array_equal(contour(full), border)
    plus = np.zeros((7, 7), bool)
    plus[1:6, 2:5] = plus[2:5, 1:6] = True
    edge = contour(plus)
    assert not edge[2, 2] and edge[1, 2] and not edge[3, 3]  # an inner corner only touches outside diagonally
    with pytest.raises(SanfError):
        contour(np.ones((2, 2, 2), bool))
    with pytest.raises(SanfError):
        contour(full, width=0)


# ------------------------------------------------------------------------------------------------ overlay
def test_overlay_blends_by_the_formula():
    image, amap = _picture()
    for alpha in (0.5, 0.25):
        out = overlay(image, amap, vmin=0.2, vmax=0.8, alpha=alpha)
        want = (1 - alpha) * image + alpha * jet(scale(amap, 0.2, 0.8)).astype(float)
        assert out.shape == image.shape and out.dtype == np.uint8
        assert np.abs(out - want).max() <= 1  # the colour table has 4096 levels
    ends = np.zeros(amap.shape, np.float32)
    ends[:, ::2] = 1.0
    out = overlay(image, ends, vmin=0.0, vmax=1.0)
    assert np.array_equal(out, np.rint(0.5 * image + 0.5 * jet(ends).astype(float)).astype(np.uint8))
    assert np.array_equal(overlay(image, amap, vmin=0, vmax=1, alpha=0.0), image)
    assert np.abs(overlay(image, amap, vmin=0, vmax=1, alpha=1.0) - jet(amap).astype(float)).max() <= 1


def test_overlay_accepts_gray_and_rgba():
    image, amap = _picture()
    gray = image[..., 0]
    assert np.array_equal(overlay(gray, amap, vmin=0, vmax=1), overlay(np.stack([gray] * 3, -1), amap, vmin=0, vmax=1))
    rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 7, np.uint8)], axis=-1)
    assert np.array_equal(overlay(rgba, amap, vmin=0, vmax=1), overlay(image, amap, vmin=0, vmax=1))


def test_overlay_rejects_bad_input():
    image, amap = _picture()
    for bad in (dict(amap=amap[:-1]), dict(amap=amap.T), dict(alpha=1.5), dict(region=np.ones((3, 3), bool)),
                dict(image=image.astype(np.float32)), dict(image=image[..., :2])):
        args = dict(image=image, amap=amap, vmin=0.0, vmax=1.0) | bad
        with pytest.raises(SanfError) as info:
            overlay(args.pop("image"), args.pop("amap"), **args)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("side, width", [(100, 1), (600, 2)])
def test_region_and_truth_contours_are_drawn_in_their_colours(side, width):
    image, amap = _picture(side, side)
    region = np.zeros((side, side), bool)
    region[10:60, 20:80] = True
    truth = np.zeros((side, side), bool)
    truth[40:90, 50:95] = True
    out = overlay(image, amap, vmin=0, vmax=1, region=region, truth=truth)
    plain = overlay(image, amap, vmin=0, vmax=1)
    pred_edge, truth_edge = contour(region, width), contour(truth, width)
    assert (out[pred_edge & ~truth_edge] == PREDICTED).all()
    assert (out[truth_edge] == TRUTH).all()  # drawn last, on top
    assert np.array_equal(out[~(pred_edge | truth_edge)], plain[~(pred_edge | truth_edge)])
    assert pred_edge[10, 20 + width - 1] and not pred_edge[10 + width, 20 + width]


def test_title_band_sits_above_the_image():
    image, amap = _picture(50, 300)
    plain = overlay(image, amap, vmin=0, vmax=1)
    out = overlay(image, amap, vmin=0, vmax=1, title="bottle / broken_large / 003.png")
    band = out.shape[0] - 50
    assert out.shape[1:] == (300, 3) and band > 10
    assert np.array_equal(out[band:], plain)
    assert tuple(out[0, 0]) == BACKGROUND and out[:band].max() > 200  # white text on the dark band
    long = overlay(image, amap, vmin=0, vmax=1, title="x" * 500)
    assert long.shape == out.shape


def test_long_text_is_cut_with_an_ellipsis():
    font = _font(12)
    line = _fit("a rather long title that cannot fit in the room " * 3, font, 120)
    assert line.endswith("\u2026") and font.getlength(line) <= 120 and len(line) > 5
    assert _fit("short", font, 120) == "short"
    assert _fit("two\nlines", font, 120) == "two lines"


def test_overlay_is_fast():
    image, amap = _picture(460, 1130)
    region = amap > 0.9
    overlay(image, amap, vmin=0, vmax=1, region=region, title="warm-up")
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        overlay(image, amap, vmin=0, vmax=1, region=region, truth=region, title="timed")
        best = min(best, time.perf_counter() - t)
    assert best < 0.1  # ~20 ms on one core; a per-pixel Python loop would take seconds (2x slack: shared CPUs)


# ------------------------------------------------------------------------------------------------ grid, colour bar
def test_grid_layout():
    tiles = [_picture(20 + 5 * i, 30)[0] for i in range(5)]
    cell = 32 + 2 * CELL_PAD
    assert grid(tiles, columns=4, tile=32).shape == (2 * cell, 4 * cell, 3)
    assert grid(tiles[:2], columns=4, tile=32).shape == (cell, 2 * cell, 3)
    sheet = grid(tiles, columns=2, tile=32, captions=[f"tile {i}" for i in range(5)])
    rows, band = 3, sheet.shape[0] // 3 - cell
    assert sheet.shape == (rows * (cell + band), 2 * cell, 3) and band >= caption_size(32)
    assert sheet[cell:cell + band].max() > 200  # caption text under the first row's cells


def test_grid_fits_a_tile_keeping_its_aspect_ratio():
    red = np.zeros((10, 40, 3), np.uint8)
    red[..., 0] = 255
    sheet = grid([red], tile=64)  # 10 x 40 -> 16 x 64 at rows 28..43, columns 4..67 of a 72 x 72 cell
    assert sheet.shape == (72, 72, 3)
    assert (sheet[28:44, 4:68] == (255, 0, 0)).all()
    assert (sheet[:28] == BACKGROUND).all() and (sheet[44:] == BACKGROUND).all()
    assert (sheet[:, :4] == BACKGROUND).all() and (sheet[:, 68:] == BACKGROUND).all()


def test_grid_rejects_bad_input():
    with pytest.raises(SanfError):
        grid([])
    with pytest.raises(SanfError):
        grid([np.zeros((4, 4, 3), np.uint8)], captions=["a", "b"])
    with pytest.raises(SanfError):
        grid([np.zeros((0, 4, 3), np.uint8)])


def test_colorbar():
    bar = colorbar(0.0, 2.5, width=120, height=14)
    assert bar.dtype == np.uint8 and bar.shape[1:] == (120, 3) and bar.shape[0] > 14
    assert np.array_equal(bar[:14, 0], np.repeat(jet([0.0]), 14, 0))
    assert np.array_equal(bar[:14, -1], np.repeat(jet([1.0]), 14, 0))
    assert bar[14:, :40].max() > 200 and bar[14:, -40:].max() > 200  # both end values written


# ------------------------------------------------------------------------------------------------ files
def test_save_png_round_trip_leaves_no_temp(tmp_path):
    image, _ = _picture()
    target = tmp_path / "map.png"
    target.write_bytes(b"old")
    save_png(target, image)
    with Image.open(target) as img:
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), image)
    assert os.listdir(tmp_path) == ["map.png"]


def test_save_png_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    image, _ = _picture()
    with pytest.raises(SanfError) as info:
        save_png(tmp_path / "missing" / "map.png", image)
    assert "missing" in str(info.value) and os.listdir(tmp_path) == []

    target = tmp_path / "map.png"
    target.write_bytes(b"old")

    def broken(self, fp, *args, **kwargs):
        fp.write(b"half a png")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(SanfError, match="No space left"):
        save_png(target, image)
    assert os.listdir(tmp_path) == ["map.png"] and target.read_bytes() == b"old"

    def interrupted(self, fp, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_png(target, image)
    assert os.listdir(tmp_path) == ["map.png"]
    with pytest.raises(SanfError):
        save_png(target, image.astype(np.float32))


def test_raw_map_round_trip(tmp_path):
    amap = (np.random.default_rng(3).standard_normal((37, 53)) * 1e3).astype(np.float64)
    save_raw_map(tmp_path / "m.npy", amap)
    back = load_raw_map(tmp_path / "m.npy")
    assert back.dtype == np.float32 and np.array_equal(back, amap.astype(np.float32))
    assert os.listdir(tmp_path) == ["m.npy"]
    with pytest.raises(SanfError):
        save_raw_map(tmp_path / "x.npy", np.zeros((2, 2, 2)))
    with pytest.raises(SanfError):
        save_raw_map(tmp_path / "missing" / "x.npy", amap)
    assert os.listdir(tmp_path) == ["m.npy"]


def test_load_raw_map_refuses_other_files(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 2), np.float32))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    for name in ("obj.npy", "cube.npy", "junk.npy", "absent.npy"):
        with pytest.raises(SanfError):
            load_raw_map(tmp_path / name)
