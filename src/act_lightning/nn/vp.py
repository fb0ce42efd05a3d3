"""A diffusers DDPM (variance-preserving, epsilon-predicting UNet2DModel) as a generator backbone F_theta
(docs/algorithm.md, section 12; written by act_lightning.convert_diffusers).

The library's networks see x in EDM's variance-exploding parametrisation, x = y + sigma n, through
`consistency_function`: F(c_in x, c_noise, y) with c_in = 1 / sqrt(sigma^2 + sd^2). A DDPM sees
x_VP = sqrt(abar_t) y + sqrt(1 - abar_t) n at integer timesteps t. The two are the same point up to a
scale (Karras et al. 2022, EDM, appendix C.1): x_VP = x / sqrt(1 + sigma^2) with
sigma_t = sqrt((1 - abar_t) / abar_t). This backbone undoes c_in, feeds the DDPM its own input at the
(fractional) timestep of sigma, and returns the F for which EDM's preconditioning (sigma_min = 0) gives the
DDPM's denoiser D(x, sigma) = x - sigma eps exactly:

    F = (D - c_skip x) / c_out = x sigma / (sd sqrt(sigma^2 + sd^2)) - eps sqrt(sigma^2 + sd^2) / sd

with c_skip = sd^2 / (sigma^2 + sd^2) and c_out = sigma sd / sqrt(sigma^2 + sd^2). Its weights are the
UNet's (`unet.*`), so training goes on from them.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import Tensor, nn

from act_lightning.consistency import append_dims, noise_level


def plain_config(config: Any) -> dict:
    """`config` as a plain dict (Hydra passes nested configs as DictConfig unless told otherwise)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return dict(config)


def vp_log_sigmas(scheduler: dict) -> Tensor:
    """ln sigma_t, t = 0..T-1, of the scheduler's config (float64): sigma_t = sqrt((1 - abar_t) / abar_t)
    with abar_t = DDPMScheduler(**scheduler).alphas_cumprod, increasing in t."""
    abar = DDPMScheduler(**scheduler).alphas_cumprod.double()
    return 0.5 * ((1 - abar) / abar).log()


def fractional_timesteps(log_sigma: Tensor, log_sigmas: Tensor) -> Tensor:
    """The timestep of each noise level: the index of `log_sigma` in the increasing table `log_sigmas`,
    linear in ln sigma between entries, clamped to [0, T-1] (so t_i of the table's sigma_i is i)."""
    table = log_sigmas.to(log_sigma.dtype)
    last = table.numel() - 1
    lo = (torch.searchsorted(table, log_sigma.contiguous(), right=True) - 1).clamp(0, last - 1)
    left, right = table[lo], table[lo + 1]
    return (lo + (log_sigma - left) / (right - left)).clamp(0, last)


class VPEpsilonBackbone(nn.Module):
    """F_theta(x, c_noise, y) from a DDPM's epsilon UNet (see the module docstring).

    `unet` is the UNet2DModel's config and `scheduler` a DDPMScheduler config (their keys without the
    leading-underscore ones); `sigma_data` and `c_noise` must be the run's model.sigma_data and model.c_noise
    (the converter writes them as interpolations), `image_size` and `in_channels` the UNet's, which
    the training's config checks compare with the data's. Unconditional: class labels are ignored.
    """

    config_prefix = "model.generator"

    def __init__(
        self,
        *,
        unet: dict,
        scheduler: dict,
        sigma_data: float,
        c_noise: str,
        image_size: int,
        in_channels: int,
    ):
        super().__init__()
        unet, scheduler = plain_config(unet), plain_config(scheduler)
        noise_level(torch.ones(1), c_noise)  # refuses an unknown kind now, not at the first step
        if unet.get("sample_size") != image_size or unet.get("in_channels") != in_channels:
            raise ValueError(
                f"{self.config_prefix}.image_size={image_size} and in_channels={in_channels} must be the "
                f"UNet's sample_size={unet.get('sample_size')} and in_channels={unet.get('in_channels')}"
            )
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_class_embeds = None
        self.used_channels = None
        self.sigma_data = float(sigma_data)
        self.c_noise = c_noise
        self.unet = UNet2DModel(**unet)
        # not in the state dict: a function of the scheduler's config, which the checkpoint's config holds
        self.register_buffer("log_sigmas", vp_log_sigmas(scheduler).float(), persistent=False)

    def forward(self, u: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """u = c_in x: (B, C, H, W); c_noise: (B,) or a scalar, the run's noise conditioning of sigma.
        Returns F (B, C, H, W) in float32 (the scalings are computed in float32 whatever the UNet's
        precision)."""
        dtype = torch.promote_types(u.dtype, torch.float32)
        sigma = noise_level(torch.as_tensor(c_noise, device=u.device).to(dtype), self.c_noise)
        sigma = sigma.reshape(-1).expand(u.shape[0])  # (B,)
        sd = self.sigma_data
        root = append_dims((sigma**2 + sd**2).sqrt(), u.ndim)  # sqrt(sigma^2 + sd^2) = 1 / c_in
        s = append_dims(sigma, u.ndim)
        x = u.to(dtype) * root  # EDM's noisy image x = y + sigma n
        x_vp = x / (1 + s**2).sqrt()  # the DDPM's input sqrt(abar) y + sqrt(1 - abar) n
        t = fractional_timesteps(sigma.log(), self.log_sigmas)
        weight = next(self.unet.parameters())
        out = self.unet(x_vp.to(weight.dtype), t, return_dict=False)[0]
        eps = out[:, : self.in_channels].to(dtype)  # a learned-variance UNet puts its variance after eps
        return x * s / (sd * root) - eps * root / sd
