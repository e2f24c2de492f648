"""An endless, resumable, rank-sharded sampler for map-style datasets."""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler


def mix_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (independent of Python's hash randomisation)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


class InfiniteShardSampler(Sampler):
    """Yields ``(index, sample_seed)`` forever: epoch ``e`` is a permutation seeded by ``(seed, e)``, split by rank.

    Every rank gets ``ceil(n / world_size)`` items per epoch (the permutation is padded with its head, as
    ``DistributedSampler`` does). ``start`` skips that many items of this rank's sequence, which is how a resumed
    run continues exactly where the interrupted one stopped. The per-sample seed drives random crops and flips.
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, start: int = 0) -> None:
        if num_samples <= 0:
            raise ValueError("the dataset is empty")
        self.n, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle, self.start = seed, shuffle, start
        self.per_rank = math.ceil(num_samples / world_size)

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch``."""
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world_size
        order = (order * math.ceil(total / self.n))[:total]
        return order[self.rank:total:self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            for index in self.epoch_indices(epoch)[offset:]:
                yield index, mix_seed(self.seed, epoch, index)
            epoch, offset = epoch + 1, 0
