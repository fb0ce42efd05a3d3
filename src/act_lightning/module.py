"""ACTModule: owns the generator, its target EMA and the discriminator, and runs one ACT iteration (one
generator update, then one discriminator update) per batch (docs/algorithm.md, section 3).

The math lives in pure functions (`losses.pair_losses`, `losses.discriminator_losses_at`,
`losses.denoising_losses` for diffusion training, the
`ConsistencySchedule`), the draws of an iteration in `iteration`, the divergence guard in `divergence`,
per-network DDP in `distributed`, the EMAs' update in `ema`, the checks of the module's arguments in
`arguments`; this module does what is Lightning's: which network trains, backward,
optimiser steps, the target EMA, the iteration counter, the augmentation controller's state, logging.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor, nn

from act_lightning.arguments import OptimizerFactory, check_arguments, check_objective
from act_lightning.augment import AugmentPipe, DrawnAugmentation, r1_controller_update
from act_lightning.checkpoints import checkpoint_iteration, prepare_training_checkpoint, restore_rng
from act_lightning.checks import check_noise, class_labels_for
from act_lightning.compat import eager_forward
from act_lightning.consistency import ConsistencySchedule, noise_conditioning
from act_lightning.data.base import DataError, HalfBatch
from act_lightning.distributed import PerNetworkDDP
from act_lightning.divergence import BadIterations, guard_mask, skip_if_nonfinite
from act_lightning.ema import ema_copies, ema_update
from act_lightning.environment import latest_environment, launch_environments
from act_lightning.iteration import (
    Draws,
    GridCache,
    augmentation_streams,
    draw_noise,
    ect_levels,
    edm_levels,
    grid_levels,
    split_micro,
)
from act_lightning.losses import (
    R1Pass,
    build_distance,
    denoising_losses,
    discriminator_losses_at,
    logits_and_r1_gradient_traceable,
    pair_losses,
)
from act_lightning.nn import consistency_function
from act_lightning.readback import DeferredRead
from act_lightning.resume import set_foreach, set_learning_rates
from act_lightning.samplers import heun, later_levels, multistep
from act_lightning.seeds import AUGMENT, mix_seed, seed_global_generators
from act_lightning.speed import SpeedOptions, in_bf16

Logs = dict[str, Any]
Bad = dict[str, Tensor]  # guarded term -> whether it went non-finite (divergence.GUARDED_TERMS)


def with_curriculum(schedule: ConsistencySchedule, curriculum: str | None) -> ConsistencySchedule:
    """`model.curriculum`, when set, replaces `model.schedule.curriculum` (its shorthand: curriculum=ect);
    refused under its own name when the schedule does not know it."""
    if curriculum is None:
        return schedule
    try:
        return dataclasses.replace(schedule, curriculum=curriculum)
    except ValueError as err:
        raise ValueError(str(err).replace("model.schedule.curriculum", "model.curriculum", 1)) from None


def discriminator_if(adversarial: bool, discriminator: nn.Module | Callable[[], nn.Module] | None):
    """The discriminator when it trains (gan_ratio > 0), built from its factory only then; else None."""
    if not adversarial:
        return None
    return discriminator if isinstance(discriminator, nn.Module) else discriminator()


def on_forked_rng(fn: Callable, device: torch.device) -> Callable:
    """`fn` run on a fork of the global random state: the draws made after it repeat the draws it made."""

    def run(*args):
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return fn(*args)

    return run


def identity(images: Tensor) -> Tensor:
    return images


class Critic:
    """D(x, c_noise(sigma), y) -> (B,) logits of one network (D, or its DDP wrapper): D sees the same noise
    conditioning as the generator. A plain callable, not a module of the state dict: the compiled R1 pass
    is bound to one such object, which keeps its graph's guards from call to call."""

    def __init__(self, net: nn.Module, c_noise: str) -> None:
        self.net, self.c_noise = net, c_noise

    def __call__(self, x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        return self.net(x, noise_conditioning(sigma, self.c_noise), labels)


def _options(value, cls):
    """A dataclass of options, from itself (Hydra builds it) or from its keys."""
    return value if isinstance(value, cls) else cls(**(value or {}))


# ACTModule arguments that are modules or option groups (their config is in the run config), not
# hyper-parameters of the checkpoint
NOT_HYPERPARAMETERS = ["generator", "discriminator", "optimizer", "d_optimizer", "schedule", "speed"]


class ACTModule(L.LightningModule):
    """Adversarial Consistency Training.

    `generator` and `discriminator` are backbones `(x, c_noise, class_labels)`; the preconditioning
    (docs/algorithm.md section 1) is applied here. `discriminator` may be a factory (a Hydra `_partial_`),
    called only when `schedule.gan_ratio > 0`. `optimizer` and `d_optimizer` are Hydra partials
    `params -> Optimizer`; `schedule` (`model.schedule`) answers every schedule question, `speed`
    (`model.speed`) says how the networks run. The curriculum follows the module's own counter `k` of the
    K = `iterations` (also the buffer `iteration`), never `trainer.global_step` (two optimiser steps per
    iteration). Every batch is one iteration, its gradients accumulated over its micro-batches.
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module | Callable[[], nn.Module] | None,
        iterations: int,
        optimizer: OptimizerFactory,
        d_optimizer: OptimizerFactory | None = None,
        schedule: ConsistencySchedule | Mapping | None = None,
        speed: SpeedOptions | Mapping | None = None,
        warmup: int = 1,
        r1_gamma: float = 10.0,
        r1_interval: int = 16,
        r1_threshold: float = 1e4,
        ada_length: float = 5e5,
        ada_beta: float = 0.93,
        augment: dict[str, Any] | None = None,
        distance: str = "lpips",
        lpips_weights: str | None = None,
        lpips_pretrained: bool = True,
        lpips_resize: int | None = 224,
        sigma_data: float = 0.5,
        c_noise: str = "identity",
        num_classes: int | None = None,
        seed: int = 0,
        sampling_ema: float | None = None,
        shared_dropout: bool = False,
        objective: str = "consistency",
        curriculum: str | None = None,
        pseudo_huber_c: float | None = None,
        heun_steps: int = 18,
    ) -> None:
        super().__init__()
        # in the checkpoint; not logged: the loggers get the whole config (on_fit_start)
        self.save_hyperparameters(ignore=NOT_HYPERPARAMETERS, logger=False)
        self.schedule = with_curriculum(_options(schedule, ConsistencySchedule), curriculum)
        self.speed = _options(speed, SpeedOptions)
        adversarial = self.schedule.gan_ratio > 0
        r1 = (r1_gamma, r1_interval, ada_length)
        check_objective(objective, adversarial, heun_steps)
        check_arguments(
            iterations, optimizer, d_optimizer, discriminator, adversarial, warmup, r1, sampling_ema, c_noise
        )
        self.automatic_optimization = False
        self.generator = generator
        consistency = objective == "consistency"
        separate_teacher = consistency and self.schedule.teacher == "ema" and sampling_ema is not None
        self.target, self.teacher_ema = ema_copies(generator, separate_teacher)
        self.discriminator = discriminator_if(adversarial, discriminator)
        self._optimizer_factories = (optimizer, d_optimizer)
        self.augment_pipe = AugmentPipe(**(augment or {}))
        # diffusion training needs no consistency distance (and so no LPIPS weights)
        self.distance = (
            build_distance(distance, lpips_weights, lpips_pretrained, pseudo_huber_c, lpips_resize)
            if consistency
            else None
        )
        nets = [self.generator, self.target, self.teacher_ema, self.discriminator, self.distance]
        self.speed.apply(nets, self.discriminator, self.generator, self.distance, self.augment_pipe)
        self._init_training_state(r1_threshold)

    def _init_training_state(self, r1_threshold: float) -> None:
        """Training state that must survive a resume exactly (buffers: in every checkpoint), the host's
        copies of it, and the caches of the iteration."""
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.register_buffer("aug_p", torch.zeros(()))
        self.register_buffer("r1_ema", torch.full((), float(r1_threshold)))  # as the reference starts it
        self.bad = BadIterations()  # the divergence guard's counters, read by callbacks.DivergenceGuard
        self.k = 0  # ACT iterations done: the host copy of `iteration` (the schedule never reads the device)
        self.run_config: dict | None = None  # resolved training config (set by train()), kept in checkpoints
        self.run_history: list[dict] | None = None  # the launches that trained the run (set by train()), too
        self.wandb_id: str | None = None  # the run's W&B id from its checkpoint (set by train()), kept on
        self._grids = GridCache(self.schedule)
        self._ddp = PerNetworkDDP()
        self._aug_idle = False  # p known to be exactly 0 on the host: augmentation skipped (an exact no-op)
        self._aug_read = DeferredRead()
        self._compiled_r1: R1Pass | None = None  # model.speed.compile_r1: built at the first R1 pass
        self._last_r1: Tensor | float | None = None  # the latest R1 penalty (a float when restored)

    # -- the networks as functions of (x, sigma, y) ---------------------------------------------------
    def denoise(
        self, net: nn.Module, x: Tensor, sigma: Tensor, labels: Tensor | None, training: bool = False
    ) -> Tensor:
        """f(x, sigma, y) for `net` = generator or target (or a DDP wrapper of the generator); under
        diffusion training EDM's denoiser D(x, sigma, y): the same preconditioning at sigma_min = 0
        (docs/algorithm.md, section 12). `training`: in the training losses, whose preconditioning is the
        schedule's `train_sigma_min` (0 under ECT's curriculum, as ECT trains; sampling keeps sigma_min)."""
        h = self.hparams
        sigma_min = self.schedule.train_sigma_min if training else self.schedule.sigma_min
        precond = {
            "sigma_min": sigma_min if h.objective == "consistency" else 0.0,
            "sigma_data": h.sigma_data,
            "c_noise_kind": h.c_noise,
        }
        return consistency_function(net, x, sigma, labels, **precond)

    def teacher(self) -> nn.Module:
        """theta^- of the consistency loss: the generator itself (teacher=online, run without gradient),
        the separate EMA teacher (when `target` is a sampling EMA), or `target` (the reference)."""
        if self.schedule.teacher == "online":
            return self.generator
        return self.teacher_ema if self.teacher_ema is not None else self.target

    def _teacher_pass(self) -> Callable:
        """The teacher's f(x, sigma, y) for `pair_losses`. With `shared_dropout` it runs on a fork of
        the random state that the online pass then starts from (the teacher runs first), so both passes
        draw the same dropout masks. With `model.speed.bf16_target` it runs under bf16 autocast."""
        teacher = self.teacher()
        run = lambda x, s, y: self.denoise(teacher, x, s, y, training=True)  # noqa: E731
        run = in_bf16(run) if self.speed.bf16_target else run  # the target itself stays float32
        return on_forked_rng(run, self.device) if self.hparams.shared_dropout else run

    def on_fit_start(self) -> None:
        # the run's resolved config, for the loggers (hparams.yaml, the W&B run's config): recorded here,
        # once the data is prepared, so that a launch whose download fails leaves no run behind; with the
        # launch's environment (versions and commit: act_lightning.environment) and every launch's (a
        # resumed W&B run's config is updated: `environment` alone would hide what trained it before)
        env = latest_environment(self.run_history)
        extra = {"environment": env, "environments": launch_environments(self.run_history)} if env else {}
        for logger in self.loggers if self.run_config is not None else ():
            logger.log_hyperparams({**self.run_config, **extra})

    def on_train_start(self) -> None:
        self.k = int(self.iteration)
        if self.k >= self.hparams.iterations:  # a continuation that only makes the evaluation a stop left it
            self.trainer.should_stop = True
        self._aug_idle = self.speed.lazy_augment and float(self.aug_p) == 0
        restore_rng(getattr(self, "_restore_rng", None))
        self._restore_rng = None
        if isinstance(self._last_r1, float):  # restored from a checkpoint: onto the device once
            self._last_r1 = self._on_device(self._last_r1)
        # a continuation with other learning rates (resume_changes=[model.optimizer.lr]) trains at those
        nets = [self.generator, self.discriminator]
        set_learning_rates(self.optimizers(), self.lr_schedulers(), self._optimizer_factories, nets)
        set_foreach(self.optimizers(), self._optimizer_factories, nets)  # the launch's, not the saved run's
        nets = {"generator": self.generator, "discriminator": self.discriminator}
        self._ddp.setup(
            self.trainer.strategy.model, self.trainer.world_size, self.device, nets, [self.target]
        )

    # -- the iteration ------------------------------------------------------------------------------
    def training_step(self, batch: HalfBatch, batch_idx: int) -> None:
        self.speed.begin_step()
        seed_global_generators(self.hparams.seed, self.k, self.trainer.global_rank)  # dropout, per rank
        draws = self._draw(batch)
        optimizers = self.optimizers()  # [G's, D's], or G's alone when gan_ratio is 0
        opt_g, opt_d = optimizers if isinstance(optimizers, list) else (optimizers, None)
        if self.hparams.objective == "diffusion":
            logs, bad = self._diffusion_step(draws, opt_g)
            self._update_target(0.0)  # the target follows with sampling_ema (null: it is the generator)
            self.bad.record(guard_mask(bad, self.trainer.world_size), self.k)
            logs["train/skipped_updates"] = self.bad.total.float()
            return self._end_iteration(logs, draws.gen_size)
        logs, bad = self._generator_step(draws, opt_g)
        self._update_target(self.schedule.target_ema(draws.num_scales))
        if self.discriminator is not None:
            d_logs, d_bad = self._discriminator_step(draws, opt_d)
            logs, bad = {**logs, **d_logs}, {**bad, **d_bad}
        self.bad.record(guard_mask(bad, self.trainer.world_size), self.k)
        logs["train/skipped_updates"] = self.bad.total.float()
        self._end_iteration(logs, draws.gen_size)

    def _draw(self, batch: HalfBatch) -> Draws:
        """The levels of iteration k (N(k) and its grid; ECT's pairs; diffusion's levels), this device's
        share of the noise, and the augmentation."""
        h, rank, world = self.hparams, self.trainer.global_rank, self.trainer.world_size
        num_scales = None
        if h.objective == "diffusion":
            levels = edm_levels(self.schedule)
        elif self.schedule.continuous:
            levels = ect_levels(self.schedule, self.k, h.iterations)
        else:
            num_scales = self.schedule.num_scales(self.k, h.iterations)
            levels = grid_levels(*self._grids(num_scales, self.device))
        g = torch.Generator(self.device).manual_seed(mix_seed(h.seed, self.k))
        noise = draw_noise(batch, levels, g, rank, world)
        p_on_host = self._aug_read.poll()  # p after the last controller update, once it reached the host
        if p_on_host is not None:
            self._aug_idle = self.speed.lazy_augment and p_on_host == 0
        micro = split_micro(batch, noise)
        if self._aug_idle:  # p == 0 (known on the host): the pipeline would hand every image back untouched
            micro = [dataclasses.replace(mb, augment_gen=identity, augment_disc=identity) for mb in micro]
        else:  # each example's random numbers from its position in the global batch, per stream
            seed_of = lambda stream: mix_seed(h.seed, self.k, AUGMENT, stream)  # noqa: E731
            gen, fake, real = augmentation_streams(batch, seed_of, self.device, rank, world)
            pipe, p = self.augment_pipe, self.aug_p
            micro = [
                dataclasses.replace(
                    mb,
                    augment_gen=DrawnAugmentation(pipe, p, [g]),
                    augment_disc=DrawnAugmentation(pipe, p, [f, r]),
                )
                for mb, g, f, r in zip(micro, gen, fake, real, strict=True)
            ]
        return Draws(num_scales, micro, batch.gen.shape[0], batch.disc.shape[0])

    def _generator_step(self, draws: Draws, opt: torch.optim.Optimizer) -> tuple[Logs, Bad]:
        """The consistency loss plus the adversarial loss on the same prediction, accumulated over the
        micro-batches; one optimiser step (a zero-gradient one when something went non-finite)."""
        online = self._ddp.network("generator", self.generator)
        critic = None
        if self.discriminator is not None:
            self.toggle_optimizer(opt)  # D's parameters take no gradient from the generator's loss
            critic = Critic(self.discriminator, self.hparams.c_noise)
        opt.zero_grad(set_to_none=True)
        sums = torch.zeros(3, device=self.device)  # L_G, L_ct, L_adv summed over examples
        loss_bad = torch.zeros(2, dtype=torch.bool, device=self.device)
        for i, mb in enumerate(draws.micro):
            with self._ddp.sync("generator", last=i == len(draws.micro) - 1):
                losses = pair_losses(
                    mb.data.gen,
                    mb.data.gen_labels if self.hparams.num_classes else None,
                    mb.gen_hi,
                    mb.gen_lo,
                    mb.gen_z,
                    schedule=self.schedule,
                    online=lambda x, s, y: self.denoise(online, x, s, y, training=True),
                    target=self._teacher_pass(),
                    distance=self.distance,
                    critic=critic,
                    augment=mb.augment_gen,
                    num_scales=draws.num_scales,
                )
                objective = losses.objective()
                self.manual_backward(objective.sum() / draws.gen_size)
            sums += torch.stack(
                [objective.sum(), losses.consistency.sum(), losses.adversarial.sum()]
            ).detach()
            loss_bad |= ~torch.stack(
                [losses.consistency.isfinite().all(), losses.adversarial.isfinite().all()]
            )
        grads_bad = self._skip_if_nonfinite(self.generator, loss_bad.any())
        opt.step()
        if self.discriminator is not None:
            self.untoggle_optimizer(opt)
        means = sums / draws.gen_size
        logs: Logs = {
            "train/loss_g": means[0],
            "train/loss_ct": means[1],
            "train/target_ema": self._on_device(self.schedule.target_ema(draws.num_scales)),  # mu (0: online)
        }
        if draws.num_scales is not None:  # a grid curriculum (ECT's pairs have none)
            logs["train/num_scales"] = self._on_device(draws.num_scales)
        if self.discriminator is not None:
            logs["train/loss_adv"] = means[2]
        bad = {"train/loss_ct": loss_bad[0], "train/loss_adv": loss_bad[1], "generator gradients": grads_bad}
        return logs, bad

    def _discriminator_step(self, draws: Draws, opt: torch.optim.Optimizer) -> tuple[Logs, Bad]:
        """Fake half and real half (and lazy R1), accumulated over the micro-batches; one optimiser step.
        The R1 pass differentiates D twice: D then runs its classic attention, eagerly."""
        h = self.hparams
        with_r1 = h.r1_gamma > 0 and self.k % h.r1_interval == 0
        safe = getattr(self.discriminator, "double_backward_safe", None)
        with safe() if with_r1 and safe is not None else nullcontext():
            critic = self._ddp.network("discriminator", self.discriminator)
            self.toggle_optimizer(opt)
            opt.zero_grad(set_to_none=True)
            sums = torch.zeros(4, device=self.device)  # L_D, L_fake, L_real, R1 summed over example pairs
            loss_bad = torch.zeros(3, dtype=torch.bool, device=self.device)
            n_half = draws.disc_size // 2
            for i, mb in enumerate(draws.micro):
                fake_x, real_x = mb.data.disc.chunk(2)  # (B_D/2, C, H, W) each
                fake_y, real_y = (None, None) if not h.num_classes else mb.data.disc_labels.chunk(2)
                with self._ddp.sync("discriminator", last=i == len(draws.micro) - 1):
                    losses = discriminator_losses_at(
                        fake_x,
                        fake_y,
                        mb.fake_t,
                        mb.fake_z,
                        real_x,
                        real_y,
                        mb.real_t,
                        num_scales=draws.num_scales,
                        schedule=self.schedule,
                        online=lambda x, s, y: self.denoise(self.generator, x, s, y, training=True),
                        critic=Critic(critic, h.c_noise),
                        augment=mb.augment_disc,
                        r1_gamma=h.r1_gamma,
                        with_r1=with_r1,
                        joint=self.speed.joint_d_pass,
                        r1_pass=self._r1_pass() if with_r1 else None,
                    )
                    objective = losses.objective(self.schedule.gan_ratio)
                    self.manual_backward(objective.sum() / n_half)
                sums += torch.stack(
                    [objective.sum(), losses.fake.sum(), losses.real.sum(), losses.r1.sum()]
                ).detach()
                loss_bad |= ~torch.stack([t.isfinite().all() for t in (losses.fake, losses.real, losses.r1)])
            grads_bad = self._skip_if_nonfinite(self.discriminator, loss_bad.any())
            opt.step()
            self.untoggle_optimizer(opt)
        means = sums / n_half
        logs: Logs = {"train/loss_d": means[0], "train/aug_p": self.aug_p}
        if with_r1:
            self._update_augmentation(means[3], draws)
            self._last_r1 = means[3]
        if self._last_r1 is not None:
            # the R1 penalty of the latest R1 iteration (every r1_interval), at every iteration: what
            # Lightning logged anyway (it repeats a key's last value), now also after a resume, which
            # restores it from the checkpoint, so a resumed run's rows are the uninterrupted run's
            logs["train/r1"] = self._last_r1
        bad = dict(zip(("train/loss_fake", "train/loss_real", "train/r1"), loss_bad))
        return logs, {**bad, "discriminator gradients": grads_bad}

    def _r1_pass(self) -> R1Pass | None:
        """The R1 iteration's D passes and input gradient as one compiled graph (model.speed.compile_r1; D
        itself runs uncompiled and classic then, inside this graph), or None: eagerly. On several devices
        eagerly too: D runs in its DDP wrapper there, whose gradient hooks are not traced into the graph."""
        if not self.speed.compile_r1 or self.trainer.world_size > 1:
            return None
        if self._compiled_r1 is None:
            critic = Critic(self.discriminator, self.hparams.c_noise)
            traceable = partial(logits_and_r1_gradient_traceable, critic)
            self._compiled_r1 = torch.compile(traceable, **self.speed.compile_options())
        return self._compiled_r1

    def _diffusion_step(self, draws: Draws, opt: torch.optim.Optimizer) -> tuple[Logs, Bad]:
        """EDM's denoising loss (`losses.denoising_losses`) on the generator half, accumulated over the
        micro-batches; one optimiser step (a zero-gradient one when something went non-finite)."""
        online = self._ddp.network("generator", self.generator)
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        loss_bad = torch.zeros((), dtype=torch.bool, device=self.device)
        for i, mb in enumerate(draws.micro):
            with self._ddp.sync("generator", last=i == len(draws.micro) - 1):
                loss = denoising_losses(
                    mb.data.gen,
                    mb.data.gen_labels if self.hparams.num_classes else None,
                    mb.gen_hi,
                    mb.gen_z,
                    denoise=lambda x, s, y: self.denoise(online, x, s, y),
                    sigma_data=self.hparams.sigma_data,
                )
                self.manual_backward(loss.sum() / draws.gen_size)
            total += loss.sum().detach()
            loss_bad |= ~loss.isfinite().all()
        grads_bad = self._skip_if_nonfinite(self.generator, loss_bad)
        opt.step()
        logs: Logs = {"train/loss_dsm": total / draws.gen_size}
        return logs, {"train/loss_dsm": loss_bad, "generator gradients": grads_bad}

    def _update_augmentation(self, r1: Tensor, draws: Draws) -> None:
        """The controller sees the R1 statistic of the global batch (the mean over all devices) and the
        global batch size B (both halves), so every rank moves p the same way."""
        h = self.hparams
        r1 = self.trainer.strategy.reduce(r1, reduce_op="mean")
        p, r1_ema = r1_controller_update(
            self.aug_p,
            self.r1_ema,
            r1,  # a non-finite R1 (the guard's business) leaves the controller as it is
            beta=h.ada_beta,
            threshold=h.r1_threshold,
            batch_size=(draws.gen_size + draws.disc_size) * self.trainer.world_size,
            interval=h.r1_interval,
            ada_length=h.ada_length,
        )
        self.aug_p.copy_(p)
        self.r1_ema.copy_(r1_ema)
        self._aug_idle = False  # until the new p reaches the host (no waiting for it here)
        self._aug_read.submit(self.aug_p)

    def _on_device(self, value: float) -> Tensor:
        """A host number as a device scalar, filled in place: Lightning would copy a float to the device,
        a copy from pageable memory that waits for the device. Float64: logged as exactly as the float."""
        return torch.full((), float(value), dtype=torch.float64, device=self.device)

    def _skip_if_nonfinite(self, net: nn.Module, loss_bad: Tensor) -> Tensor:
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None  # fp16 loss scaling
        return skip_if_nonfinite(net, loss_bad, scaled, self.trainer.world_size)

    def _end_iteration(self, logs: Logs, batch_size: int) -> None:
        """Warm-up schedulers, the iteration counter, the logs; stops the trainer after iteration K."""
        schedulers = self.lr_schedulers()
        for s in schedulers if isinstance(schedulers, list) else [schedulers]:
            s.step()
        self.k += 1
        self.iteration.fill_(self.k)
        logs["step"] = self._on_device(self.k)  # loggers' x-axis: ACT iterations, not optimiser steps
        self._mean_over_devices(logs)
        if self.speed.sync_logs:  # the baseline's way: every value read off the device at once (waits for it)
            logs = {k: float(v) for k, v in logs.items()}
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=batch_size)
        if self.k >= self.hparams.iterations:
            self.trainer.should_stop = True

    def _mean_over_devices(self, logs: Logs) -> None:
        """The losses of the global batch under DDP: each rank's are means over its shard of the global
        batch (equal shards), so their mean over ranks is the global batch's, which one device logs; in one
        collective, with no wait for the device. The other values are alike on every rank already (R1's
        statistic is reduced where it is computed; p, N(k), mu are the run's)."""
        names = [k for k in logs if k.startswith("train/loss_")]
        if self.trainer.world_size == 1 or not names:
            return
        stacked = torch.stack([torch.as_tensor(logs[k], device=self.device).float() for k in names])
        logs.update(zip(names, self.trainer.strategy.reduce(stacked, reduce_op="mean").unbind(), strict=True))

    # -- the target EMA -----------------------------------------------------------------------------
    def _update_target(self, decay: float) -> None:
        """After the generator's step: theta^- <- mu * theta^- + (1 - mu) * theta with the teacher's mu;
        with `sampling_ema` set, `target` follows the generator with that decay instead (and an EMA
        teacher, `teacher_ema`, with mu)."""
        sampling, foreach = self.hparams.sampling_ema, self.speed.foreach_ema
        if self.teacher_ema is not None:
            ema_update(self.teacher_ema, self.generator, decay, foreach)
        ema_update(self.target, self.generator, decay if sampling is None else sampling, foreach)

    # -- optimisers --------------------------------------------------------------------------------
    def configure_optimizers(self):
        warmup = self.hparams.warmup
        ramp = lambda k: min(1.0, (k + 1) / warmup)  # noqa: E731  linear warm-up, in iterations
        make_g, make_d = self._optimizer_factories
        optimizers = [make_g(self.generator.parameters())]
        if self.discriminator is not None:
            optimizers.append(make_d(self.discriminator.parameters()))
        return optimizers, [torch.optim.lr_scheduler.LambdaLR(o, ramp) for o in optimizers]

    # -- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # a launch without the W&B logger keeps the run's id, which its next launch with it continues
        wandb_id = next(
            (str(lg.version) for lg in self.loggers if isinstance(lg, WandbLogger) and lg.version),
            self.wandb_id,
        )
        prepare_training_checkpoint(checkpoint, self.run_config, wandb_id, self.run_history)
        names = self._label_names()
        if names is not None:  # what each class index is (a folder's class sub-folders, in name order)
            checkpoint["act_label_names"] = names
        # saved before on_train_start put the checkpoint's random state back (the best.ckpt of an evaluation
        # a stop deferred): the run's state at this iteration is that one, not the freshly seeded one
        if getattr(self, "_restore_rng", None) is not None:
            checkpoint["act_rng"] = self._restore_rng
        if self._last_r1 is not None:
            checkpoint["act_last_r1"] = float(self._last_r1)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # The frozen LPIPS network is no part of a checkpoint: it keeps the weights it was built with.
        own = {k: v for k, v in self.state_dict().items() if k.startswith("distance.")}
        checkpoint["state_dict"].update(own)
        self.k = checkpoint_iteration(checkpoint)
        self._restore_rng = checkpoint.get("act_rng")
        last_r1 = checkpoint.get("act_last_r1")  # (a checkpoint from before it was kept: none until R1)
        self._last_r1 = None if last_r1 is None else float(last_r1)
        check_label_names(checkpoint.get("act_label_names"), self._label_names())

    def _label_names(self) -> list[str] | None:
        """The training data's class names (`label_names`), when a trainer with such data is attached."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return datamodule.label_names() if hasattr(datamodule, "label_names") else None

    # -- sampling ----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        noise: Tensor,
        labels: Tensor | None = None,
        net: nn.Module | None = None,
        taus: list[float] | None = None,
        generator: torch.Generator | None = None,
        step_noise: Callable[[int], Tensor] | None = None,
    ) -> Tensor:
        """One-step samples f_{theta^-}(sigma_max z, sigma_max, y) in [-1, 1]; with `taus`, the noise levels
        of the steps after that first one (decreasing, each below sigma_max; e.g. [0.821] for two steps:
        the convention of the sample command and of `load_generator(...).sample`), multistep sampling
        (`samplers.multistep`), later steps' noise from `generator` or `step_noise(step)`. A diffusion
        model (model.objective=diffusion) samples with EDM's Heun sampler over `model.heun_steps` Karras
        levels instead (2 heun_steps - 1 evaluations, deterministic; no taus). The
        network runs in eval mode (no dropout) and eagerly when it is compiled: each new batch size would
        compile another graph (and under CUDA graphs hold another memory pool) for a few forwards. A
        class-conditional model takes one class index per image (`labels`: a (B,) tensor, list or numpy
        array) or one for all (an int), an unconditional one none. `noise` is (B, C, H, W) at the model's
        image size, in any float dtype (taken in the weights')."""
        net = self.target if net is None else net
        noise = check_noise(noise, net)
        labels = self.check_labels(labels, len(noise), noise.device)
        diffusion = self.hparams.objective == "diffusion"
        taus = [float(self.schedule.sigma_max), *self.check_later_levels(taus)]
        was_training = net.training
        net.eval()
        try:
            with eager_forward(net):
                denoise = lambda x, sigma: self.denoise(net, x, sigma, labels)  # noqa: E731
                if diffusion:
                    levels = self.schedule.sigmas(self.hparams.heun_steps).flip(0).tolist()
                    return heun(denoise, noise, levels)
                return multistep(denoise, noise, taus, self.schedule.sigma_min, generator, step_noise)
        finally:
            net.train(was_training)

    def check_labels(self, labels, batch: int, device: torch.device) -> Tensor | None:
        """`sample`'s labels as a (B,) tensor on `device` (`checks.class_labels_for`): present for a
        class-conditional model, absent for an unconditional one. Their range is checked where they are
        on the CPU (the Python API's); on a device that would wait for it, the callers check it (the
        commands do)."""
        on_cpu = not isinstance(labels, Tensor) or labels.device.type == "cpu"
        classes = self.hparams.get("num_classes")
        return class_labels_for(labels, classes, batch, device, key="labels", read=on_cpu)

    def check_later_levels(self, taus: list[float] | None) -> list[float]:
        """`sample`'s taus, the levels after the first step: each below sigma_max (`samplers.later_levels`),
        and none for a diffusion model (the sample command checks them before it makes its folder)."""
        given = taus is not None and not (isinstance(taus, (list, tuple)) and not taus)
        if self.hparams.objective == "diffusion" and given:
            raise ValueError(
                "a diffusion model (model.objective=diffusion) samples with EDM's Heun sampler over "
                f"model.heun_steps={self.hparams.heun_steps} levels, not in steps at taus={taus}: "
                "sample it without taus (evaluate: samplers=[1-step])"
            )
        return later_levels(taus, float(self.schedule.sigma_max))

    def extra_repr(self) -> str:
        return f"iteration={self.k}/{self.hparams.iterations}"

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Not Lightning's: the module takes its networks built, which the checkpoint's config builds.
        `act_lightning.checkpoints.load_model(path)` does, and returns (model, run config, checkpoint)."""
        raise TypeError(
            f"ACTModule.load_from_checkpoint({str(checkpoint_path)!r}): the module takes its networks built, "
            "from the run's config; load a checkpoint with "
            "`model, run, checkpoint = act_lightning.checkpoints.load_model(path)`"
        )


def check_label_names(saved: list | None, current: list[str] | None) -> None:
    """A resumed run's class names (the checkpoint's `act_label_names`) against its data's now: a class
    folder renamed, added or removed since would give its images another class index without a word."""
    if saved is None or current is None or list(saved) == list(current):
        return
    raise DataError(
        f"data.root: its class sub-folders are now {', '.join(current)}; this run was trained with "
        f"{', '.join(saved)} (class k is the k-th in that order): name the folders as they were, or start a "
        "new run"
    )
