"""`sanf serve`: a trained run (or its ONNX export) as an HTTP service. The app and its routes (``app``), reading a
request's images within the server's limits (``upload``), one model call per batch of concurrent images
(``batching``) and the scorers that equal `sanf score` (``scoring``); the page it serves is ``static/index.html``.
FastAPI, uvicorn, python-multipart and prometheus_client come with ``pip install 'sanf[serve]'``; importing this
package loads none of them (nor torch)."""

from .. import lazy_api

_API = {
    "create_app": "app",
    "Batcher": "batching",
    "Limits": "upload",
    "DetectorScorer": "scoring",
    "OnnxScorer": "scoring",
}

__getattr__ = lazy_api(__name__, _API)
__all__ = sorted(_API)
