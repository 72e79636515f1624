"""Deterministic draws for training: every random choice is a function of (seed, what it is for), never of
a global RNG, so that a resumed run, or one resumed with another number of processes, sees the same data
order, noises and timesteps as an uninterrupted one.

Sample bookkeeping: the global batch of update `step` holds the global sample numbers
n = (step - 1) * B ... step * B - 1; `sample_item(seed, n_items, n)` maps n to (dataset item, epoch) through
a seeded permutation per epoch; `generator_for(seed, ...)` seeds a torch.Generator from any tuple of ints
and strings. Reference: yuhaoliu7456/Diff-Plugin @ 79e12bb train.py seeds one global RNG (accelerate
set_seed); minidiff derives one generator per purpose instead (../shared/reference/official-facts.md §7).
"""
import functools
import hashlib

import torch


def derive_seed(*parts):
    """A 63-bit seed from any tuple of ints/strings (SHA-256 of their text): same parts, same seed."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def generator_for(*parts):
    """A CPU torch.Generator seeded by derive_seed(*parts): draws on the CPU are the same on any machine."""
    return torch.Generator().manual_seed(derive_seed(*parts))


@functools.lru_cache(maxsize=4)
def epoch_order(seed, n_items, epoch):
    """The order in which `epoch` visits the dataset items: a permutation seeded by (seed, epoch)."""
    return torch.randperm(n_items, generator=generator_for(seed, "epoch", epoch)).tolist()


def sample_item(seed, n_items, n):
    """Global sample number n -> (dataset item, epoch): epoch e = n // n_items walks epoch_order(e)."""
    epoch, pos = divmod(n, n_items)
    return epoch_order(seed, n_items, epoch)[pos], epoch
