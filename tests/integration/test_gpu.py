"""Checks that need a CUDA device (skipped without one): fp16 mixed precision with loss scaling and the
lazy R1 penalty at the paper's network size, and both DDP strategies on the GPU."""

from __future__ import annotations

import math

import pytest
import torch

from act_lightning.train import train
from tests.conftest import compose

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
