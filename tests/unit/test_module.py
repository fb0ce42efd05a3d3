"""One ACT iteration through Lightning: what moves, by how much, what is counted, and what is skipped."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from act_lightning import consistency as cm
from act_lightning.augment import r1_controller_update
from act_lightning.data.base import split_halves
from act_lightning.divergence import GUARDED_TERMS
from act_lightning.ema import ema_update
from act_lightning.module import ACTModule
from tests.helpers_training import SMALL, fit, fit_recording, params


def test_one_iteration_moves_g_and_d_and_the_target_by_the_exact_decay(cfg_factory):
    cfg = cfg_factory([*SMALL, "iterations=1", "model.r1_threshold=1e9"])
    model, before, trainer = fit(cfg)
    assert model.k == 1 and int(model.iteration) == 1
    assert trainer.global_step == 2  # Lightning counts both optimiser steps; the schedule does not

    gen_after = params(model.generator)
    assert any(not torch.equal(a, b) for a, b in zip(before["gen"], gen_after))
    assert any(not torch.equal(a, b) for a, b in zip(before["disc"], params(model.discriminator)))

    # k = 0: N(0) = bins_min = 2, mu = exp(2 ln(mu0) / 1) = mu0^2; the target started equal to G
    mu = cm.target_ema_decay(
        cm.num_scales(0.0, cfg.model.schedule.bins_min, cfg.model.schedule.bins_max),
        cfg.model.schedule.bins_min,
        cfg.model.schedule.mu0,
    )
    assert mu == pytest.approx(cfg.model.schedule.mu0**2)
    assert trainer.callback_metrics["train/target_ema"].item() == pytest.approx(mu)
    assert trainer.callback_metrics["train/num_scales"].item() == 2
    for t0, g1, t1 in zip(before["target"], gen_after, params(model.target)):
        torch.testing.assert_close(t1, mu * t0 + (1 - mu) * g1, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(t0, t1) for t0, t1 in zip(before["target"], params(model.target)))


class _WatchesDiscriminatorGradients(ACTModule):
    """Records D's gradients when its own update starts, i.e. right after the generator's backward."""

    def _discriminator_step(self, *args, **kwargs):
        self.grads_after_generator_update = [p.grad for p in self.discriminator.parameters()]
        return super()._discriminator_step(*args, **kwargs)


def test_the_generators_loss_gives_the_discriminator_no_gradient(cfg_factory):
    cfg = cfg_factory([*SMALL, "iterations=1"])
    model = instantiate(cfg.model, _target_=f"{__name__}._WatchesDiscriminatorGradients")
    model, _, _ = fit(cfg, model)
    assert model.grads_after_generator_update and all(g is None for g in model.grads_after_generator_update)
    assert any(p.grad is not None for p in model.discriminator.parameters())  # its own update did train it


def test_gan_ratio_zero_is_plain_consistency_training_and_builds_no_discriminator(cfg_factory):
    cfg = cfg_factory([*SMALL, "iterations=2", "model.schedule.gan_ratio=0"])

    def never():
        raise AssertionError("the discriminator was built")

    model = instantiate(cfg.model, discriminator=never)
    model, before, trainer = fit(cfg, model)
    assert model.discriminator is None
    assert trainer.global_step == 2  # one optimiser step per iteration
    assert len(trainer.optimizers) == 1
    assert any(not torch.equal(a, b) for a, b in zip(before["gen"], params(model.generator)))


def test_r1_ema_starts_at_the_threshold_and_r1_drives_the_augmentation_probability(cfg_factory):
    cfg = cfg_factory([*SMALL, "model.r1_threshold=123.0"])
    assert instantiate(cfg.model).r1_ema.item() == 123.0  # as the reference starts it
    # threshold 0: R1 > 0 so the EMA exceeds it and p rises by B * interval / ada_length per R1 step
    cfg = cfg_factory(
        [*SMALL, "iterations=3", "model.r1_threshold=0", "model.r1_interval=2", "model.ada_length=1000"]
    )
    model, _, _ = fit(cfg)
    batch = 2 * 4  # both halves, one device
    # R1 runs at k = 0 and k = 2
    assert model.aug_p.item() == pytest.approx(2 * batch * 2 / 1000, rel=1e-6)
    assert model.r1_ema.item() > 0


def test_the_discriminators_beta2_follows_the_r1_interval(cfg_factory):
    for interval in (16, 4):
        cfg = cfg_factory([*SMALL, f"model.r1_interval={interval}"])
        model = instantiate(cfg.model)
        opt_g, opt_d = model.configure_optimizers()[0]
        assert tuple(opt_g.param_groups[0]["betas"]) == (0.0, 0.99)
        assert opt_d.param_groups[0]["betas"][1] == pytest.approx(0.99 * interval / (interval + 1))
    assert opt_d.param_groups[0]["foreach"] is True


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "model.schedule.bins_min=30",
            "model.schedule.bins_min (30) must not exceed model.schedule.bins_max",
        ),
        ("model.schedule.gan_ratio=1.5", "model.schedule.gan_ratio must lie in [0, 1]"),
        ("model.schedule.rho=0", "model.schedule.rho must be positive"),
        ("model.c_noise=sigma", "model.c_noise must be one of identity, log; got 'sigma'"),
        ("model.warmup=abc", "model.warmup must be an integer >= 1, got 'abc'"),
        ("model.r1_interval=16.0", "model.r1_interval must be an integer >= 1, got 16.0"),
        ("model.optimizer.lr=0", "model.optimizer.lr must be positive"),
        ("model.d_optimizer.lr=-1e-4", "model.d_optimizer.lr must be positive"),
        ("+model.optimizer.eps=-1", "model.optimizer: Invalid epsilon value"),
        ("model.d_optimizer.betas=[0.0,1.5]", "model.d_optimizer: Invalid beta parameter"),
        ("iterations=0", "iterations must be a positive integer"),
        ("model.distance=l3", "model.distance must be one of"),
    ],
)
def test_invalid_values_name_the_key(cfg_factory, override, message):
    cfg = cfg_factory([*SMALL, override])
    with pytest.raises(Exception) as err:
        instantiate(cfg.model)
    assert message in str(err.value)


def test_sample_is_deterministic_and_clipped(cfg_factory):
    cfg = cfg_factory(SMALL)
    model = instantiate(cfg.model)
    z = torch.randn(3, 1, 8, 8)
    a, b = model.sample(z), model.sample(z)
    assert torch.equal(a, b) and a.shape == z.shape
    assert a.min() >= -1 and a.max() <= 1
    # sampling uses the target network, not the online generator
    other = copy.deepcopy(model.generator)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    assert not torch.equal(model.sample(z, net=other), a)


def test_sample_takes_the_levels_after_the_first_step_as_the_command_and_the_export_do(cfg_factory):
    """taus=[tau]: one step at sigma_max, then one at tau (samplers.multistep over [sigma_max, tau]), as
    `sample taus=[tau]` and `load_generator(...).sample(z, taus=[tau])`. A list that starts at sigma_max
    (or any level at or above it) is refused by name instead of sampling something else."""
    from act_lightning.samplers import multistep

    model = instantiate(cfg_factory(SMALL).model)
    z, step = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    sigma_max, sigma_min = model.schedule.sigma_max, model.schedule.sigma_min
    two = model.sample(z, taus=[1.5], step_noise=lambda s: step)
    model.target.eval()
    with torch.no_grad():
        denoise = lambda x, sigma: model.denoise(model.target, x, sigma, None)  # noqa: E731
        expected = multistep(denoise, z, [sigma_max, 1.5], sigma_min, step_noise=lambda s: step)
    assert torch.equal(two, expected) and not torch.equal(two, model.sample(z))
    assert torch.equal(model.sample(z, taus=[]), model.sample(z))
    for taus in ([sigma_max, 1.5], [2 * sigma_max]):
        with pytest.raises(ValueError, match=r"the noise levels of the steps after the first, which is at"):
            model.sample(z, taus=taus)


def test_sample_names_missing_or_misshaped_labels_and_labels_an_unconditional_model_has_no_use_for(
    cfg_factory,
):
    z = torch.randn(2, 1, 8, 8)
    plain = instantiate(cfg_factory(SMALL).model)
    with pytest.raises(ValueError, match=r"labels: this model is unconditional"):
        plain.sample(z, torch.tensor([0, 1]))
    classes = ["data.num_classes=3", "model.generator.num_class_embeds=3"]
    model = instantiate(cfg_factory([*SMALL, *classes]).model)
    with pytest.raises(ValueError, match=r"class-conditional \(3 classes\); pass one class index per image"):
        model.sample(z, None)
    with pytest.raises(
        ValueError, match=r"labels: one class index per image, shape \(2,\), or one for all; got"
    ):
        model.sample(z, torch.tensor([1]))
    expected = model.sample(z, torch.tensor([0, 2]))
    assert expected.shape == z.shape
    # the forms the export and the sample command take: a list (numpy's integers too), a numpy array, one
    # class for all (it raised AttributeError: 'list' object has no attribute 'shape')
    for same in (
        [0, 2],
        [np.int64(0), np.int64(2)],
        np.array([0, 2]),
        torch.tensor([0, 2], dtype=torch.int32),
    ):
        assert torch.equal(model.sample(z, same), expected)
    assert torch.equal(model.sample(z, 2), model.sample(z, torch.tensor([2, 2])))
    # the Python API's labels (load_model): out of range or not integers, named (it raised IndexError)
    for labels in (torch.tensor([0, 3]), torch.tensor([-1, 0])):
        with pytest.raises(ValueError, match=r"labels: out of range for 3 classes \(0..2\)"):
            model.sample(z, labels)
    with pytest.raises(
        ValueError, match=r"labels: integer class indices \(int64 or int32\); got torch.float32"
    ):
        model.sample(z, torch.tensor([0.0, 1.0]))


def test_sample_names_noise_of_another_size_and_takes_any_float_dtype(cfg_factory):
    """Noise of another image size was sampled without a word (the UNet takes any multiple of its
    downsampling); float64 noise failed in the first convolution: it is taken in the weights' dtype."""
    model = instantiate(cfg_factory(SMALL).model)
    z = torch.randn(2, 1, 8, 8)
    for bad in (torch.randn(2, 1, 16, 16), torch.randn(2, 3, 8, 8)):
        with pytest.raises(ValueError, match=r"noise: this model makes 1 x 8 x 8 images; got noise of shape"):
            model.sample(bad)
    for bad in (torch.randn(1, 8, 8), z.numpy(), torch.zeros(2, 1, 8, 8, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"noise: a float tensor of shape \(B, C, H, W\)"):
            model.sample(bad)
    one = model.sample(z)
    assert torch.equal(model.sample(z.double()), one) and model.sample(z.double()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"taus: a list of noise levels after the first step"):
        model.sample(z, taus=1.5)
    # torch.randn's CPU noise for a network elsewhere (a GPU's: meta stands in) goes where the weights are
    from act_lightning.checks import check_noise

    on_meta = torch.nn.Conv2d(1, 1, 1).to("meta")
    assert check_noise(z, on_meta, image=(1, 8)).device.type == "meta"


def test_lightnings_load_from_checkpoint_points_to_load_model(tmp_path):
    """Lightning's classmethod cannot build the networks (the module takes them built): it failed with
    'missing 3 required positional arguments'."""
    with pytest.raises(TypeError, match=r"act_lightning.checkpoints.load_model\(path\)"):
        ACTModule.load_from_checkpoint(tmp_path / "last.ckpt")


class _NaNAtIteration(ACTModule):
    """The consistency distance turns NaN at one iteration, as a diverging run's would."""

    bad_iteration = 1

    def training_step(self, batch, batch_idx):
        distance = self.distance
        if self.k == self.bad_iteration:
            self.distance = lambda a, b: distance(a, b) * float("nan")
        try:
            super().training_step(batch, batch_idx)
        finally:
            self.distance = distance
        if self.k == self.bad_iteration:  # right after the good iteration before the bad one
            self.snapshot = params(self.generator)


def test_a_non_finite_loss_skips_the_update_and_is_counted(cfg_factory):
    cfg = cfg_factory([*SMALL, "iterations=3", "model.distance=l2"])
    model = instantiate(cfg.model, _target_=f"{__name__}._NaNAtIteration")
    model, _, trainer = fit(cfg, model)
    # the generator's update at iteration 1 was skipped: its weights stayed those after iteration 0 ...
    # (the snapshot is taken after iteration 0; iteration 2 then moved them again)
    assert int(model.bad.total) == 1 and int(model.bad.streak) == 0  # one bad iteration, then good ones
    assert int(model.bad.since) == 1
    assert GUARDED_TERMS[int(model.bad.terms).bit_length() - 1] in ("train/loss_ct", "generator gradients")
    assert "train/loss_ct" in model.bad.report()
    for tensor in [
        *model.generator.parameters(),
        *model.target.parameters(),
        *model.discriminator.parameters(),
    ]:
        assert tensor.isfinite().all()
    for opt in trainer.optimizers:  # no NaN reached the optimisers' moments either
        for state in opt.state.values():
            assert all(v.isfinite().all() for v in state.values() if torch.is_tensor(v))
    assert trainer.callback_metrics["train/skipped_updates"].item() == 1


def test_the_skipped_update_leaves_the_generator_as_it_was(cfg_factory):
    cfg = cfg_factory([*SMALL, "iterations=2", "model.distance=l2"])
    model = instantiate(cfg.model, _target_=f"{__name__}._NaNAtIteration")
    model, _, _ = fit(cfg, model)
    # iteration 1 (the bad one) was the last: the generator holds the weights it had after iteration 0
    for before, after in zip(model.snapshot, params(model.generator)):
        assert torch.equal(before, after)


def test_bf16_mixed_on_cpu_keeps_the_target_and_the_ema_in_float32(cfg_factory):
    cfg = cfg_factory([*SMALL, "iterations=2", "model.distance=l2"])
    model, _, trainer = fit(cfg, precision="bf16-mixed")
    assert model.k == 2 and int(model.bad.total) == 0
    assert all(p.dtype == torch.float32 for p in model.target.parameters())
    for key in ("train/loss_ct", "train/loss_d"):
        assert trainer.callback_metrics[key].isfinite()
    x = torch.randn(2, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.denoise(model.target, x, torch.full((2,), 5.0), None)
    assert out.dtype == torch.float32  # the skip connection and the result stay float32 under autocast


def test_nonfinite_tensors_names_what_holds_nan_or_inf():
    from act_lightning.checkpoints import nonfinite_tensors

    state = {f"w{i}": torch.full((2,), float("nan") if i % 2 else 1.0) for i in range(14)}
    state["inf"] = torch.tensor([float("inf")])
    state["steps"] = torch.tensor(3)  # integer buffers are never non-finite
    assert nonfinite_tensors(state) == "w1, w3, w5, w7, w9 and 3 more tensors"
    assert nonfinite_tensors({"a": torch.ones(2), "b": torch.zeros(())}) == ""


def test_a_checkpoint_with_non_finite_weights_is_never_written(cfg_factory, tmp_path):
    from act_lightning.callbacks import AtomicCheckpointIO

    cfg = cfg_factory([*SMALL, "iterations=1", "model.distance=l2"])
    model, _, trainer = fit(cfg, plugins=[AtomicCheckpointIO()])
    good = tmp_path / "last.ckpt"
    trainer.save_checkpoint(good)
    before = good.read_bytes()
    with torch.no_grad():
        next(model.generator.parameters())[0] = float("nan")
    with pytest.raises(RuntimeError, match=r"non-finite weights in generator\."):
        trainer.save_checkpoint(good)
    assert good.read_bytes() == before  # the last checkpoint on disk stays as it was
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_controller_sees_the_mean_r1_penalty_of_the_iteration_with_ada_beta(cfg_factory, monkeypatch):
    # every per-example R1 term the discriminator step computed: train/r1 is their mean, and the
    # controller's EMA moves from the threshold by ada_beta towards it (Kong et al.'s ADA)
    from act_lightning import module as module_code

    terms, discriminator_losses_at = [], module_code.discriminator_losses_at

    def recording(*args, **kwargs):
        losses = discriminator_losses_at(*args, **kwargs)
        terms.append(losses.r1.detach().clone())
        return losses

    monkeypatch.setattr(module_code, "discriminator_losses_at", recording)
    overrides = ["iterations=1", "model.r1_interval=1", "model.r1_threshold=1.0", "model.ada_beta=0.5"]
    model, _, trainer = fit(cfg_factory([*SMALL, *overrides]))
    r1 = torch.cat(terms)
    assert r1.numel() == 2 and r1.min() > 0  # the 4 images of D's half: 2 fake + 2 real pairs
    assert trainer.callback_metrics["train/r1"].item() == pytest.approx(r1.mean().item(), rel=1e-6)
    assert model.r1_ema.item() == pytest.approx(0.5 * 1.0 + 0.5 * r1.mean().item(), rel=1e-6)
    assert model.r1_ema.item() > 1.0  # so p rose by the global batch (both halves) x interval / ada_length
    assert model.aug_p.item() == pytest.approx(2 * 4 / model.hparams.ada_length, rel=1e-6)


def test_the_discriminator_sees_the_generators_noise_conditioning(cfg_factory):
    # c_noise=log: D is conditioned on 250 ln(sigma), as the generator is (iCT's and ECT's networks)
    from act_lightning.module import Critic

    seen = []
    critic = Critic(lambda x, c, y: seen.append(c) or x.sum((1, 2, 3)), "log")
    sigma = torch.tensor([0.5, 2.0, 80.0])
    critic(torch.zeros(3, 1, 2, 2), sigma, None)
    torch.testing.assert_close(seen[0].flatten(), 250 * sigma.log())


def test_the_warm_up_ramps_the_learning_rate_linearly_over_warmup_iterations(cfg_factory):
    # lr(k) = lr * min(1, (k + 1) / warmup): a quarter of it at the first iteration of a 4-iteration warm-up
    model = instantiate(cfg_factory([*SMALL, "model.warmup=4"]).model)
    optimizers, schedulers = model.configure_optimizers()
    assert len(schedulers) == 2  # G's and D's
    for optimizer, scheduler in zip(optimizers, schedulers):
        assert [scheduler.lr_lambdas[0](k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
        group = optimizer.param_groups[0]
        assert group["lr"] == pytest.approx(group["initial_lr"] / 4)


def test_r1_gamma_zero_runs_no_r1_pass_and_leaves_the_augmentation_controller_alone(cfg_factory):
    cfg = cfg_factory([*SMALL, "iterations=2", "model.r1_gamma=0", "model.r1_interval=1"])
    model, _, trainer = fit(cfg)
    assert model.r1_ema.item() == cfg.model.r1_threshold  # no R1 statistic ever reached the controller
    assert model.aug_p.item() == 0.0
    assert "train/r1" not in trainer.callback_metrics


@pytest.mark.parametrize("foreach", [True, False])
def test_ema_update_lerps_the_parameters_and_copies_the_buffers(foreach):
    torch.manual_seed(0)
    net, source = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        for p in (*net.parameters(), *source.parameters()):
            p.normal_()
    source.running_mean.normal_()
    source.num_batches_tracked += 5
    before = [p.detach().clone() for p in net.parameters()]
    ema_update(net, source, 0.9, foreach=foreach)
    for b, a, s in zip(before, net.parameters(), source.parameters()):
        torch.testing.assert_close(a, 0.9 * b + 0.1 * s)  # theta^- <- mu theta^- + (1 - mu) theta
    assert torch.equal(net.running_mean, source.running_mean) and int(net.num_batches_tracked) == 5


def test_what_each_network_backpropagates_over_its_micro_batches_sums_to_its_logged_mean_loss(
    cfg_factory, monkeypatch
):
    # the gradient is that of the logged loss, the mean over the half-batch: each micro-batch contributes
    # its sum divided by the whole half's size (G: B_G examples, D: B_D / 2 fake-real pairs), so neither
    # the number of micro-batches nor the discriminator's two halves scale the step (which SGD would see)
    cfg = cfg_factory([*SMALL, "iterations=1", "data.global_batch_size=8", "model.r1_interval=1"])
    backpropagated = []
    original = ACTModule.manual_backward

    def recording(self, loss, *args, **kwargs):
        backpropagated.append(loss.detach().item())
        return original(self, loss, *args, **kwargs)

    monkeypatch.setattr(ACTModule, "manual_backward", recording)
    _, rows = fit_recording(cfg)
    assert len(backpropagated) == 4  # two micro-batches of 4, for G and then for D (its R1 term included)
    assert sum(backpropagated[:2]) == pytest.approx(rows[0]["train/loss_g"], rel=1e-5)
    assert sum(backpropagated[2:]) == pytest.approx(rows[0]["train/loss_d"], rel=1e-5)


def test_every_example_is_augmented_by_its_global_position_on_any_device_count(cfg_factory):
    """(seed, k, AUGMENT, stream): each stream (G's predictions, D's fakes, D's reals) is drawn for the
    global batch, and each rank and micro-batch takes its examples' numbers, so two ranks' augmented
    shares, or two micro-batches, are one device's augmented global batch, cut. (Each rank drew its own
    numbers, so the same example was augmented otherwise on another device count.) The same iteration
    draws the same again (a resume)."""
    from act_lightning.data.base import shard_of_global_batch

    cfg = cfg_factory(SMALL)
    model = instantiate(cfg.model)
    model.aug_p.fill_(1.0)
    images = torch.rand(16, cfg.data.channels, cfg.data.image_size, cfg.data.image_size) * 2 - 1
    labels = torch.zeros(16, dtype=torch.long)

    def augmented(rank: int, world: int, micro: int = 1) -> list[torch.Tensor]:
        """[gen, fake, real] of each micro-batch of this rank's share, augmented, then joined."""
        model._trainer = SimpleNamespace(global_rank=rank, world_size=world)
        mine = shard_of_global_batch(list(range(16)), rank, world)
        draws = model._draw(split_halves(images[mine], labels[mine], micro))
        parts = []
        for mb in draws.micro:
            fake, real = mb.data.disc.chunk(2)
            parts.append([mb.augment_gen(mb.data.gen), *mb.augment_disc.together(fake, real)])
        return [torch.cat(p) for p in zip(*parts, strict=True)]

    one = augmented(0, 1)
    assert all(torch.equal(a, b) for a, b in zip(one, augmented(0, 1), strict=True))  # drawn again alike
    for world in (2, 4):
        for rank in range(world):
            n, m = 8 // world, 4 // world
            cuts = (
                slice(rank * n, (rank + 1) * n),
                slice(rank * m, (rank + 1) * m),
                slice(rank * m, (rank + 1) * m),
            )
            for got, want, cut in zip(augmented(rank, world), one, cuts, strict=True):
                torch.testing.assert_close(got, want[cut], rtol=1e-5, atol=1e-6)
    for got, want in zip(augmented(0, 1, micro=2), one, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(one[0], split_halves(images, labels).gen)  # p = 1: it did augment


def test_a_non_finite_r1_leaves_the_augmentation_controller_as_it_is(cfg_factory):
    # a NaN or infinite R1 is the divergence guard's business; the controller read it as 0, or (infinite)
    # as 3.4e38, which held p at its maximum for thousands of iterations and put r1_ema ~1e37 in checkpoints
    model = instantiate(cfg_factory(SMALL).model)
    model._trainer = SimpleNamespace(world_size=1, strategy=SimpleNamespace(reduce=lambda x, reduce_op: x))
    for bad in (float("nan"), float("inf")):
        model.r1_ema.fill_(10.0)
        model.aug_p.fill_(0.5)
        model._update_augmentation(torch.tensor(bad), SimpleNamespace(gen_size=4, disc_size=4))
        assert (model.r1_ema.item(), model.aug_p.item()) == pytest.approx((10.0, 0.5))
    h = model.hparams
    p, r1_ema = r1_controller_update(
        0.5,
        10.0,
        2.0,
        beta=h.ada_beta,
        threshold=h.r1_threshold,
        batch_size=8,
        interval=h.r1_interval,
        ada_length=h.ada_length,
    )
    model._update_augmentation(torch.tensor(2.0), SimpleNamespace(gen_size=4, disc_size=4))  # a finite one
    assert (model.r1_ema.item(), model.aug_p.item()) == pytest.approx((r1_ema.item(), p.item()))


def test_a_resume_on_class_folders_renamed_since_is_refused_naming_both_orders():
    from act_lightning.data import DataError
    from act_lightning.module import check_label_names

    check_label_names(["apple", "mango"], ["apple", "mango"])
    check_label_names(None, ["apple", "mango"])  # a checkpoint from before they were kept
    check_label_names(["apple", "mango"], None)  # unconditional data, or official labels
    with pytest.raises(
        DataError, match=r"now mango, zz_apple; this run was trained with apple, mango \(class k"
    ):
        check_label_names(["apple", "mango"], ["mango", "zz_apple"])
