import math

import pytest
import torch

from act_lightning import consistency as cm


def test_karras_sigmas_end_points_and_order():
    s = cm.karras_sigmas(18, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    assert s.shape == (18,)
    assert s[0].item() == pytest.approx(0.002, rel=1e-6)
    assert s[-1].item() == pytest.approx(80.0, rel=1e-6)
    assert bool((s[1:] > s[:-1]).all())


def test_karras_sigmas_hand_computed_middle_value():
    # N = 3: the middle point is ((0.002^(1/7) + 80^(1/7)) / 2)^7
    expected = ((0.002 ** (1 / 7) + 80 ** (1 / 7)) / 2) ** 7
    assert cm.karras_sigmas(3)[1].item() == pytest.approx(expected, rel=1e-6)


def test_karras_sigmas_rejects_fewer_than_two_scales():
    with pytest.raises(ValueError, match="num_scales"):
        cm.karras_sigmas(1)


def test_sigma_to_index_inverts_the_discretisation():
    s = cm.karras_sigmas(11).double()
    assert torch.allclose(cm.sigma_to_index(s, 11), torch.arange(11, dtype=torch.float64), atol=1e-4)


def test_boundary_scalings_hand_computed():
    sigma = torch.tensor([0.002, 1.0])
    c_skip, c_out, c_in = cm.boundary_scalings(sigma, sigma_data=0.5, sigma_min=0.002)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0  # boundary condition
    assert c_skip[1].item() == pytest.approx(0.25 / (0.998**2 + 0.25), rel=1e-6)
    assert c_out[1].item() == pytest.approx(0.998 * 0.5 / math.sqrt(1.25), rel=1e-6)
    assert c_in[1].item() == pytest.approx(1 / math.sqrt(1.25), rel=1e-6)


def test_num_scales_schedule():
    assert cm.num_scales(0.0, 2, 150) == 2
    assert cm.num_scales(1.0, 2, 150) == 150
    # k/K = 0.5: sqrt(0.5 * (150^2 - 2^2) + 4) = 106.08 -> 106
    assert cm.num_scales(0.5, 2, 150) == 106
    values = [cm.num_scales(k / 1000, 2, 150) for k in range(1001)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    # CIFAR-10 quickstart-like: N_max 20 at k/K = 0.25: sqrt(0.25 * 396 + 4) = 10.15 -> 10
    assert cm.num_scales(0.25, 2, 20) == 10


def test_target_ema_decay_hand_computed():
    # mu(k) = exp(N_min ln(mu0) / (N - 1))
    assert cm.target_ema_decay(2, 2, 0.9) == pytest.approx(0.81)
    assert cm.target_ema_decay(11, 2, 0.9) == pytest.approx(0.9**0.2)
    assert cm.target_ema_decay(150, 2, 0.95) == pytest.approx(math.exp(2 * math.log(0.95) / 149))
    # slower averaging as the discretisation gets finer
    decays = [cm.target_ema_decay(n, 2, 0.9) for n in range(2, 200)]
    assert all(b > a for a, b in zip(decays, decays[1:]))


def test_schedule_weight_and_lambda_constant_and_mid_weight():
    sigma = cm.karras_sigmas(21)
    flat = cm.ConsistencySchedule(gan_ratio=0.3, mid_weight=None)
    assert torch.equal(flat.weight(sigma, 21), torch.ones(21))
    assert torch.allclose(flat.lam(sigma, 21), torch.full((21,), 0.3))
    schedule = cm.ConsistencySchedule(gan_ratio=0.6, mid_weight=0.2)
    w, lam = schedule.weight(sigma, 21), schedule.lam(sigma, 21)
    assert torch.allclose(lam, 0.6 * w)  # gan_ratio enters lambda once, here
    assert lam[-1].item() == pytest.approx(0.6, rel=1e-5)  # lambda(sigma_max) = gan_ratio
    assert lam[10].item() == pytest.approx(0.2, rel=1e-4)  # lambda at the middle index = mid_weight
    assert lam[0].item() == pytest.approx(0.0, abs=1e-6)
    assert bool((w[1:] >= w[:-1]).all())
    # hand-computed: w(t_i) = (i / (N - 1)) ** log_0.5(mid_weight / gan_ratio)
    exponent = math.log(0.2 / 0.6, 0.5)
    assert w[5].item() == pytest.approx((5 / 20) ** exponent, rel=1e-4)


def test_schedule_answers_the_curriculum_questions_from_its_hyper_parameters():
    schedule = cm.ConsistencySchedule(
        sigma_min=0.002, sigma_max=80.0, rho=7.0, bins_min=2, bins_max=150, mu0=0.95
    )
    assert schedule.num_scales(0, 1000) == 2 and schedule.num_scales(1000, 1000) == 150
    assert schedule.num_scales(500, 1000) == cm.num_scales(0.5, 2, 150) == 106
    assert torch.equal(schedule.sigmas(11), cm.karras_sigmas(11, 0.002, 80.0, 7.0))
    assert schedule.target_ema(150) == pytest.approx(math.exp(2 * math.log(0.95) / 149))
    other = cm.ConsistencySchedule(sigma_max=20.0, rho=5.0)
    assert other.sigmas(5)[-1].item() == pytest.approx(20.0, rel=1e-6)
    assert not torch.equal(other.sigmas(5), schedule.sigmas(5))


def test_ict_loss_weighting_is_the_inverse_gap_of_the_pair_by_hand():
    uniform = cm.ConsistencySchedule()
    ict = cm.ConsistencySchedule(loss_weighting="ict")
    t_hi, t_lo = (
        torch.tensor([80.0, 1.0, 0.0021], dtype=torch.float64),
        torch.tensor([60.0, 0.5, 0.002], dtype=torch.float64),
    )
    assert torch.equal(uniform.consistency_weight(t_hi, t_lo), torch.ones(3).double())
    torch.testing.assert_close(
        ict.consistency_weight(t_hi, t_lo), torch.tensor([1 / 20, 2.0, 10_000.0], dtype=torch.float64)
    )
    # iCT's final grid, 1,281 levels (bins_max 1280 steps): the weight spans a factor of about 8.7e3,
    # largest at the smallest gap (near sigma_min), smallest at the top
    sigmas = cm.karras_sigmas(1281, 0.002, 80.0, 7.0).double()
    weights = ict.consistency_weight(sigmas[1:], sigmas[:-1])
    assert bool((weights[1:] < weights[:-1]).all())
    ratio = (weights.max() / weights.min()).item()
    assert 8.6e3 < ratio < 8.8e3
    with pytest.raises(ValueError, match="model.schedule.loss_weighting must be one of uniform, ict"):
        cm.ConsistencySchedule(loss_weighting="snr")


def test_sample_indices_cover_one_to_n_minus_one():
    g = torch.Generator().manual_seed(0)
    j = cm.sample_indices(10_000, 5, generator=g)
    assert j.min().item() == 1 and j.max().item() == 4
    counts = torch.bincount(j, minlength=5)[1:].float()
    assert (counts / counts.sum() - 0.25).abs().max() < 0.02  # uniform, per example


def test_append_dims():
    assert cm.append_dims(torch.ones(3), 4).shape == (3, 1, 1, 1)
    with pytest.raises(ValueError):
        cm.append_dims(torch.ones(3, 2), 1)


def test_append_dims_leaves_a_tensor_of_the_target_rank_as_it_is():
    x = torch.ones(3, 2)
    assert cm.append_dims(x, 2).shape == (3, 2)
    assert cm.append_dims(torch.ones(3), 1).shape == (3,)


def test_log_noise_conditioning_is_250_log_sigma_and_noise_level_inverts_it():
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=torch.float64)
    c_noise = cm.noise_conditioning(sigma, "log")
    torch.testing.assert_close(c_noise, 250.0 * torch.log(sigma))
    torch.testing.assert_close(cm.noise_level(c_noise, "log"), sigma)
    assert torch.equal(cm.noise_level(sigma, "identity"), sigma)
    # 250 ln(80) = 1095.5...: the level back from the number Song et al.'s networks read
    assert cm.noise_level(torch.tensor([250.0 * math.log(80.0)], dtype=torch.float64), "log").item() == (
        pytest.approx(80.0, rel=1e-12)
    )


def test_the_curriculum_rounds_an_exact_half_up_and_clamps_the_progress():
    # sqrt(0.45 (3^2 - 2^2) + 2^2) = sqrt(6.25) = 2.5 exactly: half up gives 3 (Python's round: 2)
    assert cm.num_scales(0.45, 2, 3) == 3
    # sqrt(0.152 (150^2 - 4) + 4) = 58.5098 -> 59
    assert cm.num_scales(0.152, 2, 150) == 59
    # progress outside [0, 1] (k past K, or before 0) is clamped: N stays within [bins_min, bins_max]
    assert cm.num_scales(1.5, 2, 150) == 150
    assert cm.num_scales(-0.5, 2, 150) == 2


def test_the_exponential_curriculum_of_a_run_shorter_than_its_stages_doubles_every_iteration():
    # K = 4 < log2(1280 / 10) + 1 = 8 stages: K' = floor(4 / 8) = 0 is raised to one iteration per stage
    assert [cm.num_scales_exponential(k, 4, 10, 1280) for k in range(5)] == [11, 21, 41, 81, 161]


def test_the_exponential_curriculums_stage_length_takes_the_floor_of_the_ratio_as_ict_does():
    # iCT: K' = floor(K / (log2 floor(s1 / s0) + 1)). s0 = 3, s1 = 20: floor(6.67) = 6, log2 6 + 1 = 3.585,
    # K' = floor(100 / 3.585) = 27 (with log2(6.67): 3.737, K' = 26)
    assert [cm.num_scales_exponential(k, 100, 3, 20) for k in (26, 27, 53, 54, 81)] == [4, 7, 7, 13, 21]


@pytest.mark.parametrize(
    "key, value",
    [("ect_k", 0.0), ("bins_min", 150), ("gan_ratio", 1.0), ("mid_weight", 1.0), ("mu0", 0.999)],
)
def test_the_schedules_inclusive_bounds_are_accepted(key, value):
    above = {"gan_ratio": 1.0} if key == "mid_weight" else {}  # (mid_weight <= gan_ratio)
    schedule = cm.ConsistencySchedule(**{key: value}, **above)
    assert getattr(schedule, key) == value


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("sigma_min", 0.0, "need 0 < model.schedule.sigma_min < model.schedule.sigma_max"),
        ("bins_min", 1, "model.schedule.bins_min must be >= 2"),
        ("mu0", 1.0, "model.schedule.mu0 must lie in (0, 1)"),
        ("mid_weight", 0.0, "model.schedule.mid_weight must be null"),
        ("gan_ratio", -0.1, "model.schedule.gan_ratio must lie in [0, 1]"),
        (
            "train_scalings",
            "karras",
            "model.schedule.train_scalings must be one of boundary, edm; got 'karras'",
        ),
    ],
)
def test_the_schedules_exclusive_bounds_are_refused_by_name(key, value, message):
    with pytest.raises(ValueError) as err:
        cm.ConsistencySchedule(**{key: value})
    assert message in str(err.value)


def test_a_mid_weight_above_gan_ratio_is_refused_naming_both_keys():
    """log_0.5(mid_weight / gan_ratio) < 0 made w(t) grow without bound as t -> sigma_min (infinite at
    sigma_min): lambda > 1 and a negative weight on the consistency loss, without a word."""
    with pytest.raises(
        ValueError, match=r"mid_weight \(0.6\) must not exceed model.schedule.gan_ratio \(0.3\)"
    ):
        cm.ConsistencySchedule(gan_ratio=0.3, mid_weight=0.6)
    cm.ConsistencySchedule(gan_ratio=0.3, mid_weight=0.3)  # w = 1
    cm.ConsistencySchedule(gan_ratio=0.0, mid_weight=0.2)  # no discriminator: ImageNet 64's variant=ct


def test_the_training_scalings_are_edms_under_ects_curriculum_and_the_boundarys_otherwise():
    assert cm.ConsistencySchedule().train_sigma_min == 0.002
    assert cm.ConsistencySchedule(curriculum="ect").train_sigma_min == 0.0  # as ECT trains
    assert cm.ConsistencySchedule(curriculum="ect", train_scalings="boundary").train_sigma_min == 0.002
    assert cm.ConsistencySchedule(train_scalings="edm").train_sigma_min == 0.0


def test_the_time_weighting_is_zero_at_and_below_sigma_min_and_one_without_a_discriminator():
    schedule = cm.ConsistencySchedule(gan_ratio=0.6, mid_weight=0.2)
    w = schedule.weight(torch.tensor([0.001, 0.002]), 11)  # i(t, N) <= 0: w = 0, never NaN
    assert w[0].item() == 0.0 and 0.0 <= w[1].item() < 1e-9  # (float32's 0.002 lies a hair above 0.002)
    # gan_ratio 0 (no discriminator): w = 1 whatever mid_weight says (log_0.5(mid_weight / 0) is undefined)
    off = cm.ConsistencySchedule(gan_ratio=0.0, mid_weight=0.2)
    assert torch.equal(off.weight(cm.karras_sigmas(5), 5), torch.ones(5))
