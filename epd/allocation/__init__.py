"""How many workers each stage gets, decided again while serving: load estimation, policies, and
the controller that turns their decisions into role switches (engine and simulator alike)."""

from epd.allocation.controller import AllocationController, make_allocation
from epd.allocation.load import LoadEstimator, StageLoad

__all__ = ["AllocationController", "LoadEstimator", "StageLoad", "make_allocation"]
