"""What each noise level and sampling step is, by value: the samplers' inputs (Song et al. 2023,
Algorithms 1 and 4), the levels an iteration draws, and the curriculum's rounding and decays."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from act_lightning import consistency as cm
from act_lightning.data.base import HalfBatch
from act_lightning.edit import default_taus, edit_taus
from act_lightning.iteration import GridCache, draw_noise, ect_levels, edm_levels, grid_levels, split_micro
from act_lightning.samplers import multistep, superres_projection, zero_shot_edit

SIGMA_MIN = 0.002


class Recording:
    """A denoiser that keeps every input and returns a constant image inside [-1, 1]."""

    def __init__(self) -> None:
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x, sigma):
        self.inputs.append((x.clone(), sigma.clone()))
        return torch.full_like(x, 0.25)


def _noise(step: int, shape=(2, 1, 4, 4)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + step))


def test_multistep_starts_at_sigma_max_times_the_noise_and_adds_each_steps_noise_at_its_level():
    denoise, z, taus = Recording(), _noise(0), [80.0, 5.0, 0.8]
    out = multistep(denoise, z, taus, SIGMA_MIN, step_noise=_noise)
    (x0, s0), (x1, s1), (x2, s2) = denoise.inputs
    torch.testing.assert_close(x0, 80.0 * z, rtol=0, atol=0)
    for x, sigma, step, tau in ((x1, s1, 1, 5.0), (x2, s2, 2, 0.8)):
        torch.testing.assert_close(x, 0.25 + math.sqrt(tau**2 - SIGMA_MIN**2) * _noise(step))
        torch.testing.assert_close(sigma, torch.full((2,), tau))
    assert s0.tolist() == [80.0, 80.0] and torch.equal(out, torch.full_like(z, 0.25))


def test_multistep_refuses_levels_that_do_not_decrease_or_reach_sigma_min():
    denoise, z = Recording(), _noise(0)
    for taus in ([], [5.0, 5.0], [80.0, 0.5, 1.0], [80.0, SIGMA_MIN], [SIGMA_MIN / 2]):
        with pytest.raises(ValueError, match="sampling times must decrease and stay above sigma_min"):
            multistep(denoise, z, taus, SIGMA_MIN, step_noise=_noise)
    assert denoise.inputs == []
    multistep(denoise, z, [80.0, 2 * SIGMA_MIN], SIGMA_MIN, step_noise=_noise)  # just above: two steps
    assert len(denoise.inputs) == 2
    # the fresh noise's scale is sqrt(tau^2 - sigma_min^2), not tau: it matters near sigma_min
    expected = 0.25 + math.sqrt(3) * SIGMA_MIN * _noise(1)
    torch.testing.assert_close(denoise.inputs[1][0], expected, rtol=0, atol=1e-6)


def test_zero_shot_editing_refuses_levels_that_do_not_decrease_or_reach_sigma_min():
    """As multistep: increasing levels were run without a word, one below sigma_min failed with 'math
    domain error'."""
    denoise, y = Recording(), _noise(0)
    for taus in ([80.0, 0.5, 1.0], [80.0, SIGMA_MIN / 2]):
        with pytest.raises(ValueError, match="sampling times must decrease and stay above sigma_min"):
            zero_shot_edit(denoise, lambda x: x, tuple(y.shape), taus, SIGMA_MIN, _noise)
    assert denoise.inputs == []


def test_superresolutions_projection_refuses_a_factor_it_cannot_take():
    """The edit command checks its factor; the Python API's projection failed inside with a size
    mismatch (3 on 8 x 8) or averaged a border it did not keep."""
    y = torch.zeros(1, 3, 8, 8)
    for factor in (3, 16, 1):
        with pytest.raises(
            ValueError, match=rf"factor={factor}: one of 2, 4, 8 that divides the image's 8 x 8"
        ):
            superres_projection(y, factor)
    with pytest.raises(ValueError, match="factor=4: one of 2, 4, 8 that divides the image's 6 x 6"):
        superres_projection(torch.zeros(1, 3, 6, 6), 4)
    assert superres_projection(y, 8)(torch.ones(1, 3, 8, 8)).abs().max() == 0  # the patch mean is y's


def test_multistep_clips_every_step_and_draws_later_noise_from_the_generator():
    class Beyond(Recording):
        def __call__(self, x, sigma):
            super().__call__(x, sigma)
            return torch.full_like(x, 3.0)

    denoise, z, taus = Beyond(), _noise(0), [80.0, 5.0]
    out = multistep(denoise, z, taus, SIGMA_MIN, generator=torch.Generator().manual_seed(7))
    drawn = torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
    (_, _), (x1, _) = denoise.inputs
    torch.testing.assert_close(x1, 1.0 + math.sqrt(5.0**2 - SIGMA_MIN**2) * drawn)  # clip(3.0) = 1
    assert torch.equal(out, torch.ones_like(z))


def test_zero_shot_editing_adds_each_steps_noise_at_its_level():
    denoise, taus = Recording(), [80.0, 5.0, 0.8]
    zero_shot_edit(denoise, lambda x: x, (2, 1, 4, 4), taus, SIGMA_MIN, _noise)
    (x0, _), (x1, s1), (x2, _) = denoise.inputs
    torch.testing.assert_close(x0, 80.0 * _noise(0))
    torch.testing.assert_close(x1, 0.25 + math.sqrt(5.0**2 - SIGMA_MIN**2) * _noise(1))
    torch.testing.assert_close(x2, 0.25 + math.sqrt(0.8**2 - SIGMA_MIN**2) * _noise(2))
    assert s1.tolist() == [5.0, 5.0]


def test_zero_shot_editing_projects_the_start_and_each_clipped_denoised_image():
    """Algorithm 4 with a projection that keeps a known column: x = P(0) + tau_1 z to start, and after each
    step P(clip(f(x))), so the known part is in every input and in the result, and the denoiser's values
    outside [-1, 1] are clipped before the projection."""
    known = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    known[..., 0] = True
    project = lambda x: torch.where(known, torch.full_like(x, 0.5), x)  # noqa: E731

    class Beyond(Recording):
        def __call__(self, x, sigma):
            super().__call__(x, sigma)
            return torch.full_like(x, 3.0)

    denoise, taus = Beyond(), [80.0, 5.0, 0.8]
    out = zero_shot_edit(denoise, project, (2, 1, 4, 4), taus, SIGMA_MIN, _noise)
    (x0, _), (x1, _), (x2, _) = denoise.inputs
    torch.testing.assert_close(x0, project(torch.zeros(2, 1, 4, 4)) + 80.0 * _noise(0))
    kept = project(torch.ones(2, 1, 4, 4))  # 3.0 clipped to 1, then the known column set to 0.5
    torch.testing.assert_close(x1, kept + math.sqrt(5.0**2 - SIGMA_MIN**2) * _noise(1))
    torch.testing.assert_close(x2, kept + math.sqrt(0.8**2 - SIGMA_MIN**2) * _noise(2))
    assert torch.equal(out, kept)


def test_zero_shot_editings_result_is_clipped_after_the_last_projection():
    """A projection may leave [-1, 1] (colorize and superres shift by the known part): the result is
    clipped after it."""
    project = lambda x: x + 1.5  # noqa: E731
    out = zero_shot_edit(Recording(), project, (2, 1, 4, 4), [80.0, 5.0], SIGMA_MIN, _noise)
    assert torch.equal(out, torch.ones(2, 1, 4, 4))  # 0.25 + 1.5, clipped to 1


def test_editings_default_levels_start_at_sigma_max_and_stop_above_sigma_min():
    taus = default_taus(3, SIGMA_MIN, 80.0, 7.0)
    grid = cm.karras_sigmas(4, SIGMA_MIN, 80.0, 7.0).flip(0).tolist()  # 80, ..., sigma_min
    assert taus == grid[:3] and taus[0] == pytest.approx(80.0) and min(taus) > SIGMA_MIN
    schedule = cm.ConsistencySchedule(sigma_max=80.0)
    given = edit_taus(OmegaConf.create({"taus": [5.0, 0.8], "steps": 10}), schedule)
    assert given == [80.0, 5.0, 0.8]  # the first step is at sigma_max, the given levels after it
    assert edit_taus(OmegaConf.create({"taus": None, "steps": 3}), schedule) == taus


def test_a_grid_iteration_pairs_adjacent_levels_and_draws_fake_and_real_levels_apart():
    sigmas = cm.karras_sigmas(11)
    draws = grid_levels(sigmas, None)(64, 32, (1, 2, 2), "cpu", torch.Generator().manual_seed(3))
    hi = torch.searchsorted(sigmas, draws["gen_hi"])
    assert torch.equal(sigmas[hi], draws["gen_hi"]) and torch.equal(draws["gen_lo"], sigmas[hi - 1])
    # the draws in their order: the generator's indices and noise, the fake half's, the real half's
    g = torch.Generator().manual_seed(3)
    cm.sample_indices(64, 11, "cpu", g)
    torch.randn((64, 1, 2, 2), generator=g)
    fake_j = cm.sample_indices(32, 11, "cpu", g)
    torch.randn((32, 1, 2, 2), generator=g)
    real_j = cm.sample_indices(32, 11, "cpu", g)
    assert torch.equal(draws["fake_t"], sigmas[fake_j]) and torch.equal(draws["real_t"], sigmas[real_j])
    assert not torch.equal(draws["fake_t"], draws["real_t"])


def test_diffusion_training_draws_edms_log_normal_levels():
    schedule = cm.ConsistencySchedule(edm_p_mean=-1.2, edm_p_std=1.2, p_mean=-1.1, p_std=2.0)
    draws = edm_levels(schedule)(16, 0, (1, 2, 2), "cpu", torch.Generator().manual_seed(4))
    n = torch.randn(16, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(draws["gen_hi"], (-1.2 + 1.2 * n).exp())


@pytest.mark.parametrize(
    ("progress", "bins_min", "expected"), [(0.75, 2, 130), (0.5, 2, 106), (0.001, 2, 5), (0.5, 10, 106)]
)
def test_the_curriculum_rounds_n_half_up(progress, bins_min, expected):
    # sqrt(0.75 (150^2 - 2^2) + 2^2) = 129.91 -> 130; sqrt(0.001 (150^2 - 4) + 4) = 5.15 -> 5;
    # sqrt(0.5 (150^2 - 10^2) + 10^2) = 106.30 -> 106 (with N_min instead of N_min^2 inside: 106.51 -> 107)
    assert cm.num_scales(progress, bins_min, 150) == expected


def test_ects_curriculum_with_an_ema_teacher_decays_by_mu0():
    schedule = cm.ConsistencySchedule(curriculum="ect", teacher="ema", mu0=0.9)
    assert schedule.target_ema(2) == 0.9 and schedule.target_ema(150) == 0.9


def test_each_rank_takes_its_slice_of_the_global_batchs_draws_and_each_micro_batch_its_part():
    sigmas = cm.karras_sigmas(11)
    levels = grid_levels(sigmas, None)
    images = torch.zeros(4, 1, 2, 2)
    batch = HalfBatch(images, torch.zeros(4, dtype=torch.long), images, torch.zeros(4, dtype=torch.long), 2)
    whole = draw_noise(batch, levels, torch.Generator().manual_seed(5), 0, 1)
    assert whole["gen_z"].shape == (4, 1, 2, 2) and whole["fake_t"].shape == (2,)
    for rank in (0, 1):  # two devices, each with half of this global batch
        half = HalfBatch(images[:2], batch.gen_labels[:2], images[:2], batch.disc_labels[:2])
        share = draw_noise(half, levels, torch.Generator().manual_seed(5), rank, 2)
        for key, value in share.items():
            assert torch.equal(value, whole[key].chunk(2)[rank]), key
    micro = split_micro(batch, whole)
    assert len(micro) == 2 and torch.equal(micro[1].gen_z, whole["gen_z"][2:])
    assert torch.equal(micro[1].real_t, whole["real_t"][1:]) and micro[1].data.gen.shape[0] == 2


def test_ects_pairs_take_r_at_the_iterations_stage_and_the_grid_is_computed_once_per_size():
    schedule = cm.ConsistencySchedule(curriculum="ect", teacher="ema", mu0=0.9)
    k = next(
        k
        for k in range(100)
        if cm.ect_stage(k, 100, schedule.ect_stages) != cm.ect_stage(k + 1, 100, schedule.ect_stages)
    )
    draws = ect_levels(schedule, k, 100)(8, 4, (1, 2, 2), "cpu", torch.Generator().manual_seed(6))
    torch.testing.assert_close(draws["gen_lo"], schedule.ect_r(draws["gen_hi"], k, 100), rtol=0, atol=0)
    assert not torch.equal(draws["fake_t"], draws["real_t"])  # drawn apart

    computed = []
    counted = SimpleNamespace(
        sigmas=lambda n: computed.append(n) or schedule.sigmas(n), index_probs=lambda s: None
    )
    cache = GridCache(counted)
    first, _ = cache(11, torch.device("cpu"))
    again, _ = cache(11, torch.device("cpu"))
    cache(12, torch.device("cpu"))
    assert again is first and computed == [11, 12]
