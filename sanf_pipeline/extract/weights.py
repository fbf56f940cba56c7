"""Backbone weights: where they come from (an explicit file, a weights folder, a registry package, timm's download,
random) and how a file is loaded into a timm model (timm's own checkpoint filter, strict, classifier dropped); see
``extract/backbones.py`` for the order and the reasons. This module never writes files.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SanfError

WEIGHTS_ENV = "SANF_WEIGHTS_DIR"
WEIGHT_EXTENSIONS = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
RANDOM_WEIGHTS = ("random", "none")
TIMM_WEIGHTS = ("timm", "hub")
RANDOM_SEED = 0


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file or a plain (``weights_only``) torch state dict onto the CPU.

    A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper and a DataParallel ``module.`` prefix are
    removed. Anything else that is not a mapping of names to tensors is a :class:`SanfError`.
    """
    path = Path(path)
    if not path.is_file():
        raise SanfError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SanfError(
            f"cannot read weights file {path}: {first[:300]} (expected a .safetensors file or a plain "
            f"state dict that torch.load(weights_only=True) accepts)"
        ) from e
    if isinstance(sd, Mapping):
        for key in ("state_dict", "model"):
            if key in sd and isinstance(sd[key], Mapping):
                sd = sd[key]
                break
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SanfError(f"weights file {path} is not a state dict (a mapping of parameter names to tensors)")
    out = {}
    for k, v in sd.items():
        k = str(k)
        out[k[7:] if k.startswith("module.") else k] = v
    return out


@dataclass(frozen=True)
class WeightsChoice:
    """Where the weights of a backbone come from.

    ``source``: ``"file"`` (explicit ``--weights``), ``"weights_dir"``, ``"package"`` (a registry package's
    file, :mod:`sanf_pipeline.packaged_weights`), ``"timm"`` (timm's pretrained
    download, attempted by :func:`create_backbone`) or ``"random"``. ``tried`` describes the places looked
    at before, for the error message when the download fails too.
    """

    source: str
    file: str | None = None
    tried: tuple[str, ...] = field(default_factory=tuple)


def _weights_dir(weights_dir: str | os.PathLike | None) -> tuple[Path | None, str]:
    if weights_dir is not None and str(weights_dir) != "":
        return Path(weights_dir).expanduser(), "weights dir"
    env = os.environ.get(WEIGHTS_ENV, "")
    if env:
        return Path(env).expanduser(), f"${WEIGHTS_ENV}"
    return None, f"${WEIGHTS_ENV}"


def _find_in_dir(directory: Path, arch: str, tag: str | None) -> tuple[Path | None, str]:
    """A file ``<arch>.*`` (with a known extension) in ``directory``; ``(None, why)`` when none."""
    if not directory.is_dir():
        return None, f"{directory} is not a directory"
    cands = sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and p.name.startswith(arch + ".") and p.name.lower().endswith(WEIGHT_EXTENSIONS)
    )
    if not cands:
        return None, f"no file named {arch}.*{{{','.join(WEIGHT_EXTENSIONS)}}} in {directory}"
    if tag:
        tagged = [p for p in cands if p.name.startswith(f"{arch}.{tag}.")]
        if tagged:
            cands = tagged
    if len(cands) > 1:
        # safetensors beats other formats of the same stem; otherwise the choice is ambiguous
        stems = {p.name.split(".")[1] if p.name.count(".") > 1 else "" for p in cands}
        if len(stems) == 1:
            cands = sorted(cands, key=lambda p: (not p.name.endswith(".safetensors"), p.name))
        else:
            names = ", ".join(p.name for p in cands)
            raise SanfError(
                f"several weights files for {arch} in {directory} ({names}); pass --weights FILE or "
                f"name the tag (e.g. {arch}.<tag>)"
            )
    return cands[0], ""


def _timm_pretrained_location(arch: str, tag: str | None) -> str | None:
    """Where timm would download pretrained weights from (``None``: timm has none for this name)."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
    except RuntimeError:
        return None
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        return f"hf-hub:{cfg.hf_hub_id}"
    return cfg.url or None


def _three_places_error(arch: str, tag: str | None, tried: tuple[str, ...], hub: str) -> SanfError:
    name = f"{arch}.{tag}" if tag else arch
    places = "; ".join(f"({i + 1}) {t}" for i, t in enumerate((*tried, hub)))
    return SanfError(
        f"no weights for {name}. Tried {places}. Pass --weights FILE (safetensors or a state dict), put "
        f"{arch}.<tag>.safetensors into ${WEIGHTS_ENV} (or --weights-dir), or use --weights random"
    )


def resolve_weights(
    arch: str,
    weights: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
    *,
    tag: str | None = None,
) -> WeightsChoice:
    """Decide where the weights for timm architecture ``arch`` come from.

    Order: ``weights`` as a file; a file ``<arch>.*`` in ``weights_dir`` (default ``$SANF_WEIGHTS_DIR``),
    preferring ``<arch>.<tag>.*``; an installed registry package that ships ``arch`` (``source="package"``);
    timm's pretrained download (returned as ``source="timm"``, done by :func:`create_backbone`).
    ``weights="random"``/``"none"``: random init; ``weights="timm"``: the download only. Raises one
    :class:`SanfError` naming the places tried when nothing is available.
    """
    if "." in arch and tag is None:
        from timm.models import split_model_name_tag

        arch, tag = split_model_name_tag(arch)
        tag = tag or None
    tried: list[str] = []
    if weights is not None and str(weights) != "":
        w = str(weights)
        if w.lower() in RANDOM_WEIGHTS:
            return WeightsChoice("random")
        if w.lower() in TIMM_WEIGHTS:
            tried = ["--weights: 'timm' (download only)", "weights dir: skipped"]
        else:
            p = Path(w).expanduser()
            if not p.is_file():
                raise SanfError(f"weights file {p} does not exist (--weights takes a file, 'random' or 'timm')")
            return WeightsChoice("file", str(p.resolve()))
    else:
        tried.append("--weights FILE: not given")
        directory, label = _weights_dir(weights_dir)
        if directory is None:
            tried.append(f"{label}: not set")
        else:
            found, why = _find_in_dir(directory, arch, tag)
            if found is not None:
                return WeightsChoice("weights_dir", str(found.resolve()))
            tried.append(f"{label}: {why}")
        from .packaged_weights import find_packaged

        entry, where = find_packaged(arch, tag)
        if entry is not None:
            return WeightsChoice("package", where, tuple(tried))
        tried.append(f"registry package: {where}")
    loc = _timm_pretrained_location(arch, tag)
    if loc is None:
        raise _three_places_error(arch, tag, tuple(tried), "timm pretrained download: timm has no pretrained "
                                  f"weights named {arch + '.' + tag if tag else arch}")
    return WeightsChoice("timm", None, tuple(tried))


def _create_timm_model(model_name: str, *, pretrained: bool, **kwargs: Any) -> nn.Module:
    import timm

    return timm.create_model(model_name, pretrained=pretrained, **kwargs)


def _create_from_hub(model_name: str, kwargs: dict[str, Any]) -> nn.Module:
    """timm's own pretrained download (Hugging Face hub or URL). Tests replace this function."""
    return _create_timm_model(model_name, pretrained=True, **kwargs)


def _hub_cached_sha256(model_name: str) -> tuple[str | None, str | None]:
    """Best effort: the cached Hugging Face file timm just loaded, and its sha256 (no network)."""
    try:
        from huggingface_hub import hf_hub_download
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(model_name)
        if cfg is None or not cfg.hf_hub_id:
            return None, None
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for fn in names:
            try:
                p = hf_hub_download(cfg.hf_hub_id, fn, local_files_only=True)
            except Exception:  # noqa: BLE001
                continue
            return str(p), file_sha256(p)
    except Exception:  # noqa: BLE001
        pass
    return None, None


_MISSING_RE = re.compile(r"Missing key\(s\) in state_dict: (.*)")
_UNEXPECTED_RE = re.compile(r"Unexpected key\(s\) in state_dict: (.*)")
_SIZE_RE = re.compile(
    r"size mismatch for ([^:]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from checkpoint, "
    r"the shape in current model is torch\.Size\((\[[^\]]*\])\)"
)


def _mismatch_error(path: str, arch: str, err: Exception, max_keys: int = 4) -> SanfError:
    text = str(err)
    parts = []
    for regex, label in ((_MISSING_RE, "missing"), (_UNEXPECTED_RE, "unexpected")):
        keys = [k for m in regex.finditer(text) for k in re.findall(r'"([^"]+)"', m.group(1))]
        if keys:
            more = f" (+{len(keys) - max_keys} more)" if len(keys) > max_keys else ""
            parts.append(f"{label} keys {', '.join(keys[:max_keys])}{more}")
    sizes = _SIZE_RE.findall(text)
    if sizes:
        shown = ", ".join(f"{k} {a} in file vs {b} in model" for k, a, b in sizes[:max_keys])
        more = f" (+{len(sizes) - max_keys} more)" if len(sizes) > max_keys else ""
        parts.append(f"shape mismatch {shown}{more}")
    if not parts:
        first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
        parts.append(f"{type(err).__name__}: {first[:300]}")
    return SanfError(f"weights file {path} does not match model {arch}: {'; '.join(parts)}")


def _classifier_names(model_name: str) -> tuple[str, ...]:
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(model_name)
    except RuntimeError:
        return ()
    names = cfg.classifier if cfg is not None and cfg.classifier else ()
    return (names,) if isinstance(names, str) else tuple(names)


def _load_with_file(model_name: str, path: str, *args: Any) -> nn.Module:
    """Create the model through timm's pretrained path with a local state dict (strict, head dropped);
    ``args`` is ``(kwargs,)`` or ``(state_dict, kwargs)`` for tensors already read (and converted) from ``path``."""
    sd, kwargs = (load_state_dict_file(path), args[0]) if len(args) == 1 else (dict(args[0]), args[1])
    for c in _classifier_names(model_name):
        for suffix in (".weight", ".bias"):
            sd.pop(c + suffix, None)
    overlay = dict(state_dict=sd, num_classes=0, source="", file=None, hf_hub_id=None, url=None)
    try:
        model = _create_timm_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except SanfError:
        raise
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise  # a constructor argument, not the file: handled by create_backbone
        raise _mismatch_error(path, model_name, e) from e
    except Exception as e:  # noqa: BLE001 - a filter fn or load_state_dict rejecting the file
        raise _mismatch_error(path, model_name, e) from e
    # timm keeps the overlay in the model's config: drop the reference to the raw tensors
    for cfg in {id(c): c for c in (getattr(model, "pretrained_cfg", None), getattr(model, "default_cfg", None))
                if isinstance(c, dict)}.values():
        cfg.pop("state_dict", None)
    return model


def _create_random(model_name: str, kwargs: dict[str, Any]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return _create_timm_model(model_name, pretrained=False, **kwargs)
