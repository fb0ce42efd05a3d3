"""Noise levels, preconditioning and the curriculum of consistency training (docs/algorithm.md,
sections 1, 2 and 4).

Pure functions of tensors and numbers, and `ConsistencySchedule`, which answers every schedule question
of one run (sigmas(N), N(k), mu(N), w(t) and lambda(t)) from its hyper-parameters. No Lightning,
no Hydra, no state that changes during training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dimensions so a per-example (B,) tensor broadcasts over (B, C, H, W)."""
    if x.ndim > ndim:
        raise ValueError(f"tensor has {x.ndim} dims, more than the target {ndim}")
    return x.reshape(*x.shape, *([1] * (ndim - x.ndim)))


def karras_sigmas(
    num_scales: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> Tensor:
    """The Karras et al. discretisation t_0 < ... < t_{N-1} (float32, computed in float64)."""
    if num_scales < 2:
        raise ValueError(f"num_scales must be >= 2, got {num_scales}")
    ramp = torch.linspace(0, 1, num_scales, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((lo + ramp * (hi - lo)) ** rho).float()


def sigma_to_index(
    sigma: Tensor, num_scales: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> Tensor:
    """Continuous inverse i(t, N) of `karras_sigmas`: i(t_i(N), N) == i."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (sigma ** (1 / rho) - lo) / (hi - lo) * (num_scales - 1)


def boundary_scalings(
    sigma: Tensor, sigma_data: float = 0.5, sigma_min: float = 0.002
) -> tuple[Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in) with c_skip(sigma_min) = 1 and c_out(sigma_min) = 0, so f(x, sigma_min) = x."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in


C_NOISE = ("identity", "log")  # model.c_noise: what the networks' noise embedding reads


def noise_conditioning(sigma: Tensor, kind: str = "identity") -> Tensor:
    """c_noise(t): the raw sigma (reference default) or 250 * log(sigma) (Song et al. 2023)."""
    if kind == "identity":
        return sigma
    if kind == "log":
        return 250.0 * sigma.log()
    raise ValueError(f"c_noise must be 'identity' or 'log', got {kind!r}")


def noise_level(c_noise: Tensor, kind: str = "identity") -> Tensor:
    """The inverse of `noise_conditioning`: sigma from c_noise (a backbone that needs sigma itself)."""
    if kind == "identity":
        return c_noise
    if kind == "log":
        return (c_noise / 250.0).exp()
    raise ValueError(f"c_noise must be 'identity' or 'log', got {kind!r}")


def lognormal_sigmas(noise: Tensor, p_mean: float, p_std: float) -> Tensor:
    """sigma = exp(P_mean + P_std n) for standard normal draws n (B,): EDM's training noise levels
    (P_mean -1.2, P_std 1.2) and ECT's t (P_mean -1.1, P_std 2.0)."""
    return (p_mean + p_std * noise).exp()


def ect_stage(iteration: int, iterations: int, stages: int) -> int:
    """ECT's stage s = floor(k / d) of iteration k of K in `stages` stages of d = K / stages iterations
    (ECT's `--double`: 250 ticks of 12.8k images at batch 128, 25,000 iterations, 8 stages in 200k)."""
    return min(max(int(iteration), 0) * stages // iterations, stages - 1)


def ect_pair(t: Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> Tensor:
    """ECT's mapping of t to r (Geng et al. 2024, locuslab/ect `training/loss.py`, `t_to_r_sigmoid`):

        r = max(t (1 - q^-(s+1) (1 + k sigmoid(-b t))), 0)

    so t - r = t q^-(s+1) n(t), n(t) = 1 + k sigmoid(-b t): the gap shrinks by q each stage s, and is
    wider (relative to t) at small t, where r reaches 0 (the clean image) in the first stages."""
    n_t = 1 + k * torch.sigmoid(-b * t)
    return (t * (1 - n_t / q ** (stage + 1))).clamp(min=0)


def num_scales(progress: float, bins_min: int, bins_max: int) -> int:
    """N(k) = round(sqrt(k/K * (N_max^2 - N_min^2) + N_min^2)) for progress = k/K in [0, 1].

    Rounds half up (not Python's banker's rounding) so the schedule is monotone in k.
    """
    progress = min(max(float(progress), 0.0), 1.0)
    value = math.sqrt(progress * (bins_max**2 - bins_min**2) + bins_min**2)
    return int(math.floor(value + 0.5))


def num_scales_exponential(iteration: int, iterations: int, bins_min: int, bins_max: int) -> int:
    """iCT's curriculum (Song & Dhariwal 2023, section 3.4): N(k) = min(s0 * 2^floor(k / K'), s1) + 1 with
    s0 = bins_min, s1 = bins_max and K' = floor(K / (log2 floor(s1 / s0) + 1)): the number of steps doubles
    in equal stages of training, from s0 to s1 (so 11 to 1281 noise levels for iCT's 10 and 1280)."""
    stage_length = max(1, math.floor(iterations / (math.log2(bins_max // bins_min) + 1)))
    return min(bins_min * 2 ** (max(int(iteration), 0) // stage_length), bins_max) + 1


def target_ema_decay(num_scales: int, bins_min: int, mu0: float) -> float:
    """mu(k) = exp(N_min * ln(mu_0) / (N(k) - 1)): the target network's EMA decay at N(k) scales."""
    return math.exp(bins_min * math.log(mu0) / (num_scales - 1))


def sample_indices(
    batch_size: int,
    num_scales: int,
    device: torch.device | str | None = None,
    generator=None,
    probs: Tensor | None = None,
) -> Tensor:
    """Per-example j in {1, ..., N-1}, so (t_j, t_{j-1}) is an adjacent pair of the schedule: uniform
    (the reference), or with `probs` (N-1 values, e.g. `lognormal_index_probs`) p(j) = probs[j - 1]."""
    if probs is None:
        return torch.randint(1, num_scales, (batch_size,), device=device, generator=generator)
    if probs.numel() != num_scales - 1:
        raise ValueError(f"probs must hold N-1 = {num_scales - 1} values, got {probs.numel()}")
    return torch.multinomial(probs.to(device), batch_size, replacement=True, generator=generator) + 1


def lognormal_index_probs(sigmas: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """iCT's noise sampling (Song & Dhariwal 2023, section 3.5): p(j) proportional to
    erf((ln t_j - P_mean) / (sqrt(2) P_std)) - erf((ln t_{j-1} - P_mean) / (sqrt(2) P_std)) for
    j = 1..N-1, the log-normal mass of the interval (t_{j-1}, t_j]. Returns the N-1 probabilities of j."""
    cdf = torch.erf((sigmas.double().log() - p_mean) / (math.sqrt(2.0) * p_std))
    mass = (cdf[1:] - cdf[:-1]).clamp(min=0)
    return (mass / mass.sum()).float()


def check_iterations(iterations: object) -> int:
    """K, the number of ACT iterations the curriculum spans: a positive integer (the key `iterations`)."""
    _require(
        isinstance(iterations, int) and not isinstance(iterations, bool) and iterations >= 1,
        f"iterations must be a positive integer (ACT iterations K), got {iterations!r}",
    )
    return iterations


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


PREFIX = "model.schedule"  # where the schedule's keys live in the training config
CURRICULA = (
    "sqrt",
    "exponential",
    "ect",
)  # N(k): ACT's square root | iCT's doubling | ECT's continuous t -> r
NOISE_SAMPLING = ("uniform", "lognormal")  # j: uniform (ACT) | iCT's discretised log-normal
TEACHERS = ("ema", "online")  # theta^-: the EMA with decay mu(N) (ACT) | stop_grad(theta) (iCT)
LOSS_WEIGHTINGS = ("uniform", "ict")  # lambda_ct of L_ct: 1 (ACT) | 1 / (t_hi - t_lo) (iCT)
TRAIN_SCALINGS = ("boundary", "edm")  # the training losses' c_skip, c_out: at sigma_min | EDM's (ECT)


@dataclass(frozen=True)
class ConsistencySchedule:
    """Every schedule question of one run, answered from its hyper-parameters, the keys of `model.schedule`
    (docs/algorithm.md).

    `num_scales(k, K)` is N(k), `sigmas(N)` the Karras grid t_0 < ... < t_{N-1}, `target_ema(N)` the
    target network's decay mu, `weight(t, N)` the time weighting w(t) of the adversarial terms and
    `lam(t, N)` = gan_ratio * w(t), the generator's mixing weight lambda(t). `mid_weight=None` gives
    w = 1 (CIFAR-10); otherwise w(t) = (i(t, N) / (N - 1)) ** log_0.5(mid_weight / gan_ratio), so that
    lambda(sigma_max) = gan_ratio and lambda at the middle index = mid_weight.

    The options from later work (Song & Dhariwal 2023, improved consistency training; all off by default):
    `curriculum="exponential"` takes N(k) from `num_scales_exponential`, `noise_sampling="lognormal"`
    draws j by `lognormal_index_probs(p_mean, p_std)`, `teacher="online"` makes theta^- the online
    network itself (mu = 0), and `loss_weighting="ict"` weights each example's consistency term by
    `consistency_weight` = 1 / (t_hi - t_lo) (docs/algorithm.md, section 3).

    `curriculum="ect"` is ECT's continuous-time curriculum (Geng et al. 2024): no grid; t is drawn
    log-normal (`p_mean`, `p_std`) and paired with r = `ect_pair(t, stage)`, the gap shrinking by `ect_q`
    in each of `ect_stages` equal stages of the run (`ect_k`, `ect_b` shape it). With `teacher="ema"` its
    decay is `mu0` (ECT's teacher is the online network). `edm_p_mean` and `edm_p_std` are the log-normal of
    the noise levels of diffusion training (model.objective=diffusion, EDM's -1.2 and 1.2).

    `train_scalings` is the preconditioning of the training losses (`train_sigma_min`): "boundary" (the
    consistency models' c_skip, c_out, which make f(x, sigma_min) = x) or "edm" (EDM's, sigma_min = 0, as
    ECT trains: its `ECMPrecond` in training mode; the boundary is then r = 0, where the target is x).
    None: the curriculum's, "edm" under ECT's and "boundary" otherwise. Sampling always uses the boundary's.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    bins_min: int = 2
    bins_max: int = 150
    mu0: float = 0.9
    gan_ratio: float = 0.3
    mid_weight: float | None = None
    curriculum: str = "sqrt"
    noise_sampling: str = "uniform"
    p_mean: float = -1.1
    p_std: float = 2.0
    teacher: str = "ema"
    loss_weighting: str = "uniform"
    ect_q: float = 2.0
    ect_k: float = 8.0
    ect_b: float = 1.0
    ect_stages: int = 8
    edm_p_mean: float = -1.2
    edm_p_std: float = 1.2
    train_scalings: str | None = None

    def __post_init__(self) -> None:
        """Every range check of the schedule, named by its key, when the schedule is built (Hydra builds it
        from `model.schedule` before the module, and `train` before anything else)."""
        for key, value, allowed in (
            ("curriculum", self.curriculum, CURRICULA),
            ("noise_sampling", self.noise_sampling, NOISE_SAMPLING),
            ("teacher", self.teacher, TEACHERS),
            ("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS),
            ("train_scalings", self.train_scalings or "boundary", TRAIN_SCALINGS),
        ):
            _require(value in allowed, f"{PREFIX}.{key} must be one of {', '.join(allowed)}; got {value!r}")
        _require(self.p_std > 0, f"{PREFIX}.p_std must be positive, got {self.p_std}")
        _require(self.edm_p_std > 0, f"{PREFIX}.edm_p_std must be positive, got {self.edm_p_std}")
        _require(self.ect_q > 1, f"{PREFIX}.ect_q must exceed 1 (the gap shrinks by it), got {self.ect_q}")
        _require(self.ect_k >= 0, f"{PREFIX}.ect_k must be >= 0, got {self.ect_k}")
        _require(
            isinstance(self.ect_stages, int) and self.ect_stages >= 1,
            f"{PREFIX}.ect_stages must be a positive integer, got {self.ect_stages!r}",
        )
        _require(
            0 < self.sigma_min < self.sigma_max,
            f"need 0 < {PREFIX}.sigma_min < {PREFIX}.sigma_max, got {self.sigma_min}, {self.sigma_max}",
        )
        _require(self.rho > 0, f"{PREFIX}.rho must be positive (Karras' exponent, 7), got {self.rho}")
        _require(self.bins_min >= 2, f"{PREFIX}.bins_min must be >= 2, got {self.bins_min}")
        _require(
            self.bins_min <= self.bins_max,
            f"{PREFIX}.bins_min ({self.bins_min}) must not exceed {PREFIX}.bins_max ({self.bins_max})",
        )
        _require(0 < self.mu0 < 1, f"{PREFIX}.mu0 must lie in (0, 1), got {self.mu0}")
        _require(0 <= self.gan_ratio <= 1, f"{PREFIX}.gan_ratio must lie in [0, 1], got {self.gan_ratio}")
        _require(
            self.mid_weight is None or 0 < self.mid_weight <= 1,
            f"{PREFIX}.mid_weight must be null (w(t) = 1) or in (0, 1], got {self.mid_weight}",
        )
        # else w(t) grows without bound as t -> sigma_min: lambda > 1, a negative consistency weight
        _require(
            self.mid_weight is None or self.gan_ratio == 0 or self.mid_weight <= self.gan_ratio,
            f"{PREFIX}.mid_weight ({self.mid_weight}) must not exceed {PREFIX}.gan_ratio ({self.gan_ratio}): "
            "lambda falls from gan_ratio at sigma_max to mid_weight at the middle noise index",
        )

    @property
    def train_sigma_min(self) -> float:
        """The sigma_min of the training losses' preconditioning (`train_scalings`): 0 for EDM's."""
        scalings = self.train_scalings or ("edm" if self.curriculum == "ect" else "boundary")
        return 0.0 if scalings == "edm" else self.sigma_min

    @property
    def continuous(self) -> bool:
        """Whether the pairs are continuous (ECT) rather than adjacent levels of a grid."""
        return self.curriculum == "ect"

    def ect_r(self, t: Tensor, iteration: int, iterations: int) -> Tensor:
        """ECT's r for t at iteration k of K: `ect_pair` at the stage `ect_stage(k, K, ect_stages)`."""
        stage = ect_stage(iteration, iterations, self.ect_stages)
        return ect_pair(t, stage, self.ect_q, self.ect_k, self.ect_b)

    def ect_t(self, noise: Tensor) -> Tensor:
        """ECT's t from standard normal draws: log-normal (p_mean, p_std), clipped to [sigma_min,
        sigma_max] (ECT does not clip: see docs/algorithm.md, section 12)."""
        return lognormal_sigmas(noise, self.p_mean, self.p_std).clamp(self.sigma_min, self.sigma_max)

    def num_scales(self, iteration: int, iterations: int) -> int:
        """N(k) at ACT iteration k of K (under ECT's curriculum, which has no grid: 2, its ends)."""
        if self.curriculum == "ect":
            return 2
        if self.curriculum == "exponential":
            return num_scales_exponential(iteration, iterations, self.bins_min, self.bins_max)
        return num_scales(iteration / iterations, self.bins_min, self.bins_max)

    def index_probs(self, sigmas: Tensor) -> Tensor | None:
        """The distribution of j over the grid `sigmas` (N values): None = uniform."""
        if self.noise_sampling == "lognormal":
            return lognormal_index_probs(sigmas, self.p_mean, self.p_std)
        return None

    def sigmas(self, num_scales: int) -> Tensor:
        return karras_sigmas(num_scales, self.sigma_min, self.sigma_max, self.rho)

    def target_ema(self, num_scales: int) -> float:
        """mu(N): the decay of theta^- <- mu theta^- + (1 - mu) theta at N scales (0: the online teacher)."""
        if self.teacher == "online":
            return 0.0
        if self.curriculum == "ect":
            return self.mu0
        return target_ema_decay(num_scales, self.bins_min, self.mu0)

    def weight(self, sigma: Tensor, num_scales: int | None = None) -> Tensor:
        """w(t): 1, or the power law in the noise index that puts lambda(t_mid) at mid_weight. The fraction
        i(t, N) / (N - 1) is the same on every grid: without `num_scales` (ECT's pairs) it is i(t, 2)."""
        if self.mid_weight is None or self.gan_ratio == 0:
            return torch.ones_like(sigma)
        exponent = math.log(self.mid_weight / self.gan_ratio, 0.5)
        num_scales = 2 if num_scales is None else num_scales
        index = sigma_to_index(sigma, num_scales, self.sigma_min, self.sigma_max, self.rho)
        return (index / (num_scales - 1)).clamp(min=0.0) ** exponent

    def consistency_weight(self, t_hi: Tensor, t_lo: Tensor) -> Tensor:
        """lambda_ct of each example's consistency term: 1, or iCT's 1 / (t_hi - t_lo), the inverse gap of
        the pair of adjacent noise levels (t_lo < t_hi) it compares."""
        if self.loss_weighting == "ict":
            return 1.0 / (t_hi - t_lo)
        return torch.ones_like(t_hi)

    def lam(self, sigma: Tensor, num_scales: int | None = None) -> Tensor:
        """lambda(t) = gan_ratio * w(t): the weight of L_adv against L_ct in the generator's loss."""
        return self.gan_ratio * self.weight(sigma, num_scales)
