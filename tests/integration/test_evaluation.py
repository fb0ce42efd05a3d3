"""Evaluation and tracking through the CLIs: FID during training (W&B offline history, best checkpoint),
`python -m act_lightning.evaluate`, start-up errors, and DDP against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from act_lightning.metrics.inception import WEIGHTS_FILE, WEIGHTS_URL
from tests.conftest import ROOT, run_cli
from tests.helpers_wandb import read_run


def run_evaluate(args: list[str], tmp_path, timeout: int = 600):
    cmd = [sys.executable, "-m", "act_lightning.evaluate", *args, f"hydra.run.dir={tmp_path / 'eval'}"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    """The CIFAR-10 experiment (W&B logger, Inception FID) in smoke size on synthetic images."""
    run = tmp_path_factory.mktemp("cifar") / "run"
    result = run_cli(["experiment=cifar10", "debug=smoke", "data=synthetic"], run)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_offline_wandb_history_holds_val_fid_the_best_value_the_config_and_the_grids(cifar_run):
    summary = json.loads((cifar_run / "metric_summary.json").read_text())
    assert [h["iteration"] for h in summary["history"]] == [0, 4]  # eval.every=4 in smoke size

    logged = read_run(cifar_run)
    fid_rows = [row for row in logged["history"] if "val/fid" in row]
    assert [row["trainer/global_step"] for row in fid_rows] == [0, 4]  # x-axis: ACT iterations
    assert [row["val/fid"] for row in fid_rows] == pytest.approx([h["value"] for h in summary["history"]])
    assert logged["summary"]["val/fid_best"] == pytest.approx(summary["best"]["value"])
    assert logged["summary"]["val/fid_best_iteration"] == summary["best"]["iteration"] > 0
    assert any("train/loss_ct" in row for row in logged["history"])
    assert any("train/aug_p" in row for row in logged["history"])
    assert any("samples/one_step" in key for row in logged["history"] for key in row)
    assert logged["name"] == "cifar10[data=synthetic,debug=smoke]" and logged["group"] == "cifar10"
    config = logged["config"]  # the whole resolved config
    assert config["experiment_name"] == "cifar10"
    assert config["model"]["gan_ratio"] == 0.3 and config["eval"]["features"] == "inception"

    assert (cifar_run / "fid_curve.png").stat().st_size > 1000
    assert (cifar_run / "metrics.csv").read_text().count("val/fid") == 1  # the header: csv logged too


def test_best_checkpoint_is_the_lowest_fid_after_iteration_0(cifar_run):
    summary = json.loads((cifar_run / "metric_summary.json").read_text())
    trained = [h for h in summary["history"] if h["iteration"] > 0]
    best = min(trained, key=lambda h: h["value"])
    assert summary["best"] == best
    ckpt = torch.load(cifar_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert int(ckpt["state_dict"]["iteration"]) == best["iteration"]
    assert ckpt["act_config"]["experiment_name"] == "cifar10"


def test_evaluate_reproduces_the_training_fid_and_writes_json_next_to_the_checkpoint(cifar_run, tmp_path):
    ckpt = cifar_run / "checkpoints" / "best.ckpt"
    summary = json.loads((cifar_run / "metric_summary.json").read_text())
    # The smoke run evaluated 8 samples in one batch of 8 with seed 0: the same samples here.
    result = run_evaluate([f"ckpt={ckpt}", "num_samples=8", "batch_size=8"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1-step FID" in result.stderr  # the progress bar
    out = json.loads((cifar_run / "checkpoints" / "best.ckpt.eval.json").read_text())
    assert out["iteration"] == summary["best"]["iteration"] and out["num_samples"] == 8
    assert out["results"]["1-step"]["fid"] == pytest.approx(summary["best"]["value"], rel=1e-6)
    assert out["results"]["1-step"]["taus"] == [80.0]
    assert out["results"]["2-step"]["taus"] == [80.0, 1.3824]
    assert out["results"]["2-step"]["fid"] != out["results"]["1-step"]["fid"]
    assert f"1-step: {out['results']['1-step']['fid']:.4f}" in result.stdout


def test_evaluate_names_a_missing_or_foreign_checkpoint(tmp_path):
    result = run_evaluate([f"ckpt={tmp_path / 'nope.ckpt'}"], tmp_path)
    assert (
        result.returncode != 0 and f"ckpt={tmp_path / 'nope.ckpt'}: no such checkpoint file" in result.stderr
    )
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    result = run_evaluate([f"ckpt={foreign}"], tmp_path)
    assert result.returncode != 0 and "holds no training config" in result.stderr


def test_missing_inception_weights_stop_the_run_at_start_up(tmp_path):
    run = tmp_path / "run"
    env_home = tmp_path / "torch"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "act_lightning.train",
            "experiment=cifar10",
            "debug=smoke",
            "data=synthetic",
            "eval.inception_weights=null",
            f"hydra.run.dir={run}",
        ],
        cwd=ROOT,
        env={**os.environ, "TORCH_HOME": str(env_home), "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert WEIGHTS_FILE in result.stderr and WEIGHTS_URL in result.stderr
    assert str(env_home / "hub" / "checkpoints" / WEIGHTS_FILE) in result.stderr
    assert not (run / "checkpoints").exists() and not (run / "metrics.csv").exists()  # before training


def test_a_missing_published_reference_stops_the_run_at_start_up(tmp_path):
    run = tmp_path / "run"
    result = run_cli(
        [
            "experiment=imagenet64",
            "debug=smoke",
            "data=synthetic",
            f"eval.reference={tmp_path}/VIRTUAL_imagenet64_labeled.npz",
        ],
        run,
    )
    assert result.returncode != 0
    assert "openaipublic.blob.core.windows.net" in result.stderr and "eval.reference=train" in result.stderr
    assert not (run / "checkpoints").exists()


def test_tensorboard_logger_writes_events_and_metrics_csv(tmp_path):
    run = tmp_path / "run"
    result = run_cli(["debug=smoke", "logger=tensorboard"], run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert "val/fd" in (run / "metrics.csv").read_text()
