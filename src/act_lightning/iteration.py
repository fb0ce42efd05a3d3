"""What one ACT iteration draws before either update runs: the noise levels and noises z of the global
batch (this device's share), split over the micro-batches, and the augmentation. The levels are adjacent
pairs of a grid (indices j drawn on the Karras grid of N(k) levels: ACT, iCT), ECT's continuous pairs
(t, r), or EDM's log-normal levels of diffusion training (`grid_levels`, `ect_levels`, `edm_levels`).

The draws come from a generator seeded by (seed, k) for the *global* batch, and each device takes its
rank's contiguous slice: one device with the global batch, two with half each, or one with gradient
accumulation see the same examples with the same noise, and a resumed run needs no random state. The
augmentation's random numbers are drawn the same way, per stream (the generator's predictions, D's fakes,
D's reals: `augmentation_streams`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from act_lightning.augment import draw_augmentation
from act_lightning.consistency import ConsistencySchedule, lognormal_sigmas, sample_indices
from act_lightning.data.base import HalfBatch
from act_lightning.losses import Augment


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch's images and its share of the iteration's draws (None: not drawn, e.g. the
    discriminator's under diffusion training)."""

    data: HalfBatch
    gen_hi: Tensor  # (b_G,) the generator's noise levels: t_hi of each pair (diffusion: sigma)
    gen_lo: Tensor  # (b_G,) t_lo of each pair (diffusion: sigma again, unused)
    gen_z: Tensor  # (b_G, C, H, W)
    fake_t: Tensor | None = None  # (b_D / 2,) levels of the discriminator's fake half
    fake_z: Tensor | None = None  # (b_D / 2, C, H, W)
    real_t: Tensor | None = None  # (b_D / 2,) of its real half
    augment_gen: Augment | None = None  # the augmentation of the generator step's predictions
    augment_disc: Augment | None = None  # of D's fake and real halves, in that order


@dataclass(frozen=True)
class Draws:
    """Everything random or scheduled about iteration k on this device."""

    num_scales: int | None  # N(k) of a grid curriculum; None for ECT's pairs and diffusion training
    micro: list[MicroBatch]  # each with its augmentation at the current p (identity while p == 0)
    gen_size: int  # B_G on this device (both updates average over their whole half)
    disc_size: int  # B_D on this device: fake half + real half


class GridCache:
    """The Karras grid of N scales and p(j) on it (None: uniform) on a device, computed once per (N, device):
    the curriculum changes N a few hundred times in a run, the iteration asks every time."""

    def __init__(self, schedule: ConsistencySchedule) -> None:
        self.schedule = schedule
        self._grids: dict[tuple[int, torch.device], tuple[Tensor, Tensor | None]] = {}

    def __call__(self, num_scales: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
        key = (num_scales, device)
        if key not in self._grids:
            sigmas = self.schedule.sigmas(num_scales)
            probs = self.schedule.index_probs(sigmas)
            self._grids[key] = (
                to_device(sigmas, device),
                None if probs is None else to_device(probs, device),
            )
        return self._grids[key]


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device`; to a GPU through pinned memory without waiting for the device (a copy
    from pageable memory would synchronise the host with it)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


LevelDraw = Callable[[int, int, tuple, torch.device, torch.Generator], dict[str, Tensor]]


def grid_levels(sigmas: Tensor, probs: Tensor | None) -> LevelDraw:
    """Adjacent pairs of the grid `sigmas` (N levels): j in 1..N-1 uniform or by `probs`, for the
    generator's pairs, the fake and the real half."""
    num_scales = sigmas.numel()

    def draw(n_gen, n_half, shape, device, generator):
        gen_j = sample_indices(n_gen, num_scales, device, generator, probs)
        gen_z = torch.randn((n_gen, *shape), device=device, generator=generator)
        fake_j = sample_indices(n_half, num_scales, device, generator, probs)
        fake_z = torch.randn((n_half, *shape), device=device, generator=generator)
        real_j = sample_indices(n_half, num_scales, device, generator, probs)
        return {
            "gen_hi": sigmas[gen_j],
            "gen_lo": sigmas[gen_j - 1],
            "gen_z": gen_z,
            "fake_t": sigmas[fake_j],
            "fake_z": fake_z,
            "real_t": sigmas[real_j],
        }

    return draw


def ect_levels(schedule: ConsistencySchedule, iteration: int, iterations: int) -> LevelDraw:
    """ECT's pairs: t log-normal (`ConsistencySchedule.ect_t`), r = `ect_r(t, k, K)`; the discriminator's
    fake and real levels drawn as t."""

    def draw(n_gen, n_half, shape, device, generator):
        gen_t = schedule.ect_t(torch.randn(n_gen, device=device, generator=generator))
        gen_z = torch.randn((n_gen, *shape), device=device, generator=generator)
        fake_t = schedule.ect_t(torch.randn(n_half, device=device, generator=generator))
        fake_z = torch.randn((n_half, *shape), device=device, generator=generator)
        real_t = schedule.ect_t(torch.randn(n_half, device=device, generator=generator))
        gen_r = schedule.ect_r(gen_t, iteration, iterations)
        return {
            "gen_hi": gen_t,
            "gen_lo": gen_r,
            "gen_z": gen_z,
            "fake_t": fake_t,
            "fake_z": fake_z,
            "real_t": real_t,
        }

    return draw


def edm_levels(schedule: ConsistencySchedule) -> LevelDraw:
    """Diffusion training's noise levels: EDM's log-normal (`edm_p_mean`, `edm_p_std`); no discriminator."""

    def draw(n_gen, n_half, shape, device, generator):
        sigma = lognormal_sigmas(
            torch.randn(n_gen, device=device, generator=generator), schedule.edm_p_mean, schedule.edm_p_std
        )
        gen_z = torch.randn((n_gen, *shape), device=device, generator=generator)
        return {"gen_hi": sigma, "gen_lo": sigma, "gen_z": gen_z}

    return draw


def draw_noise(
    batch: HalfBatch,
    levels: LevelDraw,
    generator: torch.Generator,
    rank: int,
    world_size: int,
) -> dict[str, Tensor]:
    """Levels and z of the global batch (`world_size` devices with `batch`'s sizes), then this rank's
    share."""
    device = batch.gen.device
    n_gen, n_half = batch.gen.shape[0] * world_size, batch.disc.shape[0] // 2 * world_size
    draws = levels(n_gen, n_half, tuple(batch.gen.shape[1:]), device, generator)
    if world_size == 1:
        return draws
    return {k: v.chunk(world_size)[rank].clone() for k, v in draws.items()}  # free the other ranks' shares


def augmentation_streams(
    batch: HalfBatch, seed_of: Callable[[int], int], device: torch.device, rank: int, world_size: int
) -> list[list[tuple[Tensor, Tensor]]]:
    """The augmentation draws of this device's micro-batches, per stream: [gen, fake, real], each a list
    over the micro-batches of (uniform, normal) for their examples. Each stream is drawn for the global
    batch from a generator seeded by `seed_of(stream)`, then this rank's slice is split as the images are
    (`HalfBatch.micro_batches`), so every example gets the numbers of its global position."""
    n_gen, n_half = batch.gen.shape[0], batch.disc.shape[0] // 2
    streams = []
    for stream, count in enumerate((n_gen, n_half, n_half)):
        g = torch.Generator(device).manual_seed(seed_of(stream))
        uniform, normal = draw_augmentation(count * world_size, device, g)
        mine = (uniform.chunk(world_size, dim=1)[rank], normal.chunk(world_size, dim=1)[rank])
        parts = [t.chunk(batch.micro, dim=1) for t in mine]
        streams.append([(u.contiguous(), n.contiguous()) for u, n in zip(*parts, strict=True)])
    return streams


def split_micro(batch: HalfBatch, draws: dict[str, Tensor]) -> list[MicroBatch]:
    """The micro-batches of `batch` (`HalfBatch.micro_batches`), each with its slice of the draws."""
    data = batch.micro_batches()
    parts = {k: v.chunk(len(data)) for k, v in draws.items()}
    return [MicroBatch(mb, **{k: v[i] for k, v in parts.items()}) for i, mb in enumerate(data)]
