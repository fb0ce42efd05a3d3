"""Samplers of a consistency function f(x, sigma) -> x_0 (Song et al. 2023, Algorithm 1).

`denoise(x, sigma)` takes a batch and a (B,) tensor of noise levels and returns clean images; samplers
run under `no_grad` and clip to [-1, 1] after every step, as the reference does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from act_lightning.consistency import append_dims

Denoiser = Callable[[Tensor, Tensor], Tensor]


@torch.no_grad()
def multistep(
    denoise: Denoiser,
    noise: Tensor,
    taus: Sequence[float],
    sigma_min: float = 0.002,
    generator: torch.Generator | None = None,
    step_noise: Callable[[int], Tensor] | None = None,
) -> Tensor:
    """x <- f(tau_1 z, tau_1); then for each later tau: x <- f(x + sqrt(tau^2 - sigma_min^2) z', tau).

    `noise` is z ~ N(0, I), (B, C, H, W); `taus` decrease, `taus[0]` is sigma_max; the fresh noise z' of
    step s = 1, 2, ... is `step_noise(s)` when given, else drawn from `generator` (on noise's device), so
    a seeded sampler is reproducible."""
    taus = [float(t) for t in taus]
    if not taus or any(a <= b for a, b in zip(taus, taus[1:])) or taus[-1] <= sigma_min:
        raise ValueError(f"sampling times must decrease and stay above sigma_min={sigma_min}, got {taus}")
    b = noise.shape[0]
    x = denoise(noise * taus[0], noise.new_full((b,), taus[0])).clamp(-1, 1)
    for step, tau in enumerate(taus[1:], start=1):
        if step_noise is not None:
            z = step_noise(step).to(device=noise.device, dtype=noise.dtype)
        else:
            z = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
        x_tau = x + append_dims(noise.new_full((b,), (tau**2 - sigma_min**2) ** 0.5), x.ndim) * z
        x = denoise(x_tau, noise.new_full((b,), tau)).clamp(-1, 1)
    return x
