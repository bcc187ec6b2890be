"""Target backends: one module or package per vendor, discovered through entry points."""

from quadc.targets.base import ENTRY_POINT_GROUP, Target, discover_targets, get_target

__all__ = ["ENTRY_POINT_GROUP", "Target", "discover_targets", "get_target"]
