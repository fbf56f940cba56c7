"""`sanf score --maps DIR`: for every scored image an overlay PNG and its raw map, written a batch at a time.

Per image ``<name>`` (the file's stem; ``-2``, ``-3`` ... appended when stems repeat, in input order):

- ``<name>.overlay.png``: the image with its anomaly map in jet colours at alpha 0.5 (blue = like the held-out normal
  images, red = well above the pixel threshold; the run's fixed colour scale, ``jobs.maps``), the predicted defect
  region's contour in white, and a title with the score and the decision;
- ``<name>.map.npy``: the raw map, float32 ``(H, W)`` at the image's own resolution, in the score's map units
  (``numpy.load``); the predicted region is ``map > pixel_threshold``.

``sanf-maps.json`` indexes the folder (run, score, thresholds, and per image its source path, files, score and
decision). It is written before the first image, listing every file the command will write, and completed at the
end, so a rerun into the same folder replaces exactly sanf's files; a folder that is neither new, empty nor holds
that index is refused (docs/file-safety.md).
"""

from __future__ import annotations

from pathlib import Path

from ..cache.schema import read_json_file
from ..errors import SanfError
from ..store.atomic import write_json_atomic

INDEX_FILE = "sanf-maps.json"
INDEX_FORMAT = "sanf-maps"


def map_names(paths: list[str]) -> dict[str, str]:
    """A unique file-name stem per input path (its stem, numbered when stems repeat)."""
    seen: dict[str, int] = {}
    out = {}
    for p in paths:
        stem = Path(p).stem or "image"
        n = seen.get(stem, 0) + 1
        seen[stem] = n
        out[p] = stem if n == 1 else f"{stem}-{n}"
    return out


def _files(name: str) -> tuple[str, str]:
    return f"{name}.overlay.png", f"{name}.map.npy"


class MapWriter:
    """Writes the maps of ``Detector.score(..., on_batch=writer)`` into ``folder`` (module docstring)."""

    def __init__(self, folder, detector, paths: list[str], *, overwrite: bool = False):
        self.folder, self.detector = Path(folder), detector
        self.names = map_names(paths)
        self.rows: list[dict] = []
        planned = [f for n in self.names.values() for f in _files(n)]
        self._check(planned, overwrite)
        self.index = {"format": INDEX_FORMAT, "format_version": 1, "run": str(detector.run_dir),
                      "score": detector.score_kind, "threshold": detector.threshold,
                      "pixel_threshold": detector.pixel_threshold.record if detector.pixel_threshold else None,
                      "colour_scale": list(detector.pixel_threshold.colour) if detector.pixel_threshold else None,
                      "map": "float32 (H, W) at the image's own resolution; predicted region: map > "
                             "pixel_threshold.value", "files": planned, "complete": False, "images": []}
        write_json_atomic(self.folder / INDEX_FILE, self.index)

    def _check(self, planned: list[str], overwrite: bool) -> None:
        f = self.folder
        if f.exists() and not f.is_dir():
            raise SanfError(f"--maps {f} is a file; give a folder")
        if f.is_dir() and any(f.iterdir()):
            old = None
            if (f / INDEX_FILE).is_file():
                try:
                    old = read_json_file(f / INDEX_FILE)
                except SanfError:
                    old = None
            if not isinstance(old, dict) or old.get("format") != INDEX_FORMAT:
                raise SanfError(f"--maps {f} holds files that sanf did not write; sanf writes maps only into a new "
                                f"or empty folder, or one it wrote maps into before")
            ours = set(old.get("files") or [])
            foreign = [n for n in planned if (f / n).exists() and n not in ours]
            if foreign:
                raise SanfError(f"--maps {f} holds {foreign[0]}, which sanf did not write; choose another folder")
            if not overwrite and any((f / n).exists() for n in planned):
                raise SanfError(f"--maps {f} holds maps of an earlier `sanf score`; pass --overwrite to replace them "
                                f"or choose another folder")
        try:
            f.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SanfError(f"cannot create --maps {f}: {exc.strerror or exc}") from None

    def __call__(self, batch) -> None:
        from ..maps.overlay import colour_range, overlay, save_png, save_raw_map

        det = self.detector
        pt = det.pixel_threshold
        thr = det.threshold
        for path, s, a, image, amap in zip(batch.paths, batch.scores, batch.anomalous, batch.images, batch.maps,
                                           strict=True):
            name = self.names[path]
            png, npy = _files(name)
            lo, hi = colour_range(amap, pt.colour if pt else None)
            decision = "ANOMALOUS" if a else "normal"
            title = f"{Path(path).name}: score {s:.4g}, {decision}" + (
                f" (threshold {thr['value']:.4g})" if thr else "")
            save_png(self.folder / png, overlay(image, amap, vmin=lo, vmax=hi, region=amap > pt.value if pt else None,
                                                title=title))
            save_raw_map(self.folder / npy, amap)
            self.rows.append({"path": path, "overlay": png, "map": npy, "score": float(s), "anomalous": bool(a),
                              "region_pixels": int((amap > pt.value).sum()) if pt else None})

    def finish(self, skipped: list[dict]) -> None:
        self.index.update({"complete": True, "images": self.rows, "skipped": skipped})
        write_json_atomic(self.folder / INDEX_FILE, self.index)
