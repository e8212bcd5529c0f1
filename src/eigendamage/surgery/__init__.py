"""Physical model surgery: eigenbasis bottlenecks, depthwise-separable cores and channel
removal."""

from .eigenbasis import KFEBottleneck, to_eigenbasis

__all__ = ["KFEBottleneck", "to_eigenbasis"]
