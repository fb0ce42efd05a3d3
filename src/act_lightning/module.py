"""ACTModule: owns the generator, its target EMA and the discriminator, and runs one ACT iteration
(one generator update, then one discriminator update) per batch, exactly as ACT.md section 3."""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from act_lightning import consistency as cm
from act_lightning.augment import AugmentPipe, r1_controller_update
from act_lightning.data.base import HalfBatch
from act_lightning.losses import (
    DISTANCES,
    build_distance,
    discriminator_fake_loss,
    discriminator_real_loss,
    generator_adversarial_loss,
    r1_gradient_norm,
)
from act_lightning.nn import consistency_function
from act_lightning.sampling import multistep

OPTIMIZERS = ("radam", "adam", "rmsprop")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class ACTModule(L.LightningModule):
    """Adversarial Consistency Training.

    `generator` and `discriminator` are backbones with the signature `(x, c_noise, class_labels)`;
    the preconditioning of ACT.md section 1 is applied here. `iterations` is K, the number of ACT
    iterations: the curriculum N(k), mu(k) uses this module's own counter `iteration` (a buffer, so it
    is in every checkpoint), never `trainer.global_step`, which counts two optimiser steps per iteration.
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module | None,
        iterations: int,
        lr: float = 1e-4,
        d_lr: float = 1e-4,
        optimizer: str = "radam",
        warmup: int = 1,
        bins_min: int = 2,
        bins_max: int = 150,
        mu0: float = 0.9,
        gan_ratio: float = 0.3,
        mid_weight: float | None = None,
        r1_gamma: float = 10.0,
        r1_interval: int = 16,
        r1_threshold: float = 1e4,
        ada_length: float = 5e5,
        ada_beta: float = 0.93,
        augment: dict[str, float] | None = None,
        distance: str = "lpips",
        lpips_weights: str | None = None,
        lpips_pretrained: bool = True,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        rho: float = 7.0,
        c_noise: str = "identity",
        num_classes: int | None = None,
        global_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["generator", "discriminator"])
        _check(iterations >= 1, f"iterations must be a positive integer (ACT iterations K), got {iterations}")
        _check(lr > 0, f"model.lr must be positive, got {lr}")
        _check(d_lr > 0, f"model.d_lr must be positive, got {d_lr}")
        _check(
            optimizer in OPTIMIZERS,
            f"model.optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}",
        )
        _check(warmup >= 1, f"model.warmup must be >= 1 iteration (1 = no warm-up), got {warmup}")
        _check(bins_min >= 2, f"model.bins_min must be >= 2, got {bins_min}")
        _check(
            bins_min <= bins_max, f"model.bins_min ({bins_min}) must not exceed model.bins_max ({bins_max})"
        )
        _check(0 < mu0 < 1, f"model.mu0 must lie in (0, 1), got {mu0}")
        _check(0 <= gan_ratio <= 1, f"model.gan_ratio must lie in [0, 1], got {gan_ratio}")
        _check(
            mid_weight is None or 0 < mid_weight <= 1,
            f"model.mid_weight must be null (w(t) = 1) or in (0, 1], got {mid_weight}",
        )
        _check(r1_gamma >= 0, f"model.r1_gamma must be >= 0, got {r1_gamma}")
        _check(r1_interval >= 1, f"model.r1_interval must be >= 1, got {r1_interval}")
        _check(ada_length > 0, f"model.ada_length must be positive, got {ada_length}")
        _check(
            distance in DISTANCES, f"model.distance must be one of {', '.join(DISTANCES)}; got {distance!r}"
        )
        _check(
            0 < sigma_min < sigma_max,
            f"need 0 < model.sigma_min < model.sigma_max, got {sigma_min}, {sigma_max}",
        )
        _check(gan_ratio == 0 or discriminator is not None, "model.gan_ratio > 0 needs a model.discriminator")

        self.automatic_optimization = False
        self.generator = generator
        self.target = copy.deepcopy(generator).requires_grad_(False)  # theta^-: the EMA that samples
        self.discriminator = discriminator if gan_ratio > 0 else None
        self.augment_pipe = AugmentPipe(**(augment or {}))
        self.distance = build_distance(distance, lpips_weights, lpips_pretrained)

        # Training state that must survive a resume exactly: buffers are in every checkpoint.
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.register_buffer("aug_p", torch.zeros(()))
        self.register_buffer("r1_ema", torch.zeros(()))
        self._k = 0  # host copy of `iteration`, so the schedule never reads the device
        self.run_config: dict | None = None  # resolved training config (set by train()), kept in checkpoints
        self._sigma_cache: dict[tuple[int, torch.device], Tensor] = {}

    # -- the consistency function and the schedule ------------------------------------------------
    def denoise(self, net: nn.Module, x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        """f(x, sigma, y) for `net` = generator or target."""
        h = self.hparams
        return consistency_function(
            net, x, sigma, labels, sigma_min=h.sigma_min, sigma_data=h.sigma_data, c_noise_kind=h.c_noise
        )

    def c_noise(self, sigma: Tensor) -> Tensor:
        return cm.noise_conditioning(sigma, self.hparams.c_noise)

    def sigmas(self, num_scales: int) -> Tensor:
        key = (num_scales, self.device)
        if key not in self._sigma_cache:
            h = self.hparams
            self._sigma_cache[key] = cm.karras_sigmas(num_scales, h.sigma_min, h.sigma_max, h.rho).to(
                self.device
            )
        return self._sigma_cache[key]

    def num_scales_now(self) -> int:
        return cm.num_scales(self._k / self.hparams.iterations, self.hparams.bins_min, self.hparams.bins_max)

    def weight(self, sigma: Tensor, num_scales: int) -> Tensor:
        h = self.hparams
        return cm.adversarial_weight(
            sigma, num_scales, h.gan_ratio, h.mid_weight, h.sigma_min, h.sigma_max, h.rho
        )

    def _labels(self, labels: Tensor) -> Tensor | None:
        return labels if self.hparams.num_classes else None

    # -- the iteration ----------------------------------------------------------------------------
    def training_step(self, batch: HalfBatch, batch_idx: int) -> None:
        h = self.hparams
        num_scales = self.num_scales_now()
        sigmas = self.sigmas(num_scales)
        optimizers = self.optimizers()
        opt_g, opt_d = (optimizers, None) if not isinstance(optimizers, list) else optimizers
        use_gan = h.gan_ratio > 0

        # ---- generator update: consistency loss + adversarial loss on the same prediction ----
        x, y = batch.gen, self._labels(batch.gen_labels)  # (B_G, C, H, W)
        j = cm.sample_indices(x.shape[0], num_scales, device=x.device)
        t_hi, t_lo = sigmas[j], sigmas[j - 1]  # (B_G,)
        z = torch.randn_like(x)
        with torch.no_grad():
            target = self.denoise(self.target, x + cm.append_dims(t_lo, x.ndim) * z, t_lo, y)
        pred = self.denoise(self.generator, x + cm.append_dims(t_hi, x.ndim) * z, t_hi, y)
        loss_ct = self.distance(pred, target).float()  # (B_G,)
        if use_gan:
            self.toggle_optimizer(opt_g)  # D's parameters take no gradient from the generator's loss
            lam = h.gan_ratio * self.weight(t_hi, num_scales)
            fake_logits = self.discriminator(self.augment_pipe(pred, self.aug_p), self.c_noise(t_hi), y)
            loss_adv = generator_adversarial_loss(fake_logits)
            loss_g = ((1 - lam) * loss_ct + lam * loss_adv).mean()
        else:
            loss_adv = None
            loss_g = loss_ct.mean()
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        opt_g.step()
        if use_gan:
            self.untoggle_optimizer(opt_g)
        target_ema = cm.target_ema_decay(num_scales, h.bins_min, h.mu0)
        self._update_target(target_ema)

        logs = {
            "train/loss_ct": loss_ct.mean().detach(),
            "train/loss_g": loss_g.detach(),
            "train/num_scales": float(num_scales),
            "train/target_ema": target_ema,
        }

        # ---- discriminator update: fake half and real half, lazy R1 ----
        if use_gan:
            logs.update(self._discriminator_step(batch, sigmas, num_scales, opt_d))
            logs["train/loss_adv"] = loss_adv.mean().detach()

        self._step_schedulers()
        self._k += 1
        self.iteration.fill_(self._k)
        logs["step"] = float(self._k)  # loggers' x-axis: ACT iterations, not optimiser steps (two each)
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=x.shape[0])
        if self._k >= h.iterations:
            self.trainer.should_stop = True

    def _discriminator_step(self, batch: HalfBatch, sigmas: Tensor, num_scales: int, opt_d) -> dict[str, Any]:
        h = self.hparams
        self.toggle_optimizer(opt_d)
        x_fake, x_real = batch.disc.chunk(2)  # (B_D/2, C, H, W) each
        y_fake, y_real = (None, None) if not h.num_classes else batch.disc_labels.chunk(2)

        j = cm.sample_indices(x_fake.shape[0], num_scales, device=x_fake.device)
        t_fake = sigmas[j]
        with torch.no_grad():
            x_t = x_fake + cm.append_dims(t_fake, x_fake.ndim) * torch.randn_like(x_fake)
            fake = self.denoise(self.generator, x_t, t_fake, y_fake)
        fake_logits = self.discriminator(self.augment_pipe(fake, self.aug_p), self.c_noise(t_fake), y_fake)
        loss_fake = discriminator_fake_loss(fake_logits) * self.weight(t_fake, num_scales)

        j_real = cm.sample_indices(x_real.shape[0], num_scales, device=x_real.device)
        t_real = sigmas[j_real]
        w_real = self.weight(t_real, num_scales)
        real = self.augment_pipe(x_real, self.aug_p)
        do_r1 = h.r1_gamma > 0 and self._k % h.r1_interval == 0
        if do_r1:
            # The penalty needs d D / d r and a double backward. It runs in fp32 with autocast off, so
            # fp16 loss scaling can neither overflow nor corrupt it (ACT.md section 3).
            real = real.detach().float().requires_grad_(True)
            with torch.autocast(device_type=real.device.type, enabled=False):
                real_logits = self.discriminator(real, self.c_noise(t_real), y_real).float()
                grad_norm = r1_gradient_norm(real_logits, real)
            r1 = (h.r1_gamma / 2) * (w_real * grad_norm).mean()
        else:
            real_logits = self.discriminator(real.detach(), self.c_noise(t_real), y_real)
            r1 = torch.zeros((), device=real.device)
        loss_real = discriminator_real_loss(real_logits) * w_real
        loss_d = h.gan_ratio * (loss_fake.mean() + loss_real.mean() + r1)

        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(loss_d)
        opt_d.step()
        self.untoggle_optimizer(opt_d)

        logs = {"train/loss_d": loss_d.detach(), "train/aug_p": self.aug_p}
        if do_r1:
            p, r1_ema = r1_controller_update(
                self.aug_p,
                self.r1_ema,
                r1.detach(),
                beta=h.ada_beta,
                threshold=h.r1_threshold,
                batch_size=self._global_batch_size(batch),
                interval=h.r1_interval,
                ada_length=h.ada_length,
            )
            self.aug_p.copy_(p)
            self.r1_ema.copy_(r1_ema)
            logs["train/r1"] = r1.detach()
        return logs

    def _global_batch_size(self, batch: HalfBatch) -> int:
        """B of the augmentation controller: both halves, all devices (ACT.md section 5)."""
        if self.hparams.global_batch_size:
            return self.hparams.global_batch_size
        return (batch.gen.shape[0] + batch.disc.shape[0]) * self.trainer.world_size

    @torch.no_grad()
    def _update_target(self, decay: float) -> None:
        """theta^- <- mu * theta^- + (1 - mu) * theta, in one fused op over all tensors."""
        target = list(self.target.parameters())
        online = [p.detach() for p in self.generator.parameters()]
        torch._foreach_lerp_(target, online, 1.0 - decay)
        for b_t, b in zip(self.target.buffers(), self.generator.buffers()):
            b_t.copy_(b)

    # -- optimisers --------------------------------------------------------------------------------
    def _make_optimizer(self, params, lr: float, beta2: float):
        name = self.hparams.optimizer
        # foreach: the multi-tensor update, which PyTorch picks by itself only on CUDA; on the CPU the
        # per-tensor loop cost the quickstart about 9% of its time.
        if name == "radam":
            return torch.optim.RAdam(params, lr=lr, betas=(0.0, beta2), foreach=True)
        if name == "adam":
            return torch.optim.Adam(params, lr=lr, betas=(0.0, beta2), foreach=True)
        return torch.optim.RMSprop(params, lr=lr, foreach=True)

    def configure_optimizers(self):
        h = self.hparams
        warmup = lambda k: min(1.0, (k + 1) / h.warmup)  # noqa: E731  linear warm-up, in iterations
        opt_g = self._make_optimizer(self.generator.parameters(), h.lr, 0.99)
        if self.discriminator is None:
            return [opt_g], [torch.optim.lr_scheduler.LambdaLR(opt_g, warmup)]
        opt_d = self._make_optimizer(self.discriminator.parameters(), h.d_lr, 0.99 * 16 / 17)
        schedulers = [torch.optim.lr_scheduler.LambdaLR(o, warmup) for o in (opt_g, opt_d)]
        return [opt_g, opt_d], schedulers

    def _step_schedulers(self) -> None:
        schedulers = self.lr_schedulers()
        for s in schedulers if isinstance(schedulers, list) else [schedulers]:
            s.step()

    # -- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The frozen LPIPS network is rebuilt from its own weights file: keep it out of checkpoints.
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("distance.")]:
            del state[key]
        if self.run_config is not None:  # plain containers: `evaluate` rebuilds data and networks from it
            checkpoint["act_config"] = self.run_config
        checkpoint["act_rng"] = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            if key.startswith("distance."):
                state[key] = value
        self._k = int(state["iteration"])
        rng = checkpoint.get("act_rng")
        if rng is not None:
            self._restore_rng = rng

    def on_train_start(self) -> None:
        rng = getattr(self, "_restore_rng", None)
        if rng is not None:
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            self._restore_rng = None
        self._k = int(self.iteration)

    # -- sampling ----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        noise: Tensor,
        labels: Tensor | None = None,
        net: nn.Module | None = None,
        taus: list[float] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """One-step samples x = f_{theta^-}(sigma_max * z, sigma_max, y), clipped to [-1, 1]; with `taus`
        (decreasing, taus[0] = sigma_max), multistep sampling (Song et al. 2023, Algorithm 1)."""
        net = self.target if net is None else net
        h = self.hparams
        taus = [h.sigma_max] if taus is None else taus
        return multistep(
            lambda x, sigma: self.denoise(net, x, sigma, labels), noise, taus, h.sigma_min, generator
        )

    @property
    def progress(self) -> float:
        return self._k / self.hparams.iterations

    def extra_repr(self) -> str:
        return f"iteration={self._k}/{self.hparams.iterations}"
