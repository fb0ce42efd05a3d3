"""The training CLI as users call it: smoke runs and a shortened quickstart. (ImageNet 64 and LSUN Cat run
in smoke size on files in their official formats in test_data_cli.py.)"""

import csv
import json

import pytest
import torch

from tests.conftest import run_cli


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
    assert (run / "samples" / "last.png").is_file()
    assert (run / "metrics.csv").is_file()


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_shortened_quickstart_writes_checkpoint_grid_metrics_and_curve(tmp_path):
    run = tmp_path / "run"
    result = run_cli(
        [
            "iterations=160",
            "eval.every=80",
            "eval.num_samples=297",  # one set at the held-out count (eval.subset_size)
            "callbacks.samples.every_n_iterations=80",
            "callbacks.checkpoint.every_n_iterations=80",
        ],
        run,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ACT" in result.stderr  # the progress bar
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert int(ckpt["state_dict"]["iteration"]) == 160
    assert not any(k.startswith("distance.") for k in ckpt["state_dict"])
    for name in ("iter_0000000.png", "iter_0000080.png", "iter_0000160.png", "last.png"):
        assert (run / "samples" / name).is_file(), name
    assert (run / "fid_curve.png").stat().st_size > 1000

    rows = _rows(run / "metrics.csv")
    fd = [float(r["val/fd"]) for r in rows if r.get("val/fd")]
    assert len(fd) == 3  # iterations 0, 80 and 160
    assert any(r.get("train/loss_ct") for r in rows) and any(r.get("train/loss_d") for r in rows)

    summary = json.loads((run / "metric_summary.json").read_text())
    refs = summary["references"]
    assert 0 < refs["real"] < refs["noise"]  # held-out digits are far closer than noise
    assert [h["iteration"] for h in summary["history"]] == [0, 80, 160]
    assert summary["history"][-1]["value"] < summary["history"][0]["value"]  # training helps already
    # the generated, real and noise distances all at the held-out count: one ruler (README, "scale")
    assert summary["subset_size"] == summary["num_samples"] == 297
