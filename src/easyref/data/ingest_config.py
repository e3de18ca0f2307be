"""The ``ingest`` section of ``params.yaml``: a leaf module that the ingest steps (:mod:`easyref.data.ingest`,
:mod:`easyref.data.ingest_work`, :mod:`easyref.data.ingest_shards`) import, and that imports none of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from easyref.data.fetch_config import FetchConfig
from easyref.data.images import ImageConfig


@dataclass(kw_only=True)
class IngestConfig:
    """The ``ingest`` section of ``params.yaml``; command-line flags override it."""

    workers: int = 2
    """Worker processes that fetch, check and normalise images (1 runs in the calling process)."""
    near_duplicate_distance: int = 2
    """Images of one group whose perceptual hashes differ in at most this many bits (of 64) are near duplicates..."""
    near_duplicate_colour_distance: int = 24
    """...if their colour signatures (4x4 grid of mean colours) also differ by at most this much (0-255)."""
    max_caption_chars: int = 1000
    """Longer captions are rejected."""
    group_collision: Literal["merge", "prefix", "error"] = "prefix"
    """A group name found in two sources: one group (merge), one group per source named SOURCE/GROUP (prefix), or
    an error."""
    allow_roots: tuple[str, ...] = ()
    """Folders that local paths in tables (absolute, file://) may point into, besides the table's own folder."""
    shards: int = 1
    """Ingest tasks the KFP pipeline fans the images out to (``easyref ingest-shard``), merged by one
    ``easyref ingest-merge``; 1 runs a single ``easyref ingest``. ``easyref ingest`` itself ignores it."""
    image: ImageConfig = field(default_factory=ImageConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.shards < 1:
            raise ValueError(f"shards must be at least 1, got {self.shards}")
        if not 0 <= self.near_duplicate_distance <= 64:
            raise ValueError(f"near_duplicate_distance must be in 0..64, got {self.near_duplicate_distance}")
        if not 0 <= self.near_duplicate_colour_distance <= 255:
            raise ValueError(
                f"near_duplicate_colour_distance must be in 0..255, got {self.near_duplicate_colour_distance}"
            )
        if self.max_caption_chars < 1:
            raise ValueError(f"max_caption_chars must be positive, got {self.max_caption_chars}")
        if self.group_collision not in ("merge", "prefix", "error"):
            raise ValueError(f"group_collision must be merge, prefix or error, got {self.group_collision!r}")
        self.allow_roots = tuple(self.allow_roots)
