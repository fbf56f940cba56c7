"""The ``sanf`` command: one click command per verb over the Python API (``main``, ``sweep``, ``detect``, ``demo``) and
the option types read from the registries (``options``)."""

from .main import main  # the `sanf` entry point (pyproject: sanf_pipeline.cli:main)

__all__ = ["main"]
