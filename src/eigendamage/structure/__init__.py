"""Coupled channel groups (torch-pruning's dependency graph as plain data) and their removal."""

from .groups import ChannelGroup, ChannelGroups, Member, mask_channels, prune_channels

__all__ = ["ChannelGroup", "ChannelGroups", "Member", "mask_channels", "prune_channels"]
