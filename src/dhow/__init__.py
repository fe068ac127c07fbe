"""dhow: serve trained models over the Open Inference Protocol, with policies built in."""

__version__ = "0.1.0"

__all__ = ["__version__"]
