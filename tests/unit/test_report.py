"""The sweep report's arithmetic: variant labels, values at equal iterations and at equal wall time."""

from pathlib import Path

import pytest

from act_lightning.report import Run, Variant, summarise, value_at_seconds, variant_labels


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
    import math
    import time

    from act_lightning.callbacks import FrechetEvaluation

    cb = FrechetEvaluation(run_dir=str(tmp_path), features="digits")
    cb._clock = time.perf_counter() - 5.0  # five seconds of training in this process
    state = cb.state_dict()
    assert 5.0 <= state["train_seconds"] < 6.0
    resumed = FrechetEvaluation(run_dir=str(tmp_path), features="digits")
    resumed.load_state_dict(state)
    assert resumed.train_seconds() == state["train_seconds"]  # counting goes on from there
    resumed._clock = time.perf_counter() - 2.0
    assert resumed.train_seconds() >= state["train_seconds"] + 2.0
    old = FrechetEvaluation(run_dir=str(tmp_path), features="digits")
    old.load_state_dict({"history": [(0, 9.0), (4, 3.0)], "references": {}, "best": (4, 3.0)})
    assert [h[:2] for h in old.history] == [(0, 9.0), (4, 3.0)] and math.isnan(old.history[0][2])


def _job(folder: Path, seed: int, overrides: list[str] | None, later: list[str] | None = None) -> Path:
    import json

    import torch
    import yaml

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
    from act_lightning.report import find_runs, job_record

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
    import json

    import torch

    from act_lightning.report import find_runs, markdown, summarise

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
    import types
    from itertools import count

    import numpy as np
    import torch

    from act_lightning.callbacks import FrechetEvaluation, evaluation

    ticks = count()
    monkeypatch.setattr(evaluation.time, "perf_counter", lambda: float(next(ticks)))
    cb = FrechetEvaluation(run_dir=str(tmp_path), features="digits", best_checkpoint=None)
    cb.extractor = torch.nn.Identity()
    cb._reference_statistics = lambda *a: (np.zeros(2), np.eye(2))
    cb._extra_references = lambda *a: None
    cb._define_wandb_metrics = lambda trainer: None
    cb.evaluate = lambda trainer, pl_module: 7.0
    trainer = types.SimpleNamespace(loggers=[], callback_metrics={}, datamodule=types.SimpleNamespace())
    module = types.SimpleNamespace(k=0, device=torch.device("cpu"))
    cb.on_train_start(trainer, module)
    assert cb.history == [(0, 7.0, 0.0)]
    assert cb.train_seconds() == 1.0  # the clock started after the evaluation: one reading since
