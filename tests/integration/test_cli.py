"""The training CLI as users call it: smoke runs and a shortened quickstart. (ImageNet 64 and LSUN Cat run
in smoke size on files in their official formats in test_data_cli.py.)"""

import csv
import json

import pytest
import torch

from act_lightning.train import train
from tests.conftest import compose, run_cli, run_module


@pytest.mark.parametrize("experiment", ["quickstart", "cifar10"])
def test_smoke_run_of_every_experiment_on_synthetic_data(experiment, tmp_path, request):
    if experiment == "cifar10":  # the same command as the evaluation tests': that one run
        run = request.getfixturevalue("cifar10_smoke_run")
    else:
        run = tmp_path / "run"
        result = run_cli([f"experiment={experiment}", "debug=smoke", "data=synthetic"], run)
        assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert int(ckpt["state_dict"]["iteration"]) == 4
    # the frozen LPIPS network (cifar10's distance) is rebuilt from its own weights, never saved
    assert not any(k.startswith("distance.") for k in ckpt["state_dict"])
    assert (run / "samples" / "last.png").is_file()
    assert (run / "metrics.csv").is_file()


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_shortened_quickstart_writes_checkpoint_grid_metrics_and_curve(tmp_path):
    run = tmp_path / "run"
    result = run_cli(
        [
            "iterations=80",  # a tenth of the quickstart: the distance falls already
            "eval.every=40",
            "eval.num_samples=297",  # one set at the held-out count (eval.subset_size)
            "callbacks.samples.every_n_iterations=40",
            "callbacks.checkpoint.every_n_iterations=40",
        ],
        run,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ACT" in result.stderr  # the progress bar
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert int(ckpt["state_dict"]["iteration"]) == 80
    assert not any(k.startswith("distance.") for k in ckpt["state_dict"])
    for name in ("iter_0000000.png", "iter_0000040.png", "iter_0000080.png", "last.png"):
        assert (run / "samples" / name).is_file(), name
    assert (run / "fid_curve.png").stat().st_size > 1000

    rows = _rows(run / "metrics.csv")
    fd = [float(r["val/fd"]) for r in rows if r.get("val/fd")]
    assert len(fd) == 3  # iterations 0, 40 and 80
    assert any(r.get("train/loss_ct") for r in rows) and any(r.get("train/loss_d") for r in rows)

    summary = json.loads((run / "metric_summary.json").read_text())
    refs = summary["references"]
    assert 0 < refs["real"] < refs["noise"]  # held-out digits are far closer than noise
    assert [h["iteration"] for h in summary["history"]] == [0, 40, 80]
    assert summary["history"][-1]["value"] < summary["history"][0]["value"]  # training helps already
    last = summary["history"][-1]["value"]  # on the scale real = 0, noise = 1 (README)
    assert summary["normalised"] == pytest.approx((last - refs["real"]) / (refs["noise"] - refs["real"]))
    # the lowest of the three, with its own normalised value (train's last line says the best's)
    assert summary["best"] == {"iteration": 80, "value": last, "normalised": summary["normalised"]}
    # the generated, real and noise distances all at the held-out count: one ruler (README, "scale")
    assert summary["subset_size"] == summary["num_samples"] == 297
    # the progress bar's last read-out shows the last evaluation, not the one before it
    final = result.stderr.rsplit("ACT: 100%", 1)[-1]
    assert f"fd={summary['history'][-1]['value']:.4g}" in final, final[-500:]
    # the run's last line says where to look: the best value (on the scale above) and the files
    normalised = (last - refs["real"]) / (refs["noise"] - refs["real"])
    said = f"best val/fd {last:.4g} at iteration 80 (normalised {normalised:.2g}); see "
    said += "checkpoints/best.ckpt, samples/last.png, fid_curve.png, metric_summary.json"
    assert said in result.stdout, result.stdout[-500:]


@pytest.mark.slow
def test_diffusion_pretraining_then_ect_tuning_from_its_checkpoint(tmp_path):
    """README "Start from a diffusion model", shortened: experiment=quickstart_diffusion, then the quickstart
    from its last.ckpt with ECT's curriculum. The tuning run starts from the diffusion model's sampling
    network (its target), records where it came from, and continues from its own checkpoint afterwards."""
    pretrain, tune = tmp_path / "diffusion", tmp_path / "tune"
    result = run_cli(["experiment=quickstart_diffusion", "debug=smoke", "model.sampling_ema=0.5"], pretrain)
    assert result.returncode == 0, result.stderr[-3000:]
    source = torch.load(pretrain / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert source["act_config"]["model"]["objective"] == "diffusion"
    assert not any(k.startswith("discriminator.") for k in source["state_dict"])
    assert (pretrain / "samples" / "last.png").is_file()  # Heun's samples
    init = str(pretrain / "checkpoints" / "last.ckpt")
    # iterations=0 would be refused: one iteration at a learning rate of 1e-30 leaves the weights as loaded
    result = run_cli(
        [
            "experiment=quickstart",
            f"init_from={init}",
            "model.curriculum=ect",
            "debug=smoke",
            "iterations=1",
            "model.optimizer.lr=1e-30",
            "model.d_optimizer.lr=1e-30",
            "model.schedule.teacher=online",
        ],
        tune,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "init_from=" in result.stdout + result.stderr  # the log says where the weights came from
    assert "without init_from" not in result.stdout + result.stderr
    tuned = torch.load(tune / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert tuned["act_history"][0]["init_from"] == init
    assert int(tuned["state_dict"]["iteration"]) == 1
    for key, value in source["state_dict"].items():
        if key.startswith("target."):
            torch.testing.assert_close(tuned["state_dict"]["generator." + key[7:]], value, rtol=0, atol=1e-20)
    assert any(k.startswith("discriminator.") for k in tuned["state_dict"])  # built anew for the tuning
    # a second launch into the folder continues the run from its own checkpoint (not from init_from again)
    result = run_cli(
        [
            "experiment=quickstart",
            f"init_from={init}",
            "model.curriculum=ect",
            "debug=smoke",
            "iterations=2",
            "model.optimizer.lr=1e-30",
            "model.d_optimizer.lr=1e-30",
            "model.schedule.teacher=online",
            "resume_changes=[iterations]",
        ],
        tune,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = torch.load(tune / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert int(resumed["state_dict"]["iteration"]) == 2


@pytest.mark.slow
def test_the_cifar10_recipes_chain_diffusion_ect_and_a_converted_ddpm(tmp_path):
    """README "Start from a diffusion model", CIFAR-10 commands under debug=smoke on synthetic images:
    experiment=cifar10_diffusion, cifar10_ect and cifar10_ect_act from its checkpoint, and
    `python -m act_lightning.convert_diffusers DIR OUT` of a DDPM folder then cifar10_ect from that."""
    from act_lightning.train import train
    from tests.conftest import compose
    from tests.unit.test_convert_diffusers import make_scheduler, make_unet, save_ddpm  # its layout, small

    quick = ["debug=smoke", "data=synthetic", "iterations=2", "eval=null"]
    train(compose(["experiment=cifar10_diffusion", *quick], run_dir=str(tmp_path / "diffusion")))
    init = tmp_path / "diffusion" / "checkpoints" / "last.ckpt"
    for experiment in ("cifar10_ect", "cifar10_ect_act"):
        summary = train(
            compose(
                [f"experiment={experiment}", f"init_from={init}", *quick], run_dir=str(tmp_path / experiment)
            )
        )
        assert summary["finished"]
        ckpt = torch.load(
            tmp_path / experiment / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
        )
        assert ckpt["act_history"][0]["init_from"] == str(init)
        assert ckpt["act_config"]["model"]["schedule"]["curriculum"] == "ect"
        assert any(k.startswith("discriminator.") for k in ckpt["state_dict"]) == (
            experiment == "cifar10_ect_act"
        )

    folder = save_ddpm(tmp_path / "ddpm-cifar10-32", make_unet(3, sample_size=32), make_scheduler())
    out = tmp_path / "ddpm_cifar10.ckpt"
    result = run_module("convert_diffusers", [folder, out], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "from_ddpm"
    train(compose(["experiment=cifar10_ect", f"init_from={out}", *quick], run_dir=str(run)))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    generator = ckpt["act_config"]["model"]["generator"]
    assert generator["_target_"].endswith("VPEpsilonBackbone")  # the folder's network, not the experiment's
    assert generator["unet"]["dropout"] == 0.2  # but ECT's dropout of the experiment


def test_ects_curriculum_without_a_diffusion_model_to_tune_says_so(tmp_path, caplog):
    """experiment=cifar10_ect (or model.curriculum=ect) without init_from trains ECT from random weights:
    allowed, with a warning that names init_from."""
    overrides = ["model.curriculum=ect", "debug=smoke", "iterations=1", "eval=null"]
    train(compose(overrides, run_dir=str(tmp_path)))
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("ECT's curriculum (model.curriculum=ect) without init_from" in m for m in said), said
