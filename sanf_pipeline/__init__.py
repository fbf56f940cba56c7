"""sanf: semantic-aware normalizing flow with feature fusion for image anomaly detection."""
__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import sanf_pipeline` (and `sanf --help`) must not import torch
    if name == "Detector":
        from .detect.detector import Detector

        return Detector
    raise AttributeError(f"module 'sanf_pipeline' has no attribute {name!r}")
