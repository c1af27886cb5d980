"""Samplers: P x K structure, coverage, determinism by seed, sharding."""
import numpy as np
import pytest

from upreid.data.samplers import PKBatches, SequentialBatches, ShuffleBatches

PIDS = np.random.default_rng(0).integers(0, 40, 500)


def test_pk_structure():
    s = PKBatches(PIDS, p=8, k=4, seed=3)
    for b in s.batches(0):
        assert len(b) == 32
        ids = PIDS[b]
        assert len(set(ids)) == 8
        assert all((ids == i).sum() == 4 for i in set(ids))


def test_pk_covers_almost_everything_and_reports_the_rest():
    s = PKBatches(PIDS, p=8, k=4, seed=0)
    seen = {i for b in s.batches(0) for i in b}
    assert len(seen) + s.dropped() == len(PIDS)
    assert s.dropped() < 0.15 * len(PIDS)


def test_pk_identity_with_fewer_than_k_images():
    pids = [0, 1, 1, 1, 1, 2, 2, 2, 2]
    b = PKBatches(pids, p=3, k=4, seed=0).batches(0)
    assert len(b) == 1 and sorted(b[0]).count(0) == 4                 # index 0 drawn again to fill K


def test_pk_deterministic_and_epochs_differ():
    a, b = PKBatches(PIDS, 8, 4, seed=1), PKBatches(PIDS, 8, 4, seed=1)
    assert a.batches(2) == b.batches(2)
    assert a.batches(0) != a.batches(1)
    assert PKBatches(PIDS, 8, 4, seed=2).batches(0) != a.batches(0)


def test_pk_shards_disjoint_batches_equal_counts():
    shards = [PKBatches(PIDS, 4, 4, rank=r, world=3, seed=0).batches(0) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    full = PKBatches(PIDS, 4, 4, seed=0).batches(0)
    flat = [tuple(b) for s in shards for b in s]
    assert len(set(flat)) == len(flat) and set(flat) <= {tuple(b) for b in full}


def test_pk_too_few_identities():
    with pytest.raises(ValueError, match="at least P=16"):
        PKBatches([0, 1, 2], p=16, k=4)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sequential_once_in_order_last_batch_kept(world):
    parts = [SequentialBatches(103, 10, r, world) for r in range(world)]
    flat = [i for p in parts for b in p.batches() for i in b]
    assert flat == list(range(103))
    last = 103 - 103 * (world - 1) // world
    assert len(parts[-1].batches()[-1]) == (last % 10 or 10)
    assert sum(p.num_samples() for p in parts) == 103


def test_shuffle_drop_and_shards():
    s = [ShuffleBatches(103, 10, r, 2, seed=5) for r in range(2)]
    b0, b1 = s[0].batches(0), s[1].batches(0)
    assert len(b0) == len(b1) == 5
    flat = [i for b in b0 + b1 for i in b]
    assert len(set(flat)) == 100 and s[0].dropped() == 3
    assert s[0].batches(1) != b0 and ShuffleBatches(103, 10, 0, 2, seed=5).batches(0) == b0


def test_shard_arguments_checked():
    with pytest.raises(ValueError, match="rank"):
        SequentialBatches(10, 2, rank=2, world=2)


@pytest.mark.parametrize("world", [1, 2])
def test_pk_reports_each_epochs_own_leftovers(world):
    """The images no rank draws change with the epoch: each epoch reports its own count, computed here
    from what the ranks' batches hold."""
    pids = np.random.default_rng(1).integers(0, 9, 80)
    parts = [PKBatches(pids, p=2, k=4, seed=0, rank=r, world=world) for r in range(world)]
    counts = []
    for epoch in range(6):
        seen = {i for s in parts for b in s.batches(epoch) for i in b}
        counts.append(len(pids) - len(seen))
        assert parts[0].dropped(epoch) == counts[-1], epoch
    assert len(set(counts)) > 1                      # the epochs differ, so epoch 0's count would be wrong


def test_loader_summary_counts_the_epoch_it_ran(tmp_path):
    from upreid.data.loader import build_loader
    from upreid.data.testing import write_tiny
    recs = write_tiny(str(tmp_path), n=30, ids=7)
    L = build_loader("finetune", recs, batch_size=4, backend="torch", device="cpu", workers=0, p=2, k=4, seed=1)
    for epoch in range(4):
        L.set_epoch(epoch)
        list(L)
        assert L.summary["not_drawn"] == L.sampler.dropped(epoch)


def test_too_few_identities_for_p_names_the_setting():
    with pytest.raises(ValueError, match=r"P x K sampling needs at least P=8 identities, the dataset has 5 "
                                         r"\(set data.p to at most 5\)"):
        PKBatches([0, 1, 2, 3, 4] * 4, p=8, k=4)
