"""Writing and reading the files sanf writes: atomic replace for JSON, text, JSONL and safetensors (with a JSON
metadata record, never pickles), safe reading of them, package versions, timestamps and settings ids."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from ..cache.schema import MAX_JSON_BYTES, canonical_json, loads_limited
from ..cache.schema import write_json_atomic as _write_json_atomic
from ..errors import SanfError

META_KEY = "sanf"


# ------------------------------------------------------------------------------------------------ small I/O
def _os_error(exc: OSError, path: Path, doing: str) -> SanfError:
    return SanfError(f"cannot {doing} {path}: {exc.strerror or exc}; check the folder exists, is writable and "
                     f"the disk has space, or choose another --out")


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it (os.umask would race other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode(path) -> None:
    """Give a file the mode ``open()`` would (0666 less the umask): some writers (safetensors) create 0600 files,
    which other users of a shared machine cannot read."""
    os.chmod(path, 0o666 & ~_umask())


def write_json_atomic(path, obj: Any) -> None:
    path = Path(path)
    try:
        _write_json_atomic(path, obj)
    except OSError as exc:
        _tmp_name(path).unlink(missing_ok=True)
        raise _os_error(exc, path, "write") from None


def write_text_atomic(path, text: str) -> None:
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _os_error(exc, path, "write") from None


def write_jsonl_atomic(path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows))


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise SanfError(f"{path} is {size} bytes, over the {MAX_JSON_BYTES}-byte limit; refusing to parse it")
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise SanfError(f"cannot read {path}: {exc.strerror or exc}") from None
    return [loads_limited(line, str(path)) for line in text.splitlines() if line.strip()]


def save_tensors_atomic(path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """safetensors file with ``meta`` as JSON under the metadata key ``sanf``; atomic replace."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _tmp_name(path)
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    try:
        save_file(clean, str(tmp), metadata={META_KEY: canonical_json(meta)})
        default_file_mode(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _os_error(exc, path, "write") from None


def load_tensors(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a safetensors file written by ``save_tensors_atomic``: (tensors on CPU, meta dict)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SanfError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0] if str(exc) else ''}); "
                        f"it is damaged or not a sanf file") from None
    if raw is None:
        raise SanfError(f"{path} has no sanf metadata; it is not a sanf file")
    return tensors, loads_limited(raw, f"the metadata of {path}")


def package_versions() -> dict:
    """Versions of everything that can change a cache's or a run's numbers (recorded in both)."""
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    versions = {"sanf": __version__, "python": platform.python_version()}
    for name in ("torch", "timm", "numpy", "scikit-learn", "zarr", "h5py"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def settings_id(settings: dict) -> str:
    return hashlib.sha256(canonical_json(settings).encode()).hexdigest()[:16]
