"""The split's shared types: the split codes, its configuration and its thresholds.

A leaf module: :mod:`easyref.data.split` and :mod:`easyref.data.split_pins` both import it, and it imports
neither.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HELD_IN", "HELD_OUT", "TRAIN", "SplitConfig", "Thresholds"]

TRAIN, HELD_IN, HELD_OUT = 0, 1, 2


@dataclass(kw_only=True)
class SplitConfig:
    """The ``split`` section of ``params.yaml``; command-line flags override it."""

    held_out_groups: int = 50
    """Groups held out entirely (zero-shot evaluation)."""
    held_in_groups: int = 300
    """Groups whose targets are held out while their references train."""
    min_group_size: int = 2
    """Only groups with at least this many images (a target and a reference) can be held out or held in."""
    targets_per_group: int = 1
    """Target images (test samples) per evaluation group; at least one image of each group stays a reference."""
    seed: int = 0
    """Seeds the group and target hashes."""

    def __post_init__(self) -> None:
        if self.held_out_groups < 0 or self.held_in_groups < 0:
            raise ValueError("held_out_groups and held_in_groups must not be negative")
        if self.min_group_size < 2:
            raise ValueError(f"min_group_size must be at least 2 (a target and a reference), got {self.min_group_size}")
        if self.targets_per_group < 1:
            raise ValueError(f"targets_per_group must be at least 1, got {self.targets_per_group}")


@dataclass(frozen=True, kw_only=True)
class Thresholds:
    """Groups with key < ``held_out`` are held out, ``held_out`` <= key < ``held_in`` held in (if eligible)."""

    held_out: int
    held_in: int
