"""The ACT module's own arguments, checked by key before anything is built: the optimisers (built once over
a dummy parameter), the objective and the ranges of the module's keys (the schedule and the speed options
check theirs)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from act_lightning.checks import check_count
from act_lightning.consistency import C_NOISE, check_iterations

OptimizerFactory = Callable[..., torch.optim.Optimizer]  # a Hydra `_partial_` optimizer: params -> optimizer
OBJECTIVES = ("consistency", "diffusion")  # model.objective: ACT/CT/iCT/ECT | EDM's denoising score matching


def check_optimizer(key: str, factory: OptimizerFactory | None) -> None:
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


def check_objective(objective: str, adversarial: bool, heun_steps: int) -> None:
    """model.objective, and what diffusion training needs: no discriminator, Heun's levels."""
    if objective not in OBJECTIVES:
        raise ValueError(f"model.objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    if objective == "diffusion" and adversarial:
        raise ValueError(
            "model.objective=diffusion trains no discriminator: set model.schedule.gan_ratio=0 "
            "(experiment=quickstart_diffusion and cifar10_diffusion do)"
        )
    if not (isinstance(heun_steps, int) and heun_steps >= 2):
        raise ValueError(
            f"model.heun_steps must be an integer >= 2 (noise levels of Heun's sampler), got {heun_steps!r}"
        )


def check_arguments(
    iterations: int,
    optimizer: OptimizerFactory,
    d_optimizer: OptimizerFactory | None,
    discriminator: object,
    adversarial: bool,
    warmup: int,
    r1: tuple[float, int, float],
    sampling_ema: float | None,
    c_noise: str,
) -> None:
    """The ranges of the module's own keys (the schedule and the speed options check theirs), named by
    key, before anything is built. `r1` is (r1_gamma, r1_interval, ada_length)."""
    r1_gamma, r1_interval, ada_length = r1
    check_iterations(iterations)
    check_count(warmup, "model.warmup")  # 1 = no warm-up
    check_count(r1_interval, "model.r1_interval")
    check_optimizer("model.optimizer", optimizer)
    for ok, message in (
        (r1_gamma >= 0, f"model.r1_gamma must be >= 0, got {r1_gamma}"),
        (ada_length > 0, f"model.ada_length must be positive, got {ada_length}"),
        (
            sampling_ema is None or 0 <= sampling_ema < 1,
            f"model.sampling_ema must be null (sample with the teacher) or in [0, 1), got {sampling_ema}",
        ),
        (
            not adversarial or discriminator is not None,
            "model.schedule.gan_ratio > 0 needs a model.discriminator",
        ),
        (c_noise in C_NOISE, f"model.c_noise must be one of {', '.join(C_NOISE)}; got {c_noise!r}"),
    ):
        if not ok:
            raise ValueError(message)
    if adversarial:
        check_optimizer("model.d_optimizer", d_optimizer)
