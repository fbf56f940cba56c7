"""Bad images: what `decode_image` makes of the awkward and broken files real folders contain (16-bit, palette,
CMYK, animated GIF, EXIF rotation; truncated, empty, not an image, missing, unreadable, decompression bombs), and
what `sanf extract` does with them (--on-error skip records them, --on-error fail stops with one line, a class left
without a usable image is refused)."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_user_error, extract_args
from PIL import Image
from robust_helpers import sanf

from sanf_pipeline.cache import open_cache
from sanf_pipeline.cache.inspect import verify_cache
from sanf_pipeline.data import create_dataset, decode_image
from sanf_pipeline.data import images as images_mod
from sanf_pipeline.errors import BadImageError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------- decode_image
def test_decode_16bit_png_scales_not_clips(tmp_path):
    vals = np.array([[0, 128, 129, 257], [1000, 32768, 65278, 65535]], dtype=np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(vals).save(p)
    with Image.open(p) as im:
        assert im.mode.startswith("I")
    out = decode_image(p)
    want = np.rint(vals / 257.0).astype(np.uint8)
    assert out.shape == (2, 4, 3) and np.array_equal(out[..., 0], want) and np.array_equal(out[..., 2], want)


def test_decode_32bit_int_image_out_of_16bit_range(tmp_path):
    img = Image.fromarray(np.array([[-5, 0], [10, 1_000_000]], dtype=np.int32), mode="I")
    p = tmp_path / "i32.tif"
    img.save(p)
    out = decode_image(p)
    assert out[0, 0, 0] == 0 and out[1, 1, 0] == 255


def test_decode_palette_png(tmp_path):
    img = Image.new("P", (4, 3))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.putpixel((1, 2), 2)
    p = tmp_path / "p.png"
    img.save(p)
    out = decode_image(p)
    assert out.shape == (3, 4, 3)
    assert out[0, 0].tolist() == [255, 0, 0] and out[2, 1].tolist() == [0, 0, 255]


@pytest.mark.parametrize("mode, value, want", [
    ("RGBA", (10, 20, 30, 0), [10, 20, 30]),
    ("LA", (77, 128), [77, 77, 77]),
    ("L", 200, [200, 200, 200]),
    ("1", 1, [255, 255, 255]),
])
def test_decode_modes_png(tmp_path, mode, value, want):
    p = tmp_path / f"{mode}.png"
    Image.new(mode, (5, 4), value).save(p)
    out = decode_image(p)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    assert out[1, 1].tolist() == want


def test_decode_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(p, quality=95)  # pure red in CMYK
    with Image.open(p) as im:
        assert im.mode == "CMYK"
    out = decode_image(p)
    assert out.shape == (6, 8, 3)
    r, g, b = out[3, 4].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_decode_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 4), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(p) as im:
        assert im.n_frames == 3
    out = decode_image(p)
    assert out.shape == (4, 6, 3) and out[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize("orientation, shape", [(1, (20, 40, 3)), (6, (40, 20, 3)), (8, (40, 20, 3)),
                                                (3, (20, 40, 3))])
def test_decode_exif_orientation(tmp_path, orientation, shape):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / "rot.jpg"
    Image.fromarray(a).save(p, exif=exif, quality=95)
    out = decode_image(p)
    assert out.shape == shape
    if orientation == 6:  # rotate 90 clockwise for display: the stored left half ends on top
        assert out[5, 10].min() > 200 and out[35, 10].max() < 50
    if orientation == 3:
        assert out[10, 35].min() > 200 and out[10, 5].max() < 50


def _noisy_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (64, 64, 3), np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_decode_truncated(tmp_path, fmt, suffix):
    data = _noisy_bytes(fmt)
    p = tmp_path / f"cut{suffix}"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match="truncated|corrupt") as e:
        decode_image(p)
    assert e.value.path == str(p)


def test_decode_zero_bytes(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(BadImageError, match="empty file"):
        decode_image(p)
    with pytest.raises(BadImageError, match="empty"):
        decode_image(b"")


def test_decode_text_with_image_suffix(tmp_path):
    p = tmp_path / "readme.jpg"
    p.write_text("this is not a JPEG\n")
    with pytest.raises(BadImageError, match="not a recognised image format"):
        decode_image(p)


def test_decode_missing_and_directory(tmp_path):
    with pytest.raises(BadImageError, match="not found"):
        decode_image(tmp_path / "nope.png")
    d = tmp_path / "dir.png"
    d.mkdir()
    with pytest.raises(BadImageError, match="directory"):
        decode_image(d)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root, which can read files whatever their permissions; "
                    "unreadable paths are covered by test_decode_missing_and_directory")
def test_decode_permission_denied(tmp_path):
    p = tmp_path / "secret.png"
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(p)
    p.chmod(0)
    try:
        with pytest.raises(BadImageError, match="permission denied"):
            decode_image(p)
    finally:
        p.chmod(0o644)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_decode_bomb_header(tmp_path):
    """A tiny PNG whose header claims 100,000 x 100,000 pixels."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))
    p = tmp_path / "bomb.png"
    p.write_bytes(data)
    with pytest.raises(BadImageError, match="decompression bomb"):
        decode_image(p)


def test_decode_bomb_low_cap(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(p)
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 100)
    with pytest.raises(BadImageError, match="decompression bomb: 20x20"):
        decode_image(p)


def test_folder_bad_image_raises_on_load(make_folder_dataset):
    data = make_folder_dataset(n_train=2, n_test=1)
    (data / "train/a/000.png").write_bytes(b"")
    ds = create_dataset("folder", data, "train")
    assert ds.sample_ids[0] == "train/a/000.png"
    with pytest.raises(BadImageError, match="empty"):
        ds.load(0)
    assert ds.load(1).shape == (32, 32, 3)


# ---------------------------------------------------------------------------------------------- sanf extract
def _add_bad_images(folder: Path) -> list[str]:
    from PIL import Image

    good = folder / "ok.jpg"
    Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(good, quality=90)
    data = good.read_bytes()
    good.unlink()
    (folder / "zz_truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "zz_empty.png").write_bytes(b"")
    (folder / "zz_text.jpg").write_text("this is not an image\n")
    return ["zz_empty.png", "zz_text.jpg", "zz_truncated.jpg"]


def test_bad_images_are_skipped_and_recorded(make_folder_dataset, tmp_path):
    data = make_folder_dataset(n_train=4, n_test=2)
    bad = [f"train/a/{name}" for name in _add_bad_images(data / "train" / "a")]
    cache = tmp_path / "cache"
    r = sanf(*extract_args(data, cache, "--on-error", "skip"))
    assert r.exit_code == 0 and "complete" in r.stdout, r.output
    assert "skipped 3 unreadable image(s)" in r.stderr and "train/a/zz_empty.png" in r.stderr
    with open_cache(cache) as c:
        skipped = c.meta["skipped"]
        assert sorted(s["sample_id"] for s in skipped) == bad
        assert all(s["reason"] and s["split"] == "train" and s["label"] == 0 for s in skipped)
        s = c.split("train")
        assert s.n == 15 and s.n_valid == 12 and c.meta["splits"]["train"]["n_valid"] == 12
        assert not set(bad) & set(s.sample_ids) and set(bad) <= set(s.sample_ids_all)
        cls, patch = s.read_class(0)
        assert cls.shape == (4, 32) and patch.shape == (4, 16, 32)
        assert len(s.read_all()[0]) == 12
    assert verify_cache(cache).ok
    info = sanf("cache", "info", cache)
    assert "skipped    3 files" in info.stdout

    line = assert_user_error(sanf(*extract_args(data, tmp_path / "strict", "--on-error", "fail")))
    assert "train/a/zz_empty.png" in line, line


def test_class_without_a_usable_image_is_refused(make_folder_dataset, tmp_path):
    data = make_folder_dataset(n_train=2, n_test=1)
    for f in (data / "test" / "c").iterdir():
        f.unlink()
    _add_bad_images(data / "test" / "c")
    line = assert_user_error(sanf(*extract_args(data, tmp_path / "cache")))
    assert "no usable image in class c of split test" in line, line
