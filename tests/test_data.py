"""sanf_pipeline.data: every reader on small files written in the real on-disk format, and decode_image on
ordinary images (the awkward and broken ones real folders contain: tests/robustness/test_bad_images.py)."""

from __future__ import annotations

import gzip
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sanf_pipeline.data import (
    IMAGE_EXTENSIONS,
    ImageDataset,
    create_dataset,
    decode_image,
    first_per_class,
    list_datasets,
    register_dataset,
)
from sanf_pipeline.errors import SanfError

SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAR_JPG_ZIP = SHARED / "data" / "cifar10-jpg.zip"


def rng_images(n: int, h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# writers for the real on-disk formats
# ---------------------------------------------------------------------------------------------


def cifar_rows(imgs: np.ndarray) -> np.ndarray:
    """uint8 (n, 32, 32, 3) -> CIFAR rows (n, 3072): R plane, G plane, B plane, row-major."""
    return imgs.transpose(0, 3, 1, 2).reshape(len(imgs), -1)


def dump(obj, path: Path, protocol: int = 2) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def write_cifar10(root: Path, per_batch: int = 4, bytes_keys: bool = False):
    """The layout of cifar-10-python.tar.gz. Returns {split: (images, labels)}."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    dump({key("label_names"): names, key("num_cases_per_batch"): per_batch}, d / "batches.meta")
    out = {}
    files = {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"]}
    for split, fnames in files.items():
        all_imgs, all_labels = [], []
        for j, fname in enumerate(fnames):
            seed = 100 * (split == "test") + j
            imgs = rng_images(per_batch, 32, 32, seed)
            labels = [(seed + k) % 3 for k in range(per_batch)]  # classes 0..2 only
            dump({key("batch_label"): fname, key("labels"): labels, key("data"): cifar_rows(imgs),
                  key("filenames"): [f"{fname}_{k}.png" for k in range(per_batch)]},
                 d / fname, protocol=3 if bytes_keys else 2)
            all_imgs.append(imgs)
            all_labels += labels
        out[split] = (np.concatenate(all_imgs), np.asarray(all_labels))
    return names, out


def write_cifar100(root: Path, n: int = 6):
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    fine_names = [f"fine{k:02d}" for k in range(100)]
    coarse_names = [f"coarse{k:02d}" for k in range(20)]
    dump({"fine_label_names": fine_names, "coarse_label_names": coarse_names}, d / "meta")
    out = {}
    for split, seed in (("train", 1), ("test", 2)):
        imgs = rng_images(n, 32, 32, seed)
        fine = [(7 * k + seed) % 100 for k in range(n)]
        coarse = [f // 5 for f in fine]
        dump({"fine_labels": fine, "coarse_labels": coarse, "data": cifar_rows(imgs)}, d / split)
        out[split] = (imgs, np.asarray(fine), np.asarray(coarse))
    return fine_names, coarse_names, out


def write_stl10(root: Path, n: int = 3):
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (d / "class_names.txt").write_text("\n".join(names) + "\n")
    out = {}
    for split, seed in (("train", 3), ("test", 4)):
        imgs = rng_images(n, 96, 96, seed)
        imgs[:, 0, :, :] = 255  # top row white, left column black: catches a wrong transpose
        imgs[:, :, 0, :] = 0
        labels0 = np.asarray([(seed + k) % 10 for k in range(n)], dtype=np.uint8)
        # each image: 3 planes, each stored column-major -> array (3, W, H) in C order
        (d / f"{split}_X.bin").write_bytes(imgs.transpose(0, 3, 2, 1).tobytes())
        (d / f"{split}_y.bin").write_bytes((labels0 + 1).tobytes())
        out[split] = (imgs, labels0.astype(np.int64))
    return names, out


def idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype("u1"): 0x08}[arr.dtype]
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx_set(folder: Path, gz: bool, n_train: int = 7, n_test: int = 5, dotted: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) * 3 % 10).astype(np.uint8)
        sep = "." if dotted else "-"
        for name, arr in ((f"{prefix}-images{sep}idx3-ubyte", imgs), (f"{prefix}-labels{sep}idx1-ubyte", labels)):
            data = idx_bytes(arr)
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data, mtime=0))
            else:
                (folder / name).write_bytes(data)
        out[split] = (imgs, labels.astype(np.int64))
    return out


def save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def write_mvtec(root: Path):
    cat = root / "bottle"
    rng = np.random.default_rng(6)
    layout = {"train/good": 3, "test/good": 2, "test/contamination": 2, "test/broken_large": 1}
    arrays = {}
    for sub, n in layout.items():
        for k in range(n):
            a = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
            save_png(cat / sub / f"{k:03d}.png", a)
            arrays[f"bottle/{sub}/{k:03d}.png"] = a
    save_png(cat / "ground_truth/contamination/000_mask.png", np.zeros((10, 12), np.uint8))
    (root / "cable" / "train" / "good").mkdir(parents=True)  # a second, empty category
    (root / "license.txt").write_text("CC BY-NC-SA 4.0")
    return arrays


def write_folder(root: Path):
    rng = np.random.default_rng(7)
    arrays = {}
    files = ["train/cat/b.png", "train/cat/a.png", "train/dog/sub/c.png", "train/dog/d.PNG",
             "test/cat/e.png", "test/dog/f.png", "test/zebra/g.png", "test/zebra/h.jpg"]
    for f in files:
        a = rng.integers(0, 256, size=(9, 7, 3), dtype=np.uint8)
        p = root / f
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(p, format="JPEG" if f.endswith(".jpg") else "PNG")
        arrays[f] = a
    (root / "train/cat/notes.txt").write_text("not an image")
    (root / "train/cat/.DS_Store").write_bytes(b"\0\1")
    (root / "train/dog/.hidden").mkdir()
    save_png(root / "train/dog/.hidden/x.png", np.zeros((2, 2, 3), np.uint8))
    return arrays


# ---------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------


def check_common(ds: ImageDataset) -> None:
    n = len(ds)
    assert ds.labels.dtype == np.int64 and ds.labels.shape == (n,)
    assert len(ds.sample_ids) == n and len(set(ds.sample_ids)) == n
    d = ds.describe()
    assert set(d) >= {"name", "root", "split", "category", "limit_per_class", "n", "num_classes"}
    assert d["n"] == n and d["num_classes"] == len(ds.class_names)
    import json

    json.dumps(d)
    if n:
        img = ds.load(0)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert img.flags.c_contiguous and img.flags.writeable
    order = ds.order_by_label()
    assert np.all(np.diff(ds.labels[order]) >= 0)
    # cheap to pickle and still works in the "worker"; the per-process cache stays behind
    blob = pickle.dumps(ds)
    ds2 = pickle.loads(blob)
    assert ds2.sample_ids == ds.sample_ids and np.array_equal(ds2.labels, ds.labels)
    if n:
        assert np.array_equal(ds2.load(n - 1), ds.load(n - 1))
        assert len(pickle.dumps(ds)) == len(blob)  # loading did not grow the pickle


@pytest.mark.parametrize("bytes_keys", [False, True], ids=["py2-style", "py3-bytes-keys"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10(tmp_path, split, bytes_keys):
    names, data = write_cifar10(tmp_path, bytes_keys=bytes_keys)
    ds = create_dataset("cifar10", tmp_path, split)
    imgs, labels = data[split]
    assert ds.class_names == names
    assert np.array_equal(ds.labels, labels)
    assert len(ds) == len(imgs)
    for i in range(len(ds)):
        assert np.array_equal(ds.load(i), imgs[i])
    first = "cifar-10-batches-py/data_batch_1#0" if split == "train" else "cifar-10-batches-py/test_batch#0"
    assert ds.sample_ids[0] == first
    check_common(ds)
    # root may also be the batch folder itself
    inner = create_dataset("cifar10", tmp_path / "cifar-10-batches-py", split)
    assert np.array_equal(inner.load(1), imgs[1]) and inner.sample_ids[0] == first.split("/", 1)[1]


def test_cifar10_limit_per_class(tmp_path):
    _, data = write_cifar10(tmp_path)
    _, labels = data["train"]
    ds = create_dataset("cifar10", tmp_path, "train", limit_per_class=2)
    assert np.bincount(ds.labels).tolist() == [2, 2, 2]
    keep = first_per_class(labels, 2)
    assert np.array_equal(ds.labels, labels[keep])
    assert np.array_equal(ds.load(3), data["train"][0][keep[3]])
    assert ds.describe()["limit_per_class"] == 2
    check_common(ds)


@pytest.mark.parametrize("category", [None, "coarse", "fine"])
def test_cifar100(tmp_path, category):
    fine_names, coarse_names, data = write_cifar100(tmp_path)
    for split in ("train", "test"):
        ds = create_dataset("cifar100", tmp_path, split, category=category)
        imgs, fine, coarse = data[split]
        want_names, want = (fine_names, fine) if category == "fine" else (coarse_names, coarse)
        assert ds.class_names == want_names
        assert np.array_equal(ds.labels, want)
        assert ds.describe()["category"] == (category or "coarse")
        assert np.array_equal(ds.load(len(ds) - 1), imgs[-1])
        assert ds.sample_ids[2] == f"cifar-100-python/{split}#2"
        check_common(ds)


def test_cifar100_bad_category(tmp_path):
    write_cifar100(tmp_path)
    with pytest.raises(SanfError, match="coarse, fine"):
        create_dataset("cifar100", tmp_path, "train", category="medium")


@pytest.mark.parametrize("split", ["train", "test"])
def test_stl10(tmp_path, split):
    names, data = write_stl10(tmp_path)
    ds = create_dataset("stl10", tmp_path, split)
    imgs, labels = data[split]
    assert ds.class_names == names
    assert np.array_equal(ds.labels, labels)  # 1-based in the file, 0-based here
    for i in range(len(ds)):
        got = ds.load(i)
        assert got.shape == (96, 96, 3)
        assert np.array_equal(got, imgs[i])
    assert (ds.load(0)[0, 1:, :] == 255).all() and (ds.load(0)[:, 0, :] == 0).all()
    assert ds.sample_ids[1] == f"stl10_binary/{split}_X.bin#1"
    check_common(ds)


def test_stl10_truncated(tmp_path):
    write_stl10(tmp_path)
    x = tmp_path / "stl10_binary" / "train_X.bin"
    x.write_bytes(x.read_bytes()[:-10])
    with pytest.raises(SanfError, match="truncated"):
        create_dataset("stl10", tmp_path, "train")


@pytest.mark.parametrize("name, sub, classes", [
    ("mnist", "", [str(d) for d in range(10)]),
    ("mnist", "MNIST/raw", [str(d) for d in range(10)]),
    ("fashion-mnist", "raw", None),
    ("fashion-mnist", "FashionMNIST/raw", None),
])
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_idx(tmp_path, name, sub, classes, gz):
    data = write_idx_set(tmp_path / sub if sub else tmp_path, gz=gz)
    for split in ("train", "test"):
        ds = create_dataset(name, tmp_path, split)
        imgs, labels = data[split]
        if classes:
            assert ds.class_names == classes
        else:
            assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
        assert len(ds.class_names) == 10
        assert np.array_equal(ds.labels, labels)
        for i in range(len(ds)):
            got = ds.load(i)
            assert got.shape == (28, 28, 3)
            assert np.array_equal(got[..., 0], imgs[i]) and np.array_equal(got[..., 2], imgs[i])
        prefix = f"{sub}/" if sub else ""
        stem = "train-images-idx3-ubyte" if split == "train" else "t10k-images-idx3-ubyte"
        assert ds.sample_ids[3] == f"{prefix}{stem}{'.gz' if gz else ''}#3"
        check_common(ds)


def test_idx_dotted_names_and_limit(tmp_path):
    data = write_idx_set(tmp_path, gz=False, dotted=True, n_train=25)
    ds = create_dataset("MNIST", tmp_path, "train", limit_per_class=1)
    assert ds.labels.tolist() == list(data["train"][1][:10])
    assert sorted(ds.labels.tolist()) == list(range(10))


def test_idx_missing(tmp_path):
    with pytest.raises(SanfError, match="train-images-idx3-ubyte"):
        create_dataset("fashion_mnist", tmp_path, "train")


def test_mvtec(tmp_path):
    arrays = write_mvtec(tmp_path)
    tr = create_dataset("mvtec", tmp_path, "train", category="bottle")
    te = create_dataset("mvtec", tmp_path, "test", category="bottle")
    assert tr.class_names == te.class_names == ["good", "broken_large", "contamination"]
    assert tr.labels.tolist() == [0, 0, 0]
    assert te.labels.tolist() == [0, 0, 1, 2, 2]
    assert te.sample_ids == ["bottle/test/good/000.png", "bottle/test/good/001.png",
                             "bottle/test/broken_large/000.png", "bottle/test/contamination/000.png",
                             "bottle/test/contamination/001.png"]
    for ds in (tr, te):
        for i, sid in enumerate(ds.sample_ids):
            assert np.array_equal(ds.load(i), arrays[sid])
        check_common(ds)
    lim = create_dataset("mvtec", tmp_path, "test", category="bottle", limit_per_class=1)
    assert lim.labels.tolist() == [0, 1, 2]
    assert lim.describe()["category"] == "bottle"


@pytest.mark.parametrize("category", [None, "carpet"])
def test_mvtec_bad_category_lists_choices(tmp_path, category):
    write_mvtec(tmp_path)
    with pytest.raises(SanfError, match="bottle, cable"):
        create_dataset("mvtec", tmp_path, "train", category=category)


def test_mvtec_empty_defect_folder(tmp_path):
    write_mvtec(tmp_path)
    (tmp_path / "bottle/test/crack").mkdir()
    with pytest.raises(SanfError, match="no images"):
        create_dataset("mvtec", tmp_path, "test", category="bottle")


def test_folder(tmp_path):
    arrays = write_folder(tmp_path)
    tr = create_dataset("folder", tmp_path, "train")
    te = create_dataset("folder", tmp_path, "test")
    assert tr.class_names == te.class_names == ["cat", "dog", "zebra"]
    assert tr.sample_ids == ["train/cat/a.png", "train/cat/b.png", "train/dog/d.PNG", "train/dog/sub/c.png"]
    assert tr.labels.tolist() == [0, 0, 1, 1]
    assert te.labels.tolist() == [0, 1, 2, 2]
    for i, sid in enumerate(tr.sample_ids):
        assert np.array_equal(tr.load(i), arrays[sid])  # PNG is lossless
    jpg = te.load(te.sample_ids.index("test/zebra/h.jpg"))
    assert jpg.shape == (9, 7, 3)
    assert np.abs(jpg.astype(int) - arrays["test/zebra/h.jpg"]).mean() < 60  # lossy, but the same image
    for ds in (tr, te):
        check_common(ds)
    lim = create_dataset("folder", tmp_path, "train", limit_per_class=1)
    assert lim.sample_ids == ["train/cat/a.png", "train/dog/d.PNG"]


def test_folder_accepts_parent_of_dataset_folder(tmp_path):
    write_folder(tmp_path / "cifar10")
    ds = create_dataset("folder", tmp_path, "train")
    assert ds.sample_ids[0] == "cifar10/train/cat/a.png"
    assert ds.load(0).shape == (9, 7, 3)


def test_folder_errors(tmp_path):
    with pytest.raises(SanfError, match="no train/ or test/"):
        create_dataset("folder", tmp_path, "train")
    (tmp_path / "train/cat").mkdir(parents=True)
    with pytest.raises(SanfError, match="has no images"):
        create_dataset("folder", tmp_path, "train")
    with pytest.raises(SanfError, match="no test/ folder"):
        create_dataset("folder", tmp_path, "test")


def test_digits():
    tr = create_dataset("digits", None, "train")
    te = create_dataset("digits", "/ignored", "test")
    assert len(tr) + len(te) == 1797
    assert tr.class_names == [str(d) for d in range(10)]
    assert not set(tr.sample_ids) & set(te.sample_ids)
    assert abs(np.bincount(tr.labels) - np.bincount(te.labels)).max() <= 1  # stratified
    img = tr.load(0)
    assert img.shape == (8, 8, 3) and img.max() > 200 and img.min() == 0
    from sklearn.datasets import load_digits

    k = int(tr.sample_ids[5].split("#")[1])
    want = np.rint(load_digits().images[k] * 255 / 16).astype(np.uint8)
    assert np.array_equal(tr.load(5)[..., 1], want) and tr.labels[5] == load_digits().target[k]
    assert create_dataset("digits", None, "train").sample_ids == tr.sample_ids  # deterministic
    for ds in (tr, te):
        check_common(ds)


def test_registry_and_argument_errors(tmp_path):
    assert {"cifar10", "cifar100", "stl10", "mnist", "fashion-mnist", "mvtec", "folder", "digits"} <= set(
        list_datasets())
    with pytest.raises(SanfError, match="unknown dataset 'imagenet'; choose one of: cifar10"):
        create_dataset("imagenet", tmp_path, "train")
    with pytest.raises(SanfError, match="unknown split 'val'; choose one of: train, test"):
        create_dataset("digits", None, "val")
    with pytest.raises(SanfError, match="does not exist"):
        create_dataset("folder", tmp_path / "nope", "train")
    with pytest.raises(SanfError, match="needs a root"):
        create_dataset("folder", None, "train")
    with pytest.raises(SanfError, match="limit_per_class"):
        create_dataset("digits", None, "train", limit_per_class=0)
    with pytest.raises(SanfError, match="no categories"):
        create_dataset("digits", None, "train", category="x")
    with pytest.raises(SanfError, match="cifar-10-batches-py"):
        create_dataset("cifar10", tmp_path, "train")
    with pytest.raises(IndexError):
        create_dataset("digits", None, "train", limit_per_class=1).load(10)


def test_register_custom_dataset(tmp_path):
    @register_dataset("test-ramp")
    class Ramp(ImageDataset):
        needs_root = False

        def _scan(self):
            return ["a", "b"], np.array([1, 0, 1, 1]), [f"ramp#{k}" for k in range(4)], np.arange(4)

        def _load(self, i):
            return np.full((2, 2, 3), int(self._refs[i]), np.uint8)

    ds = create_dataset("TEST_RAMP", None, "test", limit_per_class=2)
    assert ds.name == "test-ramp" and ds.labels.tolist() == [1, 0, 1]
    assert ds.order_by_label().tolist() == [1, 0, 2]
    assert ds.load(2)[0, 0, 0] == 2


@pytest.mark.parametrize("labels, n, want", [
    ([2, 0, 2, 1, 2, 0], 1, [0, 1, 3]),
    ([2, 0, 2, 1, 2, 0], 2, [0, 1, 2, 3, 5]),
    ([], 3, []),
])
def test_first_per_class(labels, n, want):
    assert first_per_class(np.array(labels, dtype=np.int64), n).tolist() == want


@pytest.mark.skipif(not CIFAR_JPG_ZIP.is_file(), reason=f"real-data check needs {CIFAR_JPG_ZIP} "
                    "(the shared CIFAR-10 JPEG export), which is not present")
def test_folder_on_real_cifar10_jpegs(tmp_path):
    classes = ["airplane", "cat"]
    with zipfile.ZipFile(CIFAR_JPG_ZIP) as z:
        for split in ("train", "test"):
            for c in classes:
                for k in range(3):
                    z.extract(f"cifar10/{split}/{c}/{k:04d}.jpg", tmp_path)
    for split in ("train", "test"):
        ds = create_dataset("folder", tmp_path, split)  # the export's root, as unpacked
        assert ds.class_names == classes
        assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
        assert ds.sample_ids[0] == f"cifar10/{split}/airplane/0000.jpg"
        for i in range(len(ds)):
            img = ds.load(i)
            assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and img.std() > 5
        check_common(ds)


# ---------------------------------------------------------------------------------------------
# decode_image
# ---------------------------------------------------------------------------------------------


def test_image_extensions():
    assert {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"} <= IMAGE_EXTENSIONS


def test_decode_rgb_png_roundtrip_path_and_bytes(tmp_path):
    a = rng_images(1, 5, 6, 0)[0]
    p = tmp_path / "x.png"
    save_png(p, a)
    out = decode_image(p)
    assert np.array_equal(out, a) and out.flags.writeable and out.flags.c_contiguous
    assert np.array_equal(decode_image(str(p)), a)
    assert np.array_equal(decode_image(p.read_bytes()), a)


