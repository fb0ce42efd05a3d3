"""Every command the README shows is run by a test, shortened where it would take long (tiny networks,
synthetic or tiny official-format data, a few iterations, CPU instead of GPUs). Commands another test
already runs are listed with that test; a new README command without an entry here fails."""

from __future__ import annotations

import math
import os
import shlex
from pathlib import Path

import pytest
import torch

from act_lightning.prepare import main as prepare_main
from act_lightning.train import train
from tests.conftest import COMMAND_ENV, CONF, ROOT, compose, run_module
from tests.helpers_data import write_image_folder, write_imagenet64, write_lsun_lmdb
from tests.helpers_readme import readme_commands
from tests.helpers_training import THIN

SMOKE = ["debug=smoke", "data=synthetic"]
CHEAP = ["eval=null", "model.distance=pseudo_huber", "callbacks.samples.every_n_iterations=100"]
CPU2 = ["trainer.accelerator=cpu", "trainer.devices=2"]

# README command -> ("test", "<file>::<test>") when that test runs it (shortened), or how to run it here
COMMANDS: dict[str, tuple] = {
    "make train": ("test", "test_cli.py::test_shortened_quickstart_writes_checkpoint_grid_metrics_and_curve"),
    "make test": ("test", "the whole suite: .ci/run runs exactly this command"),
    "make train PYTHON=python3.12": (
        "test",
        "test_makefile.py::test_make_train_makes_the_venv_with_the_python_given_and_installs_with_uv_or_pip_once",
    ),
    "make train INSTALLER=pip": (
        "test",
        "test_makefile.py::test_make_train_makes_the_venv_with_the_python_given_and_installs_with_uv_or_pip_once",
    ),
    "torchrun --standalone --nproc-per-node 4 --local-ranks-filter 0 --tee 3 --log-dir outputs/torchrun "
    "-m act_lightning.train experiment=cifar10 trainer=ddp trainer.devices=4 "
    "hydra.run.dir=outputs/cifar10/run1": (
        "test",
        "test_scale_out.py::test_torchrun_starts_each_rank_and_the_console_and_record_are_rank_0s",
    ),
    "make help": ("test", "test_makefile.py::test_make_help_lists_every_target_with_its_description"),
    "make lint": ("test", "test_makefile.py::test_make_lint_passes_on_this_checkout"),
    "make test-oldest": (
        "test",
        "test_makefile.py::test_make_test_oldest_runs_make_tests_suite_with_the_oldest_releases_beside_the_pinned_torch",
    ),
    'make train ARGS="iterations=1000 seed=1"': ("train", ["iterations=4", "debug=smoke"]),
    "python -m act_lightning.train experiment=cifar10": (  # under SMOKE it is the next command
        "test",
        "test_cli.py::test_smoke_run_of_every_experiment_on_synthetic_data",
    ),
    "python -m act_lightning.train experiment=imagenet64": (
        "test",
        "test_data_cli.py::test_smoke_run_on_each_data_source",
    ),
    "python -m act_lightning.train experiment=lsun_cat256": (
        "test",
        "test_data_cli.py::test_smoke_run_on_each_data_source",
    ),
    "python -m act_lightning.train experiment=cifar10 debug=smoke data=synthetic": (
        "test",
        "test_cli.py::test_smoke_run_of_every_experiment_on_synthetic_data",
    ),
    "python -m act_lightning.train experiment=cifar10 model.schedule.gan_ratio=0": ("train", SMOKE),
    "python -m act_lightning.train --config-dir my_conf experiment=my_experiment": (
        "test",
        "test_packaging.py::test_commands_run_from_the_installed_wheel_with_a_users_own_configs",
    ),
    "python -m act_lightning.prepare imagenet64 /downloads/imagenet64 data/imagenet64": ("prepare", None),
    "python -m act_lightning.prepare lsun_cat256 data/lsun_cat256/cat data/lsun_cat256": ("prepare", None),
    "python -m act_lightning.train experiment=cifar10 data=folder data.root=/path/to/images": (
        "test",
        "test_data_cli.py::test_smoke_run_on_each_data_source",
    ),
    "python -m act_lightning.train experiment=cifar10 data=folder data.root=DIR data.num_classes=5": (
        "train",
        ["debug=smoke"],
    ),
    "python -m act_lightning.evaluate ckpt=outputs/cifar10/.../checkpoints/best.ckpt": (
        "test",
        "test_evaluation.py::test_readme_evaluate_commands",
    ),
    "python -m act_lightning.evaluate ckpt=... num_samples=10000 samplers=[1-step]": (
        "test",
        "test_evaluation.py::test_readme_evaluate_commands",
    ),
    "python -m act_lightning.evaluate ckpt=... data.root=/new/place/cifar10 "
    "eval.reference=/refs/cifar10-32x32.npz": (
        "test",
        "test_evaluation.py::test_readme_evaluate_commands",
    ),
    "python -m act_lightning.evaluate ckpt=... eval.quantize=truncate": (
        "test",
        "test_evaluation.py::test_readme_evaluate_commands",
    ),
    "python -m act_lightning.evaluate ckpt=... seeds=[0,1,2]": (
        "test",
        "test_evaluation.py::test_readme_evaluate_commands",
    ),
    "python -m act_lightning.evaluate ckpt=... metrics=[fid,is,kid,pr]": (
        "test",
        "test_evaluation.py::test_readme_evaluate_commands",
    ),
    "python -m act_lightning.train experiment=cifar10 hydra.run.dir=outputs/cifar10/run1": (
        "test",
        "test_resume.py::test_stop_after_then_resume_auto_equals_the_straight_run_bit_for_bit",
    ),
    "python -m act_lightning.train experiment=cifar10 hydra.run.dir=outputs/cifar10/run1 stop_after=5000": (
        "test",
        "test_resume.py::test_stop_after_then_resume_auto_equals_the_straight_run_bit_for_bit",
    ),
    "python -m act_lightning.train experiment=cifar10 "
    "ckpt_path=outputs/cifar10/run1/checkpoints/iter_0295000.ckpt": (
        "test",
        "test_resume.py::test_stop_after_then_resume_auto_equals_the_straight_run_bit_for_bit",
    ),
    "python -m act_lightning.train experiment=cifar10 hydra.run.dir=outputs/cifar10/run1 iterations=400000 "
    "resume_changes=[iterations]": (
        "test",
        "test_launch.py::test_resume_with_a_changed_config_is_refused_by_name_unless_the_change_is_deliberate",
    ),
    "python -m act_lightning.train experiment=cifar10 trainer=ddp trainer.devices=4": (
        "cli",
        [*SMOKE, *CHEAP, *CPU2],
    ),
    "python -m act_lightning.train experiment=lsun_cat256 trainer.devices=2": (
        "cli",
        # 8 per half over 2 devices, micro-batches of 2: 2 micro-batches on each, as 640 / 2 / 80 = 4
        [*SMOKE, *CHEAP, *CPU2, "data.batch_size=2", "data.global_batch_size=8", "iterations=2", *THIN],
    ),
    "python -m act_lightning.train debug=smoke trainer=ddp trainer.accelerator=cpu trainer.devices=2": (
        "test",
        "test_scale_out.py::test_plain_ddp_on_two_cpu_processes_trains_what_one_process_with_the_global_batch_trains",
    ),
    "python -m act_lightning.train -m hydra/launcher=submitit_slurm experiment=lsun_cat256 trainer.devices=8 "
    "trainer.num_nodes=2 hydra.launcher.partition=gpu hydra.launcher.timeout_min=1440": ("slurm", None),
    "python -m act_lightning.train -m experiment=cifar10 model.schedule.gan_ratio=0.1,0.3,0.5 seed=0,1": (
        "cli",
        [*SMOKE, *CHEAP, "iterations=2"],
    ),
    "python -m act_lightning.train -m model.schedule.gan_ratio=0,0.3 logger=wandb": (
        "test",
        "test_sweeps.py::test_a_two_job_grid_sweep_gives_two_wandb_runs_with_their_own_names_and_configs",
    ),
    "python -m act_lightning.train -m hparams_search=optuna experiment=cifar10 hydra.sweeper.n_trials=20": (
        "test",
        "test_sweeps.py::test_an_optuna_search_minimises_the_metric_train_returns",
    ),
    **{  # the agent's command for a trial, built by wandb's functions; W&B's servers are not reached
        command: (
            "test",
            "test_sweeps.py::test_a_wandb_agent_starts_the_sweep_files_trials_as_training_runs_that_report_its_metric",
        )
        for command in (
            "wandb sweep sweeps/wandb_cifar10.yaml",
            "CUDA_VISIBLE_DEVICES=0 wandb agent ENTITY/act-lightning/ID",
        )
    },
    "make bench": ("test", "test_benchmarks.py::test_make_bench_scripts_run_in_quick_mode"),
    "python -m act_lightning.sample ckpt=outputs/quickstart/.../checkpoints/best.ckpt num_samples=16 seed=7 "
    "out=samples": ("test", "test_sample.py::test_the_command_twice_gives_identical_samples"),
    "python -m act_lightning.edit task=inpaint ckpt=outputs/quickstart/.../checkpoints/best.ckpt "
    "input=images/ out=inpainted": ("test", "test_edit.py::test_the_inpaint_command_keeps_every_known_pixel"),
    "python -m act_lightning.edit task=inpaint ckpt=... input=images/ box=[0,0,4,8] out=top_half": (
        "test",
        "test_edit.py::test_inpaint_with_a_box_or_a_mask_image",
    ),
    "python -m act_lightning.edit task=superres factor=2 ckpt=... input=small/ out=sr": (
        "test",
        "test_edit.py::test_colorize_keeps_the_luminance_and_superres_the_patch_means",
    ),
    "python -m act_lightning.convert_reference cifar10_fid_6_0.ckpt cifar10_act.ckpt": (
        "test",
        "test_convert_reference.py::test_converted_networks_compute_what_the_reference_layout_holds",
    ),
    "python -m act_lightning.evaluate ckpt=cifar10_act.ckpt eval.quantize=truncate": (
        "test",
        "test_convert_reference.py::test_a_converted_checkpoint_is_evaluated_sampled_and_exported",
    ),
    "python -m act_lightning.export ckpt=outputs/quickstart/.../checkpoints/best.ckpt out=exported": (
        "test",
        "test_export.py::test_reloaded_it_samples_bit_identically_to_the_sample_command",
    ),
    "python -m act_lightning.sample ckpt=... num_samples=50000 taus=[0.821] out=two_step": (
        "test",
        "test_sample.py::test_taus_give_multistep_samples_and_bad_taus_are_refused",
    ),
    "python benchmarks/bench_train.py --configs cifar10 --ablate cifar10 --repeats 5": (
        "test",
        "test_benchmarks.py::test_bench_train_writes_the_table_against_the_baseline",
    ),
    "python -m act_lightning.train experiment=cifar10 perf=baseline trainer.strategy=auto": (
        "cli",
        [*SMOKE, *CHEAP],
    ),
    "python -m act_lightning.train -m model.schedule.gan_ratio=0,0.3 hydra/launcher=joblib "
    "hydra.launcher.n_jobs=2": (
        "cli",
        [*SMOKE, *CHEAP, "iterations=2"],
    ),
    "python -m act_lightning.train experiment=cifar10_ict": ("train", SMOKE),
    **{
        command: ("test", "test_cli.py::test_diffusion_pretraining_then_ect_tuning_from_its_checkpoint")
        for command in (
            "python -m act_lightning.train experiment=quickstart_diffusion "
            "hydra.run.dir=outputs/digits_diffusion",
            "python -m act_lightning.train experiment=quickstart "
            "init_from=outputs/digits_diffusion/checkpoints/last.ckpt model.curriculum=ect",
        )
    },
    **{
        command: ("test", "test_cli.py::test_the_cifar10_recipes_chain_diffusion_ect_and_a_converted_ddpm")
        for command in (
            "python -m act_lightning.train experiment=cifar10_diffusion",
            "python -m act_lightning.train experiment=cifar10_ect init_from=PATH/checkpoints/last.ckpt",
            "python -m act_lightning.train experiment=cifar10_ect_act init_from=PATH/checkpoints/last.ckpt",
            "python -m act_lightning.convert_diffusers ddpm-cifar10-32 ddpm_cifar10.ckpt",
            "python -m act_lightning.train experiment=cifar10_ect init_from=ddpm_cifar10.ckpt",
        )
    },
    "make reproduce-init": (
        "test",
        "test_ablations.py::test_make_reproduce_init_under_smoke_charges_the_pretraining_and_reports",
    ),
    "make reproduce-mini": (
        "test",
        "test_ablations.py::test_make_reproduce_mini_under_smoke_gives_the_figure_and_the_table",
    ),
    "python -m act_lightning.train -m ablation=options": (
        "test",
        "test_ablations.py::test_every_job_of_every_ablation_composes_and_builds",
    ),
    "python -m act_lightning.report multirun/ablation/options/<date>/<time> --out reports/options_mini": (
        "test",
        "test_ablations.py::test_make_reproduce_mini_under_smoke_gives_the_figure_and_the_table",
    ),
}


def test_every_readme_command_is_listed_here():
    assert sorted(set(readme_commands())) == sorted(COMMANDS)


@pytest.mark.parametrize("command", [c for c, (kind, _) in COMMANDS.items() if kind == "test"])
def test_the_test_that_runs_a_readme_command_exists(command):
    where = COMMANDS[command][1]
    if "::" not in where:
        return  # `make test`
    file, name = where.split("::")
    assert f"def {name}(" in (ROOT / "tests" / "integration" / file).read_text(), where


def _train_args(command: str) -> list[str]:
    if command.startswith("make train"):
        return shlex.split(command.split("ARGS=", 1)[1])[0].split()
    return shlex.split(command)[3:]


def _folder_with_classes(root: Path, n: int) -> Path:
    write_image_folder(root, classes=tuple(f"class{i}" for i in range(n)), per_class=2)
    return root


@pytest.mark.parametrize("command", [c for c, (kind, _) in COMMANDS.items() if kind == "train"])
def test_readme_training_commands(command, tmp_path):
    args = _train_args(command)
    if "data.root=DIR" in args:  # five class folders of tiny images
        args[args.index("data.root=DIR")] = f"data.root={_folder_with_classes(tmp_path / 'images', 5)}"
    extra = COMMANDS[command][1]
    summary = train(compose([*args, *extra], run_dir=str(tmp_path / "run")))
    assert summary["finished"] and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    config = ckpt["act_config"]
    for arg in args:  # the command's own settings reached the run
        key, value = arg.split("=", 1)
        node = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, (int, float, str, bool)) and key != "iterations":  # iterations: shortened
            assert str(node) == value, arg


def test_readme_prepare_commands(tmp_path):
    commands = [c for c, (kind, _) in COMMANDS.items() if kind == "prepare"]
    write_imagenet64(tmp_path / "downloads" / "imagenet64", per_file=2)
    write_lsun_lmdb(tmp_path / "data" / "lsun_cat256" / "cat", n=4)
    os.chdir(tmp_path)  # the README's relative paths, here
    try:
        for command in commands:
            argv = shlex.split(command)[3:]
            argv = [str(tmp_path / a.lstrip("/")) if a.startswith("/") else a for a in argv]
            assert prepare_main([*argv, "-q"]) == 0, command
    finally:
        os.chdir(ROOT)
    assert (tmp_path / "data" / "imagenet64" / "manifest.json").is_file()
    assert (tmp_path / "data" / "lsun_cat256" / "manifest.json").is_file()


def _run_cli(args: list[str], cwd_dir: Path, multirun: bool):
    folder = f"hydra.sweep.dir={cwd_dir}" if multirun else f"hydra.run.dir={cwd_dir}"
    env = COMMAND_ENV
    # DDP on several devices starts the command again in new processes: it runs in a process of its own
    ddp = any(a.startswith("trainer.devices=") and a != "trainer.devices=1" for a in args)
    return run_module("train", [*args, folder], env=env, timeout=600, own_process=ddp)


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c, (kind, _) in COMMANDS.items() if kind == "cli"])
def test_readme_multi_process_and_sweep_commands(command, tmp_path):
    args = shlex.split(command)[3:]
    multirun = args[0] == "-m"
    result = _run_cli([*args, *COMMANDS[command][1]], tmp_path, multirun)
    assert result.returncode == 0, result.stderr[-3000:]
    if "hydra/launcher=joblib" in args:  # its workers ended with the command, as with a process of its own
        from joblib.externals.loky import reusable_executor

        assert reusable_executor._executor is None
    jobs = sorted(p.parent.parent for p in tmp_path.glob("**/checkpoints/last.ckpt"))
    grid = math.prod(len(a.split("=", 1)[1].split(",")) for a in args if "=" in a and "," in a)
    assert len(jobs) == (grid if multirun else 1)  # one job per point of the sweep's grid, or one run


def test_readme_slurm_command_composes_the_job_it_would_submit(tmp_path):
    # No SLURM here: compose the command's config and build its launcher, which is what submits.
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.utils import instantiate

    (command,) = [c for c, (kind, _) in COMMANDS.items() if kind == "slurm"]
    overrides = [a for a in shlex.split(command)[3:] if a != "-m"]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = hydra_compose("train", overrides=[*overrides, f"run_dir={tmp_path}"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
    assert (launcher.partition, launcher.timeout_min) == ("gpu", 1440)
    assert cfg.trainer.strategy == "ddp" and cfg.data.global_batch_size == 640
    assert type(instantiate(launcher)).__name__ == "SlurmLauncher"
