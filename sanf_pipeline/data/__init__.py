"""Dataset readers and image decoding, by name (timm style).

>>> from sanf_pipeline.data import create_dataset, list_datasets
>>> ds = create_dataset("cifar10", "/data/cifar", "train", limit_per_class=100)
>>> ds.class_names, ds.labels, ds.sample_ids, len(ds), ds.load(0).shape
"""

# The reader modules register themselves on import.
from . import cifar, digits, folder, mnist, mvtec, stl10  # noqa: F401
from .base import SPLITS, ImageDataset, first_per_class
from .images import IMAGE_EXTENSIONS, decode_image, is_image_file
from .registry import create_dataset, get_dataset_class, list_datasets, register_dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "ImageDataset",
    "create_dataset",
    "decode_image",
    "first_per_class",
    "get_dataset_class",
    "is_image_file",
    "list_datasets",
    "register_dataset",
]
