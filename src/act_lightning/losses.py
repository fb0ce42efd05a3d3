"""Consistency distances, GAN losses and the R1 penalty. Every function returns per-example values
of shape (B,); the LightningModule weights and reduces them (ACT.md section 3)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DISTANCES = ("lpips", "l2", "l1", "pseudo_huber", "ssim", "msssim")
VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"


def _flat(x: Tensor) -> Tensor:
    return x.flatten(1)


def l2_distance(pred: Tensor, target: Tensor) -> Tensor:
    return (_flat(pred) - _flat(target)).square().mean(1)


def l1_distance(pred: Tensor, target: Tensor) -> Tensor:
    return (_flat(pred) - _flat(target)).abs().mean(1)


def pseudo_huber_distance(pred: Tensor, target: Tensor, c: float | None = None) -> Tensor:
    """sqrt(||a - b||^2 + c^2) - c with c = 0.00054 * sqrt(dim) (Song & Dhariwal 2023)."""
    if c is None:
        c = 0.00054 * math.sqrt(pred[0].numel())
    return ((_flat(pred) - _flat(target)).square().sum(1) + c**2).sqrt() - c


def _ssim_kernel_size(size: int) -> int:
    """The usual 11x11 window, shrunk to the largest odd size that fits small images."""
    k = min(11, size)
    return k if k % 2 else k - 1


def ssim_distance(pred: Tensor, target: Tensor) -> Tensor:
    """1 - SSIM per example, on images mapped from [-1, 1] to [0, 1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    k = _ssim_kernel_size(min(pred.shape[-2:]))
    value = ssim(
        (pred.float() + 1) / 2, (target.float() + 1) / 2, data_range=1.0, kernel_size=k, reduction="none"
    )
    return 1 - value


MSSSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def msssim_distance(pred: Tensor, target: Tensor) -> Tensor:
    """1 - MS-SSIM per example. Images too small for five scales use as many scales as fit (the
    standard weights, truncated and renormalised), so the distance also works at 32x32."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as msssim

    size = min(pred.shape[-2:])
    k = _ssim_kernel_size(size)
    scales = len(MSSSIM_BETAS)
    while scales > 1 and size <= (k - 1) * 2 ** (scales - 1):
        scales -= 1
    if scales == 1:
        return ssim_distance(pred, target)
    betas = MSSSIM_BETAS[:scales]
    betas = tuple(b / sum(betas) for b in betas)
    value = msssim(
        (pred.float() + 1) / 2,
        (target.float() + 1) / 2,
        data_range=1.0,
        kernel_size=k,
        betas=betas,
        reduction="none",
        normalize="relu",
    )
    return 1 - value


def default_vgg16_path() -> Path:
    """Where torchvision keeps the VGG16 weights: $TORCH_HOME/hub/checkpoints/vgg16-397923af.pth."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


class LPIPSDistance(nn.Module):
    """LPIPS (Zhang et al. 2018; VGG backbone with the learned linear heads shipped in the `lpips`
    package), as in the paper: inputs in [-1, 1] are mapped to [0, 1], bilinearly resized to 224x224,
    the target clipped to [-1, 1]. The network is frozen.

    The VGG16 backbone weights are not shipped with the package: they are read from `weights` (default:
    torchvision's cache) and never downloaded here, so a missing file fails at construction, before any
    training, with the path to put it at. `pretrained_backbone=False` builds a randomly initialised
    backbone (tests, smoke runs).
    """

    def __init__(self, weights: str | None = None, pretrained_backbone: bool = True, resize: int = 224):
        super().__init__()
        import lpips

        self.resize = resize
        self.net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        if pretrained_backbone:
            self._load_backbone(Path(weights) if weights else default_vgg16_path())
        self.net.eval().requires_grad_(False)

    def _load_backbone(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(
                f"LPIPS needs the VGG16 weights file '{VGG16_FILE}' at {path} (torchvision's cache) or "
                f"at the path given by model.lpips_weights. Get it from {VGG16_URL} and put it there, or "
                "choose another consistency distance with model.distance=pseudo_huber."
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated or foreign file
            raise ValueError(f"could not read the VGG16 weights at {path}: {err}") from err
        # lpips keeps torchvision's `features.<i>` modules under `slice<k>.<i>`: map the names across.
        own = self.net.net.state_dict()
        mapped = {}
        for name in own:
            index_and_param = name.split(".", 1)[1]  # "<i>.weight"
            source = f"features.{index_and_param}"
            if source not in state:
                raise ValueError(f"{path} is not torchvision's VGG16: it lacks '{source}'")
            mapped[name] = state[source]
        self.net.net.load_state_dict(mapped)

    def train(self, mode: bool = True):  # stays in eval mode whatever the parent does
        return super().train(False)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        target = target.clamp(-1, 1)
        if pred.shape[1] == 1:  # grayscale: VGG wants three channels
            pred, target = pred.expand(-1, 3, -1, -1), target.expand(-1, 3, -1, -1)
        if self.resize and pred.shape[-1] < self.resize:
            pred = F.interpolate(pred, size=self.resize, mode="bilinear", align_corners=False)
            target = F.interpolate(target, size=self.resize, mode="bilinear", align_corners=False)
        # map to [0, 1] and let lpips normalise, as the paper's pipeline does
        return self.net((pred + 1) / 2, (target + 1) / 2, normalize=True).flatten()


def build_distance(name: str, lpips_weights: str | None = None, lpips_pretrained: bool = True):
    """The consistency distance d(pred, target) -> (B,) named by `model.distance`."""
    functions = {
        "l2": l2_distance,
        "l1": l1_distance,
        "pseudo_huber": pseudo_huber_distance,
        "ssim": ssim_distance,
        "msssim": msssim_distance,
    }
    if name == "lpips":
        return LPIPSDistance(lpips_weights, pretrained_backbone=lpips_pretrained)
    if name in functions:
        return functions[name]
    raise ValueError(f"model.distance must be one of {', '.join(DISTANCES)}; got {name!r}")


# -- adversarial terms ----------------------------------------------------------------------------


def generator_adversarial_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss softplus(-D(fake)), per example."""
    return F.softplus(-fake_logits.float())


def discriminator_fake_loss(fake_logits: Tensor) -> Tensor:
    return F.softplus(fake_logits.float())


def discriminator_real_loss(real_logits: Tensor) -> Tensor:
    return F.softplus(-real_logits.float())


def r1_gradient_norm(real_logits: Tensor, real_images: Tensor) -> Tensor:
    """||dD(r)/dr||^2 per example, with the graph kept for the double backward (create_graph=True).

    `real_images` must be the (augmented) tensor that was fed to D, with requires_grad set.
    """
    (grad,) = torch.autograd.grad(real_logits.float().sum(), real_images, create_graph=True)
    return grad.float().square().flatten(1).sum(1)
