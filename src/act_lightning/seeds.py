"""One seed formula for every random stream of the library.

Each stream (the noise of ACT iteration k, the augmentation of a rank, the flips of a batch, the noise of
sample i, ...) gets its own generator, seeded from the integers that identify it. No random state has to
be saved, a resumed run continues exactly, and a run on any number of devices draws what one device
draws: provided every stream uses this one formula.
"""

from __future__ import annotations

import torch
from torch import Tensor

from act_lightning.checks import check_count

MODULUS = 2**63 - 1  # torch.Generator.manual_seed takes up to 64 bits; this keeps the seed positive

# The streams, as the parts after the seed:
#   (seed, k)                  the noise (j, z) of ACT iteration k, drawn for the global batch
#   (seed, k, AUGMENT, s)      the augmentation of iteration k's stream s (0: G's predictions, 1: D's
#                              fakes, 2: D's reals), drawn for the global batch
#   (seed, n, FLIP, 0)         the flips of the n-th global batch, drawn for all of it (data modules)
#   (seed, i, step)            the noise of image i at sampling step `step` (sample, edit)
#   (seed, i, LABEL)           the random class label of image i (sample)
#   (seed, i, EVALUATION, 0)   the noise and class label of sample i of an evaluation (FID and the rest)
#   (seed, i, EVALUATION, s)   its noise at sampling step s = 1, 2, ... (evaluate's multistep samplers)
# Per image, not per batch: the same images whatever the batch size, the process count or the device.
# One stream is per rank instead (`seed_global_generators`):
#   (seed, k, DROPOUT, rank)   the global generators at the start of iteration k on a rank: what a
#                              backbone draws itself (dropout masks), each rank its own
AUGMENT, FLIP, EVALUATION, DROPOUT = 1, 2, 3, 4
LABEL = 1 << 20


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, e.g. (seed, iteration, stream, rank): reproducible, no state to save.
    Order matters: mix_seed(1, 2) != mix_seed(2, 1), and mix_seed(a) != mix_seed(a, 0).

    The formula is linear in its parts, so an index of 1,000,003 or more meets another seed's stream:
    (seed, i) == (seed + 1, i - 1,000,003). The indices drawn here (iterations, sample and batch numbers)
    stay below that in every experiment; a draw of more samples than that per seed repeats the next
    seed's first images. Kept as it is: another formula would change every stream of every run."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part) + 1) % MODULUS
    return value


def seed_global_generators(seed: int, k: int, rank: int) -> None:
    """Seeds torch's global generators (the CPU's and every CUDA device's) with the stream (seed, k,
    DROPOUT, rank) at the start of iteration k: the dropout masks a backbone draws from them are each
    rank's own, and the same after a resume, with no random state to save. With every rank seeded alike
    once, all ranks drew the same masks (the examples at the same place of each rank's share had the same
    mask: 64 patterns in a batch of 512 on 8 GPUs). Masks are drawn per rank's batch, not per example, so
    a run with dropout is the same run on another device count only in distribution."""
    torch.manual_seed(mix_seed(seed, k, DROPOUT, rank))


def image_noise(
    seed: int, indices: range, shape: tuple[int, ...], stream: int | tuple[int, ...] = 0
) -> Tensor:
    """(len(indices), *shape) standard normal noise, image i's from its own generator (seed, i, *stream)
    on the CPU: independent of the batch it is drawn in and of the device it runs on."""
    parts = (stream,) if isinstance(stream, int) else tuple(stream)
    return torch.stack(
        [
            torch.randn(shape, generator=torch.Generator().manual_seed(mix_seed(seed, i, *parts)))
            for i in indices
        ]
    )


def check_seed(seed: object, high: int | None = None) -> int:
    """The `seed` option: an integer (in [0, high] when `high` is given: training's seed also seeds numpy,
    which takes 32 bits)."""
    return check_count(seed, "seed", None if high is None else 0, high)
