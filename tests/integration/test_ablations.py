"""The ablations in miniature (conf/ablation, conf/variant): every job of every sweep composes and builds,
and a two-variant, two-seed multirun under debug=smoke gives the report's figure and table."""

from __future__ import annotations

import itertools
import json
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf, read_write
from PIL import Image

from act_lightning.environment import describe, environment
from act_lightning.launch import check_slurm_counts
from act_lightning.report import main as report_main
from tests.conftest import COMMAND_ENV, CONF, ROOT, run_make

ABLATIONS = sorted(p.stem for p in (CONF / "ablation").glob("*.yaml"))
VARIANTS = sorted(p.stem for p in (CONF / "variant").glob("*.yaml"))
EXPECTED_SWEEPS = {  # ablations (a) to (e), the quickstart's recipe (f), the diffusion start (g)
    "ct_vs_act": {"seed": "0,1,2", "variant": "act,ct,ct_equal_time"},
    "gan_ratio": {"model.schedule.gan_ratio": "0,0.3,0.6,0.8,0.95"},
    "curriculum": {"model.schedule.bins_max": "10,20,40", "model.schedule.sigma_max": "10,20,80"},
    "augmentation": {"model.r1_threshold": "1e9,1.0,0.0"},
    "options": {"variant": "act,lognormal,exponential,online_teacher,dropout,shared_dropout,l2,ict"},
    "quickstart_recipe": {
        "model.distance": "pseudo_huber,l2",
        "model.schedule.gan_ratio": "0,0.3,0.95",
        "seed": "0,1",
    },
    "init_pretrain": {"seed": "0,1,2"},
    "init": {"seed": "0,1,2", "variant": "act,ect,ect_staged,ect_act"},
}


def _compose(overrides: list[str], tmp_path: Path, hydra: bool = False):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose(
            "train", overrides=[*overrides, f"run_dir={tmp_path}"], return_hydra_config=hydra
        )


def test_the_ablations_sweep_what_they_say():
    assert ABLATIONS == sorted(EXPECTED_SWEEPS)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_every_job_of_every_ablation_composes_and_builds(ablation, tmp_path):
    cfg = _compose([f"ablation={ablation}"], tmp_path, hydra=True)
    params = {k: str(v) for k, v in cfg.hydra.sweeper.params.items()}
    assert params == EXPECTED_SWEEPS[ablation]
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2
    assert type(instantiate(cfg.hydra.launcher)).__name__ == "JoblibLauncher"
    assert cfg.threads == "auto"  # each job's share of the cores (test_speed: threads_beside_other_jobs)
    grid = [[f"{k}={v}" for v in values.split(",")] for k, values in params.items()]
    for job in itertools.product(*grid):
        job_cfg = _compose([f"ablation={ablation}", *job, "debug=smoke", "data=synthetic"], tmp_path)
        model = instantiate(job_cfg.model)
        for override in job:  # the job's setting reached the module
            key, value = override.split("=", 1)
            if key.startswith("model.schedule."):
                name = key.removeprefix("model.schedule.")
                assert str(getattr(model.schedule, name)) == str(job_cfg.model.schedule[name])
            elif key.startswith("model."):
                assert str(model.hparams[key.removeprefix("model.")]) == str(job_cfg.model[key[6:]])


def _reproduce_slurm_command() -> list[str]:
    """docs/reproduce.md's command for an ablation on SLURM, as its arguments."""
    text = (ROOT / "docs" / "reproduce.md").read_text()
    (command,) = re.findall(
        r"^python -m act_lightning.train -m ablation=.*submitit_slurm.*(?:\n .*)*", text, re.M
    )
    return shlex.split(command.replace("\\\n", " "))[3:]


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_every_ablation_launches_on_slurm_with_the_command_docs_reproduce_shows(ablation, tmp_path):
    # the ablations' own launcher (two local jobs) gives way to the cluster's, n_jobs with it; their sweeps
    # and folders stay; the counts pass the launch's check (variant, a swept group, could set them per job)
    args = _reproduce_slurm_command()
    assert args[0] == "-m" and args[1] == "ablation=gan_ratio"
    overrides = [f"ablation={ablation}", *args[2:]]
    cfg = _compose(overrides, tmp_path, hydra=True)
    local = _compose([f"ablation={ablation}"], tmp_path, hydra=True)
    assert local.hydra.runtime.choices["hydra/launcher"] == "two_local_jobs"
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "submitit_slurm"
    assert "n_jobs" not in cfg.hydra.launcher and cfg.threads == "auto"
    assert {k: str(v) for k, v in cfg.hydra.sweeper.params.items()} == EXPECTED_SWEEPS[ablation]
    unresolved = [OmegaConf.to_container(c.hydra.sweep, resolve=False) for c in (cfg, local)]
    assert unresolved[0] == unresolved[1]  # the ablation's own folder
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (8, 1)
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    with read_write(cfg):
        cfg.hydra.overrides.task = overrides  # the multirun's command line, as Hydra records it
    check_slurm_counts(cfg)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_sets_what_it_is_named_for(variant, tmp_path):
    cfg = _compose([f"variant={variant}", "debug=smoke", "data=synthetic"], tmp_path)
    m = cfg.model
    expected = {
        "act": m.schedule.gan_ratio == 0.95 and m.schedule.teacher == "ema",  # the quickstart's
        "ct": m.schedule.gan_ratio == 0 and cfg.iterations == 4,  # debug=smoke shortens every variant alike
        "ct_equal_time": m.schedule.gan_ratio == 0,
        "lognormal": m.schedule.noise_sampling == "lognormal"
        and (m.schedule.p_mean, m.schedule.p_std) == (-1.1, 2.0),
        "exponential": m.schedule.curriculum == "exponential",
        "online_teacher": m.schedule.teacher == "online" and m.sampling_ema == 0.964,
        "dropout": m.generator.dropout == 0.1 and not m.shared_dropout,
        "shared_dropout": m.generator.dropout == 0.1 and m.shared_dropout,
        "l2": m.distance == "l2",
        "ict": m.schedule.noise_sampling == "lognormal"
        and m.schedule.curriculum == "exponential"
        and m.schedule.teacher == "online"
        and m.shared_dropout
        and m.sampling_ema == 0.964
        and m.schedule.gan_ratio == 0.95,
        "ect": m.curriculum == "ect"
        and m.schedule.teacher == "online"
        and m.schedule.loss_weighting == "ict"
        and m.pseudo_huber_c == 0
        and m.schedule.gan_ratio == 0
        and cfg.init_from.endswith("multirun/init/pretrain/seed0/checkpoints/last.ckpt"),
        "ect_act": m.curriculum == "ect" and m.schedule.gan_ratio == 0.95 and m.schedule.teacher == "online",
        "ect_staged": m.curriculum == "ect"
        and (m.schedule.ect_q, m.schedule.ect_stages, m.schedule.gan_ratio) == (2.0, 8, 0),
    }[variant]
    assert expected
    assert instantiate(m) is not None
    if variant == "ct_equal_time":
        full = _compose([f"variant={variant}"], tmp_path)
        assert full.iterations > _compose([], tmp_path).iterations  # more iterations for the same time


def test_cifar10_ict_combines_the_options_with_acts_discriminator(tmp_path):
    cfg = _compose(["experiment=cifar10_ict"], tmp_path)
    m = cfg.model
    assert (m.schedule.noise_sampling, m.schedule.curriculum, m.schedule.teacher, m.distance) == (
        "lognormal",
        "exponential",
        "online",
        "pseudo_huber",
    )
    assert (m.schedule.bins_min, m.schedule.bins_max, m.sampling_ema, m.generator.dropout) == (
        10,
        1280,
        0.99993,
        0.3,
    )
    assert (
        m.shared_dropout and m.schedule.gan_ratio == 0.3 and cfg.iterations == 300_000
    )  # ACT's recipe otherwise
    assert (
        cfg.model.discriminator._target_
        == _compose(["experiment=cifar10"], tmp_path).model.discriminator._target_
    )


@pytest.mark.slow
def test_make_reproduce_mini_under_smoke_gives_the_figure_and_the_table(tmp_path):
    """`make reproduce-mini`, shortened: the ct_vs_act sweep under debug=smoke with two variants and two
    seeds side by side (the joblib launcher), then the report: the Makefile target's commands (run_make)."""
    sweep, out = tmp_path / "sweep", tmp_path / "report" / "mini"
    variables = {
        "MINI_DIR": str(sweep),
        "REPORT": str(out),
        "ARGS": "debug=smoke data=synthetic seed=0,1 variant=act,ct_equal_time",
    }
    results = run_make("reproduce-mini", variables, env=COMMAND_ENV)
    assert [r.returncode for r in results] == [0, 0], results[-1].stderr[-3000:]
    stdout = "".join(r.stdout for r in results)
    summaries = sorted(sweep.glob("*/metric_summary.json"))
    assert len(summaries) == 4
    for path in summaries:
        history = json.loads(path.read_text())["history"]
        seconds = [h["seconds"] for h in history]
        assert seconds[0] == 0 and seconds == sorted(seconds) and seconds[-1] > 0
    assert "| act |" in stdout  # the table is printed

    with Image.open(out.with_suffix(".png")) as image:
        assert image.size[0] > 800 and image.size[1] > 300
    report = json.loads(out.with_suffix(".json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert set(rows) == {"act", "ct_equal_time"}  # debug=smoke and data=synthetic are shared: no variant
    for row in rows.values():
        assert row["seeds"] == [0, 1] and row["iterations"] == 4
        assert row["final"]["n"] == 2 and row["final"]["min"] <= row["final"]["mean"] <= row["final"]["max"]
    # equal wall time: the time plain CT was given (the Makefile's --time-reference)
    assert report["at_iteration"] == 4 and report["time_reference"] == "ct_equal_time"
    assert report["at_seconds"] == pytest.approx(rows["ct_equal_time"]["train_seconds"]["mean"])
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| act |") == 1 and table.count("\n| ct_equal_time |") == 1 and "Machine:" in table
    # all four jobs ran this code in this interpreter: one environment, from their checkpoints
    assert report["trained_with"] == [environment()]
    assert f"Trained with: {describe(environment())}." in table
    # the seeds of ACT and of CT differ in the discriminator only: their first evaluation is the same
    curves = report["curves"]
    assert curves["act"][0]["value"][0] == pytest.approx(curves["ct_equal_time"][0]["value"][0])


@pytest.mark.slow
def test_make_reproduce_init_under_smoke_charges_the_pretraining_and_reports(tmp_path):
    """`make reproduce-init`, shortened: one seed of ablation=init_pretrain under debug=smoke, the three
    variants of ablation=init started from it, and the report: the Makefile target's commands (run_make)."""
    sweeps, out = tmp_path / "init", tmp_path / "report" / "init"
    variables = {
        "INIT_DIR": str(sweeps),
        "INIT_REPORT": str(out),
        # one job at a time in this process (reproduce-mini's test runs the joblib launcher's workers)
        "ARGS": "debug=smoke data=synthetic seed=0 hydra.launcher.n_jobs=1",
    }
    results = run_make("reproduce-init", variables, env=COMMAND_ENV)
    assert [r.returncode for r in results] == [0, 0, 0], results[-1].stderr[-3000:]
    pretrain = json.loads((sweeps / "pretrain" / "seed0" / "metric_summary.json").read_text())["history"]
    report = json.loads(out.with_suffix(".json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert set(rows) == {"act", "ect", "ect_staged", "ect_act"} and report["time_reference"] == "ect"
    assert rows["act"]["pretrain_seconds"]["mean"] == 0
    for name in (
        "ect",
        "ect_staged",
        "ect_act",
    ):  # charged the pretraining's seconds: their curves start there
        assert rows[name]["pretrain_seconds"]["mean"] == pytest.approx(pretrain[-1]["seconds"])
        assert report["curves"][name][0]["seconds"][0] == pytest.approx(pretrain[-1]["seconds"])
    assert "include the pretraining" in out.with_suffix(".md").read_text()


def test_the_report_names_a_missing_sweep_and_one_without_evaluations(tmp_path, capsys):
    assert report_main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2
    assert "nowhere" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report_main([str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "metric_summary.json" in capsys.readouterr().err
