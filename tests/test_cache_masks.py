"""Ground-truth defect masks in the cache: the dataset API (``mask_ref``), decoding and area coverage
(``extract/masks.py``), `sanf extract` storing them in the test split of Zarr and HDF5 caches, their identity
(``settings["masks"]``; none for datasets without masks), resume, alignment with skipped images, damage detection
and `sanf cache info`."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FORMATS, cache_path, extract_config
from PIL import Image

from sanf_pipeline.cache import open_cache
from sanf_pipeline.cache.inspect import cache_info, mask_line, verify_cache
from sanf_pipeline.cache.writer import mask_digest
from sanf_pipeline.cli.main import cli
from sanf_pipeline.data import create_dataset
from sanf_pipeline.errors import SanfError
from sanf_pipeline.extract.job import extract
from sanf_pipeline.extract.masks import DEFECT_COVERAGE, RULE, coverage, load_masks, read_mask
from sanf_pipeline.maps.head import eval_resolution

H, W = 24, 40  # non-square images and masks (numpy rows x columns)
SIZE = 56  # the tiny ViT's input size: eval_resolution 56x56, so every mask is upsampled unevenly (24->56, 40->56)
RECT = (5, 17, 9, 31)  # mask 000: rows 5:17, columns 9:31 defective (cell edges cut through its sides)
STRIPE = (0, 3, 0, W)  # mask 001: the top three rows
CATEGORY = "widget"


def write_mvtec(root: Path, corrupt: str | None = None) -> Path:
    """``root/widget``: train/good 4, test/good 2, test/crack 3 images of 24x40; masks for crack 000 and 001 only
    (002 has none); ``corrupt``: a test image (path under the category) overwritten with bytes that are no PNG."""
    rng = np.random.default_rng(3)
    cat = root / CATEGORY
    for sub, n in (("train/good", 4), ("test/good", 2), ("test/crack", 3)):
        (cat / sub).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(cat / sub / f"{k:03d}.png")
    (cat / "ground_truth" / "crack").mkdir(parents=True)
    for k, (r0, r1, c0, c1) in enumerate((RECT, STRIPE)):
        m = np.zeros((H, W), np.uint8)
        m[r0:r1, c0:c1] = 255
        Image.fromarray(m).save(cat / "ground_truth" / "crack" / f"{k:03d}_mask.png")
    if corrupt:
        (cat / corrupt).write_bytes(b"this is not a png")
    return root


def cell_fractions(lo: int, hi: int, n_in: int, n_out: int) -> list[Fraction]:
    """Exact fraction of each of ``n_out`` equal cells over ``[0, n_in)`` that lies in ``[lo, hi)``."""
    out = []
    for k in range(n_out):
        a, b = Fraction(k * n_in, n_out), Fraction((k + 1) * n_in, n_out)
        out.append(max(Fraction(0), min(b, Fraction(hi)) - max(a, Fraction(lo))) / (b - a))
    return out


def hand_coverage(rect, size=(SIZE, SIZE)) -> np.ndarray:
    """The coverage of a rectangle at ``size``, by exact rational arithmetic: round(255 * area fraction), halves up."""
    r0, r1, c0, c1 = rect
    fy, fx = cell_fractions(r0, r1, H, size[0]), cell_fractions(c0, c1, W, size[1])
    out = np.zeros(size, np.uint8)
    for i, y in enumerate(fy):
        for j, x in enumerate(fx):
            v = 255 * y * x + Fraction(1, 2)
            out[i, j] = v.numerator // v.denominator
    return out


def mvtec_config(root, cache, **kw):
    return extract_config(root, cache, dataset="mvtec", category=CATEGORY, **kw)


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory) -> Path:
    return write_mvtec(tmp_path_factory.mktemp("mvtec") / "data")


@pytest.fixture(scope="module")
def mask_caches(mvtec_root, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("mask-caches")
    out = {}
    for fmt in FORMATS:
        result = extract(mvtec_config(mvtec_root, cache_path(folder, fmt)))
        assert result.sealed and result.images == 9
        out[fmt] = Path(result.path)
    return out


def _copy(src: Path, dest: Path) -> Path:
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dest)
    return dest


# ---------------------------------------------------------------------------------------------- dataset API
def test_mvtec_mask_refs(mvtec_root):
    train = create_dataset("mvtec", mvtec_root, "train", category=CATEGORY)
    test = create_dataset("mvtec", mvtec_root, "test", category=CATEGORY)
    assert test.class_names == ["good", "crack"]
    assert [train.mask_ref(i) for i in range(len(train))] == [None] * 4 and not train.has_masks()
    assert test.sample_ids[2:] == [f"{CATEGORY}/test/crack/{k:03d}.png" for k in range(3)]
    assert test.mask_refs() == ["", "", f"{CATEGORY}/ground_truth/crack/000_mask.png",
                                f"{CATEGORY}/ground_truth/crack/001_mask.png", None]
    assert test.has_masks()
    limited = create_dataset("mvtec", mvtec_root, "test", category=CATEGORY, limit_per_class=1)
    assert limited.mask_refs() == ["", f"{CATEGORY}/ground_truth/crack/000_mask.png"]


def test_no_mask_files_means_no_masks(tmp_path, make_folder_dataset):
    root = write_mvtec(tmp_path / "m")
    shutil.rmtree(root / CATEGORY / "ground_truth")
    test = create_dataset("mvtec", root, "test", category=CATEGORY)
    assert test.mask_refs() == ["", "", None, None, None] and not test.has_masks()
    folder = create_dataset("folder", make_folder_dataset(n_train=1, n_test=1), "test")
    assert folder.mask_ref(0) is None and not folder.has_masks() and not folder.provides_masks


# ---------------------------------------------------------------------------------------- decoding, coverage
def test_read_mask_coverage_matches_a_hand_computation(mvtec_root):
    res = eval_resolution((SIZE, SIZE))
    assert res == (SIZE, SIZE)
    got = read_mask(mvtec_root / CATEGORY / "ground_truth/crack/000_mask.png", res)
    assert got.dtype == np.uint8 and got.shape == res
    np.testing.assert_array_equal(got, hand_coverage(RECT))
    # by hand: row cell 11 spans rows [33/7, 36/7), 1/3 of it below row 5; column cell 12 spans [60/7, 65/7), 2/5 of
    # it right of column 9: the corner cell is 2/15 covered = 34/255; its neighbours 1/3 (85) and 2/5 (102)
    assert got[11, 12] == 34 and got[11, 20] == 85 and got[20, 12] == 102 and got[20, 20] == 255
    assert got[10].max() == 0 and got[:, 11].max() == 0
    stripe = read_mask(mvtec_root / CATEGORY / "ground_truth/crack/001_mask.png", res)
    assert (stripe[:7] == 255).all() and stripe[7:].max() == 0  # rows 0:3 of 24 are cells 0:7 of 56 exactly


def test_coverage_rule_and_binarisation(tmp_path):
    assert coverage(np.array([[0, 1]]), (1, 1))[0, 0] == DEFECT_COVERAGE  # exactly half covered: defective
    assert coverage(np.array([[0, 1, 0]]), (1, 2)).tolist() == [[85, 85]]  # a third of each cell
    assert coverage(np.array([[0, 1]]), (1, 3)).tolist() == [[0, 128, 255]]  # upsampling: the middle cell is half
    assert "at least half of it is covered" in RULE
    grey = np.array([[0, 127, 128, 255]] * 2, np.uint8)  # > 127 is defective
    Image.fromarray(grey).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png", (2, 4)).tolist() == [[0, 0, 255, 255]] * 2
    # a mask whose size is a whole multiple of the grid: a plain block mean
    rng = np.random.default_rng(0)
    b = rng.random((64, 48)) > 0.5
    expected = np.floor(b.reshape(16, 4, 12, 4).mean(axis=(1, 3)) * 255 + 0.5)
    np.testing.assert_array_equal(coverage(b, (16, 12)), expected)


def test_unreadable_mask_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "broken_mask.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(SanfError, match="broken_mask.png") as e:
        read_mask(bad, (8, 8))
    assert "\n" not in str(e.value)


def test_load_masks_in_listing_order(mvtec_root):
    ds = create_dataset("mvtec", mvtec_root, "test", category=CATEGORY)
    order = np.array([4, 3, 0, 2, 1])
    seen = []
    masks, known, refs = load_masks(ds, order, (SIZE, SIZE), progress=seen.append)
    assert masks.shape == (5, SIZE, SIZE) and masks.dtype == np.uint8 and sum(seen) == 5
    assert known.tolist() == [False, True, True, True, True]
    assert refs == [ds.mask_ref(int(i)) for i in order]
    np.testing.assert_array_equal(masks[3], hand_coverage(RECT))
    assert masks[0].max() == 0 and masks[2].max() == 0 and masks[4].max() == 0


# ------------------------------------------------------------------------------------------- in the cache
@pytest.mark.parametrize("fmt", FORMATS)
def test_masks_are_stored_in_the_test_split(mask_caches, fmt):
    with open_cache(mask_caches[fmt]) as c:
        assert c.format == fmt and c.mask_resolution == (SIZE, SIZE)
        test, train = c.split("test"), c.split("train")
        assert test.has_masks and not train.has_masks
        cov, known = test.masks(0, test.n)
        assert cov.shape == (5, SIZE, SIZE) and cov.dtype == np.uint8 and known.dtype == bool
        assert test.labels.tolist() == [0, 0, 1, 1, 1]
        assert known.tolist() == [True, True, True, True, False]  # normal, normal, mask, mask, no mask file
        np.testing.assert_array_equal(cov[2], hand_coverage(RECT))
        np.testing.assert_array_equal(cov[3], hand_coverage(STRIPE))
        assert cov[[0, 1, 4]].max() == 0
        part_cov, part_known = test.masks(2, 4)  # a slice reads the same rows
        np.testing.assert_array_equal(part_cov, cov[2:4])
        assert part_known.tolist() == [True, True]
        with pytest.raises(SanfError, match="records no ground-truth masks"):
            train.masks(0, train.n)
        settings, meta = c.meta["settings"], c.meta["masks"]
        assert settings["masks"] == {"resolution": [SIZE, SIZE], "sha256": mask_digest(cov, known)}
        assert meta == {"split": "test", "resolution": [SIZE, SIZE], "rule": RULE, "n_known": 4, "n_with_defect": 2,
                        "refs": ["", "", f"{CATEGORY}/ground_truth/crack/000_mask.png",
                                 f"{CATEGORY}/ground_truth/crack/001_mask.png", None]}
    assert verify_cache(mask_caches[fmt]).ok


def test_zarr_and_hdf5_masks_are_identical(mask_caches, same_cache):
    same_cache(mask_caches["zarr"], mask_caches["hdf5"])
    with open_cache(mask_caches["zarr"]) as a, open_cache(mask_caches["hdf5"]) as b:
        for x, y in zip(a.split("test").masks(0, 5), b.split("test").masks(0, 5), strict=True):
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
        assert a.fingerprint == b.fingerprint


@pytest.mark.parametrize("fmt", FORMATS)
def test_masks_stay_aligned_with_skipped_images(tmp_path, fmt):
    root = write_mvtec(tmp_path / "data", corrupt="test/crack/001.png")  # its mask file is fine
    result = extract(mvtec_config(root, cache_path(tmp_path, fmt)))
    assert [s["sample_id"] for s in result.skipped] == [f"{CATEGORY}/test/crack/001.png"]
    with open_cache(result.path) as c:
        test = c.split("test")
        assert test.n == 5 and test.n_valid == 4
        cls, _ = test.read(0, test.n)
        cov, known = test.masks(0, test.n)
        assert len(cov) == len(known) == len(cls) == test.n_valid
        assert test.labels.tolist() == [0, 0, 1, 1] and known.tolist() == [True, True, True, False]
        np.testing.assert_array_equal(cov[2], hand_coverage(RECT))  # the stripe of the skipped image is gone
        assert cov[3].max() == 0
        sub_cov, sub_known = test.masks(3, 5)  # rows 3 (skipped) and 4: only row 4 comes back
        assert len(sub_cov) == len(test.read(3, 5)[0]) == 1 and sub_known.tolist() == [False]
        assert c.meta["masks"]["n_known"] == 4  # masks are recorded per listing position, skipped or not


@pytest.mark.parametrize("fmt", FORMATS)
def test_rerun_and_resume_are_accepted(mask_caches, mvtec_root, tmp_path, fmt, same_cache):
    copy = _copy(mask_caches[fmt], cache_path(tmp_path, fmt, "copy"))
    again = extract(mvtec_config(mvtec_root, copy))
    assert again.sealed and again.images == 0
    # two processes' worth of shards, one after the other: the second finds the cache made by the first and must
    # match its settings (masks included), and its masks were stored once, when the first created it
    split = cache_path(tmp_path, fmt, "split")
    first = extract(mvtec_config(mvtec_root, split, num_shards=2, shard_index=0))
    assert not first.sealed
    second = extract(mvtec_config(mvtec_root, split, num_shards=2, shard_index=1))
    assert second.sealed
    same_cache(mask_caches[fmt], split)
    with open_cache(mask_caches[fmt]) as a, open_cache(split) as b:
        assert a.fingerprint == b.fingerprint
        for x, y in zip(a.split("test").masks(0, 5), b.split("test").masks(0, 5), strict=True):
            np.testing.assert_array_equal(x, y)


def test_changed_mask_is_another_cache(tmp_path):
    root = write_mvtec(tmp_path / "data")
    cache = tmp_path / "cache"
    before = open_cache(extract(mvtec_config(root, cache)).path).fingerprint
    m = np.zeros((H, W), np.uint8)
    m[:, :4] = 255
    Image.fromarray(m).save(root / CATEGORY / "ground_truth/crack/001_mask.png")
    with pytest.raises(SanfError, match="masks.sha256"):
        extract(mvtec_config(root, cache))
    after = extract(mvtec_config(root, cache, overwrite=True))
    with open_cache(after.path) as c:
        assert c.fingerprint != before
        assert (c.split("test").masks(3, 4)[0][0][:, :5] == 255).all()


def test_caches_without_masks_keep_their_settings(make_folder_dataset, tmp_path):
    """No "masks" key anywhere for a dataset without masks: the settings (so the fingerprints) of such caches are
    what they were before masks existed (the keys below are all there were)."""
    from sanf_pipeline.cache.schema import fingerprint

    data = make_folder_dataset(n_train=2, n_test=2)
    with open_cache(extract(extract_config(data, tmp_path / "folder")).path) as c:
        assert sorted(c.meta["settings"]) == ["backbone", "dataset", "dtype", "precision"]
        assert "masks" not in c.meta and c.fingerprint == fingerprint(c.meta["settings"])
        assert c.mask_resolution is None and not c.split("test").has_masks
        with pytest.raises(SanfError, match="records no ground-truth masks"):
            c.split("test").masks(0, 2)
        assert cache_info(c.path)["masks"] is None
        assert mask_line(cache_info(c.path)).startswith("masks      none")
    # an mvtec cache of the train split only (no masks there) has none either
    root = write_mvtec(tmp_path / "m")
    with open_cache(extract(mvtec_config(root, tmp_path / "train-only", splits=("train",))).path) as c:
        assert "masks" not in c.meta["settings"] and "masks" not in c.meta


# ------------------------------------------------------------------------------------------------- damage
def test_damaged_zarr_masks_are_detected(mask_caches, tmp_path):
    import zarr

    path = _copy(mask_caches["zarr"], tmp_path / "z")
    array = zarr.open_array(store=str(path / "test" / "mask"), mode="r+")
    array[2, 0, 0] = 200  # a plausible value, only the checksum can tell
    with open_cache(path) as c:
        c.split("test").read(0, 5)  # the shards themselves are fine
        with pytest.raises(SanfError, match=r"is damaged: the ground-truth masks of split test do not match") as e:
            c.split("test").masks(0, 5)
        assert "sanf cache verify" in str(e.value) and "\n" not in str(e.value)
    with open_cache(path, verify=False) as c:
        assert c.split("test").masks(2, 3)[0][0, 0, 0] == 200  # unchecked reads are the caller's choice
    report = verify_cache(path)
    assert not report.ok and any("ground-truth masks do not match" in p for p in report.problems)
    # bytes of the stored chunk file flipped: unreadable or mismatching, either way the same one-line error
    raw = _copy(mask_caches["zarr"], tmp_path / "raw")
    chunk = raw / "test" / "mask" / "c" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    for k in range(len(data) // 2, min(len(data), len(data) // 2 + 8)):
        data[k] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with open_cache(raw) as c, pytest.raises(SanfError, match="is damaged: the ground-truth masks"):
        c.split("test").masks(0, 5)
    assert not verify_cache(raw).ok


def test_damaged_hdf5_masks_are_detected(mask_caches, tmp_path):
    import h5py

    path = _copy(mask_caches["hdf5"], tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:
        f["test/mask_known"][4] = True
    with open_cache(path) as c, pytest.raises(SanfError, match="ground-truth masks of split test do not match"):
        c.split("test").masks(4, 5)
    assert not verify_cache(path).ok


def test_mask_arrays_are_compressed(mask_caches):
    from sanf_pipeline.cache.inspect import disk_size

    mask_dir = mask_caches["zarr"] / "test" / "mask"
    meta = json.loads((mask_dir / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]][-1] == "zstd"
    assert disk_size(mask_dir) < 5 * SIZE * SIZE  # mostly zeros
    import h5py

    with h5py.File(mask_caches["hdf5"], "r") as f:
        assert f["test/mask"].compression == "gzip"


# ---------------------------------------------------------------------------------------------- cache info
@pytest.mark.parametrize("fmt", FORMATS)
def test_cache_info_reports_masks(mask_caches, fmt):
    info = cache_info(mask_caches[fmt])
    assert info["masks"] == {"split": "test", "resolution": [SIZE, SIZE], "n": 5, "n_known": 4, "n_with_defect": 2,
                             "rule": RULE}
    assert mask_line(info) == "masks      test: 4 of 5 images have a known mask (2 with defect pixels) at 56x56"
    r = CliRunner().invoke(cli, ["cache", "info", str(mask_caches[fmt]), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["masks"]["n_known"] == 4


def test_cache_info_text_shows_the_mask_line(mask_caches):
    r = CliRunner().invoke(cli, ["cache", "info", str(mask_caches["zarr"])])
    assert r.exit_code == 0, r.output
    assert "masks      test: 4 of 5 images have a known mask (2 with defect pixels) at 56x56" in r.stdout
