"""The import direction docs/ARCHITECTURE.md promises: a module imports only modules of lower layers (any import,
also inside functions), so e.g. cache/ or flow/ never import train, jobs or the CLI. A new module must be placed in
``LAYERS`` (and in the document)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sanf_pipeline"

# lowest first; a component is a top-level module or subpackage of sanf_pipeline ("__init__": the package itself)
LAYERS = [
    ["__init__", "errors"],  # no sanf imports
    ["progress", "device", "tokens"],  # foundation: progress bars, device and autocast policy, token pooling
    ["data", "cache", "flow", "maps"],  # readers; stores; the SANF modules, their input normaliser and scores; maps
    ["store"],  # the files sanf writes: atomic writes, safe reading, run folders
    ["extract", "evaluate"],  # stage one (backbones, weights, the extraction job); metrics, thresholds, reports
    ["train"],  # fitting flows: settings and their option types, one fit, the shared step loop, stacks
    ["models"],  # one nn.Module per detection method (flow, combined, baselines) and their registry
    ["jobs"],  # the run jobs every command and the sweep share, and the single-run API
    ["sweep", "detect"],  # many runs from one cache; a run as a detector and its export
    ["serve"],  # a detector (a run or its ONNX export) as an HTTP service
    ["cli"],  # the `sanf` command
    ["__main__"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
# the package's PEP 562 ``__getattr__`` re-exports the public API lazily (``from sanf_pipeline import Detector``,
# issue 11): an import at attribute access, after every module is loadable, never at ``import sanf_pipeline``
FACADE = {"__init__": {"detect"}}


def _component(dotted: str) -> str:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYER else "__init__"


def sanf_imports(path: Path, source: str | None = None) -> set[str]:
    """The sanf components a module imports (relative or absolute, at any depth of the code)."""
    mod = ["sanf_pipeline", *path.relative_to(PACKAGE).with_suffix("").parts]
    pkg = mod[:-1]
    out = set()
    for node in ast.walk(ast.parse(source if source is not None else path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(pkg[:len(pkg) - node.level + 1]) if node.level else ""
            target = ".".join(p for p in (base, node.module or "") if p)
            if target.startswith("sanf_pipeline"):
                if node.module is None:  # from . import x
                    out.update(_component(f"{target}.{a.name}") for a in node.names)
                else:
                    out.add(_component(target))
        elif isinstance(node, ast.Import):
            out.update(_component(a.name) for a in node.names if a.name.startswith("sanf_pipeline"))
    return out


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_component_has_a_layer():
    components = {_component(".".join(["sanf_pipeline", *p.relative_to(PACKAGE).with_suffix("").parts]))
                  for p in MODULES}
    names = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in MODULES}
    assert names <= set(LAYER), f"place {sorted(names - set(LAYER))} in LAYERS and docs/ARCHITECTURE.md"
    assert components <= set(LAYER)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    me = _component(".".join(["sanf_pipeline", *path.relative_to(PACKAGE).with_suffix("").parts]))
    upward = sorted(c for c in sanf_imports(path) - FACADE.get(me, set()) if c != me and LAYER[c] >= LAYER[me])
    assert not upward, f"{path.relative_to(PACKAGE)} (layer {LAYER[me]}) imports {upward} (same or higher layer)"


def test_the_check_catches_an_upward_import():
    reader = PACKAGE / "cache" / "reader.py"
    source = reader.read_text(encoding="utf-8") + "\n\ndef _x():\n    from ..train import fit_flow\n"
    assert "train" in sanf_imports(reader, source) and "train" not in sanf_imports(reader)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_one_import_style(path):
    """Inside the package every sanf import is relative (``from .x``, ``from ..x``); tests and users import
    ``sanf_pipeline.x``."""
    def absolute_sanf(node) -> bool:
        if isinstance(node, ast.ImportFrom):
            return not node.level and (node.module or "").startswith("sanf_pipeline")
        return isinstance(node, ast.Import) and any(a.name.startswith("sanf_pipeline") for a in node.names)

    absolute = [node.lineno for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if absolute_sanf(node)]
    assert not absolute, f"{path.relative_to(PACKAGE)}: absolute sanf imports on lines {absolute}"


def test_package_facades_resolve_and_stay_cheap():
    """`from sanf_pipeline.jobs import fit_run` (the README's Python API) resolves every facade name to its
    submodule's object, and importing the packages themselves loads no torch."""
    import importlib
    import subprocess
    import sys

    for pkg in ("sanf_pipeline", "sanf_pipeline.extract", "sanf_pipeline.jobs", "sanf_pipeline.train"):
        mod = importlib.import_module(pkg)
        api = getattr(mod, "_API", {"Detector": "detect.detector"})
        for name, sub in api.items():
            assert getattr(mod, name) is getattr(importlib.import_module(f"{pkg}.{sub}"), name), (pkg, name)
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            mod.nope  # noqa: B018
    code = "import sys, sanf_pipeline.extract, sanf_pipeline.jobs, sanf_pipeline.train; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
