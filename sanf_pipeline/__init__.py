"""sanf: semantic-aware normalizing flow with feature fusion for image anomaly detection."""
__version__ = "0.1.0"


def lazy_api(package: str, api: dict[str, str]):
    """A PEP 562 module ``__getattr__`` for ``package``: each name of ``api`` is the attribute of the submodule it
    names, imported on first use, so that importing a package (and `sanf --help`) never imports torch."""

    def __getattr__(name):
        if name in api:
            import importlib

            return getattr(importlib.import_module(f"{package}.{api[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


__getattr__ = lazy_api(__name__, {"Detector": "detect.detector"})
