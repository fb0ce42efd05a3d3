"""Starting from a diffusion model (README "Start from a diffusion model", docs/algorithm.md section 12):
EDM's denoising loss and Heun sampler, ECT's continuous-time pairs, the training step of
model.objective=diffusion, and init_from's weights-only start."""

import math
import re

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from act_lightning import consistency as cm
from act_lightning.arguments import check_objective
from act_lightning.init_from import describe, load_init, read_init, use_generator
from act_lightning.losses import denoising_losses, pair_losses, pseudo_huber_distance
from act_lightning.nn import consistency_function
from act_lightning.samplers import heun
from tests.helpers_training import SMALL, fit, params

# -- ECT's pairs (locuslab/ect training/loss.py, ECMLoss.t_to_r_sigmoid and update_schedule) -----------


def test_ect_pair_is_ects_mapping_stage_by_stage():
    t = torch.tensor([0.002, 0.05, 0.3, 1.0, 5.0, 80.0])
    for stage in range(4):
        adj = 1 + 8.0 * torch.sigmoid(-1.0 * t)
        expected = (t * (1 - adj / 2.0 ** (stage + 1))).clamp(min=0)
        torch.testing.assert_close(cm.ect_pair(t, stage, q=2.0, k=8.0, b=1.0), expected)
    r0, r3 = cm.ect_pair(t, 0), cm.ect_pair(t, 3)
    assert (r0 < t).all() and (r3 < t).all() and (r3 >= r0).all()
    assert r0[0] == 0 and r0[1] == 0  # in the first stage small t pairs with the clean image
    # at large t the sigmoid vanishes: the relative gap is q^-(s+1), halved each stage
    assert (80.0 - float(cm.ect_pair(t, 2)[-1])) / 80.0 == pytest.approx(1 / 8, rel=1e-6)


def test_ect_stages_are_equal_slices_of_the_run():
    # ECT's CIFAR-10: --double 250 ticks of 100 iterations = 25k iterations per stage, 200k in all
    assert [cm.ect_stage(k, 200_000, 8) for k in (0, 24_999, 25_000, 199_999, 200_000)] == [0, 0, 1, 7, 7]
    schedule = cm.ConsistencySchedule(curriculum="ect", ect_stages=4, p_mean=-1.1, p_std=2.0)
    t = torch.tensor([0.5, 2.0])
    torch.testing.assert_close(schedule.ect_r(t, 50, 100), cm.ect_pair(t, 2))
    assert schedule.continuous and schedule.num_scales(5, 100) == 2
    sigmas = schedule.ect_t(torch.tensor([-10.0, 0.0, 10.0]))
    assert sigmas.tolist() == pytest.approx([schedule.sigma_min, math.exp(-1.1), schedule.sigma_max])


@pytest.mark.parametrize(
    "key,value,message",
    [("ect_q", 1.0, "ect_q must exceed 1"), ("ect_stages", 0, "ect_stages"), ("edm_p_std", 0.0, "edm_p_std")],
)
def test_bad_ect_and_edm_keys_are_refused_by_name(key, value, message):
    with pytest.raises(ValueError, match=f"model.schedule.{message}"):
        cm.ConsistencySchedule(**{key: value})


def test_an_unknown_curriculum_is_refused_under_the_key_given():
    """model.curriculum (the shorthand) and model.schedule.curriculum each name themselves."""
    from act_lightning.module import with_curriculum

    allowed = "must be one of sqrt, exponential, ect; got 'ect_'"
    with pytest.raises(ValueError, match=f"^model.curriculum {allowed}$"):
        with_curriculum(cm.ConsistencySchedule(), "ect_")
    with pytest.raises(ValueError, match=f"^model.schedule.curriculum {allowed}$"):
        cm.ConsistencySchedule(curriculum="ect_")
    assert with_curriculum(cm.ConsistencySchedule(), "ect").curriculum == "ect"


@pytest.mark.parametrize("scalings", ["boundary", "edm"])
def test_a_pair_at_the_boundary_takes_the_clean_image_as_its_target(scalings):
    """Under the boundary's scalings the boundary is sigma_min: r below it takes x. Under EDM's (ECT's
    default, as ECT trains) it is r = 0, and an r in (0, sigma_min) is the network's, as in ECT."""
    schedule = cm.ConsistencySchedule(
        curriculum="ect", loss_weighting="ict", gan_ratio=0.0, train_scalings=scalings
    )
    x, z = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t_hi, t_lo = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([0.0, 0.7, 0.001])
    seen = []

    def target(x_t, sigma, y):
        seen.append(sigma.clone())
        return 0.5 * x_t

    online = lambda x_t, sigma, y: 0.9 * x_t  # noqa: E731
    losses = pair_losses(
        x,
        None,
        t_hi,
        t_lo,
        z,
        schedule=schedule,
        online=online,
        target=target,
        distance=pseudo_huber_distance,
    )
    assert seen[0].min() > 0  # the network never sees the boundary's level
    pred = 0.9 * (x + t_hi.view(-1, 1, 1, 1) * z)
    low = x[2] if scalings == "boundary" else 0.5 * (x[2] + 0.001 * z[2])
    expected_target = torch.stack([x[0], 0.5 * (x[1] + 0.7 * z[1]), low])
    torch.testing.assert_close(losses.consistency, pseudo_huber_distance(pred, expected_target))
    torch.testing.assert_close(losses.weight, 1 / (t_hi - t_lo))  # ECT's 1 / (t - r)


def test_pseudo_huber_with_c_zero_is_the_norm_with_a_finite_gradient_at_zero():
    a = torch.randn(2, 3, 4, 4)
    b = a.clone()
    b[0] += 0.1
    a.requires_grad_(True)
    d = pseudo_huber_distance(a, b, c=0.0)
    torch.testing.assert_close(d[0], torch.tensor(0.1 * math.sqrt(48)))
    assert d[1] < 1e-10
    d.sum().backward()
    assert a.grad.isfinite().all()


# -- EDM's loss and sampler --------------------------------------------------------------------------


def test_denoising_loss_is_edms_weighted_squared_error():
    x, n = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    sigma = torch.tensor([0.01, 0.3, 1.0, 20.0])
    denoise = lambda x_t, s, y: 0.8 * x_t  # noqa: E731
    loss = denoising_losses(x, None, sigma, n, denoise=denoise, sigma_data=0.5)
    for i in range(4):
        s = float(sigma[i])
        weight = (s**2 + 0.25) / (s * 0.5) ** 2
        pred = 0.8 * (x[i] + s * n[i])
        assert float(loss[i]) == pytest.approx(weight * float((pred - x[i]).square().sum()), rel=1e-5)
    perfect = denoising_losses(x, None, sigma, n, denoise=lambda x_t, s, y: x, sigma_data=0.5)
    assert perfect.abs().max() == 0


def test_heun_integrates_the_probability_flow_of_gaussian_data():
    # data N(0, s^2) per value: D(x, sigma) = x s^2 / (s^2 + sigma^2), and the ODE's exact solution is
    # x(sigma) proportional to sqrt(s^2 + sigma^2): x(0) = x(sigma_max) s / sqrt(s^2 + sigma_max^2)
    s, sigma_max = 0.3, 20.0
    calls = []

    def denoise(x, sigma):
        calls.append(sigma[0].item())
        return x * s**2 / (s**2 + sigma.view(-1, 1, 1, 1) ** 2)

    noise = torch.linspace(-2.5, 2.5, 10).view(10, 1, 1, 1)
    exact = noise * sigma_max * s / math.sqrt(s**2 + sigma_max**2)
    errors = []
    for steps in (18, 50, 200):  # second order: the error falls with the steps (3.7%, 0.4%, 0.02% here)
        calls.clear()
        out = heun(denoise, noise, cm.karras_sigmas(steps, 0.002, sigma_max).flip(0).tolist())
        errors.append(float((out - exact).abs().max()))
        assert len(calls) == 2 * steps - 1  # Heun's correction on every step but the last, to 0
    assert errors[0] > errors[1] > errors[2] and errors[2] < 3e-4 and errors[0] < 0.05
    with pytest.raises(ValueError, match="decrease"):
        heun(denoise, noise, [1.0, 2.0])


def test_heun_refuses_levels_that_reach_zero():
    denoise = lambda x, sigma: torch.zeros_like(x)  # noqa: E731
    for levels in ([1.0, 0.0], [1.0, -0.5], [], [0.0]):
        with pytest.raises(ValueError, match="must decrease and stay positive"):
            heun(denoise, torch.ones(1, 1, 2, 2), levels)


# -- model.objective=diffusion --------------------------------------------------------------------


DIFFUSION = [*SMALL, "model.objective=diffusion", "model.schedule.gan_ratio=0"]


def test_diffusion_training_moves_the_generator_alone_and_logs_the_denoising_loss(cfg_factory):
    cfg = cfg_factory([*DIFFUSION, "iterations=2", "model.sampling_ema=0.5"])

    def never():
        raise AssertionError("a discriminator was built")

    model = instantiate(cfg.model, discriminator=never)
    assert model.distance is None  # no consistency distance (and so no LPIPS weights) is needed
    model, before, trainer = fit(cfg, model)
    assert model.discriminator is None and trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss_dsm"])
    assert "train/loss_ct" not in trainer.callback_metrics
    gen = params(model.generator)
    assert any(not torch.equal(a, b) for a, b in zip(before["gen"], gen))
    assert any(not torch.equal(a, b) for a, b in zip(gen, params(model.target)))  # the sampling EMA lags


def test_diffusion_without_a_sampling_ema_samples_with_the_generator_itself(cfg_factory):
    model, _, _ = fit(cfg_factory([*DIFFUSION, "iterations=2", "model.sampling_ema=null"]))
    assert all(torch.equal(a, b) for a, b in zip(params(model.generator), params(model.target)))


def test_diffusion_precondition_is_edms_and_samples_with_heun(cfg_factory):
    cfg = cfg_factory([*DIFFUSION, "model.heun_steps=3"])
    model = instantiate(cfg.model)
    x = torch.randn(2, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    sigma = torch.full((2,), model.schedule.sigma_min)
    # EDM's c_out(sigma) = sigma sd / sqrt(sigma^2 + sd^2) > 0 at sigma_min: the network still acts there
    assert not torch.allclose(model.denoise(model.generator, x, sigma, None), x)
    calls = []
    model.generator.register_forward_hook(lambda *args: calls.append(1))
    noise = torch.randn_like(x)
    samples = model.sample(noise, net=model.generator)
    assert len(calls) == 2 * 3 - 1 and samples.shape == x.shape and samples.abs().max() <= 1
    with pytest.raises(ValueError, match="Heun"):
        model.sample(noise, taus=[80.0, 1.0])


def test_diffusion_with_a_discriminator_is_refused_by_name(cfg_factory):
    cfg = cfg_factory([*SMALL, "model.objective=diffusion", "model.schedule.gan_ratio=0.3"])
    with pytest.raises(Exception, match="model.schedule.gan_ratio=0"):
        instantiate(cfg.model)
    cfg = cfg_factory([*SMALL, "model.objective=score"])
    with pytest.raises(Exception, match="model.objective must be one of consistency, diffusion"):
        instantiate(cfg.model)


def test_ect_trains_with_edms_scalings_and_samples_with_the_boundarys(cfg_factory, monkeypatch):
    """ECT's ECMPrecond uses EDM's c_skip, c_out in training mode (sigma_min = 0: tuning starts from the
    diffusion model's D exactly) and the boundary's when it samples; so does ECT's curriculum here, for the
    student, the teacher and the discriminator's fakes. The grid curricula train at the boundary's."""
    from act_lightning import module as module_file

    seen = []

    def recording(net, x, sigma, labels=None, **precond):
        seen.append((torch.is_grad_enabled(), precond["sigma_min"]))
        return consistency_function(net, x, sigma, labels, **precond)

    monkeypatch.setattr(module_file, "consistency_function", recording)
    for curriculum, trained_at in (("ect", 0.0), ("sqrt", 0.002)):
        seen.clear()
        cfg = cfg_factory(
            [*SMALL, "iterations=1", f"model.curriculum={curriculum}", "model.schedule.gan_ratio=0.3"]
        )
        model, _, _ = fit(cfg)
        assert len(seen) == 3 and {s for _, s in seen} == {trained_at}  # teacher, student, D's fakes
        x = torch.randn(2, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        model.sample(x)
        assert seen[-1] == (False, 0.002)  # sampling: the boundary's


def test_ect_curriculum_trains_with_continuous_pairs(cfg_factory):
    cfg = cfg_factory([*SMALL, "iterations=2", "model.curriculum=ect", "model.schedule.teacher=online"])
    model, before, trainer = fit(cfg)
    assert model.schedule.curriculum == "ect"
    assert "train/num_scales" not in trainer.callback_metrics  # no grid
    assert torch.isfinite(trainer.callback_metrics["train/loss_ct"])
    assert any(not torch.equal(a, b) for a, b in zip(before["gen"], params(model.generator)))


# -- init_from -------------------------------------------------------------------------------------


def _save(path, state, **extra):
    torch.save({"state_dict": state, **extra}, path)
    return str(path)


def test_init_from_loads_the_files_sampling_network_into_generator_and_target(cfg_factory, tmp_path):
    cfg = cfg_factory(SMALL)
    source = instantiate(cfg.model)
    for p in source.target.parameters():
        p.data.normal_()
    state = {f"target.{k}": v for k, v in source.target.state_dict().items()}
    state.update({f"generator.{k}": torch.zeros_like(v) for k, v in source.generator.state_dict().items()})
    path = _save(tmp_path / "diffusion.ckpt", state, act_config={"model": {"c_noise": cfg.model.c_noise}})
    cfg = cfg_factory([*SMALL, f"init_from={path}"])
    init = read_init(cfg)
    assert init.source == "target."  # the EMA it sampled with, not its online weights
    model = instantiate(cfg.model)
    load_init(model, init)
    # with a sampling EMA the EMA teacher is a third copy (`teacher_ema`): it starts from the file too
    separate = instantiate(cfg_factory([*SMALL, f"init_from={path}", "model.sampling_ema=0.99"]).model)
    load_init(separate, init)
    assert separate.teacher_ema is not None
    for net in (model.generator, model.target, separate.generator, separate.target, separate.teacher_ema):
        for a, b in zip(params(net), params(source.target)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_init_from_a_run_on_images_of_another_size_is_warned_about(cfg_factory, tmp_path, caplog):
    cfg = cfg_factory(SMALL)
    own = {f"generator.{k}": v for k, v in instantiate(cfg.model).generator.state_dict().items()}
    size = cfg.data.image_size
    same = _save(tmp_path / "same.ckpt", own, act_config={"data": {"image_size": size}})
    other = _save(tmp_path / "other.ckpt", own, act_config={"data": {"image_size": 2 * size}})
    with caplog.at_level("WARNING", logger="act_lightning.init_from"):
        read_init(cfg_factory([*SMALL, f"init_from={same}"]))
        assert not caplog.records
        init = read_init(cfg_factory([*SMALL, f"init_from={other}"]))  # it loads: the weights fit
    assert init is not None and len(caplog.records) == 1
    said = caplog.records[0].getMessage()
    assert f"trained on {2 * size} x {2 * size} images" in said and f"trains on {size} x {size}" in said


@pytest.mark.parametrize("variant", ["ect", "ect_act", "ect_staged"])
def test_a_tuning_variant_without_its_pretrained_model_says_which_sweep_makes_it(variant, tmp_path):
    """The ECT variants read ablation=init_pretrain's job of their seed by default: a missing one names that
    sweep and init_from=, where the error gave only a path the user never typed; a path given is said as
    is."""
    from tests.conftest import compose

    missing = tmp_path / "none"
    with pytest.raises(FileNotFoundError) as refused:
        read_init(compose([f"variant={variant}", "debug=smoke", f"+init_sweep={missing}"]))
    assert str(refused.value).startswith(
        f"init_from={missing}/seed0/checkpoints/last.ckpt: no such checkpoint"
    )
    assert "-m ablation=init_pretrain` trains" in str(refused.value) and "give init_from=PATH" in str(
        refused.value
    )
    assert "+init_sweep=... outside ablation=init" in str(
        refused.value
    )  # (Hydra refuses a new key without +)
    given = tmp_path / "given.ckpt"
    with pytest.raises(FileNotFoundError) as refused:
        read_init(compose([f"variant={variant}", "debug=smoke", f"init_from={given}"]))
    assert str(refused.value) == f"init_from={given}: no such checkpoint file"


def test_init_from_refuses_foreign_files_by_name(cfg_factory, tmp_path):
    cfg = cfg_factory(SMALL)
    own = instantiate(cfg.model).generator.state_dict()
    empty = _save(tmp_path / "empty.ckpt", {"discriminator.w": torch.zeros(1)})
    with pytest.raises(ValueError, match="holds no generator weights"):
        read_init(cfg_factory([*SMALL, f"init_from={empty}"]))
    other = _save(
        tmp_path / "other.ckpt",
        {f"generator.{k}": v for k, v in own.items()},
        act_config={"model": {"c_noise": "log"}},
    )
    with pytest.raises(ValueError, match="model.c_noise=log"):
        read_init(cfg_factory([*SMALL, f"init_from={other}", "model.c_noise=identity"]))
    scaled = _save(
        tmp_path / "scaled.ckpt",
        {f"generator.{k}": v for k, v in own.items()},
        act_config={"model": {"sigma_data": 0.5}},
    )
    with pytest.raises(ValueError, match="model.sigma_data=0.5"):  # the preconditioning it was trained in
        read_init(cfg_factory([*SMALL, f"init_from={scaled}", "model.sigma_data=0.7"]))
    with pytest.raises(ValueError, match="give one"):
        read_init(cfg_factory([*SMALL, f"init_from={other}", f"ckpt_path={other}"]))
    key = next(k for k, v in own.items() if v.ndim == 4)
    shaped = _save(
        tmp_path / "shaped.ckpt", {f"generator.{k}": v[:1] if k == key else v for k, v in own.items()}
    )
    cfg = cfg_factory([*SMALL, f"init_from={shaped}"])
    with pytest.raises(ValueError, match=f"mis-shaped: {key}"):
        load_init(instantiate(cfg.model), read_init(cfg))
    # a key the file lacks and one the generator does not have: both named, refused before any load
    partial = {f"generator.{k}": v for k, v in own.items() if k != key}
    cfg = cfg_factory([*SMALL, f"init_from={_save(tmp_path / 'partial.ckpt', partial)}"])
    with pytest.raises(ValueError, match=rf"does not match model.generator: missing: {re.escape(key)}\. Use"):
        load_init(instantiate(cfg.model), read_init(cfg))
    extra = {**{f"generator.{k}": v for k, v in own.items()}, "generator.extra.weight": torch.zeros(1)}
    cfg = cfg_factory([*SMALL, f"init_from={_save(tmp_path / 'extra.ckpt', extra)}"])
    with pytest.raises(ValueError, match=r"does not match model.generator: unknown: extra\.weight\. Use"):
        load_init(instantiate(cfg.model), read_init(cfg))
    with pytest.raises(FileNotFoundError, match="init_from="):
        read_init(cfg_factory([*SMALL, f"init_from={tmp_path / 'missing.ckpt'}"]))


def test_init_from_empty_is_no_init_and_a_state_dict_that_is_not_a_mapping_holds_no_weights(
    cfg_factory, tmp_path
):
    assert read_init(cfg_factory([*SMALL, "init_from="])) is None  # `init_from=` on the command line
    flat = tmp_path / "flat.ckpt"
    torch.save({"state_dict": torch.zeros(3)}, flat)
    with pytest.raises(ValueError, match="holds no generator weights"):
        read_init(cfg_factory([*SMALL, f"init_from={flat}"]))


def test_init_from_refuses_a_transposed_weight_and_names_six_problems_of_a_kind_at_most(
    cfg_factory, tmp_path
):
    cfg = cfg_factory(SMALL)
    own = instantiate(cfg.model).generator.state_dict()
    key = next(k for k, v in own.items() if v.ndim == 2 and v.shape[0] != v.shape[1])
    swapped = {f"generator.{k}": v.t() if k == key else v for k, v in own.items()}
    cfg = cfg_factory([*SMALL, f"init_from={_save(tmp_path / 'swapped.ckpt', swapped)}"])
    init = read_init(cfg)
    assert describe(init) == f"{tmp_path / 'swapped.ckpt'} (generator.*, {len(own)} tensors)"
    with pytest.raises(
        ValueError, match=f"mis-shaped: {re.escape(key)} {re.escape(str(tuple(own[key].t().shape)))}"
    ):
        load_init(instantiate(cfg.model), init)
    names = list(own)[:8]
    partial = {f"generator.{k}": v for k, v in own.items() if k not in names}
    cfg = cfg_factory([*SMALL, f"init_from={_save(tmp_path / 'partial.ckpt', partial)}"])
    with pytest.raises(ValueError) as refused:
        load_init(instantiate(cfg.model), read_init(cfg))
    assert f"missing: {', '.join(names[:6])} and 2 more. Use" in str(refused.value)
    assert names[6] not in str(refused.value)


def test_a_converted_generator_without_a_runs_dropout_is_taken_as_the_file_gives_it():
    file = {"_target_": "Backbone", "unet": {"dropout": 0.1, "layers": 2}}
    cfg = OmegaConf.create({"model": {"generator": {"_target_": "Experiments", "width": 64}}})
    use_generator(cfg, file)
    assert OmegaConf.to_container(cfg.model.generator) == file  # no `width` left from the experiment's
    cfg = OmegaConf.create({"model": {"generator": {"_target_": "Experiments", "dropout": 0.2}}})
    use_generator(cfg, file)
    assert cfg.model.generator.unet == {"dropout": 0.2, "layers": 2} and file["unet"]["dropout"] == 0.1


def test_heun_steps_takes_two_levels_at_least():
    check_objective("diffusion", False, 2)  # the smallest grid: sigma_max and sigma_min
    for bad in (1, 0, 2.5, "18"):
        with pytest.raises(ValueError, match=rf"model.heun_steps must be an integer >= 2 .*got {bad!r}"):
            check_objective("diffusion", False, bad)
    with pytest.raises(ValueError, match="model.objective=diffusion trains no discriminator"):
        check_objective("diffusion", True, 18)
