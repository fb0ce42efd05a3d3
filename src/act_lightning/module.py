"""ACTModule: owns the generator, its target EMA and the discriminator, and runs one ACT iteration (one
generator update, then one discriminator update) per batch (docs/algorithm.md, section 3).

The math lives in pure functions (`losses.generator_losses`, `losses.discriminator_losses`, the
`ConsistencySchedule`); this module does what is Lightning's: which network trains, backward, optimiser
steps, the target EMA, the iteration counter, the augmentation controller's state, and logging.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from act_lightning.augment import AugmentPipe, r1_controller_update
from act_lightning.consistency import ConsistencySchedule, noise_conditioning, sample_indices
from act_lightning.data.base import HalfBatch
from act_lightning.losses import DISTANCES, build_distance, discriminator_losses, generator_losses
from act_lightning.nn import consistency_function
from act_lightning.readback import DeferredRead
from act_lightning.samplers import multistep

OptimizerFactory = Callable[..., torch.optim.Optimizer]  # a Hydra `_partial_` optimizer: params -> optimizer

# The terms the divergence guard watches, as bits of `bad_terms` (which went non-finite first).
GUARDED_TERMS = (
    "train/loss_ct",
    "train/loss_adv",
    "generator gradients",
    "train/loss_fake",
    "train/loss_real",
    "train/r1",
    "discriminator gradients",
)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_optimizer(key: str, factory: OptimizerFactory | None) -> None:
    """Builds the optimiser once over a dummy parameter, so a bad learning rate or beta fails now,
    naming its key, instead of after the data and the loggers have started."""
    if not callable(factory):
        raise ValueError(
            f"{key} must be a Hydra partial of a torch.optim optimizer (_partial_: true), got {factory!r}"
        )
    lr = getattr(factory, "keywords", {}).get("lr")
    if lr is not None and not lr > 0:  # torch accepts 0, which would train nothing
        raise ValueError(f"{key}.lr must be positive, got {lr}")
    try:
        factory([nn.Parameter(torch.zeros(1))])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{key}: {err}") from err


def nonfinite_tensors(state_dict: dict[str, Tensor]) -> str:
    """The names of a state dict's tensors that hold NaN or inf ('a, b, c and 4 more tensors'), or ''.
    Checkpoints are refused with it, when written (training) and when read (evaluate)."""
    names = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    more = f" and {len(names) - 5} more tensors" if len(names) > 5 else ""
    return ", ".join(names[:5]) + more


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, iteration, stream, rank): reproducible, no state to save."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part) + 1) % (2**63 - 1)
    return value


def _describe_terms(mask: int) -> str:
    return ", ".join(name for bit, name in enumerate(GUARDED_TERMS) if mask >> bit & 1) or "unknown"


class ACTModule(L.LightningModule):
    """Adversarial Consistency Training.

    `generator` and `discriminator` are backbones with the signature `(x, c_noise, class_labels)`; the
    preconditioning of docs/algorithm.md section 1 is applied here. `discriminator` may be a factory (a
    Hydra `_partial_`), called only when `gan_ratio > 0`, so plain consistency training never builds one.
    `optimizer` and `d_optimizer` are factories `params -> torch.optim.Optimizer` (Hydra partials).
    `iterations` is K: the curriculum follows this module's own counter `k` (also the buffer `iteration`,
    so it is in every checkpoint), never `trainer.global_step`, which counts two optimiser steps per
    iteration. Every batch is one iteration; a batch split into micro-batches (`HalfBatch.micro`)
    accumulates gradients over them before each optimiser step.

    The noise of an iteration (indices j and noise z) is drawn for the *global* batch from a generator
    seeded by (seed, k), and each device takes its share: one device with the global batch, two with half
    each, or one with gradient accumulation see the same examples with the same noise, and a resumed run
    needs no random state to continue exactly.
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module | Callable[[], nn.Module] | None,
        iterations: int,
        optimizer: OptimizerFactory,
        d_optimizer: OptimizerFactory | None = None,
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
        augment: dict[str, Any] | None = None,
        distance: str = "lpips",
        lpips_weights: str | None = None,
        lpips_pretrained: bool = True,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        rho: float = 7.0,
        c_noise: str = "identity",
        num_classes: int | None = None,
        seed: int = 0,
        curriculum: str = "sqrt",
        noise_sampling: str = "uniform",
        p_mean: float = -1.1,
        p_std: float = 2.0,
        teacher: str = "ema",
        sampling_ema: float | None = None,
        shared_dropout: bool = False,
        channels_last: bool = True,
        compile: bool | str = False,
        fast_attention: bool = True,
        foreach_ema: bool = True,
        joint_d_pass: bool = True,
        lazy_augment: bool = True,
        sync_logs: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["generator", "discriminator", "optimizer", "d_optimizer"])
        _check(iterations >= 1, f"iterations must be a positive integer (ACT iterations K), got {iterations}")
        _check_optimizer("model.optimizer", optimizer)
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
        _check(
            sampling_ema is None or 0 <= sampling_ema < 1,
            f"model.sampling_ema must be null (sample with the teacher) or in [0, 1), got {sampling_ema}",
        )
        if gan_ratio > 0:
            _check(discriminator is not None, "model.gan_ratio > 0 needs a model.discriminator")
            _check_optimizer("model.d_optimizer", d_optimizer)

        self.automatic_optimization = False
        self.schedule = ConsistencySchedule(
            sigma_min, sigma_max, rho, bins_min, bins_max, mu0, gan_ratio, mid_weight,
            curriculum, noise_sampling, p_mean, p_std, teacher,
        )  # fmt: skip
        self.generator = generator
        # `target` is the network that samples and is evaluated (and exported): theta^-, the EMA teacher,
        # as in the reference; with `sampling_ema` set, an EMA of its own decay. An EMA teacher that no
        # longer samples is then `teacher_ema`; the online teacher is the generator itself.
        self.target = copy.deepcopy(generator).requires_grad_(False)
        self.teacher_ema = (
            copy.deepcopy(generator).requires_grad_(False)
            if teacher == "ema" and sampling_ema is not None
            else None
        )
        if gan_ratio > 0 and not isinstance(discriminator, nn.Module):
            discriminator = discriminator()  # a factory: built only when it trains
        self.discriminator = discriminator if gan_ratio > 0 else None
        self._optimizer_factories = (optimizer, d_optimizer)
        self.augment_pipe = AugmentPipe(**(augment or {}))
        self.distance = build_distance(distance, lpips_weights, lpips_pretrained)
        self._speed_up(channels_last, compile, fast_attention)

        # Training state that must survive a resume exactly: buffers are in every checkpoint.
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.register_buffer("aug_p", torch.zeros(()))
        self.register_buffer("r1_ema", torch.full((), float(r1_threshold)))  # as the reference starts it
        # The divergence guard's counters (docs/algorithm.md): device tensors, read by a callback.
        self.register_buffer("bad_streak", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("bad_total", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("bad_since", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("bad_terms", torch.zeros((), dtype=torch.long), persistent=False)
        self.k = (
            0  # ACT iterations done: the host copy of `iteration`, so the schedule never reads the device
        )
        self.run_config: dict | None = None  # resolved training config (set by train()), kept in checkpoints
        self._sigma_cache: dict[tuple[int, torch.device], Tensor] = {}
        self._probs_cache: dict[tuple[int, torch.device], Tensor] = {}
        self._ddp: dict[str, DistributedDataParallel] = {}  # per-network DDP wrappers (multi-process only)
        self._outer_reduces = False  # whether Lightning's whole-module DDP wrapper reduces the gradients
        # Whether p is known to be exactly 0 on the host, so augmentation is skipped (an exact no-op then).
        self._aug_idle = False
        self._aug_read = DeferredRead()

    def _speed_up(self, channels_last: bool, compile: bool | str, fast_attention: bool) -> None:
        """The options that change how the networks run, not what they compute (docs/performance.md)."""
        nets = [self.generator, self.target, self.teacher_ema, self.discriminator, self.distance]
        nets = [n for n in nets if isinstance(n, nn.Module)]
        if channels_last:  # NHWC weights: cuDNN's and oneDNN's convolutions then run NHWC throughout
            for net in nets:
                net.to(memory_format=torch.channels_last)
        if fast_attention and hasattr(self.discriminator, "use_fast_attention"):
            self.discriminator.use_fast_attention(True)
        if compile:  # in place, so state-dict keys stay as they are; a string names the backend
            backend = "inductor" if compile is True else str(compile)
            for net in nets:
                net.compile(backend=backend)

    # -- the networks as functions of (x, sigma, y) ---------------------------------------------------
    def denoise(self, net: nn.Module, x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        """f(x, sigma, y) for `net` = generator or target (or a DDP wrapper of the generator)."""
        h = self.hparams
        return consistency_function(
            net, x, sigma, labels, sigma_min=h.sigma_min, sigma_data=h.sigma_data, c_noise_kind=h.c_noise
        )

    def critic(self, net: nn.Module, x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        """D(x, c_noise(sigma), y) -> (B,): D sees the same noise conditioning as the generator."""
        return net(x, noise_conditioning(sigma, self.hparams.c_noise), labels)

    def _sigmas(self, num_scales: int) -> Tensor:
        key = (num_scales, self.device)
        if key not in self._sigma_cache:
            self._sigma_cache[key] = self.schedule.sigmas(num_scales).to(self.device)
        return self._sigma_cache[key]

    def _index_probs(self, num_scales: int) -> Tensor | None:
        """p(j) on the grid of N scales (None: uniform), cached per N like the grid."""
        if self.schedule.noise_sampling == "uniform":
            return None
        key = (num_scales, self.device)
        if key not in self._probs_cache:
            self._probs_cache[key] = self.schedule.index_probs(self.schedule.sigmas(num_scales)).to(
                self.device
            )
        return self._probs_cache[key]

    def teacher(self) -> nn.Module:
        """theta^- of the consistency loss: the generator itself (teacher=online, run without gradient),
        the separate EMA teacher (when `target` is a sampling EMA), or `target` (the reference)."""
        if self.hparams.teacher == "online":
            return self.generator
        return self.teacher_ema if self.teacher_ema is not None else self.target

    def _teacher_pass(self, online: nn.Module) -> Callable:
        """The teacher's f(x, sigma, y) for `generator_losses`. With `shared_dropout` it runs on a fork of
        the random state that the online pass then starts from, so both passes draw the same dropout masks
        (the teacher runs first in `generator_losses`)."""
        teacher = self.teacher()
        if not self.hparams.shared_dropout:
            return lambda x, s, y: self.denoise(teacher, x, s, y)

        def run(x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                return self.denoise(teacher, x, sigma, labels)

        return run

    def _labels(self, labels: Tensor) -> Tensor | None:
        return labels if self.hparams.num_classes else None

    # -- distributed data parallel, one wrapper per network ------------------------------------------
    def on_train_start(self) -> None:
        self.k = int(self.iteration)
        self._aug_idle = self.hparams.lazy_augment and float(self.aug_p) == 0
        rng = getattr(self, "_restore_rng", None)
        if rng is not None:
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            self._restore_rng = None
        outer = self.trainer.strategy.model
        # strategy=ddp_find_unused_parameters_true: Lightning's wrapper of the whole module reduces the
        # gradients, searching each backward's graph for the parameters it used (the classic way, slower).
        self._outer_reduces = isinstance(outer, DistributedDataParallel) and outer.find_unused_parameters
        world = self.trainer.world_size
        if world > 1 and dist.is_available() and dist.is_initialized() and not self._outer_reduces:
            # Each update touches one network only, so each network gets its own DDP wrapper: the gradient
            # all-reduce then expects exactly the parameters that receive gradients, and no search for
            # unused parameters is needed. The target EMA is no DDP module: it is made equal once here and
            # then follows identical generators on every rank.
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            nets = {"generator": self.generator, "discriminator": self.discriminator}
            self._ddp = {
                name: DistributedDataParallel(net, device_ids=device_ids)
                for name, net in nets.items()
                if net is not None
            }
            for tensor in [*self.target.parameters(), *self.target.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def _trained(self, name: str) -> nn.Module:
        """The network to run when it trains: its DDP wrapper under DDP, itself otherwise."""
        return self._ddp.get(name) or getattr(self, name)

    @contextmanager
    def _backward_context(self, name: str, sync: bool) -> Iterator[None]:
        """Around a micro-batch's forward and backward: gradients are all-reduced on the last micro-batch
        only (`sync`). Lightning's own DDP wrapper of this whole module (strategy `ddp`) would reduce every
        parameter and wait for those of the network that did not train: it is kept out of the way, and
        the trained network's own wrapper reduces its gradients."""
        with ExitStack() as stack:
            outer = self.trainer.strategy.model
            if isinstance(outer, DistributedDataParallel) and (not self._outer_reduces or not sync):
                stack.enter_context(outer.no_sync())
            inner = self._ddp.get(name)
            if inner is not None and not sync:
                stack.enter_context(inner.no_sync())
            yield

    # -- the iteration ------------------------------------------------------------------------------
    def _draw_noise(self, batch: HalfBatch, num_scales: int) -> dict[str, Tensor]:
        """j and z of the global batch, then this device's share (its rank's contiguous slice)."""
        rank, world = self.trainer.global_rank, self.trainer.world_size
        n_gen, n_half = batch.gen.shape[0], batch.disc.shape[0] // 2
        g = torch.Generator(self.device).manual_seed(_mix_seed(self.hparams.seed, self.k))
        shape = batch.gen.shape[1:]
        probs = self._index_probs(num_scales)
        draws = {
            "gen_j": sample_indices(n_gen * world, num_scales, self.device, g, probs),
            "gen_z": torch.randn((n_gen * world, *shape), device=self.device, generator=g),
            "fake_j": sample_indices(n_half * world, num_scales, self.device, g, probs),
            "fake_z": torch.randn((n_half * world, *shape), device=self.device, generator=g),
            "real_j": sample_indices(n_half * world, num_scales, self.device, g, probs),
        }
        if world == 1:
            return draws
        return {k: v.chunk(world)[rank].clone() for k, v in draws.items()}  # free the other ranks' shares

    def training_step(self, batch: HalfBatch, batch_idx: int) -> None:
        h = self.hparams
        num_scales = self.schedule.num_scales(self.k, h.iterations)
        sigmas = self._sigmas(num_scales)
        optimizers = self.optimizers()
        opt_g, opt_d = (optimizers, None) if not isinstance(optimizers, list) else optimizers
        micro = batch.micro_batches()
        draws = self._draw_noise(batch, num_scales)
        parts = {k: v.chunk(len(micro)) for k, v in draws.items()}
        aug_generator = torch.Generator(self.device).manual_seed(
            _mix_seed(h.seed, self.k, 1, self.trainer.global_rank)
        )

        p_on_host = self._aug_read.poll()  # p after the last controller update, once it reached the host
        if p_on_host is not None:
            self._aug_idle = h.lazy_augment and p_on_host == 0

        def augment(images: Tensor) -> Tensor:
            if self._aug_idle:  # p == 0: the pipeline would hand every image back untouched
                return images
            return self.augment_pipe(images, self.aug_p, generator=aug_generator)

        # ---- generator update: consistency loss + adversarial loss on the same prediction ----
        online = self._trained("generator")
        critic = None
        if self.discriminator is not None:
            self.toggle_optimizer(opt_g)  # D's parameters take no gradient from the generator's loss
            critic = lambda x, s, y: self.critic(self.discriminator, x, s, y)  # noqa: E731
        opt_g.zero_grad(set_to_none=True)
        sums = torch.zeros(3, device=self.device)  # L_G, L_ct, L_adv summed over examples
        bad = torch.zeros(3, dtype=torch.bool, device=self.device)
        n_gen = batch.gen.shape[0]
        for i, mb in enumerate(micro):
            with self._backward_context("generator", sync=i == len(micro) - 1):
                losses = generator_losses(
                    mb.gen,
                    self._labels(mb.gen_labels),
                    parts["gen_j"][i],
                    parts["gen_z"][i],
                    sigmas=sigmas,
                    schedule=self.schedule,
                    online=lambda x, s, y: self.denoise(online, x, s, y),
                    target=self._teacher_pass(online),
                    distance=self.distance,
                    critic=critic,
                    augment=augment,
                )
                objective = losses.objective()
                self.manual_backward(objective.sum() / n_gen)
            sums += torch.stack(
                [objective.sum(), losses.consistency.sum(), losses.adversarial.sum()]
            ).detach()
            bad[:2] |= ~torch.stack(
                [losses.consistency.isfinite().all(), losses.adversarial.isfinite().all()]
            )
        bad[2] = self._guard_gradients(self.generator, loss_bad=bad[:2].any())
        opt_g.step()
        if self.discriminator is not None:
            self.untoggle_optimizer(opt_g)
        target_ema = self.schedule.target_ema(num_scales)
        self._update_target(target_ema)
        means = sums / n_gen
        logs: dict[str, Any] = {
            "train/loss_g": means[0],
            "train/loss_ct": means[1],
            "train/num_scales": float(num_scales),
            "train/target_ema": target_ema,  # the teacher's mu (0: the online teacher)
        }

        # ---- discriminator update: fake half and real half, lazy R1 ----
        bad_d = torch.zeros(4, dtype=torch.bool, device=self.device)
        if self.discriminator is not None:
            logs["train/loss_adv"] = means[2]
            logs.update(self._discriminator_update(batch, micro, parts, sigmas, opt_d, augment, bad_d))

        self._record_bad_iteration(torch.cat([bad, bad_d]))
        logs["train/skipped_updates"] = self.bad_total.float()
        self._step_schedulers()
        self.k += 1
        self.iteration.fill_(self.k)
        logs["step"] = float(self.k)  # loggers' x-axis: ACT iterations, not optimiser steps (two each)
        if h.sync_logs:  # the baseline's way: every value read off the device at once (waits for it)
            logs = {k: float(v) for k, v in logs.items()}
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=n_gen)
        if self.k >= h.iterations:
            self.trainer.should_stop = True

    def _discriminator_update(self, batch, micro, parts, sigmas, opt_d, augment, bad) -> dict[str, Any]:
        h = self.hparams
        with_r1 = h.r1_gamma > 0 and self.k % h.r1_interval == 0
        if with_r1 and hasattr(self.discriminator, "double_backward_safe"):
            with (
                self.discriminator.double_backward_safe()
            ):  # classic attention, eager: R1 differentiates twice
                return self._discriminator_step(batch, micro, parts, sigmas, opt_d, augment, bad, with_r1)
        return self._discriminator_step(batch, micro, parts, sigmas, opt_d, augment, bad, with_r1)

    def _discriminator_step(
        self, batch, micro, parts, sigmas, opt_d, augment, bad, with_r1
    ) -> dict[str, Any]:
        h = self.hparams
        critic = self._trained("discriminator")
        self.toggle_optimizer(opt_d)
        opt_d.zero_grad(set_to_none=True)
        sums = torch.zeros(4, device=self.device)  # L_D, L_fake, L_real, R1 summed over example pairs
        n_half = batch.disc.shape[0] // 2
        for i, mb in enumerate(micro):
            fake_x, real_x = mb.disc.chunk(2)  # (B_D/2, C, H, W) each
            fake_y, real_y = (None, None) if not h.num_classes else mb.disc_labels.chunk(2)
            with self._backward_context("discriminator", sync=i == len(micro) - 1):
                losses = discriminator_losses(
                    fake_x,
                    fake_y,
                    parts["fake_j"][i],
                    parts["fake_z"][i],
                    real_x,
                    real_y,
                    parts["real_j"][i],
                    sigmas=sigmas,
                    schedule=self.schedule,
                    online=lambda x, s, y: self.denoise(self.generator, x, s, y),
                    critic=lambda x, s, y: self.critic(critic, x, s, y),
                    augment=augment,
                    r1_gamma=h.r1_gamma,
                    with_r1=with_r1,
                    joint=h.joint_d_pass,
                )
                objective = losses.objective(h.gan_ratio)
                self.manual_backward(objective.sum() / n_half)
            terms = torch.stack([objective.sum(), losses.fake.sum(), losses.real.sum(), losses.r1.sum()])
            sums += terms.detach()
            bad[:3] |= ~torch.stack([t.isfinite().all() for t in (losses.fake, losses.real, losses.r1)])
        bad[3] = self._guard_gradients(self.discriminator, loss_bad=bad[:3].any())
        opt_d.step()
        self.untoggle_optimizer(opt_d)
        means = sums / n_half
        logs = {"train/loss_d": means[0], "train/aug_p": self.aug_p}
        if with_r1:
            # The controller sees the R1 statistic of the global batch (the mean over all devices) and the
            # global batch size B (both halves), so every rank moves p the same way.
            r1 = self.trainer.strategy.reduce(means[3], reduce_op="mean")
            p, r1_ema = r1_controller_update(
                self.aug_p,
                self.r1_ema,
                torch.nan_to_num(r1, nan=0.0),  # a bad R1 is the guard's business, not the controller's
                beta=h.ada_beta,
                threshold=h.r1_threshold,
                batch_size=(batch.gen.shape[0] + batch.disc.shape[0]) * self.trainer.world_size,
                interval=h.r1_interval,
                ada_length=h.ada_length,
            )
            self.aug_p.copy_(p)
            self.r1_ema.copy_(r1_ema)
            self._aug_idle = False  # until the new p reaches the host (no waiting for it here)
            self._aug_read.submit(self.aug_p)
            logs["train/r1"] = means[3]
        return logs

    # -- the divergence guard: a non-finite loss or gradient never reaches weights or optimiser state ---
    def _guard_gradients(self, net: nn.Module, loss_bad: Tensor) -> Tensor:
        """Turns the coming update of `net` into a zero-gradient one when a loss or gradient is not
        finite, without a host synchronisation. With the paper's beta1 = 0 the weights then stay as they
        are; the optimiser sees a zero gradient. Under fp16 loss scaling (`16-mixed`) overflowing scaled
        gradients are the scaler's business (it skips that step and lowers the scale): only the losses are
        checked there. Returns whether the gradients themselves were non-finite."""
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), dtype=torch.bool, device=self.device)
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        if scaled:
            grads_bad = torch.zeros((), dtype=torch.bool, device=self.device)
        else:
            norms = torch._foreach_norm(grads, math.inf)  # max |g| per tensor: NaN and inf propagate
            grads_bad = ~torch.stack(norms).isfinite().all()
        bad = grads_bad | loss_bad
        if dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1:
            # a loss can go bad on one rank only: all ranks skip together and their weights stay equal
            bad = bad.to(torch.int32)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            bad = bad.bool()
        if not grads[0].is_cuda:  # nothing queued on the CPU: reading the flag costs no waiting
            if bool(bad):
                torch._foreach_zero_(grads)
            return grads_bad
        keep = (~bad).to(grads[0].dtype)
        for g in grads:
            torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
        torch._foreach_mul_(grads, keep)
        return grads_bad

    def _record_bad_iteration(self, bad: Tensor) -> None:
        """Counts bad iterations (device tensors; `callbacks.DivergenceGuard` reads them)."""
        weights = 2 ** torch.arange(bad.numel(), device=bad.device)
        mask = (bad.long() * weights).sum()
        is_bad = mask > 0
        streak = torch.where(is_bad, self.bad_streak + 1, torch.zeros_like(self.bad_streak))
        first = streak == 1  # the first bad iteration of a streak names what went wrong
        self.bad_since.copy_(torch.where(first, torch.full_like(self.bad_since, self.k), self.bad_since))
        self.bad_terms.copy_(torch.where(first, mask, self.bad_terms))
        self.bad_streak.copy_(streak)
        self.bad_total.add_(is_bad.long())

    def divergence_report(self) -> str:
        """What the guard stops the run with (reads the device: call it outside the iteration)."""
        return (
            f"{int(self.bad_streak)} bad iterations in a row since iteration {int(self.bad_since)} "
            f"(first non-finite: {_describe_terms(int(self.bad_terms))})"
        )

    @torch.no_grad()
    def _update_target(self, decay: float) -> None:
        """After the generator's step: theta^- <- mu * theta^- + (1 - mu) * theta with the teacher's mu;
        with `sampling_ema` set, `target` follows the generator with that decay instead (and an EMA
        teacher, `teacher_ema`, with mu)."""
        sampling = self.hparams.sampling_ema
        if self.teacher_ema is not None:
            self._ema(self.teacher_ema, decay)
        self._ema(self.target, decay if sampling is None else sampling)

    def _ema(self, net: nn.Module, decay: float) -> None:
        """net <- decay * net + (1 - decay) * generator: one fused op over all tensors (`foreach_ema`),
        or the baseline's Python loop over parameters. decay = 0 copies the generator exactly."""
        ema = list(net.parameters())
        online = [p.detach() for p in self.generator.parameters()]
        if self.hparams.foreach_ema:
            torch._foreach_lerp_(ema, online, 1.0 - decay)
        else:
            for t, o in zip(ema, online):
                t.mul_(decay).add_(o, alpha=1.0 - decay)
        for b_t, b in zip(net.buffers(), self.generator.buffers()):
            b_t.copy_(b)

    # -- optimisers --------------------------------------------------------------------------------
    def configure_optimizers(self):
        warmup = self.hparams.warmup
        ramp = lambda k: min(1.0, (k + 1) / warmup)  # noqa: E731  linear warm-up, in iterations
        make_g, make_d = self._optimizer_factories
        optimizers = [make_g(self.generator.parameters())]
        if self.discriminator is not None:
            optimizers.append(make_d(self.discriminator.parameters()))
        return optimizers, [torch.optim.lr_scheduler.LambdaLR(o, ramp) for o in optimizers]

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
        nonfinite = nonfinite_tensors(state)
        if nonfinite:  # the guard keeps NaN out of the weights; this is the last line of defence
            raise RuntimeError(
                f"refusing to write a checkpoint with non-finite weights in {nonfinite}: the last "
                "checkpoint on disk stays as it is"
            )
        if self.run_config is not None:  # plain containers: `evaluate` rebuilds data and networks from it
            checkpoint["act_config"] = self.run_config
        for logger in self.loggers:  # a resumed run continues its W&B run
            if type(logger).__name__ == "WandbLogger" and logger.version:
                checkpoint["act_wandb_id"] = str(logger.version)
        # The iteration draws its noise from generators seeded by (seed, k); the global generators only
        # matter to what a backbone draws itself (dropout), and are restored for that.
        checkpoint["act_rng"] = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            if key.startswith("distance."):
                state[key] = value
        self.k = int(state["iteration"])
        self._restore_rng = checkpoint.get("act_rng")

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
        """One-step samples x = f_{theta^-}(sigma_max * z, sigma_max, y), clipped to [-1, 1]; with `taus`
        (decreasing, taus[0] = sigma_max), multistep sampling (Song et al. 2023, Algorithm 1), the noise
        of later steps from `generator` or `step_noise(step)`."""
        net = self.target if net is None else net
        h = self.hparams
        taus = [h.sigma_max] if taus is None else taus
        was_training = net.training
        net.eval()  # no dropout when sampling (the teacher pass of training keeps it)
        try:
            return multistep(
                lambda x, sigma: self.denoise(net, x, sigma, labels),
                noise,
                taus,
                h.sigma_min,
                generator,
                step_noise,
            )
        finally:
            net.train(was_training)

    def extra_repr(self) -> str:
        return f"iteration={self.k}/{self.hparams.iterations}"
