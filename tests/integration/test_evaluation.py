"""Evaluation and tracking through the CLIs: FID during training (W&B offline history, best checkpoint),
`python -m act_lightning.evaluate`, start-up errors, and DDP against one process."""

from __future__ import annotations

import json
import re
import shlex

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import act_lightning
from act_lightning.environment import environment
from act_lightning.evaluate import over_seeds, result_line
from act_lightning.metrics.inception import WEIGHTS_FILE, WEIGHTS_URL
from act_lightning.train import train
from tests.conftest import COMMAND_ENV, CONF, compose, run_module
from tests.helpers_readme import readme_commands
from tests.helpers_wandb import read_run


def run_evaluate(args: list[str], tmp_path, timeout: int = 600):
    # a new interpreter: `python -m act_lightning.evaluate` itself starts (its only test through the command)
    args = [*args, f"hydra.run.dir={tmp_path / 'eval'}"]
    env = COMMAND_ENV
    return run_module("evaluate", args, env=env, timeout=timeout, own_process=True)


@pytest.fixture
def cifar_run(cifar10_smoke_run):
    """The CIFAR-10 experiment (W&B logger, Inception FID) in smoke size on synthetic images, trained once
    for these tests and test_cli's (tests.conftest.cifar10_smoke_run)."""
    return cifar10_smoke_run


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
    assert config["model"]["schedule"]["gan_ratio"] == 0.3 and config["eval"]["features"] == "inception"

    assert (cifar_run / "fid_curve.png").stat().st_size > 1000
    assert (cifar_run / "metrics.csv").read_text().count("val/fid") == 1  # the header: csv logged too


def test_best_checkpoint_is_the_lowest_fid_after_iteration_0(cifar_run):
    summary = json.loads((cifar_run / "metric_summary.json").read_text())
    trained = [h for h in summary["history"] if h["iteration"] > 0]
    best = min(trained, key=lambda h: h["value"])
    assert summary["best"] == {"iteration": best["iteration"], "value": best["value"]}
    ckpt = torch.load(cifar_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert int(ckpt["state_dict"]["iteration"]) == best["iteration"]
    assert ckpt["act_config"]["experiment_name"] == "cifar10"


@pytest.mark.slow
def test_evaluate_reproduces_the_training_fid_and_writes_json_next_to_the_checkpoint(cifar_run, tmp_path):
    ckpt = cifar_run / "checkpoints" / "best.ckpt"
    summary = json.loads((cifar_run / "metric_summary.json").read_text())
    # The smoke run evaluated 4 samples in one batch of 4 with seed 0: the same samples here.
    result = run_evaluate([f"ckpt={ckpt}", "num_samples=4", "batch_size=4"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1-step FID" in result.stderr  # the progress bar
    out = json.loads((cifar_run / "checkpoints" / "best.ckpt.eval.json").read_text())
    assert out["iteration"] == summary["best"]["iteration"] and out["num_samples"] == 4
    assert out["inception_resize"] == 75  # the smoke run's random Inception's input, as it trained
    assert out["tf32"] is True  # the run's arithmetic on a GPU (train's tf32), recorded
    # the same samples up to float rounding: training ran the networks channels-last, evaluate standard
    assert out["results"]["1-step"]["fid"] == pytest.approx(summary["best"]["value"], rel=1e-5)
    assert out["results"]["1-step"]["taus"] == [80.0]
    assert out["results"]["2-step"]["taus"] == [80.0, 0.821]  # experiment=cifar10's level
    assert out["results"]["2-step"]["fid"] != out["results"]["1-step"]["fid"]
    assert f"1-step: fid {out['results']['1-step']['fid']:.4f}\n" in result.stdout  # the one metric asked for
    stages = out["stage_seconds"]  # where the time went besides the samplers
    assert list(stages) == ["checkpoint", "networks", "reference", "real_references", "samplers", "total"]
    sampled = out["results"]["1-step"]["seconds"] + out["results"]["2-step"]["seconds"]
    assert stages["samplers"] == pytest.approx(sampled, abs=0.3)
    assert stages["total"] == pytest.approx(sum(list(stages.values())[:-1]), abs=0.3)
    # what measured (this process's versions) and what trained (the last launch's, kept in the checkpoint)
    assert (
        out["environment"] == environment()
        and out["environment"]["act_lightning"] == act_lightning.__version__
    )
    assert out["trained_with"] == torch.load(ckpt, weights_only=True)["act_history"][-1]["environment"]
    assert out["trained_with"]["torch"] == torch.__version__


def test_laps_time_consecutive_stages_and_refuse_a_stage_twice(monkeypatch):
    from act_lightning import evaluate as evaluate_module

    clock = iter([10.0, 10.5, 12.0, 12.04])
    monkeypatch.setattr(evaluate_module.time, "perf_counter", lambda: next(clock))
    lap = evaluate_module.Laps()
    lap("checkpoint")
    lap("networks")
    with pytest.raises(ValueError, match="stage 'networks' timed twice"):
        lap("networks")
    with pytest.raises(ValueError, match="'total' is the sum's name"):
        lap("total")
    lap("samplers")
    assert lap.seconds == {"checkpoint": 0.5, "networks": 1.5, "samplers": 0.0, "total": 2.0}


def _evaluate(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from act_lightning.evaluate import evaluate

    with initialize_config_dir(str(CONF), version_base="1.3"):
        return evaluate(hydra_compose("evaluate", overrides=overrides))


def test_an_output_that_cannot_be_written_is_refused_before_sampling(cifar_run, tmp_path, monkeypatch):
    """A folder evaluate cannot write into would have lost the whole evaluation at its last line."""
    from act_lightning import evaluate

    monkeypatch.setattr(evaluate, "build_model", lambda *a: pytest.fail("the networks were built"))
    (tmp_path / "a_file").write_text("")
    ckpt = cifar_run / "checkpoints" / "best.ckpt"
    with pytest.raises(
        NotADirectoryError, match=f"output's folder={tmp_path / 'a_file'}: .* is not a folder"
    ):
        _evaluate([f"ckpt={ckpt}", f"output={tmp_path / 'a_file' / 'eval.json'}"])
    with pytest.raises(ValueError, match=f"output={tmp_path} is a folder: name the file to write"):
        _evaluate([f"ckpt={ckpt}", f"output={tmp_path}"])  # it failed at the rename, after sampling
    # the checkpoint itself, or another run file, was replaced by a 1 kB JSON without a word
    copy = tmp_path / "copy.ckpt"
    copy.write_bytes(ckpt.read_bytes())
    with pytest.raises(ValueError, match="is the checkpoint being evaluated"):
        _evaluate([f"ckpt={copy}", f"output={copy}"])
    with pytest.raises(ValueError, match=r"already exists and is no .json file .* name a .json file"):
        _evaluate([f"ckpt={ckpt}", f"output={copy}"])
    assert copy.read_bytes() == ckpt.read_bytes()


@pytest.fixture
def tf32_flags():
    """PyTorch's TF32 flags, restored after the test (process-wide settings)."""
    kept = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # PyTorch's
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = kept


def test_tf32_is_the_runs_unless_given_and_a_non_boolean_is_refused(tf32_flags):
    from act_lightning.evaluate import use_tf32

    run = OmegaConf.create({"tf32": False})
    assert use_tf32(OmegaConf.create({"tf32": None}), run) is False
    assert not torch.backends.cudnn.allow_tf32  # PyTorch's default had it on for convolutions
    assert use_tf32(OmegaConf.create({"tf32": True}), run) is True and torch.backends.cuda.matmul.allow_tf32
    assert use_tf32(OmegaConf.create({}), OmegaConf.create({})) is True  # a run from before the key: train's
    with pytest.raises(ValueError, match="tf32 must be true, false or null"):
        use_tf32(OmegaConf.create({"tf32": "off"}), run)


def test_a_reference_batch_of_another_image_size_is_refused_before_sampling(cifar_run, tmp_path, monkeypatch):
    from act_lightning import evaluate

    monkeypatch.setattr(evaluate, "build_model", lambda *a: pytest.fail("the networks were built"))
    batch = tmp_path / "VIRTUAL_imagenet64.npz"
    np.savez(batch, arr_0=np.zeros((4, 64, 64, 3), dtype=np.uint8))
    ckpt = cifar_run / "checkpoints" / "best.ckpt"
    said = f"eval.reference={batch}: images of 64x64 with 3 channel.s., but the model generates 32x32 with 3"
    for metrics in ("[fid]", "[fid,kid]"):
        with pytest.raises(ValueError, match=said):
            _evaluate([f"ckpt={ckpt}", f"eval.reference={batch}", f"metrics={metrics}"])


def test_evaluate_names_a_missing_or_foreign_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"ckpt={tmp_path / 'nope.ckpt'}: no such checkpoint file"):
        _evaluate([f"ckpt={tmp_path / 'nope.ckpt'}"])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="holds no training config"):
        _evaluate([f"ckpt={foreign}"])


@pytest.mark.slow
def test_readme_evaluate_commands(cifar_run, tmp_path):
    """The README's `python -m act_lightning.evaluate` commands, with 4 samples instead of 10k or 50k.
    Each reference's statistics are computed once and read from a cache after (as the paper experiments'
    eval.reference_cache does), one cache per reference and quantisation: truncation moves 63 of the 256
    levels of real images down by one, and the cache's facts do not record it."""
    refs = tmp_path / "refs"
    refs.mkdir()
    images = (np.random.default_rng(0).random((8, 32, 32, 3)) * 255).astype(np.uint8)
    np.savez(refs / "cifar10-32x32.npz", arr_0=images)  # a reference batch in the published layout
    commands = [c for c in readme_commands() if c.startswith("python -m act_lightning.evaluate")]
    assert len(commands) == 7  # the seventh evaluates a converted reference checkpoint (here: the run's)
    ckpt = cifar_run / "checkpoints" / "best.ckpt"
    for command in commands:
        args = shlex.split(command)[3:]
        args = [
            f"ckpt={ckpt}" if a.startswith("ckpt=") else a for a in args if not a.startswith("num_samples=")
        ]
        args = [a.replace("/refs/", f"{refs}/").replace("/new/place/", f"{tmp_path}/") for a in args]
        quantize = "truncate" if "truncate" in command else "round"
        reference = "npz" if "eval.reference" in command else "train"
        cache = f"eval.reference_cache={tmp_path / f'reference-{reference}-{quantize}.npz'}"
        summary = _evaluate(
            [*args, "num_samples=4", "batch_size=4", cache, f"output={tmp_path / 'out.json'}"]
        )
        expected = ["1-step"] if "samplers=[1-step]" in command else ["1-step", "2-step"]
        assert list(summary["results"]) == expected, command
        assert summary["quantize"] == ("truncate" if "truncate" in command else "round"), command
        assert summary["reference"].endswith("cifar10-32x32.npz") == ("eval.reference" in command), command
        if "metrics=" in command:  # the extra metrics from the same features; FID unchanged by them
            assert summary["metrics"] == ["fid", "is", "kid", "pr"]
            for sampler, result in summary["results"].items():
                assert {"fid", "is", "is_splits_std", "kid", "kid_subsets_std", "precision", "recall"} <= set(
                    result
                )
                assert (
                    0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1 and result["is"] > 1 - 1e-9
                )
                fid_only = _evaluate(
                    [
                        f"ckpt={ckpt}",
                        "num_samples=4",
                        "batch_size=4",
                        f"samplers=[{sampler}]",
                        cache,
                        f"output={tmp_path / 'fid.json'}",
                    ]
                )
                assert fid_only["results"][sampler]["fid"] == result["fid"]
        if "seeds=" in command:  # each seed's own score, their mean and sample standard deviation
            assert summary["seeds"] == [0, 1, 2]
            for result in summary["results"].values():
                values = list(result["fid_per_seed"].values())
                assert list(result["fid_per_seed"]) == ["0", "1", "2"] and len(set(values)) == 3
                assert result["fid"] == pytest.approx(np.mean(values))
                assert result["fid_std"] == pytest.approx(np.std(values, ddof=1))
            one = [f"ckpt={ckpt}", "num_samples=4", "batch_size=4", "seed=1", "samplers=[1-step]"]
            single = _evaluate([*one, cache, f"output={tmp_path / 'one.json'}"])["results"]["1-step"]
            assert (
                summary["results"]["1-step"]["fid_per_seed"]["1"] == single["fid"]
            )  # seed 1 alone: the same


def test_kid_and_pr_refuse_a_reference_of_statistics_only_before_sampling(cifar_run, tmp_path):
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048))
    ckpt = cifar_run / "checkpoints" / "best.ckpt"
    with pytest.raises(
        ValueError, match=r"stats.npz: holds statistics only \(mu, sigma\); metric kid needs real"
    ):
        _evaluate([f"ckpt={ckpt}", f"eval.reference={stats}", "metrics=[fid,kid]", "device=cpu"])
    with pytest.raises(
        ValueError, match=r"stats.npz: .*; metrics kid and pr need real images: eval.reference"
    ):
        _evaluate([f"ckpt={ckpt}", f"eval.reference={stats}", "metrics=[kid,fid,pr]", "device=cpu"])


def test_a_diffusion_model_is_refused_multistep_samplers_before_anything_is_built():
    """evaluate's default samplers are 1-step and 2-step; a diffusion model has Heun's sampler alone, which
    the 1-step sampler runs: the 2-step one is refused at once, with the option that works."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from act_lightning.evaluate import check_options

    with initialize_config_dir(str(CONF), version_base="1.3"):
        defaults = hydra_compose("evaluate", overrides=["ckpt=x"])
        one_step = hydra_compose("evaluate", overrides=["ckpt=x", "samplers=[1-step]"])
    diffusion = OmegaConf.create({"model": {"objective": "diffusion"}})
    with pytest.raises(ValueError, match=r"2-step samples in several .*evaluate it with samplers=\[1-step\]"):
        check_options(defaults, diffusion)
    check_options(one_step, diffusion)
    check_options(defaults, OmegaConf.create({"model": {"objective": "consistency"}}))
    check_options(defaults, OmegaConf.create({"model": {}}))  # a checkpoint from before the key: consistency


def test_seeds_must_be_a_list_of_distinct_integers(cifar_run):
    ckpt = cifar_run / "checkpoints" / "best.ckpt"
    for bad in ("seeds=3", "seeds=[]", "seeds=[0,0]", "seeds=[a]", "seed=abc"):
        with pytest.raises(ValueError, match="seeds must|seed must be an integer, got 'abc'"):
            _evaluate([f"ckpt={ckpt}", bad])


def test_missing_inception_weights_stop_the_run_at_start_up(tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    cfg = compose(
        [
            "experiment=cifar10",
            "debug=smoke",
            "data=synthetic",
            "eval.inception_weights=null",
            "eval.inception_resize=null",  # smoke size's 75 is for the random network only (next test)
            "eval.download=false",
        ],
        run_dir=str(run),
    )
    with pytest.raises(Exception) as err:
        train(cfg)
    message = str(err.value)
    assert WEIGHTS_FILE in message and WEIGHTS_URL in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / WEIGHTS_FILE) in message
    assert not (run / "checkpoints").exists() and not (run / "metrics.csv").exists()  # before training


def test_a_smoke_runs_smaller_inception_input_is_refused_to_real_weights_and_dropped_by_evaluate(tmp_path):
    run = tmp_path / "run"
    cfg = compose(
        ["experiment=cifar10", "debug=smoke", "data=synthetic", "eval.inception_weights=null"], str(run)
    )
    assert cfg.eval.inception_resize == 75
    with pytest.raises(Exception, match=r"eval.inception_resize=75 needs eval.inception_weights=random"):
        train(cfg)  # (in Hydra's InstantiationException: the callback is built from the config)
    assert not (run / "checkpoints").exists()  # at start-up

    from act_lightning.evaluate import _apply_overrides

    stored = OmegaConf.create({"eval": dict(cfg.eval, inception_weights="random"), "data": {}})
    asked = OmegaConf.create({"eval": {"inception_weights": None}, "data": {}})
    assert _apply_overrides(stored.copy(), asked).inception_resize == 75  # as the run measured
    asked.eval.inception_weights = "/weights/pt_inception.pth"
    assert _apply_overrides(stored.copy(), asked).inception_resize is None  # the protocol's 299
    asked.eval.inception_resize = 80  # said explicitly: kept (and refused with real weights later)
    assert _apply_overrides(stored.copy(), asked).inception_resize == 80

    # the statistics a run kept beside its data move with data.root: the old place's are of the data that
    # was there (they were read and written at the training-time path); one given, or kept elsewhere, stays
    kept = OmegaConf.create(
        {
            "eval": {"reference_cache": "/old/cifar10/fid_stats_inception_32.npz"},
            "data": {"root": "/old/cifar10"},
        }
    )
    moved = OmegaConf.create({"eval": {}, "data": {"root": "/new/cifar10"}})
    assert _apply_overrides(kept.copy(), moved).reference_cache == "/new/cifar10/fid_stats_inception_32.npz"
    assert _apply_overrides(kept.copy(), OmegaConf.create({"eval": {}, "data": {}})).reference_cache == (
        "/old/cifar10/fid_stats_inception_32.npz"
    )
    given = OmegaConf.create({"eval": {"reference_cache": "/mine/s.npz"}, "data": {"root": "/new/cifar10"}})
    assert _apply_overrides(kept.copy(), given).reference_cache == "/mine/s.npz"
    elsewhere = OmegaConf.create(
        {"eval": {"reference_cache": "/stats/c.npz"}, "data": {"root": "/old/cifar10"}}
    )
    assert _apply_overrides(elsewhere, moved).reference_cache == "/stats/c.npz"


def test_a_missing_published_reference_stops_the_run_at_start_up(tmp_path):
    run = tmp_path / "run"
    cfg = compose(
        [
            "experiment=imagenet64",
            "debug=smoke",
            "data=synthetic",
            f"eval.reference={tmp_path}/VIRTUAL_imagenet64_labeled.npz",
        ],
        run_dir=str(run),
    )
    with pytest.raises(Exception) as err:
        train(cfg)
    assert "openaipublic.blob.core.windows.net" in str(err.value) and "eval.reference=train" in str(err.value)
    assert not (run / "checkpoints").exists() and not (run / "metrics.csv").exists()


def test_tensorboard_logger_writes_events_and_metrics_csv(tmp_path):
    run = tmp_path / "run"
    train(compose(["debug=smoke", "logger=tensorboard"], run_dir=str(run)))
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert "val/fd" in (run / "metrics.csv").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    # the run's metrics on the ACT iteration axis, without Lightning's placeholder hp_metric (-1 at step 0,
    # written again by each launch into the run)
    assert {"val/fd", "train/loss_ct"} <= set(scalars) and "hp_metric" not in scalars


def test_the_command_refuses_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from act_lightning.evaluate import main

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = hydra_compose("evaluate", overrides=[f"ckpt={tmp_path / 'nope.ckpt'}"])
    with pytest.raises(SystemExit) as stop:
        main.__wrapped__(cfg)  # the command's body, without Hydra's run folder
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err == f"error: ckpt={tmp_path / 'nope.ckpt'}: no such checkpoint file\n"


def test_fd_dinov2_scores_the_same_samples_with_stand_in_weights_and_missing_weights_stop_early(tmp_path):
    """metrics=[fid,fd_dinov2]: DINOv2 sees the images FID sees (FID unchanged by it), FD-DINOv2 is in the
    JSON per sampler and per seed; without the weights file the command stops before sampling, naming it."""
    from act_lightning.metrics.dinov2 import WEIGHTS_FILE
    from tests.unit.test_dinov2 import stand_in_weights

    run = tmp_path / "run"
    train(compose(["debug=smoke", "iterations=2", "eval=null"], run_dir=str(run)))
    ckpt = run / "checkpoints" / "last.ckpt"
    weights = stand_in_weights(tmp_path / WEIGHTS_FILE)
    # a quickstart run trained with eval=null is scored in the digits features, as `fd`, as the quickstart's
    # own evaluation is (Inception, the paper's default, sees nothing in 8x8 digits)
    common = [f"ckpt={ckpt}", "num_samples=16", "batch_size=8", "samplers=[1-step]"]
    both = _evaluate(
        [
            *common,
            "metrics=[fid,fd_dinov2]",
            f"dinov2_weights={weights}",
            "seeds=[0,1]",
            f"output={tmp_path / 'both.json'}",
        ]
    )
    fid = _evaluate([*common, "metrics=[fid]", "seeds=[0,1]", f"output={tmp_path / 'fid.json'}"])
    result = both["results"]["1-step"]
    assert both["metrics"] == ["fd", "fd_dinov2"] and both["features"] == "digits"
    assert (both["num_real"], fid["num_real"]) == (16, None)  # FD-DINOv2's reference: as many real images
    assert result["fd_per_seed"] == fid["results"]["1-step"]["fd_per_seed"]
    values = list(result["fd_dinov2_per_seed"].values())
    assert all(v > 0 for v in values) and values[0] != values[1]
    assert result["fd_dinov2"] == pytest.approx(np.mean(values))
    again = _evaluate(
        [
            *common,
            "metrics=[fid,fd_dinov2]",
            f"dinov2_weights={weights}",
            "seed=1",
            f"output={tmp_path / 'again.json'}",
        ]
    )
    assert again["results"]["1-step"]["fd_dinov2"] == result["fd_dinov2_per_seed"]["1"]  # reproducible
    # uint8 images go to DINOv2 only: the digits features read floats, so there quantize is none and
    # a quantisation given is refused; a value outside round/truncate is refused whatever the features
    assert (both["quantize"], fid["quantize"]) == ("round", None)
    with pytest.raises(ValueError, match=r"^eval.quantize=truncate: the digits features read the generated"):
        _evaluate([*common, "eval.quantize=truncate"])
    with pytest.raises(ValueError, match=r"^eval.quantize must be one of round, truncate; got 'floor'"):
        _evaluate([*common, "eval.quantize=floor", "metrics=[fid,fd_dinov2]", f"dinov2_weights={weights}"])
    from act_lightning.metrics.inception import WeightsError

    with pytest.raises(WeightsError, match="dinov2_weights=.*missing.pth: no such file"):
        _evaluate([*common, "metrics=[fid,fd_dinov2]", f"dinov2_weights={tmp_path / 'missing.pth'}"])


def test_the_metric_of_subsets_draws_only_whole_subsets(tmp_path, monkeypatch):
    """eval.num_samples=10 in subsets of 4: two subsets, 8 samples, and the metric is their mean (a third
    set of 2 would be a far more biased distance)."""
    from act_lightning.callbacks import evaluation

    seen = []
    distance = evaluation.FrechetEvaluation._fd
    monkeypatch.setattr(
        evaluation.FrechetEvaluation, "_fd", lambda self, s: seen.append(distance(self, s)) or seen[-1]
    )
    run = tmp_path / "run"
    args = ["debug=smoke", "iterations=1", "eval.every=1", "eval.num_samples=10", "eval.subset_size=4"]
    train(compose(args, run_dir=str(run)))
    summary = json.loads((run / "metric_summary.json").read_text())
    assert (summary["num_samples"], summary["subset_size"]) == (8, 4)
    assert summary["history"][-1]["value"] == pytest.approx((seen[-2] + seen[-1]) / 2)  # the last two sets


def test_extra_metrics_during_training_go_to_the_loggers_and_the_summary(tmp_path):
    """eval.metrics=[fid,kid,pr,fd_dinov2] on the quickstart (digit features, stand-in DINOv2 weights): each
    evaluation logs val/kid, val/precision, val/recall and val/fd_dinov2 beside val/fd, from the same samples,
    and metric_summary.json keeps them; Inception Score needs Inception's logits and is refused by name."""
    import csv

    from act_lightning.metrics.dinov2 import WEIGHTS_FILE
    from tests.unit.test_dinov2 import stand_in_weights

    weights = stand_in_weights(tmp_path / WEIGHTS_FILE)
    run = tmp_path / "run"
    args = ["debug=smoke", "iterations=2", "eval.every=1", "eval.num_samples=16", "eval.subset_size=null"]
    train(
        compose(
            [*args, "eval.metrics=[fid,kid,pr,fd_dinov2]", f"eval.dinov2_weights={weights}"], run_dir=str(run)
        )
    )
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/fd")]
    assert len(rows) == 3  # iterations 0, 1, 2
    for row in rows:
        assert float(row["val/fd_dinov2"]) > 0 and 0 <= float(row["val/precision"]) <= 1
        assert row["val/kid"] and row["val/recall"]
    extra = json.loads((run / "metric_summary.json").read_text())["extra"]
    assert [e["iteration"] for e in extra] == [0, 1, 2] and {"kid", "precision", "fd_dinov2"} <= set(extra[0])
    plain = tmp_path / "plain"
    train(compose(args, run_dir=str(plain)))  # the metric itself does not change with the extras
    history = json.loads((run / "metric_summary.json").read_text())["history"]
    assert [h["value"] for h in history] == [
        h["value"] for h in json.loads((plain / "metric_summary.json").read_text())["history"]
    ]
    with pytest.raises(Exception, match=r"eval.metrics=\[is\] needs eval.features=inception"):
        train(compose([*args, "eval.metrics=[fid,is]"], run_dir=str(tmp_path / "is")))


def test_the_2_step_sampler_takes_the_runs_two_step_tau(tmp_path):
    # the quickstart sets its own (8.0: at sigma_max 20 the paper's 1.3824 scores worse than one step);
    # a checkpoint from before the key takes 1.3824; the command line's levels win over the run's
    train(compose(["debug=smoke", "iterations=2"], run_dir=str(tmp_path / "run")))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    common = [f"ckpt={ckpt}", "num_samples=8", "batch_size=8", "device=cpu"]
    levels = lambda extra, name: _evaluate([*common, *extra, f"output={tmp_path / name}"])["results"]  # noqa: E731
    run = _evaluate([*common, f"output={tmp_path / 'run.json'}"])
    assert run["results"]["2-step"]["taus"] == [20.0, 8.0]
    # the quickstart's distance is in the digits features, named fd in results and in the list of metrics
    assert run["metrics"] == ["fd"] and set(run["results"]["1-step"]) >= {"fd", "taus"}
    assert levels(["two_step_tau=3.0"], "given.json")["2-step"]["taus"] == [20.0, 3.0]
    three = levels(["+taus.three=[9.0,2.0]", "samplers=[three]"], "three.json")
    assert list(three) == ["three"] and three["three"]["taus"] == [20.0, 9.0, 2.0]
    refused = {
        "two_step_tau=30.0": ("2-step", "two_step_tau=30.0"),
        "+taus.up=[2.0,9.0]": ("up", "taus.up=[2.0, 9.0]"),
        "+taus.one=5.0": ("one", "taus.one=5.0: a list"),
        # three steps reported as 2-step
        "taus={2-step:[8.0,2.0]}": (
            "2-step",
            "taus.2-step=[8.0, 2.0]: 2-step takes 1 level(s) after the first",
        ),
    }
    for bad, (sampler, named) in refused.items():
        message = (
            named
            if "list" in named or "takes" in named
            else f"{named}: the noise levels after the first step (at sigma_max=20)"
        )
        with pytest.raises(ValueError, match=re.escape(message)):
            _evaluate([*common, bad, f"samplers=[{sampler}]"])
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    del checkpoint["act_config"]["two_step_tau"]
    torch.save(checkpoint, ckpt)
    older = levels([], "older.json")
    assert older["2-step"]["taus"] == [20.0, 1.3824] and older["1-step"]["taus"] == [20.0]


@pytest.mark.parametrize("tau", ["20.0", "0.001", "abc"])
def test_a_two_step_tau_outside_the_schedules_levels_is_refused_by_name(tau, tmp_path):
    from act_lightning.train import check_config

    with pytest.raises(ValueError, match=rf"two_step_tau={tau}: .* between model.schedule.sigma_min=0.002"):
        check_config(compose(["debug=smoke", f"two_step_tau={tau}"], run_dir=str(tmp_path)))


def test_evaluate_needs_two_samples_for_a_covariance():
    from act_lightning.evaluate import check_options

    options = {"samplers": ["1-step"], "taus": {"1-step": []}, "batch_size": 4, "net": "target"}
    check_options(OmegaConf.create({**options, "num_samples": 2}))
    with pytest.raises(ValueError, match="num_samples must be an integer >= 2, got 1"):
        check_options(OmegaConf.create({**options, "num_samples": 1}))


def test_the_printed_line_names_every_metric_and_over_seeds_their_spread():
    """What `evaluate` prints per sampler: every metric of the JSON by its key (not only the first), with
    mean ± sample standard deviation over several seeds; how it sampled and the seconds stay in the JSON."""
    one = {
        "fid": 5.14093,
        "taus": [80.0],
        "seconds": 3.2,
        "is": 1.00123,
        "is_splits_std": 0.00031,
        "kid": 0.0123,
        "kid_subsets_std": 0.004,
        "precision": 0.5,
        "recall": 0.25,
    }
    assert result_line("1-step", one, 1) == (
        "1-step: fid 5.1409, is 1.0012, is_splits_std 3.100e-04, kid 0.0123, kid_subsets_std 4.000e-03, "
        "precision 0.5000, recall 0.2500"
    )
    per_seed = [{"fid": v, "taus": [80.0, 1.3824], "seconds": 1.0} for v in (10.0, 12.0, 14.0)]
    three = over_seeds(per_seed, [0, 1, 2])
    assert result_line("2-step", three, 3) == "2-step: fid 12.0000 ± 2.0000 (3 seeds)"
    heun = {"fd": 3.0, "sampler": "heun", "heun_steps": 18, "seconds": 1.0}  # a diffusion model
    assert result_line("1-step", heun, 1) == (  # not reported as a one-step result
        "1-step (EDM's Heun sampler: 18 levels, 35 network evaluations): fd 3.0000"
    )


@pytest.mark.slow
def test_more_samples_per_distance_than_held_out_digits_are_said_with_advice_that_runs(tmp_path, caplog):
    """debug=smoke draws 4 samples per distance against the quickstart's 297 held-out digits: the real end
    is then the mean over sets of 4, nothing to say. 298 per distance are more than the held-out digits:
    the warning names a setting that is accepted (subset_size may not exceed num_samples), and with it the
    warning is gone."""

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if "are fewer than the generated" in r.getMessage()]

    train(compose(["debug=smoke", "iterations=1"], run_dir=str(tmp_path / "smoke")))
    assert not said()
    more = ["debug=smoke", "iterations=1", "eval.num_samples=298", "eval.batch_size=150"]  # 2 batches, not 75
    train(compose(more, run_dir=str(tmp_path / "more")))
    assert len(said()) == 1 and said()[0].endswith("set eval.subset_size=297 or lower")
    caplog.clear()
    advised = [*more, "eval.subset_size=297"]
    assert train(compose(advised, run_dir=str(tmp_path / "advised")))["finished"]
    assert not said()
