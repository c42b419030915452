"""xmc-dst: extreme multi-label classification with fixed fan-in sparse heads and dynamic sparse training."""

__version__ = "0.1.0"
