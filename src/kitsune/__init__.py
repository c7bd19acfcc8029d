"""Kitsune: automatic kernel fusion for PyTorch."""
__version__ = "0.1.0"
