"""xmc-dst: extreme multi-label classification with fixed fan-in sparse heads and dynamic sparse training."""

__version__ = "0.1.0"

from xmc_dst.sparse import FixedFanInLinear, RewireResult, reset_optimizer_state

__all__ = ["FixedFanInLinear", "RewireResult", "reset_optimizer_state"]
