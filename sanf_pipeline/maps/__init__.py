"""Anomaly maps: a model's per-token evidence made into a map at the image's own resolution (``head``), and the
pictures of it (``overlay``). Pure torch/numpy/PIL; no files of sanf's own are read here."""

from .head import DEFAULT_SIGMA, MAX_EVAL_SIDE, MapHead, eval_resolution, resize_maps

__all__ = ["DEFAULT_SIGMA", "MAX_EVAL_SIDE", "MapHead", "eval_resolution", "resize_maps"]
