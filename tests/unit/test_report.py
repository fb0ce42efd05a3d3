"""The sweep report's arithmetic: variant labels, values at equal iterations and at equal wall time."""

import json
import math
import time
import types
from itertools import count
from pathlib import Path

import pytest
import torch
import yaml

from act_lightning import report
from act_lightning.callbacks import FrechetEvaluation, evaluation
from act_lightning.report import (
    Run,
    Variant,
    find_runs,
    job_record,
    main,
    markdown,
    plot,
    summarise,
    value_at_seconds,
    variant_labels,
    what_varies,
)


def _run(seed, iterations, values, seconds):
    return Run(Path("."), seed, iterations, values, seconds, {"real": 10.0})


def test_labels_keep_what_varies_and_drop_seeds_and_shared_settings():
    jobs = [
        ["seed=0", "variant=act", "debug=smoke", "threads=1"],
        ["seed=1", "variant=act", "debug=smoke", "threads=1"],
        ["seed=0", "+variant=ct", "debug=smoke", "hydra.launcher.n_jobs=2"],
        ["seed=0", "model.schedule.gan_ratio=0.1", "debug=smoke"],
    ]
    assert variant_labels(jobs) == ["act", "act", "ct", "model.schedule.gan_ratio=0.1"]
    assert variant_labels([["seed=0"], ["seed=1"]]) == ["defaults", "defaults"]
    assert variant_labels([["debug=smoke", "seed=0"]]) == ["debug=smoke"]  # one variant: all it set


def test_value_at_seconds_interpolates_and_flags_runs_that_ended_before():
    run = _run(0, [0, 100, 200], [100.0, 50.0, 30.0], [0.0, 10.0, 20.0])
    assert value_at_seconds(run, 15.0) == (pytest.approx(40.0), False)
    assert value_at_seconds(run, 20.3) == (30.0, False)  # within the 3% tolerance of its end
    assert value_at_seconds(run, 30.0) == (30.0, True)
    assert value_at_seconds(run, 0.0) == (100.0, False)  # its first evaluation's time: its first value
    assert value_at_seconds(run, -0.5) == (None, False)  # before it: nothing to read
    assert value_at_seconds(_run(0, [0], [1.0], [float("nan")]), 1.0) == (None, False)


def test_summary_compares_at_the_last_shared_iteration_and_the_reference_variants_time(capsys):
    act = Variant(
        "act", [_run(s, [0, 100, 200], [90.0, 40.0 + s, 20.0 + s], [0, 10, 20 + 2 * s]) for s in (0, 1)]
    )
    ct = Variant(
        "ct", [_run(s, [0, 100, 200, 300], [90.0, 60.0, 40.0, 30.0], [0, 5, 10, 15]) for s in (0, 1)]
    )
    rows, k, t, ref = summarise([act, ct], None, None, None)
    assert (k, t, ref) == (200, pytest.approx(21.0), "act")
    by = {r["variant"]: r for r in rows}
    assert by["act"]["final"]["mean"] == pytest.approx(20.5) and by["act"]["final"]["std"] == pytest.approx(
        0.7071, 1e-3
    )
    assert by["ct"]["at_iteration"]["mean"] == 40.0 and by["ct"]["iterations"] == 300
    assert by["ct"]["at_seconds"]["mean"] == 30.0 and by["ct"]["ended_before_seconds"]  # stopped at 15 s
    rows, _, t, ref = summarise([act, ct], None, None, "ct")
    assert (t, ref) == (15.0, "ct")
    # at 15 s: seed 0 halfway from 40 to 20 (30), seed 1 5/12 of the way from 41 to 21
    expected = (30.0 + (41.0 - 20.0 * 5 / 12)) / 2
    assert {r["variant"]: r for r in rows}["act"]["at_seconds"]["mean"] == pytest.approx(expected)
    _, _, t, ref = summarise([act, ct], None, None, "gan")  # not a variant: the first one's time, said
    assert (t, ref) == (pytest.approx(21.0), "act") and "not among the variants" in capsys.readouterr().err


def test_training_seconds_survive_a_resume_and_old_histories_load(tmp_path):
    cb = FrechetEvaluation(run_dir=str(tmp_path), features="digits")
    cb._clock = time.perf_counter() - 5.0  # five seconds of training in this process
    state = cb.state_dict()
    assert 5.0 <= state["train_seconds"] < 60.0  # (a machine may stall between the two lines)
    resumed = FrechetEvaluation(run_dir=str(tmp_path), features="digits")
    resumed.load_state_dict(state)
    assert resumed.train_seconds() == state["train_seconds"]  # counting goes on from there
    resumed._clock = time.perf_counter() - 2.0
    assert resumed.train_seconds() >= state["train_seconds"] + 2.0
    old = FrechetEvaluation(run_dir=str(tmp_path), features="digits")
    old.load_state_dict({"history": [(0, 9.0), (4, 3.0)], "references": {}, "best": (4, 3.0)})
    assert [h[:2] for h in old.history] == [(0, 9.0), (4, 3.0)] and math.isnan(old.history[0][2])


def _job(folder: Path, seed: int, overrides: list[str] | None, later: list[str] | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "metric_summary.json").write_text(json.dumps({"history": [{"iteration": 0, "value": 1.0}]}))
    if overrides is not None:  # trained: the checkpoint records the run's config and first launch
        (folder / "checkpoints").mkdir()
        history = [{"iteration": 0, "overrides": overrides}, {"iteration": 4, "overrides": ["resumed"]}]
        state = {"iteration": torch.tensor(4)}
        torch.save(
            {"state_dict": state, "act_config": {"seed": seed}, "act_history": history},
            folder / "checkpoints" / "last.ckpt",
        )
    for stamp, launch in (
        ("2026-01-01_10-00-00_000001", [f"seed={seed}", "first"]),
        ("2026-01-02_10-00-00_000001", later),
    ):
        if launch is not None:
            record = folder / ".hydra" / "launches" / stamp
            record.mkdir(parents=True)
            (record / "overrides.yaml").write_text(yaml.safe_dump(launch))
            (record / "config.yaml").write_text(yaml.safe_dump({"seed": seed}))
    return folder


def test_a_jobs_label_and_seed_come_from_its_checkpoint_whatever_later_launches_were_given(tmp_path):
    # a foreign launch into job 0 (another experiment, refused) left its record; job 1 has no checkpoint yet
    _job(
        tmp_path / "0",
        0,
        ["seed=0", "model.schedule.gan_ratio=0.1"],
        later=["experiment=cifar10", "logger=wandb"],
    )
    _job(tmp_path / "1", 1, None)
    overrides, config = job_record(tmp_path / "0")
    assert (overrides, config["seed"]) == (["seed=0", "model.schedule.gan_ratio=0.1"], 0)
    overrides, config = job_record(tmp_path / "1")
    assert (overrides, config["seed"]) == (["seed=1", "first"], 1)  # its first launch's record
    variants = find_runs([tmp_path])
    assert [v.label for v in variants] == ["model.schedule.gan_ratio=0.1", "first"]
    with pytest.raises(FileNotFoundError, match="neither a checkpoint nor a Hydra record"):
        job_record(tmp_path)


def test_a_run_started_from_a_pretrained_model_is_charged_its_pretraining_seconds(tmp_path):
    pretrain = tmp_path / "pretrain" / "seed0"
    pretrain.mkdir(parents=True)
    history = [
        {"iteration": 0, "value": 9.0, "seconds": 0.0},
        {"iteration": 8, "value": 5.0, "seconds": 30.0},
    ]
    (pretrain / "metric_summary.json").write_text(json.dumps({"history": history}))
    for name, init_from in (("0", None), ("1", str(pretrain / "checkpoints" / "last.ckpt"))):
        job = tmp_path / "tune" / name
        (job / "checkpoints").mkdir(parents=True)
        history = [
            {"iteration": 0, "value": 4.0, "seconds": 0.0},
            {"iteration": 4, "value": 2.0, "seconds": 10.0},
        ]
        (job / "metric_summary.json").write_text(json.dumps({"history": history}))
        torch.save(
            {
                "state_dict": {},
                "act_config": {"seed": 0, "init_from": init_from},
                "act_history": [
                    {"iteration": 0, "overrides": ["seed=0", f"variant={'ect' if init_from else 'act'}"]}
                ],
            },
            job / "checkpoints" / "last.ckpt",
        )
    scratch, tuned = find_runs([tmp_path / "tune"])
    assert scratch.runs[0].seconds == [0.0, 10.0] and scratch.runs[0].pretrain_seconds == 0
    assert tuned.label == "ect" and tuned.runs[0].seconds == [30.0, 40.0]
    rows, k, t, ref = summarise([scratch, tuned], None, 35.0, None)
    assert {r["variant"]: r for r in rows}["ect"]["at_seconds"]["mean"] == pytest.approx(3.0)
    assert "`ect` 30 s" in markdown(rows, k, t, ref, "fd", "here")
    (pretrain / "metric_summary.json").unlink()
    with pytest.raises(FileNotFoundError, match="no metric_summary.json to charge"):
        find_runs([tmp_path / "tune"])


def test_the_curves_first_point_is_at_zero_training_seconds_however_slow_the_machine(tmp_path, monkeypatch):
    # Every reading of the clock moves it on by one second (a machine that stalls between any two lines):
    # the evaluation of the untrained network is still at 0 s, and the clock counts from after it.

    import numpy as np

    ticks = count()
    monkeypatch.setattr(evaluation.time, "perf_counter", lambda: float(next(ticks)))
    cb = FrechetEvaluation(run_dir=str(tmp_path), features="digits", best_checkpoint=None)
    cb.extractor = torch.nn.Identity()
    cb._reference_statistics = lambda *a: (np.zeros(2), np.eye(2))
    cb._extra_references = lambda *a: None
    cb._define_wandb_metrics = lambda trainer: None
    cb.evaluate = lambda trainer, pl_module, stop=None: 7.0
    trainer = types.SimpleNamespace(loggers=[], callback_metrics={}, datamodule=types.SimpleNamespace())
    module = types.SimpleNamespace(k=0, device=torch.device("cpu"))
    cb.on_train_start(trainer, module)
    assert cb.history == [(0, 7.0, 0.0)] and cb.train_seconds() == 0.0  # no clock before the first epoch
    cb.on_train_epoch_start(trainer, module)  # after the grid of the untrained network
    assert cb.train_seconds() == 1.0  # the clock started with the epoch: one reading since


def test_seed_and_run_settings_removed_or_set_by_their_group_make_no_variant():
    removed = ["~seed", "~threads", "paths=cluster", "hydra=quiet", "+variant=ct"]
    assert what_varies(removed) == ["ct"]


def test_the_table_takes_the_longest_runs_iterations_the_last_values_and_flags_any_seed_that_ended():
    # seed 1 stopped early (iteration 100) and at 12 s, the equal time of the reference; its last value is
    # not its lowest
    long = _run(0, [0, 100, 200], [90.0, 30.0, 40.0], [0.0, 10.0, 20.0])
    short = _run(1, [0, 100], [80.0, 20.0], [0.0, 5.0])
    other = Variant("other", [_run(0, [0, 100, 200], [90.0, 50.0, 45.0], [0.0, 6.0, 12.0])])
    rows, k, t, _ = summarise([Variant("act", [short, long]), other], None, None, "other")
    act = rows[0]
    assert (k, t) == (100, 12.0)
    assert act["iterations"] == 200 and act["seeds"] == [0, 1]  # the longest run's; seeds in order
    assert act["final"]["min"] == 20.0 and act["final"]["max"] == 40.0  # each run's last value
    assert act["ended_before_seconds"] and act["at_seconds"]["n"] == 2  # one seed of two ended before


def test_missing_values_count_for_nothing_and_runs_without_seconds_give_no_equal_time(capsys):
    late = _run(0, [100, 200], [50.0, 40.0], [float("nan"), float("nan")])
    early = _run(1, [0, 50], [90.0, 60.0], [0.0, 5.0])
    rows, k, t, _ = summarise([Variant("a", [late]), Variant("b", [early])], None, None, None)
    assert k is None and t is None  # no iteration shared, and the reference's seconds are unknown
    late = _run(0, [100, 200], [50.0, 40.0], [10.0, 20.0])  # evaluated from 10 s on only
    rows, k, t, _ = summarise([Variant("a", [late, early])], 200, 5.0, None)
    assert rows[0]["at_iteration"] == {"mean": 40.0, "std": 0.0, "min": 40.0, "max": 40.0, "n": 1}
    # an --at-iteration some jobs were not evaluated at: a cell averages those that were, and it is said
    assert capsys.readouterr().err == (
        "note: --at-iteration 200: not every job was evaluated there (all were at no common iteration): "
        "a cell averages the jobs of its variant that were (the JSON's n counts them; none: empty)\n"
    )
    assert rows[0]["at_seconds"] == {"mean": 60.0, "std": 0.0, "min": 60.0, "max": 60.0, "n": 1}
    summarise([Variant("a", [late, early])], 150, None, None)  # none was evaluated there: said so
    assert capsys.readouterr().err == (
        "note: --at-iteration 150: no job was evaluated there (all were at no common iteration): "
        "the column's cells are empty\n"
    )


def test_the_markdown_table_has_eight_columns_marks_runs_that_ended_and_charges_only_pretrained_ones():
    act = Variant("act", [_run(0, [0, 100], [90.0, 30.0], [0.0, 10.0])])
    ct = Variant("ct", [_run(0, [0, 100], [90.0, 50.0], [0.0, 5.0])])
    rows, k, t, ref = summarise([act, ct], None, None, None)
    table = markdown(rows, k, t, ref, "fd", "here").splitlines()
    assert table[1] == "|" + "---|" * 8 and all(line.count("|") == 9 for line in table[:4])
    assert table[3].startswith("| ct |") and table[3].endswith("| 50.0 (ended earlier: its last value) |")
    assert "ended earlier" not in table[2]
    assert not any("pretraining" in line for line in table)  # no run started from a pretrained model


def test_jobs_are_taken_in_the_order_of_their_numbers(tmp_path):
    for number in (10, 2, 1):
        _job(tmp_path / str(number), number, [f"seed={number}", f"model.schedule.gan_ratio=0.{number}"])
    variants = find_runs([tmp_path])
    assert [v.label for v in variants] == [f"model.schedule.gan_ratio=0.{n}" for n in (1, 2, 10)]
    assert [v.runs[0].seed for v in variants] == [1, 2, 10]  # the config's seed


def test_a_checkpoint_whose_history_lacks_the_first_launch_takes_the_first_records_overrides(tmp_path):
    # the checkpoint's history starts past iteration 0 (its first launch is not recorded in it): the
    # overrides come from the first Hydra record, the config still from the checkpoint
    job = _job(tmp_path / "0", 0, None, later=["seed=0", "second"])
    (job / "checkpoints").mkdir()
    history = [{"iteration": 4, "overrides": ["resumed"]}]
    torch.save({"act_config": {"seed": 7}, "act_history": history}, job / "checkpoints" / "last.ckpt")
    overrides, config = job_record(job)
    assert overrides == ["seed=0", "first"] and config["seed"] == 7


def test_a_job_started_from_another_runs_checkpoint_is_labelled_by_its_own_launch(tmp_path):
    """A run started with ckpt_path= carries the other run's history first: its label was that run's
    first launch's overrides, and jobs with other settings fell into one row."""
    job = _job(tmp_path / "0", 0, None)
    (job / "checkpoints").mkdir()
    history = [
        {"iteration": 0, "overrides": ["iterations=8"], "new_run": True},
        {"iteration": 8, "overrides": ["ckpt_path=base.ckpt", "model.optimizer.lr=2e-5"], "new_run": True},
        {"iteration": 10, "overrides": ["ckpt_path=base.ckpt", "model.optimizer.lr=2e-5"]},  # requeued
    ]
    torch.save({"act_config": {"seed": 0}, "act_history": history}, job / "checkpoints" / "last.ckpt")
    overrides, _ = job_record(job)
    assert overrides == ["ckpt_path=base.ckpt", "model.optimizer.lr=2e-5"]


def test_the_command_refuses_a_missing_sweep_folder_in_one_line_with_status_2(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main([str(missing), "--out", str(tmp_path / "out")]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {missing}: no such sweep folder (a Hydra multirun's output folder)\n"
    )
    assert not list(tmp_path.iterdir())


def test_runs_without_recorded_seconds_or_with_a_diverged_metric_still_make_a_table():
    # a history written without seconds (NaN) leaves that seed out of the seconds column; a NaN metric (a
    # diverged seed) shows as nan rather than being averaged away; neither stops the report
    nan = math.nan
    untimed = _run(0, [0, 4], [9.0, 5.0], [nan, nan])
    timed = _run(1, [0, 4], [9.0, 6.0], [0.0, 10.0])
    diverged = _run(2, [0, 4], [9.0, nan], [0.0, 12.0])
    rows, k, t, ref = summarise(
        [Variant("act", [untimed, timed]), Variant("ct", [timed, diverged])], None, None, None
    )
    act, ct = rows
    assert act["train_seconds"] == {"mean": 10.0, "std": 0.0, "min": 10.0, "max": 10.0, "n": 1}
    assert act["final"]["mean"] == 5.5 and act["final"]["n"] == 2
    assert math.isnan(ct["final"]["mean"]) and math.isnan(ct["final"]["std"]) and ct["final"]["n"] == 2
    assert ct["train_seconds"]["mean"] == 11.0
    table = markdown(rows, k, t, ref, "fd", "here")
    assert "| act | 2 | 4 | 10 |" in table and "| ct | 2 | 4 | 11 ± 1 | nan ± nan |" in table


@pytest.fixture
def closed(monkeypatch):
    """The figures the plots close, kept open to read their axes."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    return figures


@pytest.mark.parametrize(
    "values, scale",
    [([9.0, 5.0], "log"), ([9.0, math.nan], "log"), ([0.3, -0.01], "linear"), ([2.0, 0.0], "linear")],
)
def test_the_figure_is_logarithmic_only_when_every_value_drawn_is_positive(tmp_path, closed, values, scale):
    # a Frechet distance near zero can round below it: a log axis would silently drop those points (NaN
    # points are not drawn at all)
    runs = [_run(0, [0, 4], values, [0.0, 10.0]), _run(1, [0, 4], [9.0, 6.0], [0.0, 11.0])]
    plot([Variant("act", runs)], tmp_path / "report.png", "fd", 4, None)
    assert (tmp_path / "report.png").is_file()
    assert [ax.get_yscale() for ax in closed[0].axes] == [scale, scale]


@pytest.mark.parametrize(
    "values, scale", [([math.nan, 5.0], "log"), ([5.0, math.nan], "log"), ([5.0, -0.1], "linear")]
)
def test_the_runs_own_curve_reads_its_values_the_same_way_wherever_a_nan_falls(
    tmp_path, closed, values, scale
):
    # min() over a list holding a NaN depends on where the NaN is: the axis did too
    evaluation.plot_curve(list(zip([0, 4], values)), {"real": 3.0}, tmp_path / "fid_curve.png", "fd")
    assert closed[0].axes[0].get_yscale() == scale


def test_the_report_says_what_the_jobs_trained_with_and_where_they_differ(tmp_path, capsys):
    """Each job's latest launch's environment, from its checkpoint: one line when all agree, each distinct
    one when they differ (here a resumed job's second launch ran other code), none for a job that recorded
    none (written before runs recorded it)."""
    env = {"act_lightning": "0.3.0", "commit": "a" * 40, "python": "3.11.7", "torch": "2.14.1", "cuda": None}
    newer = {**env, "commit": "b" * 40 + "+dirty"}
    for name, history in (
        ("0", [{"iteration": 0, "overrides": ["seed=0"], "environment": env}]),
        ("1", [{"iteration": 0, "overrides": ["seed=1"], "environment": env}]),
        ("2", [{"iteration": 0, "overrides": ["seed=2"]}]),
    ):
        job = _job(tmp_path / "sweep" / name, int(name), None)
        (job / "checkpoints").mkdir()
        torch.save(
            {"act_config": {"seed": int(name)}, "act_history": history}, job / "checkpoints" / "last.ckpt"
        )
    out = tmp_path / "report"
    assert main([str(tmp_path / "sweep"), "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["trained_with"] == [env]
    table = out.with_suffix(".md").read_text()
    assert "Trained with: act_lightning 0.3.0 (commit aaaaaaaaaaaa), Python 3.11.7, torch 2.14.1." in table

    job = tmp_path / "sweep" / "1" / "checkpoints" / "last.ckpt"
    history = [
        {"iteration": 0, "overrides": ["seed=1"], "environment": env},
        {"iteration": 4, "environment": newer},
    ]
    torch.save({"act_config": {"seed": 1}, "act_history": history}, job)
    assert main([str(tmp_path / "sweep"), "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["trained_with"] == [env, newer]
    first, second = "commit aaaaaaaaaaaa", "commit bbbbbbbbbbbb+dirty"
    assert (
        f"Trained with (the jobs differ): act_lightning 0.3.0 ({first}), Python 3.11.7, torch 2.14.1; "
        f"act_lightning 0.3.0 ({second}), Python 3.11.7, torch 2.14.1." in out.with_suffix(".md").read_text()
    )
    capsys.readouterr()


def test_out_keeps_every_dot_of_its_name_but_a_suffix_of_its_own(tmp_path):
    """`--out gan_ratio_0.3` wrote gan_ratio_0.png (with_suffix), where gan_ratio_0.5 would write too."""
    from act_lightning.report import output_paths

    def names(out):
        return [p.name for p in output_paths(tmp_path / "new" / out).values()]

    assert names("gan_ratio_0.3") == ["gan_ratio_0.3.png", "gan_ratio_0.3.md", "gan_ratio_0.3.json"]
    assert names("mini.md") == names("mini") == ["mini.png", "mini.md", "mini.json"]
    assert (tmp_path / "new").is_dir()  # its folder made


def test_jobs_that_report_different_metrics_are_refused_by_name(tmp_path):
    """A quickstart's val/fd and a CIFAR-10 val/fid went into one column under the first one's name."""
    from act_lightning.report import find_runs

    for name, metric in (("0", "val/fd"), ("1", "val/fid")):
        job = _job(tmp_path / "sweep" / name, int(name), None)
        summary = json.loads((job / "metric_summary.json").read_text())
        (job / "metric_summary.json").write_text(json.dumps({**summary, "metric": metric}))
    with pytest.raises(ValueError, match=r"different metrics: val/fd \(.*sweep/0\), val/fid \(.*sweep/1\)"):
        find_runs([tmp_path / "sweep"])
    assert main([str(tmp_path / "sweep"), "--out", str(tmp_path / "r")]) == 2  # said as an error line


def test_jobs_that_measured_the_metric_with_other_samples_are_refused_by_name(tmp_path):
    """An FD of 99 samples went into one column beside an FD of 297 (eval.subset_size=99,297)."""
    from act_lightning.report import find_runs

    for name, drawn in (("0", 297), ("1", 99)):
        job = _job(tmp_path / "sweep" / name, int(name), None)
        summary = json.loads((job / "metric_summary.json").read_text())
        (job / "metric_summary.json").write_text(
            json.dumps({**summary, "num_samples": drawn, "features": "digits"})
        )
    with pytest.raises(
        ValueError,
        match=r"measured their metric differently: .*num_samples=297 \(.*sweep/0\); .*num_samples=99",
    ):
        find_runs([tmp_path / "sweep"])
    job = tmp_path / "sweep" / "1" / "metric_summary.json"
    job.write_text(json.dumps({**json.loads(job.read_text()), "num_samples": 297}))
    assert main([str(tmp_path / "sweep"), "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["measured"] == {
        "features": "digits",
        "num_samples": 297,
    }


def test_a_sweep_without_any_evaluation_says_whether_its_jobs_were_refused(tmp_path):
    """Jobs that left only their launch records (refused, or stopped before their first evaluation) were
    reported as jobs without an evaluation (eval=null)."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: were the jobs run with an evaluation"):
        find_runs([tmp_path / "empty"])
    for job in ("0", "1"):
        (tmp_path / "sweep" / job / ".hydra" / "launches" / "2026-12-07_12-00-00_000000").mkdir(parents=True)
    refused = r"its 2 job folder\(s\) \(.*sweep/0, .*sweep/1\) were refused or stopped before their first"
    with pytest.raises(FileNotFoundError, match=refused):
        find_runs([tmp_path / "sweep"])


def test_a_job_without_a_checkpoint_is_labelled_by_the_launch_training_it(tmp_path):
    """Its first launch was refused (gan_ratio=1.5) and a second one trains: the row was the refused
    launch's setting until the job's first checkpoint."""
    _job(tmp_path / "0", 0, None, later=["seed=0", "model.schedule.gan_ratio=0.5"])
    assert job_record(tmp_path / "0")[0] == ["seed=0", "model.schedule.gan_ratio=0.5"]


def test_set_aside_outputs_and_jobs_given_twice_are_not_runs_and_order_makes_no_variant(tmp_path, capsys):
    """A relaunch's `replaced/` folder made the report fail ('holds neither a checkpoint nor a Hydra
    record'); a sweep given twice counted its seeds twice; the same settings in another order on the
    command line made another row."""
    sweep = tmp_path / "sweep"
    _job(sweep / "0", 0, ["seed=0", "model.schedule.mu0=0.9", "model.schedule.gan_ratio=0"])
    _job(sweep / "1", 1, ["seed=1", "model.schedule.gan_ratio=0", "model.schedule.mu0=0.9"])
    _job(sweep / "2", 0, ["seed=0", "model.schedule.gan_ratio=0.3", "model.schedule.mu0=0.9"])
    old = sweep / "0" / "replaced" / "2026-12-07_16-35-37-837807"
    old.mkdir(parents=True)
    (old / "metric_summary.json").write_text(json.dumps({"history": [{"iteration": 0, "value": 9.0}]}))
    variants = find_runs([sweep, sweep, sweep / "1"])
    assert [(v.label, [r.seed for r in v.runs]) for v in variants] == [
        ("model.schedule.gan_ratio=0", [0, 1]),
        ("model.schedule.gan_ratio=0.3", [0]),
    ]
    assert all("replaced" not in str(r.path) for v in variants for r in v.runs)
    (sweep / "3" / ".hydra" / "launches" / "x").mkdir(parents=True)  # a refused job: no summary
    find_runs([sweep])
    assert "1 job folder(s) have no metric_summary.json and are not in the report: refused, or" in (
        capsys.readouterr().err
    )


def test_runs_not_at_their_end_are_left_out_of_the_value_at_the_end_and_said(capsys):
    """A job still training (60 of 80) or stopped was averaged into 'at the end' with the finished ones."""
    done = Run(Path("done"), 0, [0, 40, 80], [90.0, 50.0, 30.0], [0.0, 1.0, 2.0], {}, planned=80)
    running = Run(Path("running"), 1, [0, 40, 60], [90.0, 60.0, 55.0], [0.0, 1.0, 1.5], {}, planned=80)
    longer = Run(Path("longer"), 2, [0, 40, 80, 120], [90.0, 50.0, 30.0, 20.0], [0, 1, 2, 3], {}, planned=120)
    twice = Run(Path("twice"), 0, [0, 40, 80], [90.0, 50.0, 31.0], [0.0, 1.0, 2.0], {}, planned=80)
    variant = Variant("act", [done, running, longer, twice])
    report.say_what_is_compared([variant])
    err = capsys.readouterr().err
    assert "note: running is at iteration 60 of 80 (still training, or stopped): left out of the value" in err
    assert "note: `act` holds seed(s) 0 more than once: not independent repeats" in err
    assert "note: `act`'s runs end at different iterations (80, 120): its value at the end mixes them" in err
    rows, *_ = summarise([variant], None, None, None)
    assert rows[0]["final"]["n"] == 3 and rows[0]["final"]["max"] == 31.0  # the running one left out
    # a variant with no run at its end yet (a report while the sweep trains): its cells are '-'
    rows, k, t, ref = summarise([Variant("act", [running])], None, None, None)
    assert rows[0]["final"]["n"] == 0
    assert "| act | 1 | 60 | 2 | - | - | 55.0 |" in markdown(rows, k, t, ref, "fd", "this machine")


def test_a_run_stopped_early_does_not_pull_the_equal_iterations_column_back_and_is_named(capsys):
    """A diverged job evaluated only at 0 made the column 'at 0 iterations': every variant compared on its
    untrained network, without a word."""
    done = [Run(Path(f"act{s}"), s, [0, 4, 8], [90.0, 50.0, 30.0], [0, 1, 2], {}, planned=8) for s in (0, 1)]
    ct = Run(Path("ct0"), 0, [0, 4, 8], [90.0, 70.0, 60.0], [0, 1, 2], {}, planned=8)
    diverged = Run(Path("ct1"), 1, [0], [90.0], [0], {}, planned=8)
    rows, at_iteration, *_ = summarise(
        [Variant("act", done), Variant("ct", [ct, diverged])], None, None, None
    )
    assert at_iteration == 8
    assert rows[0]["at_iteration"]["mean"] == 30.0 and rows[1]["at_iteration"] == {
        "mean": 60.0,
        "std": 0.0,
        "min": 60.0,
        "max": 60.0,
        "n": 1,
    }
    err = capsys.readouterr().err
    assert "note: ct1 was not evaluated at iteration 8 (stopped before it): left out of the column" in err


def test_the_figures_band_matches_seeds_by_iteration_not_by_position():
    """A seed resumed at another eval.every was evaluated at other iterations: the band averaged its
    values at 60 with the other's at 40 and drew them at 50."""
    a = _run(0, [0, 20, 40, 60, 80], [9.0, 8.0, 7.0, 6.0, 5.0], [0, 1, 2, 3, 4])
    b = _run(1, [0, 20, 60, 80], [9.0, 8.0, 4.0, 3.0], [0, 1, 3, 4])
    x, mean, low, high = report._band([a, b], lambda r: r.iterations)
    assert x.tolist() == [0, 20, 60, 80] and mean.tolist() == [9.0, 8.0, 5.0, 4.0]
    assert low.tolist() == [9.0, 8.0, 4.0, 3.0] and high.tolist() == [9.0, 8.0, 6.0, 5.0]


def test_a_negative_at_iteration_or_at_seconds_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path), "--out", str(tmp_path / "out"), "--at-iteration", "-5"])
    assert (
        stop.value.code == 2 and "--at-iteration -5: an ACT iteration, 0 or more" in capsys.readouterr().err
    )
    for seconds in ("-5", "0"):  # an empty column, without a word
        with pytest.raises(SystemExit) as stop:
            main([str(tmp_path), "--out", str(tmp_path / "out"), "--at-seconds", seconds])
        assert stop.value.code == 2 and "training seconds, more than 0" in capsys.readouterr().err
