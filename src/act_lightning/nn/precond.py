"""Preconditioning (docs/algorithm.md, section 1): the consistency function around a backbone, as in
NVlabs/edm.

Plain functions, not a wrapper module: the LightningModule holds the backbone itself as `generator`, so the
released checkpoints' keys (`model.unet.*`) map one to one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from act_lightning.consistency import append_dims, boundary_scalings, noise_conditioning


def consistency_function(
    backbone: nn.Module,
    x: Tensor,
    sigma: Tensor,
    class_labels: Tensor | None = None,
    *,
    sigma_min: float = 0.002,
    sigma_data: float = 0.5,
    c_noise_kind: str = "identity",
) -> Tensor:
    """f(x, sigma, y) = c_skip * x + c_out * F(c_in * x, c_noise, y); f(x, sigma_min) == x exactly.

    x: (B, C, H, W); sigma: (B,) or a scalar tensor. The skip connection is computed in float32 (float64
    for float64 inputs) whatever the backbone's precision, as in NVlabs/edm; so is the result.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)
    sigma = torch.as_tensor(sigma, device=x.device).to(dtype).expand(x.shape[0])  # (B,)
    c_skip, c_out, c_in = boundary_scalings(sigma, sigma_data, sigma_min)
    c_noise = noise_conditioning(sigma, c_noise_kind)
    c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in (c_skip, c_out, c_in))  # (B, 1, 1, 1)
    F_x = backbone(c_in * x, c_noise, class_labels)  # (B, C, H, W)
    return c_skip * x + c_out * F_x.to(dtype)
