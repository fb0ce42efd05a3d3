"""OmegaConf resolvers used by the configs in conf/ (registered when `act_lightning` is imported)."""

from __future__ import annotations

import warnings

from omegaconf import OmegaConf


def lazy_regularisation_beta2(beta2: float, r1_interval: int) -> float:
    """The discriminator's second-moment decay when R1 runs every `r1_interval` iterations.

    Lazy regularisation (StyleGAN2) takes a penalty step every `r1_interval` iterations, so the
    optimiser's averaging horizon is corrected by c = interval / (interval + 1). The ACT reference writes
    this as beta2 * c (0.99 * 16/17, with its interval of 16 hard-coded); StyleGAN2 uses beta2 ** c. We
    keep the reference's form, derived from the configured interval.
    """
    return float(beta2) * int(r1_interval) / (int(r1_interval) + 1)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("act.lazy_beta2"):
        OmegaConf.register_new_resolver("act.lazy_beta2", lazy_regularisation_beta2)


# conf/hydra/launcher/submitit_slurm.yaml gives hydra-submitit-launcher's `submitit_slurm` our defaults under
# the same name, so `hydra/launcher=submitit_slurm` picks them; Hydra 1.3 validates such a file against the
# plugin's schema (which is what we want) but warns that it does so on every run.
warnings.filterwarnings(
    "ignore", message=r"\s*'hydra/launcher/submitit_slurm' is validated against ConfigStore"
)
