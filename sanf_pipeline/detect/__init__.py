"""A finished run as a detector for new images (``detector``) and its ONNX/TorchScript export (``export``)."""
