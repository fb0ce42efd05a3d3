"""One ACT iteration through Lightning: what moves, by how much, and what is counted."""

import copy

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from act_lightning import consistency as cm

SMALL = ["debug=smoke", "data=synthetic", "data.batch_size=4"]


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _fit_one(cfg):
    L.seed_everything(0)
    dm = instantiate(cfg.data)
    model = instantiate(cfg.model)
    before = {
        "gen": _params(model.generator),
        "target": _params(model.target),
        "disc": _params(model.discriminator) if model.discriminator is not None else None,
    }
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=dm)
    return model, before, trainer


def test_one_iteration_moves_g_and_d_and_the_target_by_the_exact_decay(cfg_factory):
    cfg = cfg_factory([*SMALL, "iterations=1", "model.r1_threshold=1e9"])
    model, before, trainer = _fit_one(cfg)
    assert model._k == 1 and int(model.iteration) == 1
    assert trainer.global_step == 2  # Lightning counts both optimiser steps; the schedule does not

    gen_after = _params(model.generator)
    assert any(not torch.equal(a, b) for a, b in zip(before["gen"], gen_after))
    assert any(not torch.equal(a, b) for a, b in zip(before["disc"], _params(model.discriminator)))

    # k = 0: N(0) = bins_min = 2, mu = exp(2 ln(mu0) / 1) = mu0^2; the target started equal to G
    mu = cm.target_ema_decay(
        cm.num_scales(0.0, cfg.model.bins_min, cfg.model.bins_max), cfg.model.bins_min, cfg.model.mu0
    )
    assert mu == pytest.approx(cfg.model.mu0**2)
    for t0, g1, t1 in zip(before["target"], gen_after, _params(model.target)):
        torch.testing.assert_close(t1, mu * t0 + (1 - mu) * g1, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(t0, t1) for t0, t1 in zip(before["target"], _params(model.target)))


def test_gan_ratio_zero_is_plain_consistency_training(cfg_factory):
    cfg = cfg_factory([*SMALL, "iterations=2", "model.gan_ratio=0"])
    model, before, trainer = _fit_one(cfg)
    assert model.discriminator is None
    assert trainer.global_step == 2  # one optimiser step per iteration
    assert len(trainer.optimizers) == 1
    assert any(not torch.equal(a, b) for a, b in zip(before["gen"], _params(model.generator)))


def test_r1_drives_the_augmentation_probability(cfg_factory):
    # threshold 0: R1 > 0 so the EMA exceeds it and p rises by B * interval / ada_length per R1 step
    cfg = cfg_factory(
        [*SMALL, "iterations=3", "model.r1_threshold=0", "model.r1_interval=2", "model.ada_length=1000"]
    )
    model, _, _ = _fit_one(cfg)
    batch = 2 * 4  # both halves, one device
    # R1 runs at k = 0 and k = 2
    assert model.aug_p.item() == pytest.approx(2 * batch * 2 / 1000, rel=1e-6)
    assert model.r1_ema.item() > 0


def test_iteration_counter_drives_the_curriculum(cfg_factory):
    cfg = cfg_factory([*SMALL, "iterations=10", "model.bins_max=20"])
    model = instantiate(cfg.model)
    model._k = 5
    assert model.num_scales_now() == cm.num_scales(0.5, 2, 20)
    model._k = 10
    assert model.num_scales_now() == 20


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.bins_min=30", "model.bins_min (30) must not exceed model.bins_max"),
        ("model.gan_ratio=1.5", "model.gan_ratio must lie in [0, 1]"),
        ("model.lr=0", "model.lr must be positive"),
        ("model.d_lr=-1e-4", "model.d_lr must be positive"),
        ("iterations=0", "iterations must be a positive integer"),
        ("model.distance=l3", "model.distance must be one of"),
        ("model.optimizer=sgd", "model.optimizer must be one of"),
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
