"""Which examples go in which batch, as a pure function of (seed, epoch).

Because a batch list is recomputed, not stored, the engine resumes exactly by rebuilding the epoch's list and
skipping to batch ``index``; nothing about the sampler needs to be checkpointed.
"""

import numpy as np

from alambic.errors import AlambicError


def _rng(seed: int, epoch: int) -> np.random.Generator:
    # Seeding with the pair (not seed + epoch) keeps (seed=1, epoch=0) and (seed=0, epoch=1) unrelated.
    return np.random.default_rng([int(seed), int(epoch)])


def length_grouped_batches(lengths, batch_size: int, *, seed: int, epoch: int, mega_batch_factor: int = 50,
                           drop_last: bool = False) -> list[list[int]]:
    """Batches of similar-length examples, in random order, so padding wastes little compute.

    Sorting only inside random mega-batches of ``batch_size * mega_batch_factor`` keeps batch composition random
    across the corpus; the longest batch is put first so an out-of-memory shows at step 0, not hours in.
    """
    if batch_size < 1:
        raise AlambicError(f"batch_size must be at least 1, got {batch_size}: set a positive batch size")
    lengths = np.asarray(lengths)
    rng = _rng(seed, epoch)
    order = rng.permutation(len(lengths))
    mega = batch_size * max(1, mega_batch_factor)
    batches = []
    for begin in range(0, len(order), mega):
        group = order[begin:begin + mega]
        group = group[np.argsort(-lengths[group], kind="stable")]
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()  # only the global tail can be short: each mega-batch is a multiple of batch_size
    batches = [batches[i] for i in rng.permutation(len(batches))]
    if batches:
        longest = int(np.argmax([lengths[b].max() for b in batches]))
        batches[0], batches[longest] = batches[longest], batches[0]
    return [b.tolist() for b in batches]


def sequential_batches(n: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
                       drop_last: bool = False) -> list[list[int]]:
    """Batches of equal-length examples (packed blocks), where grouping by length would change nothing."""
    if batch_size < 1:
        raise AlambicError(f"batch_size must be at least 1, got {batch_size}: set a positive batch size")
    order = _rng(seed, epoch).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    return [order[i:i + batch_size].tolist() for i in range(0, stop, batch_size)]
