"""The training options from later work (iCT: Song & Dhariwal 2023), each off by default: each changes
what it should and nothing else."""

import math

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from act_lightning import consistency as cm
from tests.helpers_training import SMALL, fit, params


# -- log-normal sampling of the noise index ------------------------------------------------------------
def test_lognormal_probabilities_are_the_log_normal_mass_of_each_interval():
    sigmas = cm.karras_sigmas(40, 0.002, 80.0, 7.0)
    probs = cm.lognormal_index_probs(sigmas, -1.1, 2.0)
    assert probs.shape == (39,) and probs.sum().item() == pytest.approx(1.0, abs=1e-6)

    def cdf(t):  # the log-normal CDF of ln t ~ N(-1.1, 2.0^2), written out
        return 0.5 * (1 + math.erf((math.log(t) - (-1.1)) / (2.0 * math.sqrt(2))))

    mass = [cdf(float(sigmas[j])) - cdf(float(sigmas[j - 1])) for j in range(1, 40)]
    expected = torch.tensor(mass) / sum(mass)
    torch.testing.assert_close(probs, expected.float(), rtol=1e-5, atol=1e-7)
    # the mode sits where ln t is near P_mean (t ~ 0.33), far from both ends of the grid
    mode = int(probs.argmax()) + 1
    assert float(sigmas[mode - 1]) < math.exp(-1.1) < float(sigmas[mode]) * 3


def test_lognormal_index_histogram_follows_the_probabilities_and_uniform_stays_flat():
    sigmas = cm.karras_sigmas(20, 0.002, 20.0, 7.0)
    probs = cm.lognormal_index_probs(sigmas)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    j = cm.sample_indices(n, 20, generator=g, probs=probs)
    assert int(j.min()) >= 1 and int(j.max()) <= 19
    counts = torch.bincount(j, minlength=20)[1:].double()
    expected = probs.double() * n
    sd = (expected * (1 - probs.double())).sqrt()
    assert ((counts - expected).abs() <= 5 * sd + 1).all(), (counts, expected)
    uniform = torch.bincount(cm.sample_indices(n, 20, generator=g), minlength=20)[1:].double()
    assert ((uniform - n / 19).abs() <= 5 * math.sqrt(n / 19)).all()
    assert (counts - uniform).abs().max() > 20 * math.sqrt(n / 19)  # the two are told apart


def test_the_module_draws_indices_from_the_lognormal_only_when_asked(cfg_factory):
    plain = instantiate(cfg_factory(SMALL).model)
    assert plain._grids(12, plain.device)[1] is None
    overrides = [*SMALL, "model.schedule.noise_sampling=lognormal", "model.schedule.p_mean=-0.5"]
    model = instantiate(cfg_factory(overrides).model)
    sigmas, probs = model._grids(12, model.device)
    torch.testing.assert_close(sigmas, model.schedule.sigmas(12))
    torch.testing.assert_close(probs, cm.lognormal_index_probs(sigmas, -0.5, 2.0))


# -- the exponential curriculum ------------------------------------------------------------------------
def test_exponential_curriculum_doubles_from_10_to_1280_steps():
    K = 400_000
    stage = K // 8  # log2(1280 / 10) + 1 = 8 stages
    assert cm.num_scales_exponential(0, K, 10, 1280) == 11  # N = steps + 1 noise levels
    assert cm.num_scales_exponential(stage - 1, K, 10, 1280) == 11
    assert cm.num_scales_exponential(stage, K, 10, 1280) == 21
    assert cm.num_scales_exponential(7 * stage - 1, K, 10, 1280) == 641
    assert cm.num_scales_exponential(7 * stage, K, 10, 1280) == 1281
    assert cm.num_scales_exponential(K - 1, K, 10, 1280) == 1281
    values = [cm.num_scales_exponential(k, K, 10, 1280) for k in range(0, K, 997)]
    assert values == sorted(values) and set(values) == {11, 21, 41, 81, 161, 321, 641, 1281}


def test_the_schedule_switches_curriculum_by_key():
    sqrt = cm.ConsistencySchedule(bins_min=10, bins_max=1280)
    exp = cm.ConsistencySchedule(bins_min=10, bins_max=1280, curriculum="exponential")
    assert sqrt.num_scales(0, 1000) == 10 and sqrt.num_scales(1000, 1000) == 1280  # ACT's N(k)
    assert exp.num_scales(0, 1000) == 11 and exp.num_scales(999, 1000) == 1281
    assert exp.num_scales(500, 1000) != sqrt.num_scales(500, 1000)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.schedule.curriculum=linear", "model.schedule.curriculum"),
        ("model.schedule.noise_sampling=gaussian", "model.schedule.noise_sampling"),
        ("model.schedule.teacher=frozen", "model.schedule.teacher"),
        ("model.schedule.p_std=0", "model.schedule.p_std"),
        ("model.sampling_ema=1.0", "model.sampling_ema"),
    ],
)
def test_bad_option_values_name_the_key(cfg_factory, override, message):
    with pytest.raises(Exception) as err:  # Hydra wraps the module's ValueError
        instantiate(cfg_factory([*SMALL, override]).model)
    assert message in str(err.value)


def _images(cfg, n=2):
    return torch.randn(n, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)


# -- the teacher without EMA, and the separate sampling EMA --------------------------------------------
def test_mu_zero_makes_the_teacher_the_online_network(cfg_factory):
    cfg = cfg_factory([*SMALL, "iterations=3", "model.schedule.teacher=online", "model.r1_threshold=1e9"])
    model = instantiate(cfg.model)
    assert model.teacher() is model.generator and model.schedule.target_ema(50) == 0.0
    x, sigma = _images(cfg, 3), torch.full((3,), 1.5)
    teacher_out = model._teacher_pass()(x, sigma, None)
    torch.testing.assert_close(teacher_out, model.denoise(model.generator, x, sigma, None), rtol=0, atol=0)
    model, _, trainer = fit(cfg, model)
    assert trainer.callback_metrics["train/target_ema"].item() == 0.0
    # no sampling EMA: the network that samples follows the online network exactly (decay 0)
    for a, b in zip(params(model.generator), params(model.target)):
        assert torch.equal(a, b)


def test_the_sampling_ema_follows_the_generator_with_its_own_decay(cfg_factory):
    cfg = cfg_factory(
        [
            *SMALL,
            "iterations=1",
            "model.schedule.teacher=online",
            "model.sampling_ema=0.75",
            "model.r1_threshold=1e9",
        ]
    )
    model, before, _ = fit(cfg)
    assert model.teacher_ema is None  # the online teacher needs no copy
    for t0, g1, t1 in zip(before["target"], params(model.generator), params(model.target)):
        torch.testing.assert_close(t1, 0.75 * t0 + 0.25 * g1, rtol=1e-6, atol=1e-7)


def test_an_ema_teacher_beside_a_sampling_ema_keeps_its_own_decay(cfg_factory):
    cfg = cfg_factory([*SMALL, "iterations=1", "model.sampling_ema=0.5", "model.r1_threshold=1e9"])
    model = instantiate(cfg.model)
    assert model.teacher() is model.teacher_ema is not None
    teacher_before = params(model.teacher_ema)
    model, before, _ = fit(cfg, model)
    mu = cfg.model.schedule.mu0**2  # N(0) = 2
    gen = params(model.generator)
    for t0, g1, t1 in zip(teacher_before, gen, params(model.teacher_ema)):
        torch.testing.assert_close(t1, mu * t0 + (1 - mu) * g1, rtol=1e-6, atol=1e-7)
    for t0, g1, t1 in zip(before["target"], gen, params(model.target)):
        torch.testing.assert_close(t1, 0.5 * t0 + 0.5 * g1, rtol=1e-6, atol=1e-7)


def test_defaults_keep_the_reference_teacher(cfg_factory):
    model = instantiate(cfg_factory(SMALL).model)
    assert model.teacher() is model.target and model.teacher_ema is None
    assert model.schedule.curriculum == "sqrt" and model.schedule.noise_sampling == "uniform"


# -- dropout masks shared between the online and the teacher pass ---------------------------------------
@pytest.mark.parametrize("teacher", ["online", "ema"])
def test_shared_dropout_gives_the_teacher_the_online_pass_masks(cfg_factory, teacher):
    base = [*SMALL, "model.generator.dropout=0.5", f"model.schedule.teacher={teacher}"]
    x, sigma = _images(cfg_factory(base)), torch.full((2,), 3.0)
    outputs = {}
    for shared in (True, False):
        model = instantiate(cfg_factory([*base, f"model.shared_dropout={shared}"]).model).train()
        torch.manual_seed(0)
        teacher_out = model._teacher_pass()(x, sigma, None)  # runs first, as in the loss
        online_out = model.denoise(model.generator, x, sigma, None)
        outputs[shared] = (teacher_out, online_out)
    # the EMA teacher starts equal to the generator, so equal masks give equal outputs in both cases (a copy
    # of a network may round differently in the last bit; the generator itself is bit-identical)
    atol = 0 if teacher == "online" else 1e-5
    torch.testing.assert_close(outputs[True][0], outputs[True][1], rtol=0, atol=atol)
    assert (outputs[False][0] - outputs[False][1]).abs().max() > 1e-2  # independent masks differ


class _DrawFromTheGlobalGenerators(L.Callback):
    """Draws n numbers from the global generators as training starts: whatever a launch's start-up draws."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_train_start(self, trainer, pl_module) -> None:
        torch.rand(self.n)


def test_dropout_masks_are_a_stream_of_the_seed_the_iteration_and_the_rank(cfg_factory):
    """Every rank was seeded alike once and drew its masks from the global generators from there on: all
    ranks drew the same masks. Each iteration now seeds them with (seed, k, DROPOUT, rank): the masks
    depend on nothing else (not on what drew from them before), and another rank's differ."""
    from act_lightning.seeds import seed_global_generators

    cfg = cfg_factory([*SMALL, "model.generator.dropout=0.5", "iterations=2"])
    runs = []
    for n in (1, 7):
        model = instantiate(cfg.model)
        dropout = next(m for m in model.generator.modules() if isinstance(m, torch.nn.Dropout))
        runs.append([])
        dropout.register_forward_hook(lambda module, args, out, masks=runs[-1]: masks.append(out == 0))
        fit(cfg, model, callbacks=[_DrawFromTheGlobalGenerators(n)])
    assert len(runs[0]) == len(runs[1]) >= 2 and 0.3 < runs[0][0].float().mean() < 0.7
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    seed_global_generators(0, 1, 0)
    rank0 = torch.rand(100)
    seed_global_generators(0, 1, 1)
    assert not torch.equal(rank0, torch.rand(100))


def test_shared_dropout_without_dropout_is_refused_by_name_at_launch(cfg_factory):
    """With model.generator.dropout 0 there are no masks to share: the option would do nothing. Refused
    when training starts; a checkpoint of such a run still loads (the module itself takes it)."""
    from act_lightning.train import check_config

    cfg = cfg_factory([*SMALL, "model.generator.dropout=0", "model.shared_dropout=true"])
    said = r"model.shared_dropout=true .* the generator has no dropout: set model"
    with pytest.raises(ValueError, match=said):
        check_config(cfg)
    instantiate(cfg.model)
    check_config(cfg_factory([*SMALL, "model.generator.dropout=0.1", "model.shared_dropout=true"]))


def test_sampling_runs_without_dropout_and_restores_the_mode(cfg_factory):
    cfg = cfg_factory([*SMALL, "model.generator.dropout=0.5"])
    model = instantiate(cfg.model).train()
    noise = _images(cfg)
    a, b = model.sample(noise), model.sample(noise)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert model.target.training
