"""Checks that need a CUDA device (skipped without one): fp16 mixed precision with loss scaling and the
lazy R1 penalty at the paper's network size, both DDP strategies on the GPU, an iteration free of host
synchronisation, and inductor's compiled networks (with CUDA graphs too) against eager ones."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from act_lightning.train import train
from tests.conftest import compose
from tests.helpers_training import bare_trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GPU = [
    "trainer.accelerator=gpu",
    "trainer.devices=1",
    "eval=null",
    "callbacks.samples.every_n_iterations=100",
]


def _metrics(run_dir) -> dict[str, list[float]]:
    import csv

    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {key: [float(r[key]) for r in rows if r.get(key)] for key in rows[0]}


def test_fp16_loss_scaling_with_lazy_r1_at_the_paper_size(tmp_path):
    # CIFAR-10's full-size networks under 16-mixed; R1 every 2 iterations, so it runs under loss scaling
    cfg = compose(
        [
            "experiment=cifar10",
            "data=synthetic",
            *GPU,
            "trainer.precision=16-mixed",
            "trainer.log_every_n_steps=1",
            "model.lpips_pretrained=false",
            "model.r1_interval=2",
            "data.batch_size=16",
            "iterations=12",
            "logger=csv",
        ],
        run_dir=str(tmp_path),
    )
    summary = train(cfg)
    assert summary["finished"]
    metrics = _metrics(tmp_path)
    r1 = metrics["train/r1"]
    assert len(r1) >= 5 and all(math.isfinite(v) and v > 0 for v in r1)  # R1 in float32: finite, not 0
    for key in ("train/loss_ct", "train/loss_adv", "train/loss_d"):
        assert all(math.isfinite(v) for v in metrics[key]), key
    assert metrics["train/skipped_updates"][-1] == 0  # overflowing scaled gradients are the scaler's business
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    assert all(v.isfinite().all() for v in state.values() if v.is_floating_point())
    assert all(state[k].dtype == torch.float32 for k in state if k.startswith("target."))  # EMA in float32
    assert any("scaler" in key.lower() or "MixedPrecision" in key for key in ckpt)  # loss scaling was on


@pytest.mark.parametrize("strategy", ["ddp", "ddp_find_unused_parameters_true"])
def test_both_ddp_strategies_on_a_gpu(strategy, tmp_path):
    cfg = compose(
        ["debug=smoke", "data=synthetic", *GPU, f"trainer.strategy={strategy}"], run_dir=str(tmp_path)
    )
    summary = train(cfg)
    assert summary["finished"] and summary["iteration"] == 4


# CIFAR-10's layout at smoke size; R1 at k = 0 and 2, and p > 0 after the first R1 step, so iterations 1-3
# augment (the controller's new p reaches the host without waiting: DeferredRead)
SMALL_GPU = [
    "experiment=cifar10",
    "debug=smoke",
    "data=synthetic",
    "data.batch_size=4",
    "model.r1_interval=2",
    "model.r1_threshold=0",
    "model.ada_length=100",
]


class _Losses(L.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        keys = ("train/loss_ct", "train/loss_adv", "train/loss_d")
        self.rows.append([float(trainer.callback_metrics[k]) for k in keys])


class _SyncFree(L.Callback):
    """Iterations from `first` on run under set_sync_debug_mode("error"): any call that makes the host
    wait for the device raises."""

    def __init__(self, first: int):
        self.first, self.checked = first, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.k >= self.first:
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.set_sync_debug_mode(0)
        if pl_module.k - 1 >= self.first:
            self.checked.append(pl_module.k - 1)

    def on_exception(self, trainer, pl_module, exception):
        # before Lightning's teardown moves the optimisers' state to the host, which would raise again
        # and hide where the iteration synchronised
        torch.cuda.set_sync_debug_mode(0)


def _fit_on_gpu(tmp_path, overrides, callbacks):
    cfg = compose([*SMALL_GPU, *overrides], run_dir=str(tmp_path))
    L.seed_everything(0)
    model = instantiate(cfg.model)
    trainer = bare_trainer(accelerator="gpu", log_every_n_steps=1, callbacks=callbacks)
    trainer.fit(model, datamodule=instantiate(cfg.data))
    return model


def test_an_iteration_runs_without_host_synchronisation(tmp_path):
    # iteration 2 runs R1 and the controller, iteration 3 does not; both augment (p > 0)
    sync = _SyncFree(first=2)
    try:
        model = _fit_on_gpu(tmp_path, ["iterations=4"], [sync])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert sync.checked == [2, 3] and float(model.aug_p) > 0


@pytest.mark.parametrize(
    ("mode", "attention"),
    [
        ("default", "fused"),
        ("reduce-overhead", "fused"),
        ("reduce-overhead", "classic"),
        ("reduce-overhead", "flex"),
    ],
)
def test_inductor_compiled_training_matches_eager(tmp_path, mode, attention):
    # The R1 pass (k = 0, 2) runs D eagerly; everything else runs inductor's kernels (CUDA graphs too);
    # classic: diffusers' classic attention everywhere (bench_train's cuda_graphs_classic), both runs;
    # flex: the compiled graphs attend with flex_attention's generated kernel, the eager run fused, and
    # the R1 pass and the augmentation pipeline (which SMALL_GPU runs from k = 1 on) are compiled graphs
    # too (compile_r1, compile_augment): bench_train's cuda_graphs_flex_r1. No graph
    # breaks, and under CUDA graphs no graph that inductor left to launch its kernels one by one (which
    # only a warning in the log would say: its reason is there).
    from torch._dynamo.utils import counters

    compiled, eager = _Losses(), _Losses()
    same = ["iterations=4", *(["model.speed.fast_attention=false"] if attention == "classic" else [])]
    on = ["model.speed.compile=true", f"model.speed.compile_mode={mode}"]
    candidate = [
        "model.speed.flex_attention=true",
        "model.speed.compile_r1=true",
        "model.speed.compile_augment=true",
    ]
    on += candidate if attention == "flex" else []
    torch._dynamo.reset()
    counters.clear()
    model = _fit_on_gpu(tmp_path / "compiled", [*same, *on], [compiled])
    assert model.generator._compiled_call_impl is not None
    breaks, skips = sum(counters["graph_break"].values()), counters["inductor"]["cudagraph_skips"]
    _fit_on_gpu(tmp_path / "eager", same, [eager])
    assert len(compiled.rows) == len(eager.rows) == 4
    for a, b in zip(compiled.rows, eager.rows, strict=True):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-5)  # inductor fuses and reorders float sums
    assert breaks == 0, dict(counters["graph_break"])
    assert skips == 0 or mode != "reduce-overhead", f"{skips} graphs without CUDA graphs: see the log"


@pytest.mark.parametrize("tf32", [False, True])
@pytest.mark.parametrize(("heads", "positions"), [(16, 256), (32, 16)])
def test_flex_attention_compiled_for_cuda_matches_the_fused_kernel(tf32, heads, positions):
    # The CIFAR-10 networks' heads: 8 channels (padded to 16 for the kernel), at 16 x 16 (256 positions)
    # and in the middle blocks at 4 x 4 (16 positions, less than one of the kernel's blocks); forward and
    # backward against F.scaled_dot_product_attention in float32. With TF32 matmuls on (the experiments'
    # tf32=true) the generated kernel's dot products run in TF32: a TF32 tolerance.
    import torch.nn.functional as F

    from act_lightning.nn.attention import attention

    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (8, heads, positions, 8)
    q, k, v = (torch.randn(shape, device="cuda", generator=g, requires_grad=True) for _ in range(3))
    upstream = torch.randn(shape, device="cuda", generator=g)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        out = torch.compile(attention, fullgraph=True, dynamic=False)(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), upstream)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
        torch._dynamo.reset()
    expected = F.scaled_dot_product_attention(q, k, v)
    expected_grads = torch.autograd.grad(expected, (q, k, v), upstream)
    tolerance = {"rtol": 1e-2, "atol": 5e-3} if tf32 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(out, expected, **tolerance)
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, **tolerance)


def test_a_gpu_model_samples_from_cpu_noise_and_a_cpu_generator(tmp_path):
    """torch.randn's CPU noise and a CPU torch.Generator for a model on the GPU, as a user writes them:
    the noise goes where the weights are, and the later steps' noise is drawn on the generator's device
    (torch refuses a CPU generator for a CUDA draw), the same draws as on the CPU."""
    from act_lightning.checkpoints import load_model

    train(compose(["debug=smoke", "data=synthetic", "iterations=2", "eval=null"], run_dir=str(tmp_path)))
    model, _, _ = load_model(tmp_path / "checkpoints" / "last.ckpt", "cuda")
    z = torch.randn(2, 1, 8, 8)
    images = model.sample(z, taus=[8.0], generator=torch.Generator().manual_seed(3))
    assert images.device.type == "cuda"
    cpu, _, _ = load_model(tmp_path / "checkpoints" / "last.ckpt", "cpu")
    expected = cpu.sample(z, taus=[8.0], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(images.cpu(), expected, rtol=1e-3, atol=1e-3)
