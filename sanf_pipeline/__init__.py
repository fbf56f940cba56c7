"""sanf: semantic-aware normalizing flow with feature fusion for image anomaly detection."""
__version__ = "0.1.0"
