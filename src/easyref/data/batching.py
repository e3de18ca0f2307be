"""Batch sampling for :class:`~easyref.data.dataset.GroupDataset`: shuffled, bucket-aware, sharded across ranks.

Each batch holds samples of one aspect-ratio bucket (so targets stack). Batches are split across distributed ranks
(``rank``, ``world_size``), every rank getting the same number; a ``DataLoader`` then hands whole batches to its
workers, so ranks and workers never load the same sample twice in an epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class GroupBatchSampler(Sampler[list[int]]):
    """Batches of indices with equal ``bucket_ids``, reshuffled each epoch from (seed, epoch).

    Use as ``DataLoader(dataset, batch_sampler=GroupBatchSampler(dataset.bucket_ids, ...), collate_fn=collate)``
    and call :meth:`set_epoch` (on the sampler and the dataset) before each epoch.
    """

    def __init__(
        self,
        bucket_ids: np.ndarray,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.bucket_ids = np.asarray(bucket_ids)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[np.ndarray]:
        """Every rank's batches of this epoch, truncated to a multiple of ``world_size``."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.bucket_ids)) if self.shuffle else np.arange(len(self.bucket_ids))
        order = order[np.argsort(self.bucket_ids[order], kind="stable")]
        starts = np.flatnonzero(np.r_[True, np.diff(self.bucket_ids[order]) != 0])
        batches = []
        for bucket in np.split(order, starts[1:]):
            stop = len(bucket) - len(bucket) % self.batch_size if self.drop_last else len(bucket)
            batches.extend(bucket[i : i + self.batch_size] for i in range(0, stop, self.batch_size))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches[: len(batches) - len(batches) % self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._all_batches()[self.rank :: self.world_size]:
            yield batch.tolist()

    def __len__(self) -> int:
        counts = np.bincount(np.unique(self.bucket_ids, return_inverse=True)[1]) if len(self.bucket_ids) else []
        per_bucket = [c // self.batch_size if self.drop_last else -(-c // self.batch_size) for c in counts]
        return sum(per_bucket) // self.world_size
