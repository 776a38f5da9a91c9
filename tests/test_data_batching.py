import numpy as np
import pytest

from alambic.data import length_grouped_batches, sequential_batches
from alambic.errors import AlambicError

LENGTHS = np.random.default_rng(0).integers(5, 512, size=1003)


def test_length_grouped_batches_cover_every_index_once():
    batches = length_grouped_batches(LENGTHS, 16, seed=0, epoch=0, mega_batch_factor=4)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(LENGTHS)))
    assert all(len(b) == 16 for b in batches if len(b) != len(LENGTHS) % 16)
    assert sum(len(b) < 16 for b in batches) == 1
    assert all(isinstance(i, int) for i in flat)


def test_length_grouped_batches_are_deterministic_per_seed_and_epoch():
    make = lambda seed, epoch: length_grouped_batches(LENGTHS, 16, seed=seed, epoch=epoch)  # noqa: E731
    assert make(1, 2) == make(1, 2)
    assert make(1, 2) != make(1, 3) and make(1, 2) != make(2, 2)
    assert make(0, 1) != make(1, 0)  # (seed, epoch) is a pair, not a sum


def test_length_grouping_reduces_padding_and_longest_batch_comes_first():
    batches = length_grouped_batches(LENGTHS, 16, seed=0, epoch=0)
    waste = lambda bs: sum(LENGTHS[b].max() * len(b) - LENGTHS[b].sum() for b in bs)  # noqa: E731
    random_order = np.random.default_rng(0).permutation(len(LENGTHS))
    random_batches = [random_order[i:i + 16] for i in range(0, len(LENGTHS), 16)]
    assert waste(batches) < 0.2 * waste(random_batches)
    assert LENGTHS[batches[0]].max() == LENGTHS.max()
    # batches are shuffled, not sorted by length across the epoch
    maxima = [LENGTHS[b].max() for b in batches[1:]]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


def test_drop_last_and_bad_batch_size():
    batches = length_grouped_batches(LENGTHS, 16, seed=0, epoch=0, drop_last=True)
    assert all(len(b) == 16 for b in batches) and len(batches) == len(LENGTHS) // 16
    with pytest.raises(AlambicError, match="batch_size must be at least 1"):
        length_grouped_batches(LENGTHS, 0, seed=0, epoch=0)


def test_sequential_batches():
    batches = sequential_batches(50, 8, seed=3, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(50)) and len(batches[-1]) == 2
    assert batches == sequential_batches(50, 8, seed=3, epoch=0)
    assert batches != sequential_batches(50, 8, seed=3, epoch=1)
    assert sequential_batches(10, 4, seed=0, epoch=0, shuffle=False) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert sequential_batches(10, 4, seed=0, epoch=0, shuffle=False, drop_last=True) == [[0, 1, 2, 3], [4, 5, 6, 7]]
