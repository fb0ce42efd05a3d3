"""A run folder's record is the run's: a launch that is refused (the folder is in use, another experiment,
a changed config) or has nothing to do (a finished run) leaves every file as it was, and keeps its own
Hydra record apart. A resumed run's config is compared with its checkpoint's before anything is built."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re

import pytest
import torch
import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import read_write

from act_lightning.environment import describe, environment
from act_lightning.launch import check_slurm_counts, check_slurm_here
from act_lightning.train import train
from tests.conftest import COMMAND_ENV, CONF, compose, refusal, run_cli, run_module

SMOKE = ["debug=smoke", "data=synthetic"]


def _hashes(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_refused_and_finished_launches_leave_every_file_of_the_run_folder_as_it_was(tmp_path):
    run = tmp_path / "run"
    result = run_cli(SMOKE, run)
    assert result.returncode == 0, result.stderr[-3000:]
    before = _hashes(run)
    assert "hparams.yaml" in before and "metric_summary.json" in before

    finished = run_cli(SMOKE, run)  # nothing to do
    assert finished.returncode == 0 and "the run is finished, nothing to do" in finished.stdout
    foreign = refusal(run_cli(["experiment=cifar10", *SMOKE], run))  # another experiment
    assert "was trained with another config: data.channels=1 (now 3)" in foreign
    changed = refusal(run_cli([*SMOKE, "model.schedule.gan_ratio=0.5"], run))
    assert "model.schedule.gan_ratio=0.95 (now 0.5)" in changed
    with open(run / ".lock") as held:  # a live run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = refusal(run_cli(SMOKE, run))
        assert "is in use by another live run" in busy
    sweep = refusal(run_cli(["ablation=gan_ratio", *SMOKE], run))  # a sweep's config without -m
    assert sweep.startswith(
        "error: ablation=gan_ratio is a sweep over model.schedule.gan_ratio: launch it with -m"
    )

    after = _hashes(run)
    assert {k: v for k, v in after.items() if k in before} == before  # byte for byte
    new = sorted(k for k in after if k not in before)
    assert all(k.startswith(".hydra/launches/") for k in new), new
    launches = {k.split("/")[2] for k in after if k.startswith(".hydra/launches/")}
    assert len(launches) == 6  # each launch's record apart: config, hydra, overrides and its log
    refused = [foreign, changed, busy, sweep]
    for launch in launches:
        record = {p.name for p in (run / ".hydra" / "launches" / launch).iterdir()}
        assert record == {"config.yaml", "hydra.yaml", "overrides.yaml", "train.log"}, record
        log = (run / ".hydra" / "launches" / launch / "train.log").read_text()
        said = [line for line in refused if line in log]  # a refused launch's log says why, once
        assert len(said) <= 1 and log.count("error: ") == len(said), log
    logs = "".join((run / ".hydra/launches" / launch / "train.log").read_text() for launch in launches)
    assert all(logs.count(line) == 1 for line in refused)
    first = run / ".hydra" / "launches" / min(launches) / "train.log"  # launch names sort by their time
    assert f"launched with {describe(environment())}" in first.read_text()


def test_a_new_run_in_a_folder_without_a_checkpoint_sets_the_earlier_runs_outputs_aside(tmp_path, caplog):
    """A relaunch after the checkpoints were deleted (or a crash before the first save) overwrote the
    earlier run's metrics.csv and summary and left its later sample grids mixed with the new run's."""
    run = tmp_path / "run"
    train(compose([*SMOKE, "iterations=6", "eval.every=2"], run_dir=str(run)))
    before = _hashes(run)
    assert "samples/iter_0000006.png" in before and "metric_summary.json" in before
    for path in (run / "checkpoints").iterdir():
        path.unlink()
    with caplog.at_level("WARNING", logger="act_lightning.train"):
        train(compose([*SMOKE, "iterations=2", "eval.every=2"], run_dir=str(run)))
    (kept,) = (run / "replaced").iterdir()
    assert "held an earlier run's outputs and no checkpoint to continue: moved to " + str(kept) in caplog.text
    earlier = {k: v for k, v in before.items() if not k.startswith((".hydra/", "checkpoints/", ".lock"))}
    assert _hashes(kept) == earlier  # all of them, as they were
    assert not (run / "samples" / "iter_0000006.png").exists()  # the new run's grids alone
    assert len(yaml.safe_load((run / "hparams.yaml").read_text())) > 0
    caplog.clear()
    with caplog.at_level("WARNING", logger="act_lightning.train"):
        train(
            compose([*SMOKE, "iterations=4", "eval.every=2", "resume_changes=[iterations]"], run_dir=str(run))
        )
    assert "earlier run's outputs" not in caplog.text and len(list((run / "replaced").iterdir())) == 1


def test_slurm_tasks_and_torchrun_workers_of_other_ranks_keep_no_record_and_log_to_their_console(tmp_path):
    run = tmp_path / "run"
    assert run_cli(SMOKE, run).returncode == 0
    (first,) = (run / ".hydra" / "launches").iterdir()
    before = _hashes(run)
    for rank in ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NAME": "train"}, {"RANK": "3"}):
        other = run_module("train", [*SMOKE, f"hydra.run.dir={run}"], env={**COMMAND_ENV, **rank})
        assert other.returncode == 0 and "the run is finished, nothing to do" in other.stdout
        assert _hashes(run) == before  # nothing new in the run folder
    task0 = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NAME": "train"}
    assert run_module("train", [*SMOKE, f"hydra.run.dir={run}"], env={**COMMAND_ENV, **task0}).returncode == 0
    (second,) = {p.name for p in (run / ".hydra" / "launches").iterdir()} - {first.name}  # rank 0's record
    assert {p.name for p in (run / ".hydra" / "launches" / second).iterdir()} == {
        "config.yaml",
        "hydra.yaml",
        "overrides.yaml",
        "train.log",
    }


def test_an_unwritable_run_folder_is_refused_before_hydra_writes_into_it(tmp_path):
    # sysfs takes no new files, whoever runs the test (a chmod'ed folder would not stop root)
    line = refusal(run_cli(SMOKE, "/sys/act-test-run"))
    assert line.startswith("error: hydra.run.dir=/sys/act-test-run: cannot write into /sys (")
    if os.geteuid() != 0:
        folder = tmp_path / "run"
        folder.mkdir(mode=0o555)
        line = refusal(run_cli(SMOKE, folder))
        assert f"cannot write into {folder}" in line and not any(folder.iterdir())


def test_a_slurm_sweep_off_a_slurm_cluster_is_refused_in_one_line_before_hydra_builds_it(
    tmp_path, monkeypatch
):
    """submitit failed after Hydra made the sweep folder, in a traceback ('Could not detect "srun"')."""
    sweep = tmp_path / "sweep"
    args = ["-m", "experiment=lsun_cat256", "hydra/launcher=submitit_slurm", "trainer.devices=8"]
    line = refusal(run_module("train", [*args, f"hydra.sweep.dir={sweep}"], env=COMMAND_ENV, timeout=300))
    assert line == (
        "error: hydra/launcher=submitit_slurm submits its jobs with SLURM's sbatch, which this machine does "
        "not have: launch it from a login node of a SLURM cluster (Hydra's basic launcher, the default, runs "
        "a sweep's jobs here one after another)"
    )
    assert not sweep.exists()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = hydra_compose("train", overrides=args[1:], return_hydra_config=True)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "sbatch").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    check_slurm_here(cfg)  # on a cluster's login node: submitted


def test_a_slurm_sweep_without_a_number_of_devices_is_refused_in_one_line_before_hydra_builds_it(tmp_path):
    # the ddp trainer's devices=auto: Hydra's launcher schema wanted an integer, in a long traceback
    sweep = tmp_path / "sweep"
    args = ["-m", "experiment=lsun_cat256", "hydra/launcher=submitit_slurm", f"hydra.sweep.dir={sweep}"]
    line = refusal(run_module("train", args, env=COMMAND_ENV, timeout=300))
    assert line.startswith("error: trainer.devices=auto: a SLURM launch (hydra/launcher=submitit_slurm) asks")
    assert line.endswith("(e.g. trainer.devices=8)") and not sweep.exists()
    with initialize_config_dir(str(CONF), version_base="1.3"):

        def config(*overrides):
            base = ["experiment=lsun_cat256", "hydra/launcher=submitit_slurm", f"run_dir={tmp_path}"]
            return hydra_compose("train", overrides=[*base, *overrides], return_hydra_config=True)

        check_slurm_counts(config("trainer.devices=8", "trainer.num_nodes=2"))  # the README's launch
        with pytest.raises(ValueError, match=r"^trainer.num_nodes=two: .* a number of nodes"):
            check_slurm_counts(config("trainer.devices=8", "trainer.num_nodes=two"))
        check_slurm_counts(config("hydra.launcher.gpus_per_node=4", "hydra.launcher.tasks_per_node=4"))
        with pytest.raises(ValueError, match=r"^trainer.devices=auto: "):  # the tasks still follow devices
            check_slurm_counts(config("hydra.launcher.gpus_per_node=4"))
        check_slurm_counts(config("hydra/launcher=basic"))  # a local sweep: no SLURM counts
        with pytest.raises(ValueError, match=r"^trainer.num_nodes=None: .* a number of nodes"):
            check_slurm_counts(config("trainer.devices=8", "trainer.num_nodes=null"))
        # a sweep of a count: the launcher would submit every job with the config's one value
        for swept in ("trainer.devices=4,8", "trainer.num_nodes=range(1,3)"):
            cfg = config("trainer.devices=8")  # a multirun's config: the keys without their sweeps
            with read_write(cfg):
                cfg.hydra.overrides.task = ["trainer.devices=8", swept]  # the command line's overrides
            with pytest.raises(ValueError, match=rf"^{re.escape(swept)} is swept, but a SLURM multirun"):
                check_slurm_counts(cfg)
        # the sweeper's own params (Hydra's basic sweeper, Optuna's search) are sweeps too; a value given
        # as one is fixed, and the command line's value wins over theirs
        cfg = config("trainer.devices=8")
        with read_write(cfg):
            cfg.hydra.overrides.task = ["hydra/launcher=submitit_slurm"]  # devices set by a config instead
            cfg.hydra.sweeper.params = {
                "trainer.devices": "choice(4,8)",
                "model.optimizer.lr": "interval(1e-5,1e-3)",
            }
        with pytest.raises(
            ValueError, match=r"^trainer.devices=choice\(4,8\) is swept, but a SLURM multirun"
        ):
            check_slurm_counts(cfg)
        with read_write(cfg):
            cfg.hydra.overrides.task = ["hydra/launcher=submitit_slurm", "trainer.devices=8"]
        check_slurm_counts(cfg)
        with read_write(cfg):  # one value in the sweeper's params: every job's, not the launcher's
            cfg.hydra.sweeper.params = {"trainer.num_nodes": 2, "model.optimizer.lr": "interval(1e-5,1e-3)"}
        with pytest.raises(ValueError, match=r"^trainer.num_nodes=2 is swept, .*: set trainer.num_nodes on"):
            check_slurm_counts(cfg)
        with read_write(cfg):
            cfg.hydra.overrides.task.append("trainer.num_nodes=2")
        check_slurm_counts(cfg)
        # a key that is no config group is no group, whatever its value (null here); ++ is not the key's
        with read_write(cfg):
            cfg.hydra.overrides.task = ["hydra/launcher=submitit_slurm"]
            cfg.hydra.sweeper.params = {"stop_after": "100,200", "++trainer.devices": "4,8"}
        with pytest.raises(ValueError, match=r"^trainer.devices=4,8 is swept, but a SLURM multirun"):
            check_slurm_counts(cfg)
        with read_write(cfg):
            cfg.hydra.sweeper.params = {"stop_after": "100,200"}
        check_slurm_counts(cfg)
        # a swept group may set the counts per job (cifar10: 1 device, lsun_cat256: auto); Hydra builds
        # the launcher from the config without the sweep: the counts must be on the command line
        cfg = config("experiment=cifar10")
        with read_write(cfg):
            cfg.hydra.overrides.task = ["hydra/launcher=submitit_slurm", "experiment=cifar10,lsun_cat256"]
        with pytest.raises(ValueError, match=r"^experiment=cifar10,lsun_cat256 is swept and may set trainer"):
            check_slurm_counts(cfg)
        cfg = config("experiment=cifar10", "trainer.devices=8", "trainer.num_nodes=2")
        with read_write(cfg):  # fixed on the command line: every job gets them
            cfg.hydra.overrides.task = [
                "experiment=cifar10,lsun_cat256",
                "trainer.devices=8",
                "trainer.num_nodes=2",
            ]
        check_slurm_counts(cfg)


def _iteration(path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["state_dict"]["iteration"])


def test_resume_with_a_changed_config_is_refused_by_name_unless_the_change_is_deliberate(tmp_path):
    run, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    common = [*SMOKE, "eval=null", "iterations=6"]
    train(compose([*common, "stop_after=2"], run_dir=str(run)))
    unchanged = last.read_bytes()

    with pytest.raises(
        ValueError, match=r"\(iteration 2\) was trained .*: model.schedule.gan_ratio=0.95 \(now 0.5\)"
    ):
        train(compose([*common, "model.schedule.gan_ratio=0.5"], run_dir=str(run)))
    with pytest.raises(
        ValueError, match=r"another config: iterations=6 \(now 3\)\. .*resume_changes=\[iterations\]"
    ):
        train(compose([*SMOKE, "eval=null", "iterations=3"], run_dir=str(run)))  # was "finished (2 of 3)"?
    assert last.read_bytes() == unchanged

    deliberate = ["model.schedule.gan_ratio=0.5", "resume_changes=[model.schedule.gan_ratio]", "stop_after=2"]
    train(compose([*common, *deliberate], run_dir=str(run)))
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["act_config"]["model"]["schedule"]["gan_ratio"] == 0.5
    history = checkpoint["act_history"]
    assert [h["iteration"] for h in history] == [0, 2]
    assert history[0]["new_run"] and "new_run" not in history[1]  # a continuation starts no run
    assert history[1]["changes"] == {"model.schedule.gan_ratio": [0.95, 0.5]} and history[0]["changes"] == {}
    assert [h["environment"] for h in history] == [environment()] * 2  # each launch's versions, kept
    logged = yaml.safe_load((run / "hparams.yaml").read_text())  # the loggers' config, as W&B's
    assert logged["environment"] == environment()
    assert logged["environments"] == [{"iteration": 0, **environment()}, {"iteration": 2, **environment()}]
    assert "distance" in logged["model"] and "distance" not in logged  # the config once, not the module's too

    # a finished run is not extended silently; deliberately it is
    finish = [*SMOKE, "eval=null", "iterations=6", "model.schedule.gan_ratio=0.5"]
    assert train(compose(finish, run_dir=str(run)))["iteration"] == 6
    with pytest.raises(ValueError, match=r"\(iteration 6\) was trained .*: iterations=6 \(now 8\)"):
        train(compose([*finish[:-2], "iterations=8", finish[-1]], run_dir=str(run)))
    assert train(compose([*finish, "iterations=8", "resume_changes=[iterations]"], run_dir=str(run)))[
        "finished"
    ]
    assert _iteration(last) == 8

    # another run's snapshot of another network size is refused, not taken as "nothing to do"
    other, smaller = tmp_path / "other", [f"ckpt_path={last}", "model.generator.channel_divisor=4"]
    with pytest.raises(ValueError) as refused:
        train(compose([*finish, "iterations=8", *smaller], run_dir=str(other)))
    assert f"ckpt_path={last} (iteration 8) was trained with another config: " in str(refused.value)
    assert "model.generator.channel_divisor=8 (now 4)" in str(refused.value)
    assert str(refused.value).endswith("or start a new run without ckpt_path")
    assert [p.name for p in other.iterdir()] == [".lock"]  # nothing else written


def test_a_top_level_key_added_that_nothing_reads_is_refused_and_a_nested_one_where_it_is_built(tmp_path):
    """Hydra answers a misspelt key (`iteration=20`) with "To append to your config use +iteration=20";
    that launch then trained the config's own length, exit status 0."""
    said = refusal(run_cli(["+iteration=20", *SMOKE], tmp_path / "run"))
    assert said == (
        "error: +iteration=20: iteration is not a key of the training config and nothing reads it (did you "
        "mean iterations?); `--cfg job` prints the config's keys"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()
    # a nested key is refused where its class is built, naming where the key is
    said = refusal(run_cli(["+model.gan_ratio=0.5", *SMOKE], tmp_path / "nested"))
    assert "model.gan_ratio is not a key of model: it is model.schedule.gan_ratio" in said
