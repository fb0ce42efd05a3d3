"""Samplers of a consistency function f(x, sigma) -> x_0 (Song et al. 2023, Algorithms 1 and 4).

`denoise(x, sigma)` takes a batch and a (B,) tensor of noise levels and returns clean images; samplers
run under `no_grad` and clip to [-1, 1] after every step, as the reference does.

- `multistep` (Algorithm 1): one step from sigma_max, then one per later noise level.
- `heun` (Karras et al. 2022, Algorithm 1, deterministic): a diffusion model's denoiser D(x, sigma)
  integrated along the probability-flow ODE over Karras levels sigma_max > ... > sigma_min > 0.
- `zero_shot_edit` (Algorithm 4): the same steps, each followed by a projection P(x) that keeps the known
  part of an image y (A^-1[(Ay) (1 - Omega) + (Ax) Omega]):

      x <- f(P(0) + tau_1 z, tau_1); x <- P(x)
      for each later tau: x <- f(x + sqrt(tau^2 - sigma_min^2) z, tau); x <- P(x)

  The projections of the three editing tasks:
  - inpaint: the known part is a set of pixels (mask true = known). P(x) = mask y + (1 - mask) x; the
    known pixels of the result are the input's exactly.
  - colorize: the known part is each pixel's luminance: its component along the unit axis
    v = (0.2989, 0.5870, 0.1140) / |.| (ITU-R BT.601, the axis PIL's "L" conversion uses; A's first row,
    the first column of the orthogonal matrix Q of openai/consistency_models' `iterative_colorization`).
    P(x) = x + ((y - x) . v) v per pixel; the result's luminance is the input's.
  - superres (factor s = 2, 4 or 8; the reference uses 8): the known part is the mean of each s x s patch
    (A's first row on a patch is uniform). P(x) = x + upsample(avgpool(y) - avgpool(x)); the result
    averaged over patches is the input.
  For colorize and superres, "is the input's" holds before the result is clipped to [-1, 1]: a projection
  can push a pixel past the range (a dark input patch whose generated pixels vary widely), and the clip,
  which writing the image as uint8 makes anyway, moves that pixel's luminance or patch mean. Inpainting's
  projection only copies input pixels, so its known part is the input's exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from act_lightning.consistency import append_dims

Denoiser = Callable[[Tensor, Tensor], Tensor]
Projection = Callable[[Tensor], Tensor]


def later_levels(taus, sigma_max: float, key: str = "taus") -> list[float]:
    """The Python API's `taus`: the noise levels of the steps after the first (which is at sigma_max), a
    list of numbers each below sigma_max (None or []: one step). A bare number, or a list that repeats
    sigma_max (as `sample.json` records the levels), is refused by name; `multistep` checks the order."""
    if taus is None:
        return []
    numbers = isinstance(taus, (list, tuple)) or (isinstance(taus, Tensor) and taus.dim() == 1)
    if not numbers or not all(isinstance(t, (int, float, Tensor)) and not isinstance(t, bool) for t in taus):
        raise ValueError(
            f"{key}: a list of noise levels after the first step (two steps: {key}=[tau]); got {taus!r}"
        )
    later = [float(t) for t in taus]
    if any(t >= sigma_max for t in later):
        raise ValueError(
            f"{key}={later}: the noise levels of the steps after the first, which is at sigma_max="
            f"{sigma_max:g}, each below it (two steps: {key}=[tau]); sigma_max itself is not listed"
        )
    return later


def check_levels(taus: Sequence[float], sigma_min: float) -> list[float]:
    """A sampler's levels: decreasing from sigma_max, each above sigma_min (the noise added before a later
    step has standard deviation sqrt(tau^2 - sigma_min^2))."""
    taus = [float(t) for t in taus]
    if not taus or any(a <= b for a, b in zip(taus, taus[1:])) or taus[-1] <= sigma_min:
        raise ValueError(f"sampling times must decrease and stay above sigma_min={sigma_min}, got {taus}")
    return taus


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
    step s = 1, 2, ... is `step_noise(s)` when given, else drawn from `generator` (on its own device, then
    moved to noise's), so a seeded sampler is reproducible."""
    taus = check_levels(taus, sigma_min)
    b = noise.shape[0]
    x = denoise(noise * taus[0], noise.new_full((b,), taus[0])).clamp(-1, 1)
    for step, tau in enumerate(taus[1:], start=1):
        if step_noise is not None:
            z = step_noise(step).to(device=noise.device, dtype=noise.dtype)
        else:  # drawn where the generator lives (a CPU generator for a GPU model's noise), then moved
            where = noise.device if generator is None else generator.device
            z = torch.randn(noise.shape, generator=generator, device=where, dtype=noise.dtype)
            z = z.to(noise.device)
        x_tau = x + append_dims(noise.new_full((b,), (tau**2 - sigma_min**2) ** 0.5), x.ndim) * z
        x = denoise(x_tau, noise.new_full((b,), tau)).clamp(-1, 1)
    return x


@torch.no_grad()
def heun(denoise: Denoiser, noise: Tensor, sigmas: Sequence[float]) -> Tensor:
    """EDM's deterministic sampler (S_churn = 0): x_0 = sigma_0 z, then for each step from t_i to t_{i+1}
    an Euler step along dx/dt = (x - D(x, t)) / t, corrected by the slope at t_{i+1} (Heun's method)
    except on the last step to t = 0. `sigmas` decrease from sigma_max; 0 is appended. 2n - 1
    evaluations of D for n levels; the result is clipped to [-1, 1]."""
    levels = [float(s) for s in sigmas]
    if not levels or any(a <= b for a, b in zip(levels, levels[1:])) or levels[-1] <= 0:
        raise ValueError(f"Heun's levels must decrease and stay positive, got {levels}")
    levels.append(0.0)
    b = noise.shape[0]
    x = noise * levels[0]
    for t_cur, t_next in zip(levels, levels[1:]):
        slope = (x - denoise(x, noise.new_full((b,), t_cur))) / t_cur
        x_next = x + (t_next - t_cur) * slope
        if t_next > 0:
            slope_next = (x_next - denoise(x_next, noise.new_full((b,), t_next))) / t_next
            x_next = x + (t_next - t_cur) * (slope + slope_next) / 2
        x = x_next
    return x.clamp(-1, 1)


# -- zero-shot editing ----------------------------------------------------------------------------------


def inpaint_projection(y: Tensor, mask: Tensor) -> Projection:
    """mask (B, 1, H, W) or (B, H, W) bool, true = known pixel."""
    mask = (mask if mask.ndim == 4 else mask.unsqueeze(1)).to(y.dtype)
    return lambda x: mask * y + (1 - mask) * x


LUMINANCE = (0.2989, 0.5870, 0.1140)  # the RGB weights of a pixel's luminance (ITU-R BT.601)
SUPERRES_FACTORS = (2, 4, 8)


def colorize_projection(y: Tensor) -> Projection:
    """y (B, 3, H, W): keeps its luminance, the component along the unit axis of LUMINANCE. In [-1, 1] or
    in [0, 1] the same map: the offset between the two cancels in (y - x)."""
    axis = y.new_tensor(LUMINANCE)
    axis = (axis / axis.norm()).view(1, 3, 1, 1)
    return lambda x: x + ((y - x) * axis).sum(1, keepdim=True) * axis


def superres_projection(y: Tensor, factor: int) -> Projection:
    """y (B, C, H, W): keeps the mean of each factor x factor patch (`factor` one of SUPERRES_FACTORS,
    dividing H and W)."""
    if factor not in SUPERRES_FACTORS or y.shape[-1] % factor or y.shape[-2] % factor:
        raise ValueError(
            f"factor={factor}: one of {', '.join(map(str, SUPERRES_FACTORS))} that divides the image's "
            f"{y.shape[-2]} x {y.shape[-1]} pixels"
        )
    low = F.avg_pool2d(y, factor)

    def project(x: Tensor) -> Tensor:
        return x + F.interpolate(low - F.avg_pool2d(x, factor), scale_factor=factor, mode="nearest")

    return project


@torch.no_grad()
def zero_shot_edit(
    denoise: Denoiser,
    project: Projection,
    shape: tuple[int, ...],
    taus: list[float],
    sigma_min: float,
    noise: Callable[[int], Tensor],
) -> Tensor:
    """Algorithm 4: `denoise(x, sigma (B,)) -> x0`, `project` keeps the known part, `taus` decrease from
    sigma_max, `noise(step)` is the z of each step (B, C, H, W). Returns images in [-1, 1]."""
    taus = check_levels(taus, sigma_min)
    b = shape[0]
    z = noise(0)
    x = project(torch.zeros_like(z)) + taus[0] * z
    x = project(denoise(x, x.new_full((b,), taus[0])).clamp(-1, 1))
    for step, tau in enumerate(taus[1:], start=1):
        x = x + math.sqrt(tau**2 - sigma_min**2) * noise(step)
        x = project(denoise(x, x.new_full((b,), tau)).clamp(-1, 1))
    return x.clamp(-1, 1)
