"""The speed options change how the iteration runs, never what it computes: against the baseline
(`perf=baseline`) the losses, the weights and the augmentation state agree to float tolerance."""

import os

import lightning as L
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from hydra.utils import instantiate
from omegaconf import OmegaConf

from act_lightning.augment import AugmentPipe
from act_lightning.train import apply_process_settings
from tests.helpers_training import SMALL, bare_trainer

LOGGED = ("train/loss_g", "train/loss_ct", "train/loss_adv", "train/loss_d", "train/aug_p")


class _Record(L.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.rows.append({k: float(metrics[k]) for k in LOGGED if k in metrics})


def _run(cfg):
    L.seed_everything(0)
    model = instantiate(cfg.model)
    record = _Record()
    trainer = bare_trainer(callbacks=[record])
    trainer.fit(model, datamodule=instantiate(cfg.data))
    return model, record.rows


# R1 at k = 0, 2, 4 with a threshold of 0: p rises after the first R1 step, so iterations 1.. augment
# (the lazy path must then run the pipeline) while iteration 0 runs with p == 0 (the lazy path skips it).
ACTIVE = ["iterations=5", "model.r1_interval=2", "model.r1_threshold=0", "model.ada_length=100"]


def test_the_fast_path_computes_what_the_baseline_computes(cfg_factory):
    fast, fast_rows = _run(cfg_factory([*SMALL, *ACTIVE]))
    slow, slow_rows = _run(cfg_factory([*SMALL, *ACTIVE, "perf=baseline"]))
    assert fast.speed.channels_last and fast.speed.fast_attention and fast.speed.lazy_augment
    assert not slow.speed.channels_last and slow.speed.sync_logs and not slow.speed.foreach_ema
    assert fast.speed.joint_d_pass and not slow.speed.joint_d_pass
    assert float(fast.aug_p) > 0  # the augmentation did switch on during the run
    assert len(fast_rows) == len(slow_rows) == 5
    for a, b in zip(fast_rows, slow_rows, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    for (name, p), q in zip(fast.state_dict().items(), slow.state_dict().values(), strict=True):
        if p.is_floating_point():
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_the_augmentation_pipeline_runs_only_once_p_can_be_non_zero(cfg_factory, monkeypatch):
    calls = []
    forward = AugmentPipe.forward

    def counting(self, images, p, generator=None):
        calls.append(float(p))
        return forward(self, images, p, generator)

    monkeypatch.setattr(AugmentPipe, "forward", counting)
    _run(cfg_factory([*SMALL, "iterations=3", "model.r1_threshold=1e9"]))
    assert calls == []  # p stays 0: nothing to draw, nothing to resample
    _run(cfg_factory([*SMALL, "iterations=3", "model.r1_threshold=1e9", "model.speed.lazy_augment=false"]))
    assert len(calls) == 3 * 3 and set(calls) == {0.0}  # the baseline resamples every image at p = 0
    calls.clear()
    _run(cfg_factory([*SMALL, *ACTIVE]))
    assert len(calls) == 4 * 3 and min(calls) > 0  # iterations 1-4, three calls each, all with p > 0


def test_the_r1_pass_runs_the_classic_attention_and_the_others_the_fused_kernel(cfg_factory):
    model = instantiate(cfg_factory(SMALL).model)
    disc = model.discriminator
    processors = lambda: {type(m.processor) for m in disc._attention}  # noqa: E731
    assert disc._attention and processors() == {AttnProcessor2_0}
    fused = disc._attention[0].processor
    with disc.double_backward_safe():
        assert processors() == {AttnProcessor}
    assert disc._attention[0].processor is fused  # the same object: a compiled forward's guards hold
    baseline = instantiate(cfg_factory([*SMALL, "perf=baseline"]).model)
    assert {type(m.processor) for m in baseline.discriminator._attention} == {AttnProcessor}


def test_channels_last_puts_every_convolution_weight_in_nhwc(cfg_factory):
    model = instantiate(cfg_factory(SMALL).model)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)


def test_threads_and_tf32_are_set_per_process_and_checked(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        apply_process_settings(OmegaConf.create({"threads": 1, "tf32": False}))
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        apply_process_settings(OmegaConf.create({"threads": "auto", "tf32": True}))
        assert torch.get_num_threads() == 1  # auto changes nothing that was chosen before
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with pytest.raises(ValueError, match="threads must be auto or a positive integer, got 0"):
            apply_process_settings(OmegaConf.create({"threads": 0}))
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True


def test_compiled_networks_compute_what_the_eager_ones_compute(cfg_factory):
    # Dynamo's graph capture (the eager backend: inductor's code generation takes minutes on the CPU)
    # through manual optimisation, both updates, and the R1 pass, which must run D uncompiled.
    overrides = [*SMALL, "iterations=3", "model.r1_interval=2"]
    compiled, compiled_rows = _run(cfg_factory([*overrides, "model.speed.compile=eager"]))
    assert compiled.generator._compiled_call_impl is not None
    assert compiled.discriminator._compiled_call_impl is not None  # restored after the R1 passes
    _, eager_rows = _run(cfg_factory(overrides))
    for a, b in zip(compiled_rows, eager_rows, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)


def test_one_discriminator_pass_over_both_halves_equals_two_passes_with_labels(cfg_factory):
    from act_lightning.losses import discriminator_losses

    torch.manual_seed(0)
    model = instantiate(cfg_factory(SMALL).model)
    weight = torch.randn(5, 64, requires_grad=True)  # a class-conditional linear critic
    critic = lambda x, s, y: (x.flatten(1) * weight[y]).sum(1) * s  # noqa: E731
    args = dict(
        sigmas=model.schedule.sigmas(10),
        schedule=model.schedule,
        online=lambda x, s, y: x * 0.5 + y.view(-1, 1, 1, 1),
        critic=critic,
        augment=lambda x: x.flip(-1),
        r1_gamma=10.0,
        with_r1=False,
    )
    x, z, r = torch.randn(3, 2, 1, 8, 8)
    y_fake, y_real = torch.tensor([1, 4]), torch.tensor([0, 3])
    j_fake, j_real = torch.tensor([3, 9]), torch.tensor([1, 5])
    results = []
    for joint in (True, False):
        losses = discriminator_losses(x, y_fake, j_fake, z, r, y_real, j_real, joint=joint, **args)
        (grad,) = torch.autograd.grad(losses.objective(0.3).sum(), weight)
        results.append((losses, grad))
    (a, grad_a), (b, grad_b) = results
    torch.testing.assert_close(a.fake, b.fake)
    torch.testing.assert_close(a.real, b.real)
    torch.testing.assert_close(grad_a, grad_b)
