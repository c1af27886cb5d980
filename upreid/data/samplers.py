"""Batch samplers, deterministic by (seed, epoch) and sharded by (rank, world).

Each sampler's ``batches(epoch)`` returns this rank's list of batches (lists of dataset indices).
Every rank computes the same global order from the seed and takes its own share, so no
communication is needed and a run resumed at a step sees the same batches.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np


def _check_shard(rank: int, world: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")


class SequentialBatches:
    """Evaluation: every index exactly once, in order, last batch kept. With ``world > 1`` rank r
    gets the r-th contiguous block (sizes differ by at most one), so concatenating the ranks'
    outputs in rank order restores the dataset order."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1):
        _check_shard(rank, world)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        lo = n * rank // world
        hi = n * (rank + 1) // world
        self.indices = list(range(lo, hi))

    def batches(self, epoch: int = 0) -> List[List[int]]:
        b = self.batch_size
        return [self.indices[i:i + b] for i in range(0, len(self.indices), b)]

    def num_samples(self) -> int:
        return len(self.indices)

    def dropped(self, epoch: int = 0) -> int:
        return 0


class ShuffleBatches:
    """Pre-training: a permutation per epoch from (seed, epoch); global batch ``world x batch``,
    rank r takes the r-th slice; the last partial global batch is dropped (every rank must run the
    same number of steps) and reported by :meth:`dropped`."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 drop_last: bool = True):
        _check_shard(rank, world)
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.drop_last = drop_last
        self.steps = n // (batch_size * world) if drop_last else -(-n // (batch_size * world))
        if self.steps == 0:
            raise ValueError(f"the dataset has {n} images, fewer than one global batch "
                             f"({batch_size} per rank x {world} ranks); lower the batch size")

    def batches(self, epoch: int = 0) -> List[List[int]]:
        perm = np.random.default_rng([self.seed, 7, epoch]).permutation(self.n)
        g = self.batch_size * self.world
        out = []
        for s in range(self.steps):
            lo = s * g + self.rank * self.batch_size
            b = perm[lo:lo + self.batch_size].tolist()
            if b:
                out.append(b)
        return out

    def num_samples(self) -> int:
        return sum(len(b) for b in self.batches(0))

    def dropped(self, epoch: int = 0) -> int:
        """Images of the dataset no rank sees in an epoch (the same count in every epoch)."""
        return self.n - self.steps * self.batch_size * self.world if self.drop_last else 0


class PKBatches:
    """Identity-balanced batches of P identities x K images (fine-tuning, triplet loss).

    Per epoch: each identity's images are shuffled and cut into groups of K (an identity with fewer
    than K images, or a last incomplete group, is filled by drawing its own images again); groups are
    then drawn P at a time from P distinct identities chosen at random among those with groups left,
    until fewer than P identities remain. The epoch thus visits (about) every image once. Batches are
    dealt round-robin to ranks, and every rank gets the same number.
    """

    def __init__(self, pids: Sequence[int], p: int = 16, k: int = 4, rank: int = 0, world: int = 1,
                 seed: int = 0):
        _check_shard(rank, world)
        if p < 1 or k < 1:
            raise ValueError(f"P and K must be >= 1, got P={p}, K={k}")
        self.by_pid: Dict[int, List[int]] = {}
        for i, pid in enumerate(pids):
            self.by_pid.setdefault(int(pid), []).append(i)
        if len(self.by_pid) < p:
            raise ValueError(f"P x K sampling needs at least P={p} identities, the dataset has {len(self.by_pid)} "
                             f"(set data.p to at most {len(self.by_pid)})")
        self.p, self.k, self.rank, self.world, self.seed = p, k, rank, world, seed
        self.n = len(pids)
        self._cache = {}

    def _global(self, epoch: int) -> List[List[int]]:
        if epoch in self._cache:
            return self._cache[epoch]
        rng = np.random.default_rng([self.seed, 8, epoch])
        groups: Dict[int, List[List[int]]] = {}
        for pid in sorted(self.by_pid):
            idx = list(self.by_pid[pid])
            rng.shuffle(idx)
            if len(idx) % self.k:
                idx += rng.choice(self.by_pid[pid], self.k - len(idx) % self.k, replace=True).tolist()
            groups[pid] = [idx[i:i + self.k] for i in range(0, len(idx), self.k)]
        out = []
        while True:
            avail = [pid for pid in sorted(groups) if groups[pid]]
            if len(avail) < self.p:
                break
            chosen = rng.choice(avail, self.p, replace=False)
            batch = []
            for pid in chosen:
                batch += groups[int(pid)].pop()
            out.append(batch)
        self._cache = {epoch: out}
        return out

    def batches(self, epoch: int = 0) -> List[List[int]]:
        g = self._global(epoch)
        per_rank = len(g) // self.world
        return g[self.rank::self.world][:per_rank]

    def num_samples(self) -> int:
        return len(self.batches(0)) * self.p * self.k

    def dropped(self, epoch: int = 0) -> int:
        """Images of the dataset not drawn in ``epoch`` by any rank (identities left over when fewer than P
        remain; which ones, and how many, changes with the epoch)."""
        g = self._global(epoch)
        seen = {i for b in g[:len(g) // self.world * self.world] for i in b}   # what the ranks take
        return self.n - len(seen)
