"""Hydra multirun sweeps: each job is its own W&B run with its own name and config, and `train` returns
the metric an Optuna search minimises."""

from __future__ import annotations

import json

import pytest
import yaml

from act_lightning.environment import environment
from act_lightning.report import job_record
from tests.conftest import COMMAND_ENV, ROOT, run_module
from tests.helpers_wandb import read_run


def run_multirun(args: list[str], sweep_dir, timeout: int = 600):
    env = COMMAND_ENV
    return run_module("train", ["-m", *args, f"hydra.sweep.dir={sweep_dir}"], env=env, timeout=timeout)


def _best(job_dir) -> float:
    return json.loads((job_dir / "metric_summary.json").read_text())["best"]["value"]


def test_a_two_job_grid_sweep_gives_two_wandb_runs_with_their_own_names_and_configs(tmp_path):
    result = run_multirun(
        ["model.schedule.gan_ratio=0,0.3", "logger=wandb", "debug=smoke", "data=synthetic"], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [read_run(tmp_path / str(job)) for job in (0, 1)]  # exactly one offline W&B run per job folder
    for run, ratio in zip(runs, (0, 0.3)):
        # named by what it trains: not by the logger (every job's), the threads or the logging interval
        assert run["name"] == f"quickstart[data=synthetic,debug=smoke,model.schedule.gan_ratio={ratio}]"
        assert run["group"] == "quickstart"
        assert run["config"]["model"]["schedule"]["gan_ratio"] == ratio  # its own config, not the other job's
        assert run["config"]["environment"] == environment()  # what it ran with: versions, commit
        fd_rows = [row for row in run["history"] if "val/fd" in row]
        assert [row["trainer/global_step"] for row in fd_rows] == [0, 4]  # its own history only
        assert run["summary"]["val/fd"] == fd_rows[-1]["val/fd"]  # the last value, a number ({"last": ...})
    for job, run in enumerate(runs):
        assert run["summary"]["val/fd_best"] == pytest.approx(_best(tmp_path / str(job)))
    assert runs[0]["summary"]["val/fd_best"] != runs[1]["summary"]["val/fd_best"]


def test_a_wandb_agent_starts_the_sweep_files_trials_as_training_runs_that_report_its_metric(tmp_path):
    """`wandb agent` builds each trial's command from the sweep file with wandb's own functions (used here
    as the agent uses them, with a trial at the ranges' lower ends); that command, shortened for the CPU,
    trains one run whose W&B summary holds the metric the sweep minimises. W&B's servers (the search, the
    agent's polling) are not part of the test."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    sweep = yaml.safe_load((ROOT / "sweeps" / "wandb_cifar10.yaml").read_text())
    trial = {key: {"value": spec["min"]} for key, spec in sweep["parameters"].items()}
    variables = sweep_utils.create_sweep_command_args({"args": trial})
    variables |= {"env": ["/usr/bin/env"], "interpreter": ["python"], "program": [sweep["program"]]}
    command = []
    for part in sweep_utils.create_sweep_command(sweep["command"]):
        command += variables.get(part[2:-1], []) if part.startswith("${") else [part]
    assert command[:4] == ["/usr/bin/env", "python", "-m", "act_lightning.train"]
    assert "model.optimizer.lr=5e-05" in command and "experiment=cifar10" in command

    # what the agent puts into the trial's environment: the folder is named by the sweep's and run's IDs
    agent = {**COMMAND_ENV, "WANDB_SWEEP_ID": "sw33p", "WANDB_RUN_ID": "tr1al"}
    shorter = ["debug=smoke", "data=synthetic"]
    result = run_module("train", [*command[4:], *shorter], env=agent, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "outputs" / "cifar10" / "wandb" / "sw33p" / "tr1al"
    assert [p.name for p in folder.glob("wandb/offline-run-*")][0].endswith("-tr1al")  # the agent's run
    run = read_run(folder)
    assert run["config"]["model"]["optimizer"]["lr"] == 5e-05 and run["group"] == "cifar10"
    assert run["summary"][sweep["metric"]["name"]] == pytest.approx(_best(folder))


@pytest.mark.slow
def test_an_optuna_search_minimises_the_metric_train_returns(tmp_path):
    # the README's search on CIFAR-10, shortened: two trials in smoke size, without LPIPS' VGG; with a key
    # searched beside the config's, as the README says to add one
    result = run_multirun(
        [
            "hparams_search=optuna",
            "experiment=cifar10",
            "hydra.sweeper.n_trials=2",
            "debug=smoke",
            "data=synthetic",
            "model.distance=pseudo_huber",
            "model.schedule.mu0=interval(0.85,0.95)",
            # the study kept in a database, as conf/hparams_search/optuna.yaml offers (it failed on
            # SQLAlchemy 2, which the sweeper's optuna 2.10 does not support)
            f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import optuna

    study = optuna.load_study(study_name="cifar10", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    found = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    values = [_best(tmp_path / str(job)) for job in (0, 1)]
    assert found["best_value"] == pytest.approx(min(values))  # what train() returned, minimised
    assert set(found["best_params"]) == {
        "model.schedule.gan_ratio",
        "model.optimizer.lr",
        "model.d_optimizer.lr",
        "model.schedule.mu0",
    }
    assert 0.85 <= found["best_params"]["model.schedule.mu0"] <= 0.95
    for job in (0, 1):
        overrides, _ = job_record(tmp_path / str(job))  # as the checkpoint records the job's launch
        assert any(
            o.startswith("model.schedule.gan_ratio=") for o in overrides
        )  # each trial its own settings
        (record,) = (tmp_path / str(job) / ".hydra" / "launches").glob("*/overrides.yaml")  # and Hydra's
        assert yaml.safe_load(record.read_text()) == overrides
    # the study continued in a later multirun (a new sweep folder) draws a new trial, not its first again
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    again = [*QUIET_OPTUNA, "hydra.sweeper.n_trials=1", f"hydra.sweeper.storage={storage}"]
    result = run_multirun(again, tmp_path / "later")
    assert result.returncode == 0, result.stderr[-3000:]
    trials = optuna.load_study(study_name="cifar10", storage=storage).trials
    ratio = "model.schedule.gan_ratio"  # (the first session searched mu0 too)
    assert len(trials) == 3 and trials[2].params[ratio] not in (
        trials[0].params[ratio],
        trials[1].params[ratio],
    )


QUIET_OPTUNA = [
    "hparams_search=optuna",
    "experiment=cifar10",
    "debug=smoke",
    "data=synthetic",
    "model.distance=pseudo_huber",
]


def test_an_optuna_search_without_evaluation_is_refused_before_a_trial_trains(tmp_path):
    result = run_multirun([*QUIET_OPTUNA, "hydra.sweeper.n_trials=1", "eval=null"], tmp_path)
    assert result.returncode != 0
    assert "eval=null under hydra/sweeper=optuna" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "0" / "checkpoints").exists()


@pytest.fixture
def as_a_launch():
    """Composes the training config with Hydra's own as a launch's job sees it (HydraConfig set), and
    unsets it afterwards: the sweeps' checks read the choices and the command line there."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    def launch(overrides: list[str]):
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield launch
    HydraConfig.instance().cfg = None


@pytest.mark.parametrize("given", ["iterations=40", "experiment=cifar10"])
def test_the_equal_time_variant_refuses_another_length_or_experiment(as_a_launch, given):
    from act_lightning.sweeps import check_sweep

    check_sweep(as_a_launch(["variant=ct_equal_time"]))  # the quickstart at its own length
    with pytest.raises(ValueError, match=rf"variant=ct_equal_time with {given}: .*variant=ct iterations=N"):
        check_sweep(as_a_launch(["variant=ct_equal_time", given]))
