"""The losses of one ACT iteration (docs/algorithm.md, section 3): consistency distances, and the
generator's and the discriminator's update as pure functions. Everything returns per-example values of
shape (B,); the LightningModule only reduces them, calls backward and steps the optimisers.

The networks enter as callables of (images, sigma, labels): `online` and `target` are the consistency
functions f_theta and f_theta^- (preconditioning included), `critic` is D with its noise conditioning,
`augment` the differentiable augmentation at the current probability. Randomness (noise indices j and
noise z) is an argument too, so a test can hand-compute one iteration and gradient accumulation can
split a batch without changing what each example sees.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from act_lightning.consistency import ConsistencySchedule, append_dims

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
    """sqrt(||a - b||^2 + c^2) - c with c = 0.00054 * sqrt(dim) (Song & Dhariwal 2023), or the `c` given
    (model.pseudo_huber_c; ECT's CIFAR-10 c = 0 makes it the Euclidean norm ||a - b||)."""
    if c is None:
        c = 0.00054 * math.sqrt(pred[0].numel())
    squared = (_flat(pred) - _flat(target)).square().sum(1)
    if c == 0:  # the norm's gradient at 0 is 0 here, not NaN (a pair that already agrees)
        return squared.clamp(min=torch.finfo(squared.dtype).tiny).sqrt()
    return (squared + c**2).sqrt() - c


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
    package), as in the paper: inputs in [-1, 1] are mapped to [0, 1], bilinearly resized to 224x224
    whatever their size (also down from 256x256, as the reference does), the target clipped to [-1, 1].
    The network is frozen.

    The VGG16 backbone weights are not shipped with the package: they are read from `weights` (default:
    torchvision's cache) and never downloaded here, so a missing file fails at construction, before any
    training, with the path to put it at. `pretrained_backbone=False` builds a randomly initialised
    backbone (tests, smoke runs).

    `checkpointing` (model.speed.lpips_checkpointing) keeps only the inputs for the backward and runs the
    network again there; `bf16` (model.speed.bf16_lpips) runs it under bf16 autocast. Both are set by
    `SpeedOptions.apply`; the result is float32 either way.
    """

    def __init__(self, weights: str | None = None, pretrained_backbone: bool = True, resize: int = 224):
        super().__init__()
        import lpips

        self.resize = resize
        with vgg16_convolutions_only():
            self.net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        if pretrained_backbone:
            self._load_backbone(Path(weights) if weights else default_vgg16_path(), given=bool(weights))
        self.net.eval().requires_grad_(False)
        self.checkpointing = False  # model.speed.lpips_checkpointing: recompute VGG in the backward
        self.bf16 = False  # model.speed.bf16_lpips: VGG and the heads under bf16 autocast

    def _load_backbone(self, path: Path, given: bool = False) -> None:
        if not path.is_file():
            where = (
                f"at {path} (model.lpips_weights)"
                if given
                else f"at {path} (torchvision's cache) or at the path given by model.lpips_weights"
            )
            raise FileNotFoundError(
                f"LPIPS needs the VGG16 weights file '{VGG16_FILE}' {where}. Get it from {VGG16_URL} and put "
                "it there, or choose another consistency distance with model.distance=pseudo_huber."
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated or foreign file: its KeyError alone said a bare number
            raise ValueError(
                f"could not read the VGG16 weights at {path} ({type(err).__name__}: not a torch weights "
                f"file, a truncated download?); expected '{VGG16_FILE}' from {VGG16_URL}"
            ) from err
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
        if self.resize and tuple(pred.shape[-2:]) != (self.resize, self.resize):
            pred = F.interpolate(pred, size=self.resize, mode="bilinear", align_corners=False)
            target = F.interpolate(target, size=self.resize, mode="bilinear", align_corners=False)
        # map to [0, 1] and let lpips normalise, as the paper's pipeline does
        pred, target = (pred + 1) / 2, (target + 1) / 2
        # (without bf16, whatever autocast the caller runs: the trainer's precision)
        with torch.autocast(pred.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext():
            if self.checkpointing and torch.is_grad_enabled():  # keeps only the inputs for the backward
                out = checkpoint(self.net, pred, target, normalize=True, use_reentrant=False)
            else:
                out = self.net(pred, target, normalize=True)
        return out.flatten().float()


@contextmanager
def vgg16_convolutions_only():
    """While lpips builds its backbone: torchvision's VGG16 convolutions alone. lpips builds the whole
    VGG16 and keeps `.features`; initialising the discarded classifier's 120M parameters took a second of
    every construction. The convolutions are torchvision's layers with torchvision's initialisation
    (kaiming normal, fan out; zero bias); the real weights are loaded over them anyway."""
    import lpips.pretrained_networks as backbones
    from torchvision.models.vgg import cfgs, make_layers

    models = backbones.tv
    whole = models.vgg16

    def convolutions(pretrained=False, **kwargs):
        if pretrained or kwargs.get("weights") is not None:
            return whole(pretrained=pretrained, **kwargs)
        features = make_layers(cfgs["D"], batch_norm=False)
        for m in features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        return SimpleNamespace(features=features)

    models.vgg16 = convolutions
    try:
        yield
    finally:
        models.vgg16 = whole


def build_distance(
    name: str,
    lpips_weights: str | None = None,
    lpips_pretrained: bool = True,
    pseudo_huber_c: float | None = None,
    lpips_resize: int | None = 224,
):
    """The consistency distance d(pred, target) -> (B,) named by `model.distance` (pseudo-Huber's c:
    `model.pseudo_huber_c`, null for iCT's; LPIPS's input size: `model.lpips_resize`)."""
    if pseudo_huber_c is not None and not pseudo_huber_c >= 0:
        raise ValueError(f"model.pseudo_huber_c must be null (iCT's c) or >= 0, got {pseudo_huber_c}")
    if lpips_resize is not None and not (isinstance(lpips_resize, int) and lpips_resize >= 32):
        raise ValueError(
            f"model.lpips_resize must be null (the images' own size) or an integer >= 32 (VGG halves it "
            f"four times before LPIPS's last layer); got {lpips_resize!r}"
        )
    functions = {
        "l2": l2_distance,
        "l1": l1_distance,
        "pseudo_huber": partial(pseudo_huber_distance, c=pseudo_huber_c),
        "ssim": ssim_distance,
        "msssim": msssim_distance,
    }
    if name == "lpips":
        return LPIPSDistance(lpips_weights, pretrained_backbone=lpips_pretrained, resize=lpips_resize)
    if name in functions:
        return functions[name]
    raise ValueError(f"model.distance must be one of {', '.join(DISTANCES)}; got {name!r}")


# -- the two updates of one iteration --------------------------------------------------------------

Network = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]  # (x (B, C, H, W), sigma (B,), y) -> ...
Augment = Callable[[Tensor], Tensor]


class GeneratorLosses(NamedTuple):
    consistency: Tensor  # L_ct = d(f_theta(x + t_hi z, t_hi), f_theta^-(x + t_lo z, t_lo)), (B,)
    adversarial: Tensor  # L_adv = softplus(-D(A(pred), t_hi)), (B,); zeros without a discriminator
    lam: Tensor  # lambda(t_hi) = gan_ratio * w(t_hi), (B,); zeros without a discriminator
    weight: Tensor  # lambda_ct(t_hi, t_lo) of L_ct, (B,): ones (ACT) or iCT's 1 / (t_hi - t_lo)

    def objective(self) -> Tensor:
        """(1 - lambda) lambda_ct L_ct + lambda L_adv per example; L_G is its mean over the batch."""
        return (1 - self.lam) * self.weight * self.consistency + self.lam * self.adversarial


def generator_losses(
    x: Tensor,
    labels: Tensor | None,
    j: Tensor,
    noise: Tensor,
    *,
    sigmas: Tensor,
    schedule: ConsistencySchedule,
    online: Network,
    target: Network,
    distance: Callable[[Tensor, Tensor], Tensor],
    critic: Network | None = None,
    augment: Augment | None = None,
) -> GeneratorLosses:
    """The generator's update on a grid: j (B,) indices in 1..N-1 of the grid `sigmas` (N values) pick
    the adjacent pairs (t_hi, t_lo) = (t_j, t_{j-1}) of `pair_losses`."""
    return pair_losses(
        x,
        labels,
        sigmas[j],
        sigmas[j - 1],
        noise,
        schedule=schedule,
        online=online,
        target=target,
        distance=distance,
        critic=critic,
        augment=augment,
        num_scales=sigmas.numel(),
    )


def pair_losses(
    x: Tensor,
    labels: Tensor | None,
    t_hi: Tensor,
    t_lo: Tensor,
    noise: Tensor,
    *,
    schedule: ConsistencySchedule,
    online: Network,
    target: Network,
    distance: Callable[[Tensor, Tensor], Tensor],
    critic: Network | None = None,
    augment: Augment | None = None,
    num_scales: int | None = None,
) -> GeneratorLosses:
    """The generator's update: x (B, C, H, W) real images, noise levels t_hi > t_lo (B,) (a grid's
    adjacent pair, or ECT's t and r), noise z (B, C, H, W) shared by both levels. A pair whose lower level
    is at or below the training preconditioning's sigma_min (`schedule.train_sigma_min`: sigma_min, or 0
    under EDM's scalings, where ECT's r = 0) takes the clean image x as its target: the boundary, where the
    consistency function needs no network. D is called on the prediction with its gradient flowing to
    the generator only: the caller keeps D's parameters out of this backward."""
    with torch.no_grad():
        if schedule.continuous:  # ECT's r can reach the boundary (0); a grid's t_lo never passes sigma_min
            at_boundary = t_lo <= schedule.train_sigma_min
            t_net = torch.where(at_boundary, schedule.sigma_min, t_lo)  # (a level the network can take)
            target_x0 = target(x + append_dims(t_lo, x.ndim) * noise, t_net, labels)
            target_x0 = torch.where(append_dims(at_boundary, x.ndim), x.to(target_x0.dtype), target_x0)
        else:
            target_x0 = target(x + append_dims(t_lo, x.ndim) * noise, t_lo, labels)
    pred = online(x + append_dims(t_hi, x.ndim) * noise, t_hi, labels)
    loss_ct = distance(pred, target_x0).float()
    weight = schedule.consistency_weight(t_hi, t_lo).to(loss_ct.dtype)
    if critic is None:
        zeros = torch.zeros_like(loss_ct)
        return GeneratorLosses(loss_ct, zeros, zeros, weight)
    loss_adv = F.softplus(-critic(augment(pred), t_hi, labels).float())
    return GeneratorLosses(loss_ct, loss_adv, schedule.lam(t_hi, num_scales), weight)


def denoising_losses(
    x: Tensor,
    labels: Tensor | None,
    sigma: Tensor,
    noise: Tensor,
    *,
    denoise: Network,
    sigma_data: float = 0.5,
) -> Tensor:
    """EDM's denoising score matching (Karras et al. 2022, `EDMLoss`), per example (B,):

        lambda(sigma) ||D(x + sigma n, sigma) - x||^2,
        lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2

    summed over the image as EDM does; sigma (B,) the noise levels (EDM draws them log-normal), noise n
    (B, C, H, W), `denoise` the denoiser D(x, sigma, y) (EDM's preconditioning included)."""
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    pred = denoise(x + append_dims(sigma, x.ndim) * noise, sigma, labels)
    return weight.float() * (pred.float() - x.float()).square().flatten(1).sum(1)


class DiscriminatorLosses(NamedTuple):
    fake: Tensor  # L_fake = w(t) softplus(D(A(fake), t)), (B/2,)
    real: Tensor  # L_real = w(t') softplus(-D(A(real), t')), (B/2,)
    r1: Tensor  # (r1_gamma / 2) w(t') ||dD(r)/dr||^2, (B/2,); zeros between R1 iterations

    def objective(self, gan_ratio: float) -> Tensor:
        """gan_ratio (L_fake + L_real + R1) per example pair; L_D is its mean (the halves are equal)."""
        return gan_ratio * (self.fake + self.real + self.r1)


def discriminator_losses(
    fake_x: Tensor,
    fake_labels: Tensor | None,
    fake_j: Tensor,
    fake_noise: Tensor,
    real_x: Tensor,
    real_labels: Tensor | None,
    real_j: Tensor,
    *,
    sigmas: Tensor,
    **kwargs,
) -> DiscriminatorLosses:
    """The discriminator's update on a grid: the levels t = sigmas[fake_j] and t' = sigmas[real_j] of
    `discriminator_losses_at` (the same keyword arguments)."""
    return discriminator_losses_at(
        fake_x,
        fake_labels,
        sigmas[fake_j],
        fake_noise,
        real_x,
        real_labels,
        sigmas[real_j],
        num_scales=sigmas.numel(),
        **kwargs,
    )


# (fake, t_fake, fake_labels, real, t_real, real_labels) -> (fake logits, real logits, dD(real)/d real)
R1Pass = Callable[..., tuple[Tensor, Tensor, Tensor]]


def logits_and_r1_gradient(
    critic: Network,
    fake: Tensor,
    t_fake: Tensor,
    fake_labels: Tensor | None,
    real: Tensor,
    t_real: Tensor,
    real_labels: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """D's logits of the fake half and of the real half, and the gradient of the real logits' sum with
    respect to the real images (what R1 penalises), itself differentiable (`create_graph`): R1's gradient
    in D's parameters differentiates D twice. The real pass runs in float32 with autocast off (float64
    images stay float64: a float64 D, as gradient checks use, gets its own precision)."""
    fake_logits = critic(fake, t_fake, fake_labels).float()
    real = real.to(torch.promote_types(real.dtype, torch.float32)).requires_grad_(True)
    with torch.autocast(real.device.type, enabled=False):
        real_logits = critic(real, t_real, real_labels).float()
        (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)  # double backward
    return fake_logits, real_logits, grad


def logits_and_r1_gradient_traceable(
    critic: Network,
    fake: Tensor,
    t_fake: Tensor,
    fake_labels: Tensor | None,
    real: Tensor,
    t_real: Tensor,
    real_labels: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """`logits_and_r1_gradient` through `torch.func.grad`, which torch.compile traces into one graph
    (model.speed.compile_r1): the input gradient becomes part of that graph's forward, and its derivative
    in D's parameters part of the graph's ordinary backward. The same function: float rounding apart
    (torch.func orders some sums otherwise, about 2e-6 of each norm), the same numbers."""

    def real_sum(x: Tensor) -> tuple[Tensor, Tensor]:
        logits = critic(x, t_real, real_labels).float()
        return logits.sum(), logits

    fake_logits = critic(fake, t_fake, fake_labels).float()
    with torch.autocast(real.device.type, enabled=False):
        grad, real_logits = torch.func.grad(real_sum, has_aux=True)(real.float())
    return fake_logits, real_logits, grad


def discriminator_losses_at(
    fake_x: Tensor,
    fake_labels: Tensor | None,
    t_fake: Tensor,
    fake_noise: Tensor,
    real_x: Tensor,
    real_labels: Tensor | None,
    t_real: Tensor,
    *,
    schedule: ConsistencySchedule,
    online: Network,
    critic: Network,
    augment: Augment,
    r1_gamma: float,
    with_r1: bool,
    joint: bool = True,
    num_scales: int | None = None,
    r1_pass: R1Pass | None = None,
) -> DiscriminatorLosses:
    """The discriminator's update: fakes are one-step predictions of the online network from the images
    `fake_x` noised to the levels t_fake (B/2,); reals are `real_x` seen at t_real. With `with_r1`
    the lazy R1 penalty is computed with respect to the augmented real images, in float32 with autocast
    off, so that fp16 loss scaling can neither overflow nor corrupt it. `joint`: D sees both halves in
    one pass when there is no R1 pass, and an `augment` that offers `together` (the iteration's
    `DrawnAugmentation`) takes both in one pass of the pipeline, each example with the random numbers of two
    calls in turn (False: two passes of each, as the reference does). `r1_pass` computes the
    R1 iteration's logits and input gradient: `logits_and_r1_gradient` with `critic` unless given (a
    compiled `logits_and_r1_gradient_traceable`)."""
    with torch.no_grad():
        fake = online(fake_x + append_dims(t_fake, fake_x.ndim) * fake_noise, t_fake, fake_labels)
    if joint and hasattr(augment, "together"):  # both halves in one pass of the pipeline
        fake, real = augment.together(fake, real_x)
    else:
        fake, real = augment(fake), augment(real_x)
    real = real.detach()
    w_real = schedule.weight(t_real, num_scales)
    if with_r1:
        r1_pass = r1_pass or partial(logits_and_r1_gradient, critic)
        fake_logits, real_logits, grad = r1_pass(fake, t_fake, fake_labels, real, t_real, real_labels)
        r1 = (r1_gamma / 2) * w_real * grad.square().flatten(1).sum(1)
    elif not joint:
        fake_logits = critic(fake, t_fake, fake_labels).float()
        real_logits = critic(real, t_real, real_labels).float()
        r1 = torch.zeros_like(w_real)
    else:
        # One pass over both halves: D treats every example on its own (group norm, no batch statistics),
        # so this is the two passes' result in half the kernel launches.
        labels = None if fake_labels is None else torch.cat([fake_labels, real_labels])
        logits = critic(torch.cat([fake, real]), torch.cat([t_fake, t_real]), labels).float()
        fake_logits, real_logits = logits.split([fake.shape[0], real.shape[0]])
        r1 = torch.zeros_like(w_real)
    loss_fake = F.softplus(fake_logits) * schedule.weight(t_fake, num_scales)
    loss_real = F.softplus(-real_logits) * w_real
    return DiscriminatorLosses(loss_fake, loss_real, r1)
