"""Long runs: exact resume (stop_after, then resume=auto; or ckpt_path), preemption signals, kill -9,
one live run per folder, finished runs, start-up checks, and the divergence guard."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import signal
import stat
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from act_lightning.atomic import default_file_mode
from act_lightning.callbacks import DivergenceError
from act_lightning.checkpoints import load_checkpoint, run_start
from act_lightning.train import train
from tests.conftest import COMMAND_ENV, compose, run_cli, start_module


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _iteration(path) -> int:
    return int(_load(path)["state_dict"]["iteration"])


def _rows(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _by_step(rows: list[dict]) -> list[tuple[str, list]]:
    """The rows of each step, in step order, as a set: a run stopped at an evaluation's iteration logs
    that evaluation's row when it continues, after the iteration's own row rather than before it."""
    steps = list(dict.fromkeys(row["step"] for row in rows))
    return [(step, sorted(sorted(r.items()) for r in rows if r["step"] == step)) for step in steps]


def assert_same_training_state(a_path, b_path) -> None:
    a, b = _load(a_path), _load(b_path)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=0, msg=key)
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for pa, pb in zip(opt_a["state"].values(), opt_b["state"].values(), strict=True):
            for name in pa:
                torch.testing.assert_close(pa[name], pb[name], rtol=0, atol=0)
    assert a["loops"]["fit_loop"]["epoch_loop.state_dict"] == b["loops"]["fit_loop"]["epoch_loop.state_dict"]
    assert torch.equal(a["act_rng"]["cpu"], b["act_rng"]["cpu"])  # what dropout draws from next


def _sigterm_at_draw(monkeypatch, n: int) -> list[int]:
    """Patches the evaluation's noise so that drawing its n-th chunk (from 1) sends this process SIGTERM,
    as a scheduler's preemption would in the middle of an evaluation. Returns the first sample index of
    each chunk drawn since, in order."""
    from act_lightning.metrics import fid

    drawn, noise = [], fid.evaluation_noise

    def signalled(seed, indices, *rest):
        drawn.append(indices.start)
        if len(drawn) == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return noise(seed, indices, *rest)

    monkeypatch.setattr(fid, "evaluation_noise", signalled)
    return drawn


# the controller moves p (threshold 0, short ada_length) so the augmentation state is compared too
EXACT = ["debug=smoke", "iterations=8", "model.r1_threshold=0", "model.ada_length=100"]


@pytest.mark.slow
def test_stop_after_then_resume_auto_equals_the_straight_run_bit_for_bit(tmp_path):
    straight, run = tmp_path / "straight", tmp_path / "run"
    snapshots = ["callbacks.checkpoint.keep_snapshots=true", "callbacks.checkpoint.every_n_iterations=4"]
    exact = [*EXACT, "model.generator.dropout=0.3"]  # the global random state matters (act_rng)
    result = run_cli([*exact, *snapshots], straight)
    assert result.returncode == 0, result.stderr[-3000:]

    result = run_cli([*exact, "stop_after=4"], run)  # as a preempted job: checkpoint at 4, exit 0
    assert result.returncode == 0, result.stderr[-3000:]
    assert _iteration(run / "checkpoints" / "last.ckpt") == 4
    assert "Stopped at iteration 4 of 8 (stop_after=4)" in result.stdout  # Hydra logs to stdout
    # the stop saved before the evaluation due at 4 (a scheduler's kill follows its signal in seconds)
    assert "the evaluation at iteration 4 is left to the run's continuation" in result.stdout
    states = _load(run / "checkpoints" / "last.ckpt")["callbacks"].values()
    assert [k for k, *_ in next(v for v in states if "history" in v)["history"]] == [0]
    result = run_cli([*exact, "resume=auto"], run)  # the same run folder
    assert result.returncode == 0, result.stderr[-3000:]

    assert _iteration(run / "checkpoints" / "last.ckpt") == 8
    assert float(_load(run / "checkpoints" / "last.ckpt")["state_dict"]["aug_p"]) > 0
    assert_same_training_state(straight / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    # one metrics.csv holding every row once: the straight run's rows, the evaluations included (the
    # one at 4 made when the run continued, from the same weights: the same value)
    assert _by_step(_rows(run)) == _by_step(_rows(straight))
    history = json.loads((run / "metric_summary.json").read_text())["history"]
    assert [h["iteration"] for h in history] == [0, 4, 8]
    # the training seconds go on counting in the continuation (it starts mid-epoch, without an epoch start)
    assert 0 < history[1]["seconds"] < history[2]["seconds"]
    # and the same best.ckpt (at 4, a continuation saves it when it starts: with the random state the
    # checkpoint restores, not the fresh process's)
    assert _iteration(run / "checkpoints" / "best.ckpt") == _iteration(straight / "checkpoints" / "best.ckpt")
    assert_same_training_state(straight / "checkpoints" / "best.ckpt", run / "checkpoints" / "best.ckpt")
    assert [r["step"] for r in _rows(run) if "val/fd" in r] == ["0", "4", "8"]

    # ckpt_path= starts another folder from a snapshot and continues it exactly too
    other = tmp_path / "other"
    train(
        compose([*exact, f"ckpt_path={straight / 'checkpoints' / 'iter_0000004.ckpt'}"], run_dir=str(other))
    )
    assert_same_training_state(straight / "checkpoints" / "last.ckpt", other / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("stop", [5, 6])
def test_resume_across_epochs_is_exact(tmp_path, stop):
    # 12 synthetic images, 3 batches an epoch: the stop falls mid-epoch (5) or at an epoch's end (6), and
    # the run crosses epochs
    common = ["debug=smoke", "data=synthetic", "data.length=12", "iterations=8", "eval=null"]
    train(compose(common, run_dir=str(tmp_path / "straight")))
    summary = train(compose([*common, f"stop_after={stop}"], run_dir=str(tmp_path / "run")))
    assert summary["iteration"] == stop and not summary["finished"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(compose(common, run_dir=str(tmp_path / "run")))  # resume=auto is the default
    # the data module restores the loader's position: Lightning's "dataloader is not resumable" is wrong
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert_same_training_state(
        tmp_path / "straight/checkpoints/last.ckpt", tmp_path / "run/checkpoints/last.ckpt"
    )
    # the logged rows too: train/r1, the latest R1 penalty (every 2nd iteration in smoke runs), is
    # restored with the run, so a stop at an odd iteration logs on as the straight run does
    assert _rows(tmp_path / "run") == _rows(tmp_path / "straight")


def test_resume_with_dropout_draws_the_masks_the_straight_run_draws(tmp_path):
    """Dropout draws from the global generator, which the checkpoint keeps (act_rng) and a resumed run
    restores: without it, the resumed iterations would draw other masks from the freshly seeded one."""
    common = ["debug=smoke", "data=synthetic", "iterations=4", "eval=null", "model.generator.dropout=0.3"]
    train(compose(common, run_dir=str(tmp_path / "straight")))
    train(compose([*common, "stop_after=2"], run_dir=str(tmp_path / "run")))
    # stop_after counts this launch's iterations: two more from iteration 2 are the run's last two
    summary = train(compose([*common, "stop_after=2"], run_dir=str(tmp_path / "run")))
    assert summary["iteration"] == 4 and summary["finished"]
    assert_same_training_state(
        tmp_path / "straight/checkpoints/last.ckpt", tmp_path / "run/checkpoints/last.ckpt"
    )


def test_a_signal_during_an_evaluation_stops_it_and_saves_first_and_the_continuation_scores_it(
    tmp_path, monkeypatch
):
    straight, run = tmp_path / "straight", tmp_path / "run"
    args = [*EXACT, "eval.num_samples=4", "eval.batch_size=2"]  # evaluations of two rounds of sampling
    assert run_cli(args, straight).returncode == 0
    # iteration 0's evaluation draws chunks 0 and 2; the third is iteration 4's first: SLURM's preemption
    drawn = _sigterm_at_draw(monkeypatch, 3)
    result = run_cli(args, run)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert drawn == [0, 2, 0]  # it gave up after the round the signal came in: not one more image
    assert "Stopped at iteration 4 of 8 (signal SIGTERM)" in result.stdout  # not one iteration later
    assert "the evaluation at iteration 4 is left to the run's continuation" in result.stdout
    assert _iteration(run / "checkpoints" / "last.ckpt") == 4
    monkeypatch.undo()
    assert run_cli(args, run).returncode == 0
    assert _by_step(_rows(run)) == _by_step(_rows(straight))
    assert_same_training_state(straight / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")


def test_a_signal_during_the_evaluation_a_launch_starts_with_stops_it_before_its_first_iteration(
    tmp_path, monkeypatch
):
    # iteration 0's evaluation, and the one a stop at an evaluation's iteration left to its continuation,
    # give way to a signal as the evaluations during training do: a scheduler kills seconds after it
    straight, run = tmp_path / "straight", tmp_path / "run"
    args = [*EXACT, "eval.num_samples=4", "eval.batch_size=2"]  # evaluations of two rounds of sampling
    args += ["callbacks.checkpoint.keep_snapshots=true"]
    assert run_cli(args, straight).returncode == 0
    drawn = _sigterm_at_draw(monkeypatch, 1)  # in the first round
    result = run_cli(args, run)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert drawn == [0] and "Stopped at iteration 0 of 8 (signal SIGTERM)" in result.stdout
    assert _iteration(run / "checkpoints" / "last.ckpt") == 0
    # no snapshot of the untrained network, nor its sample grid: the continuation writes the grid
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]
    assert not (run / "samples" / "iter_0000000.png").exists()
    csv_file = run / "metrics.csv"  # no value of it, nor the scale's ends, which are logged with it
    assert not csv_file.exists() or "val/fid" not in csv_file.read_text()
    monkeypatch.undo()
    assert run_cli([*args, "stop_after=4"], run).returncode == 0  # stops at an evaluation's iteration
    assert _iteration(run / "checkpoints" / "last.ckpt") == 4
    drawn = _sigterm_at_draw(monkeypatch, 1)
    result = run_cli(args, run)  # the signal comes during the deferred evaluation of iteration 4
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert drawn == [0] and "Stopped at iteration 4 of 8 (signal SIGTERM)" in result.stdout
    states = _load(run / "checkpoints" / "last.ckpt")["callbacks"].values()
    (state,) = [v for v in states if "history" in v]
    assert state["deferred"] == 4 and [k for k, *_ in state["history"]] == [0]
    monkeypatch.undo()
    assert run_cli(args, run).returncode == 0
    assert _by_step(_rows(run)) == _by_step(_rows(straight))
    assert_same_training_state(straight / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    names = lambda folder: sorted(p.name for p in folder.iterdir())  # noqa: E731
    assert names(run / "samples") == names(straight / "samples")
    assert "iter_0000000.ckpt" not in names(run / "checkpoints")


def test_a_signal_during_an_evaluations_last_round_keeps_it_and_stops_at_its_iteration(tmp_path, monkeypatch):
    # the evaluation has drawn all its samples: it is kept, and the run stops at its iteration, as at
    # any other (before, the first at once gave its work up, and a later one stopped the run an
    # iteration late)
    straight, run = tmp_path / "straight", tmp_path / "run"
    args = [*EXACT, "eval.num_samples=4", "eval.batch_size=2"]  # evaluations of two rounds of sampling
    assert run_cli(args, straight).returncode == 0
    for stopped_at, history in ((0, [0]), (4, [0, 4])):
        monkeypatch.undo()
        _sigterm_at_draw(monkeypatch, 2)  # in the second, last round of the launch's first evaluation
        result = run_cli(args, run)
        assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
        assert f"Stopped at iteration {stopped_at} of 8 (signal SIGTERM)" in result.stdout
        states = _load(run / "checkpoints" / "last.ckpt")["callbacks"].values()
        (state,) = [v for v in states if "history" in v]
        assert [k for k, *_ in state["history"]] == history and state["deferred"] is None
    monkeypatch.undo()
    assert run_cli(args, run).returncode == 0
    assert _by_step(_rows(run)) == _by_step(_rows(straight))
    assert_same_training_state(straight / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_a_signal_during_the_last_evaluation_saves_first_and_the_continuation_only_evaluates(
    tmp_path, monkeypatch
):
    # the last iteration's evaluation gives way as the others do: the trained weights are on disk before
    # a scheduler's kill; the continuation, at the run's end, makes that evaluation and trains nothing.
    # A signal in that evaluation's last round keeps it, and then nothing is left: the run finishes (0,
    # no requeue), as after a signal in the last iteration (before, it stopped and a requeued job found
    # "nothing to do")
    straight, run = tmp_path / "straight", tmp_path / "run"
    args = [*EXACT, "eval.num_samples=4", "eval.batch_size=2", "callbacks.checkpoint.keep_snapshots=true"]
    # stop_after that ends at the last iteration ends the run: its evaluation is made there, not left
    result = run_cli([*args, "stop_after=8"], straight)
    assert result.returncode == 0 and "finished at iteration 8" in result.stdout
    drawn = _sigterm_at_draw(monkeypatch, 5)  # evaluations at 0, 4 and 8 of two rounds: 8's first
    result = run_cli(args, run)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]  # a job to requeue
    assert drawn == [0, 2, 0, 2, 0] and "Stopped at iteration 8 of 8 (signal SIGTERM)" in result.stdout
    assert "the evaluation at iteration 8 is left to the run's continuation" in result.stdout
    saved = _load(run / "checkpoints" / "last.ckpt")
    (state,) = [v for v in saved["callbacks"].values() if "history" in v]
    assert state["deferred"] == 8 and [k for k, *_ in state["history"]] == [0, 4]
    assert int(saved["state_dict"]["iteration"]) == 8
    monkeypatch.undo()
    drawn = _sigterm_at_draw(monkeypatch, 2)  # the continuation's only evaluation, in its last round
    result = run_cli(args, run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert drawn == [0, 2] and "Stopped at" not in result.stdout
    assert "nothing to do" not in result.stdout and "finished at iteration 8" in result.stdout
    assert _by_step(_rows(run)) == _by_step(_rows(straight))
    assert_same_training_state(straight / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    names = lambda folder: sorted(p.name for p in folder.iterdir())  # noqa: E731
    assert names(run / "samples") == names(straight / "samples")
    summary = json.loads((run / "metric_summary.json").read_text())
    assert [h["iteration"] for h in summary["history"]] == [0, 4, 8]
    for name in ("last.ckpt", "best.ckpt"):  # neither says an evaluation is left any more
        (state,) = [v for v in _load(run / "checkpoints" / name)["callbacks"].values() if "history" in v]
        assert state["deferred"] is None, name
    assert "the run is finished, nothing to do" in run_cli(args, run).stdout  # and now it is


def test_a_continuation_trains_at_the_learning_rates_resume_changes_allows(tmp_path):
    # a warm-up of 10: the continuation at 4 is mid-ramp, its rates the new base times that factor
    common = ["debug=smoke", "data=synthetic", "iterations=8", "eval=null", "model.warmup=10"]
    train(compose([*common, "stop_after=4"], run_dir=str(tmp_path / "run")))
    lower = ["model.optimizer.lr=1e-5", "model.d_optimizer.lr=3e-5"]
    with pytest.raises(ValueError, match=r"resume_changes=\[model.d_optimizer.lr,model.optimizer.lr\]"):
        train(compose([*common, *lower], run_dir=str(tmp_path / "run")))
    allowed = "resume_changes=[model.optimizer.lr,model.d_optimizer.lr]"
    train(compose([*common, *lower, allowed], run_dir=str(tmp_path / "run")))
    saved = _load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert int(saved["state_dict"]["iteration"]) == 8
    for rate, optimizer, scheduler in zip((1e-5, 3e-5), saved["optimizer_states"], saved["lr_schedulers"]):
        assert scheduler["base_lrs"] == [rate] and scheduler["last_epoch"] == 8
        assert optimizer["param_groups"][0]["lr"] == pytest.approx(rate * 0.9)  # (8 + 1) / 10
    (launch,) = saved["act_history"][1:]
    assert launch["changes"]["model.optimizer.lr"] == [2e-4, 1e-5]
    # the rates trained: the weights are not those of the straight run (= one continued at its own rates)
    train(compose(common, run_dir=str(tmp_path / "same")))
    same = _load(tmp_path / "same" / "checkpoints" / "last.ckpt")["state_dict"]
    assert not torch.equal(
        same["generator.unet.conv_out.weight"], saved["state_dict"]["generator.unet.conv_out.weight"]
    )


def test_the_last_evaluation_is_in_the_last_checkpoint_and_stays_in_the_history_of_a_longer_run(
    tmp_path, caplog
):
    # the last iteration (6) is a checkpoint iteration but not an evaluation one (every 4): it is scored
    # before that save, so a run trained on from it keeps that value in its history and summary
    common = ["debug=smoke", "data=synthetic", "callbacks.checkpoint.every_n_iterations=3", "eval.every=4"]
    train(compose([*common, "iterations=6"], run_dir=str(tmp_path)))
    states = _load(tmp_path / "checkpoints" / "last.ckpt")["callbacks"].values()
    (state,) = [v for v in states if "history" in v]
    assert [k for k, *_ in state["history"]] == [0, 4, 6]
    train(compose([*common, "iterations=8", "resume_changes=[iterations]"], run_dir=str(tmp_path)))
    summary = json.loads((tmp_path / "metric_summary.json").read_text())
    assert [h["iteration"] for h in summary["history"]] == [0, 4, 6, 8]
    # a change to a finished run trains nothing and is kept nowhere: said so, not "kept in the history"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="act_lightning.start"):
        train(compose([*common, "iterations=5", "resume_changes=[iterations]"], run_dir=str(tmp_path)))
    assert "the run is finished at iteration 8; nothing is trained or kept" in caplog.text
    assert "kept in the run's history" not in caplog.text


def test_a_run_started_from_another_runs_snapshot_keeps_a_best_checkpoint_of_its_own(tmp_path):
    # the snapshot carries its run's history and best, not that run's best.ckpt: the new folder's best is
    # taken anew at its next evaluation and written there. (Learning rates of 1e-30 leave the weights, so
    # every evaluation gives the same value: no later one beats the carried best, iteration 2's.)
    lr = ["model.optimizer.lr=1e-30", "model.d_optimizer.lr=1e-30"]
    common = ["debug=smoke", "data=synthetic", "iterations=6", "eval.every=2", *lr]
    snapshots = ["callbacks.checkpoint.every_n_iterations=2", "callbacks.checkpoint.keep_snapshots=true"]
    train(compose([*common, *snapshots], run_dir=str(tmp_path / "source")))
    source = json.loads((tmp_path / "source" / "metric_summary.json").read_text())
    assert len({h["value"] for h in source["history"][1:]}) == 1  # a tie: the earliest is the best
    assert source["best"]["iteration"] == 2 and _iteration(tmp_path / "source/checkpoints/best.ckpt") == 2
    snapshot = tmp_path / "source" / "checkpoints" / "iter_0000004.ckpt"
    train(compose([*common, f"ckpt_path={snapshot}"], run_dir=str(tmp_path / "new")))
    summary = json.loads((tmp_path / "new" / "metric_summary.json").read_text())
    assert [h["iteration"] for h in summary["history"]] == [0, 2, 4, 6]
    assert summary["history"][1]["value"] == summary["history"][3]["value"]
    assert summary["best"]["iteration"] == 6
    assert _iteration(tmp_path / "new" / "checkpoints" / "best.ckpt") == 6
    # its history: the source run's launch, then its own, which started it (report labels it by that one)
    history = _load(tmp_path / "new" / "checkpoints" / "last.ckpt")["act_history"]
    assert [(h["iteration"], h.get("new_run")) for h in history] == [(0, True), (4, True)]
    assert run_start(history) is history[1]


def test_a_run_started_from_init_from_resumes_after_that_file_has_gone(tmp_path):
    # the weights init_from gave are in the run's own checkpoint: resume=auto needs the file no more
    diffusion = ["experiment=quickstart_diffusion", "debug=smoke", "eval=null"]
    train(compose(diffusion, run_dir=str(tmp_path / "d")))
    init = tmp_path / "init.ckpt"
    (tmp_path / "d" / "checkpoints" / "last.ckpt").rename(init)
    tune = ["debug=smoke", "eval=null", f"init_from={init}", "iterations=4"]
    summary = train(compose([*tune, "stop_after=2"], run_dir=str(tmp_path / "tune")))
    assert summary["iteration"] == 2 and not summary["finished"]
    init.unlink()
    assert train(compose(tune, run_dir=str(tmp_path / "tune")))["finished"]
    assert _iteration(tmp_path / "tune" / "checkpoints" / "last.ckpt") == 4
    with pytest.raises(FileNotFoundError, match="init_from=.*init.ckpt: no such checkpoint file"):
        train(compose(tune, run_dir=str(tmp_path / "new")))  # a new run does need it


def test_the_remains_of_a_save_killed_mid_write_are_removed_at_start_up(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    stale = [".last.ckpt.k2j4h6g8.tmp", ".best.ckpt.a_b_c_d_.tmp", ".iter_0000002.ckpt.00000000.tmp"]
    others = ["notes.tmp", "old.ckpt.orig", ".last.ckpt.tmp"]  # (a *.ckpt there would refuse a fresh start)
    for name in stale + others:
        (folder / name).write_bytes(b"half a checkpoint")
    summary_remains = tmp_path / ".metric_summary.json.a1b2c3d4.tmp"  # in the run folder itself
    summary_remains.write_bytes(b"half a summary")
    train(compose(["debug=smoke", "iterations=2", "eval=null"], run_dir=str(tmp_path)))
    assert sorted(p.name for p in folder.iterdir()) == sorted(["last.ckpt", *others])
    assert not summary_remains.exists()
    assert (folder / "notes.tmp").read_bytes() == b"half a checkpoint"


def _start(args, run_dir):
    """`python -m act_lightning.train ARGS` in a process of its own, to be signalled and killed."""
    env = {**os.environ, **COMMAND_ENV}
    return start_module("train", [*args, f"hydra.run.dir={run_dir}"], env=env)


def _wait_until(condition, proc, timeout=180):
    start = time.monotonic()
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()[1][-3000:]}")
        if time.monotonic() - start > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.2)


LONG = ["debug=smoke", "eval=null", "callbacks.samples.every_n_iterations=100000"]


@pytest.mark.slow
def test_sigterm_kill_9_one_live_run_per_folder_and_a_finished_run(tmp_path):
    run, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    every = ["callbacks.checkpoint.every_n_iterations=5"]
    proc = _start([*LONG, *every, "iterations=100000"], run)
    _wait_until(last.is_file, proc)  # training (a checkpoint at iteration 5)

    # a second run started in the folder is refused while the first one lives
    with pytest.raises(RuntimeError, match="in use by another live run"):
        train(compose([*LONG, *every, "iterations=100000"], run_dir=str(run)))

    # SIGTERM (preemption, scancel): a checkpoint at the end of the current iteration, a non-zero status
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    stopped = _iteration(last)
    assert stopped >= 5 and f"Stopped at iteration {stopped}" in out and "SIGTERM received" in err
    assert int(_rows(run)[-1]["step"]) == stopped  # every row up to the checkpoint is on disk
    assert stat.S_IMODE(last.stat().st_mode) == default_file_mode()  # readable as the user's other files

    # kill -9 mid-run (no handler runs), then resume=auto continues from the last checkpoint
    proc = _start([*LONG, *every, "iterations=100000"], run)
    _wait_until(lambda: last.is_file() and _iteration(last) >= stopped + 10, proc)
    proc.kill()
    proc.wait(timeout=60)
    killed_at = _iteration(last)
    end = killed_at + 3  # a deliberate change of the run's length, which resume_changes allows
    result = run_cli([*LONG, *every, f"iterations={end}", "resume_changes=[iterations]"], run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _iteration(last) == end
    steps = [int(r["step"]) for r in _rows(run) if "train/loss_ct" in r]
    assert steps == list(range(1, end + 1))  # every iteration's row once, none lost, none twice

    # a finished run resumed does nothing more
    before = last.stat().st_mtime_ns
    summary = train(compose([*LONG, *every, f"iterations={end}"], run_dir=str(run)))
    assert summary["finished"] and summary["iteration"] == end
    assert last.stat().st_mtime_ns == before and _iteration(last) == end


def test_a_checkpoint_is_on_disk_only_after_the_rows_up_to_its_iteration(tmp_path):
    """Lightning hands iteration k's row to the loggers after the hook that writes checkpoint k: a kill -9
    between the two used to leave checkpoint k without row k, and the resumed run (which keeps the rows
    up to its checkpoint) without it for good. Checkpoint k is now put in place after row k is handed
    over and before iteration k + 1's."""
    out = tmp_path / "seen.txt"
    watch = [
        "+logger.watch._target_=tests.helpers_signals.CheckpointAtEachRow",
        f"+logger.watch.checkpoint={tmp_path / 'checkpoints' / 'last.ckpt'}",
        f"+logger.watch.out={out}",
    ]
    every = ["callbacks.checkpoint.every_n_iterations=2", "iterations=7"]
    summary = train(compose([*LONG, *every, *watch], run_dir=str(tmp_path)))
    assert summary["finished"] and _iteration(tmp_path / "checkpoints" / "last.ckpt") == 7
    seen = [tuple(map(int, line.split())) for line in out.read_text().splitlines()]
    # at row k the checkpoint on disk is the newest from before k (2, 4, 6), none before the first
    assert seen == [(1, -1), (2, -1), (3, 2), (4, 2), (5, 4), (6, 4), (7, 6)]
    assert [int(r["step"]) for r in _rows(tmp_path) if "train/loss_ct" in r] == list(range(1, 8))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]  # no temporaries


@pytest.mark.slow
def test_a_launch_killed_before_its_first_last_checkpoint_continues_from_its_best_one(tmp_path):
    """A kill -9 (a joblib sweep's Ctrl-C, the out-of-memory killer) after the first best.ckpt and before
    the first last.ckpt left a folder whose relaunch was refused; it now continues from best.ckpt, with
    every metrics row once."""
    run, best = tmp_path / "run", tmp_path / "run" / "checkpoints" / "best.ckpt"
    args = ["debug=smoke", "callbacks.samples.every_n_iterations=100000", "eval.every=2"]
    args.append("callbacks.checkpoint.every_n_iterations=100000")
    proc = _start([*args, "iterations=100000"], run)
    _wait_until(best.is_file, proc)
    proc.kill()
    proc.wait(timeout=60)
    assert sorted(p.name for p in best.parent.glob("*.ckpt")) == ["best.ckpt"]
    killed_at = _iteration(best)
    end = killed_at + 3
    result = run_cli([*args, f"iterations={end}", "resume_changes=[iterations]"], run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"continues from its newest checkpoint, best.ckpt (iteration {killed_at})" in result.stdout
    assert _iteration(run / "checkpoints" / "last.ckpt") == end
    rows = _rows(run)
    assert [int(r["step"]) for r in rows if "train/loss_ct" in r] == list(range(1, end + 1))
    evaluated = [int(r["step"]) for r in rows if "val/fd" in r]
    assert evaluated == [*range(0, end, 2), end], evaluated  # the curve from the untrained network on


def test_the_best_checkpoint_too_is_on_disk_only_after_the_rows_up_to_its_iteration(tmp_path):
    """best.ckpt, saved by the evaluation at iteration k, was put in place before row k reached the loggers:
    after a kill -9 before the first last.ckpt, a run continued from it (ckpt_path=) lacked the rows up to
    k for good (iterations 0 and 10 of the FID curve, once). It is now put in place as last.ckpt is."""
    out = tmp_path / "seen.txt"
    watch = [
        "+logger.watch._target_=tests.helpers_signals.CheckpointAtEachRow",
        f"+logger.watch.checkpoint={tmp_path / 'checkpoints' / 'best.ckpt'}",
        f"+logger.watch.out={out}",
    ]
    args = ["debug=smoke", "callbacks.samples.every_n_iterations=100000", "eval.every=1", "iterations=4"]
    summary = train(compose([*args, *watch], run_dir=str(tmp_path)))
    assert summary["finished"]
    seen = [tuple(map(int, line.split())) for line in out.read_text().splitlines()]
    # the first evaluation after the untrained network's is the first best: on disk from row 2 on
    assert seen[:2] == [(1, -1), (2, 1)] and all(k < step for step, k in seen), seen
    assert not [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def _signal_at(signum: int, at: int) -> list[str]:
    return [
        "+callbacks.send._target_=tests.helpers_signals.SendSignalAt",
        f"+callbacks.send.signum={int(signum)}",
        f"+callbacks.send.at={at}",
    ]


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    cfg = compose([*LONG, "iterations=50", *_signal_at(signal.SIGINT, 3)], run_dir=str(tmp_path))
    with pytest.raises(SystemExit) as stop:
        train(cfg)
    assert stop.value.code == 128 + signal.SIGINT
    assert _iteration(tmp_path / "checkpoints" / "last.ckpt") == 3
    assert signal.getsignal(signal.SIGINT) is not None  # handlers are put back


def test_a_sigterm_while_the_callbacks_start_stops_after_one_iteration_with_a_checkpoint(tmp_path):
    """Lightning installs its SIGTERM handler just before training. A SIGTERM during the other
    callbacks' start (the reference statistics, the first evaluation) used to reach that handler: the run
    ended with status 0 and no checkpoint, and under DDP the handler's broadcast on the rank that got the
    signal hung the job. The first callback (TakeStopSignals) now installs ours before any other starts."""
    from act_lightning.callbacks import LastCheckpoint
    from tests.helpers_signals import HANDLERS_AT_START

    HANDLERS_AT_START.clear()
    cfg = compose([*LONG, "iterations=50", *_signal_at(signal.SIGTERM, 0)], run_dir=str(tmp_path))
    with pytest.raises(SystemExit) as stop:
        train(cfg)
    assert stop.value.code == 128 + signal.SIGTERM
    assert _iteration(tmp_path / "checkpoints" / "last.ckpt") == 1
    (handler,) = HANDLERS_AT_START  # what was in place while the other callbacks started: ours
    assert getattr(handler, "__func__", None) is LastCheckpoint._on_signal


def test_the_slurm_time_limit_signal_saves_then_hands_over_to_the_launchers_requeue(tmp_path):
    seen = []

    def launcher_requeue(signum, frame):  # what submitit's handler does: requeue (here: record)
        seen.append((signum, _iteration(tmp_path / "checkpoints" / "last.ckpt")))

    previous = signal.signal(signal.SIGUSR2, launcher_requeue)
    try:
        cfg = compose([*LONG, "iterations=50", *_signal_at(signal.SIGUSR2, 3)], run_dir=str(tmp_path))
        with pytest.raises(SystemExit) as stop:
            train(cfg)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert stop.value.code == 128 + signal.SIGUSR2
    assert seen == [(signal.SIGUSR2, 3)]  # requeued once, after the checkpoint of iteration 3 was written


def test_a_signal_in_the_last_iteration_finishes_the_run_with_one_save_of_it(tmp_path, monkeypatch):
    """The run is complete when the signal is seen: it ends as finished (status 0, no requeue), and its
    last iteration's checkpoint, due by every_n_iterations, is written once (not again at the end)."""
    import lightning as L

    saves, save = [], L.Trainer.save_checkpoint

    def counted(trainer, path, *args, **kwargs):  # written under a temporary name, then renamed
        saves.append(re.sub(r"^\.(.+)\.[0-9a-f]{8}\.tmp$", r"\1", Path(path).name))
        return save(trainer, path, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "save_checkpoint", counted)
    every = ["callbacks.checkpoint.every_n_iterations=2"]
    summary = train(
        compose([*LONG, *every, "iterations=4", *_signal_at(signal.SIGUSR2, 4)], run_dir=str(tmp_path))
    )
    assert summary["finished"] and summary["iteration"] == 4 and summary["stopped_by"] is None
    assert saves == ["last.ckpt", "last.ckpt"]  # iterations 2 and 4
    assert _iteration(tmp_path / "checkpoints" / "last.ckpt") == 4


# -- start-up checks: before any logger starts or any folder is created --------------------------------


def _nothing_started(run_dir) -> bool:
    return not (run_dir / "metrics.csv").exists() and not (run_dir / "samples").exists()


def test_an_unwritable_checkpoint_folder_fails_at_start_up(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the folder should be")
    with pytest.raises(NotADirectoryError, match="callbacks.checkpoint.dirpath="):
        train(compose(["debug=smoke"], run_dir=str(tmp_path)))
    assert _nothing_started(tmp_path)


def test_a_missing_or_foreign_ckpt_path_fails_at_start_up(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=f"ckpt_path={tmp_path / 'nope.ckpt'}: no such checkpoint file"
    ):
        train(compose(["debug=smoke", f"ckpt_path={tmp_path / 'nope.ckpt'}"], run_dir=str(tmp_path / "a")))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a readable checkpoint of act_lightning.train"):
        train(compose(["debug=smoke", f"ckpt_path={foreign}"], run_dir=str(tmp_path / "b")))
    assert _nothing_started(tmp_path / "a") and _nothing_started(tmp_path / "b")


def test_a_mistyped_data_root_fails_at_start_up_and_creates_nothing(tmp_path):
    typo = tmp_path / "data" / "cifra10"
    cfg = compose(
        ["experiment=cifar10", "debug=smoke", f"data.root={typo}", "data.download=false"],
        run_dir=str(tmp_path / "run"),
    )
    with pytest.raises(FileNotFoundError, match="cifra10"):
        train(cfg)
    assert not typo.exists() and not (tmp_path / "data").exists()
    assert _nothing_started(tmp_path / "run")


def test_a_reference_batch_of_another_image_size_fails_at_start_up(tmp_path):
    batch = tmp_path / "VIRTUAL_imagenet64.npz"
    np.savez(batch, arr_0=np.zeros((4, 64, 64, 3), dtype=np.uint8))
    said = f"eval.reference={batch}: images of 64x64 with 3 channel.s., but the model generates 8x8 with 1"
    with pytest.raises(ValueError, match=said):  # it met the first evaluation, after the loggers started
        train(compose(["debug=smoke", f"eval.reference={batch}"], run_dir=str(tmp_path / "run")))
    assert _nothing_started(tmp_path / "run")


def test_bad_callback_values_fail_at_start_up(tmp_path):
    with pytest.raises(Exception, match=r"callbacks.samples.every_n_iterations must be an integer >= 1"):
        train(compose(["debug=smoke", "callbacks.samples.every_n_iterations=0"], run_dir=str(tmp_path)))
    with pytest.raises(Exception, match="stop_after must be a positive number"):
        train(compose(["debug=smoke", "stop_after=0"], run_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"callbacks.checkpoint=null: a training run always keeps"):
        train(compose(["debug=smoke", "callbacks.checkpoint=null"], run_dir=str(tmp_path)))
    assert _nothing_started(tmp_path)


def test_resume_never_refuses_a_folder_that_holds_a_checkpoint(tmp_path):
    train(compose(["debug=smoke", "iterations=2", "eval=null"], run_dir=str(tmp_path)))
    with pytest.raises(FileExistsError, match="pass resume=auto to continue that run"):
        train(compose(["debug=smoke", "iterations=4", "resume=never"], run_dir=str(tmp_path)))


# -- the divergence guard -----------------------------------------------------------------------------------


def test_a_diverging_run_stops_naming_the_iteration_and_the_loss_and_keeps_a_finite_checkpoint(tmp_path):
    # lr = 1e6: the first update blows the generator up and every later loss is non-finite
    cfg = compose(
        [
            "debug=smoke",
            "model.optimizer.lr=1e6",
            "guard.max_bad_iterations=3",
            "iterations=40",
            "eval=null",
            "callbacks.checkpoint.every_n_iterations=1",
        ],
        run_dir=str(tmp_path),
    )
    with pytest.raises(
        DivergenceError, match=r"3 bad iterations in a row since iteration 1 \(first non-finite: train/loss"
    ):
        train(cfg)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert _iteration(last) < 40
    state = _load(last)["state_dict"]
    assert all(v.isfinite().all() for v in state.values() if v.is_floating_point())
    skipped = [float(r["train/skipped_updates"]) for r in _rows(tmp_path) if "train/skipped_updates" in r]
    assert skipped[:2] == [1.0, 2.0]  # counted in the logs (the stopping iteration's row is not written)


def test_a_diverging_run_with_evaluations_is_stopped_by_the_guard_not_by_the_metric(tmp_path):
    """Learning rates of 1e30: the evaluations between the bad iterations score NaN samples. The Fréchet
    distance failed there ('Eigenvalues did not converge') before the guard could stop the run; it is
    NaN now, logged, never the best, and the guard stops the run with its own message."""
    args = ["debug=smoke", "model.optimizer.lr=1e30", "model.d_optimizer.lr=1e30", "iterations=40"]
    args += ["guard.max_bad_iterations=4", "eval.every=1", "callbacks.checkpoint.every_n_iterations=1"]
    with pytest.raises(DivergenceError, match=r"4 bad iterations in a row since iteration"):
        train(compose(args, run_dir=str(tmp_path)))
    summary = json.loads((tmp_path / "metric_summary.json").read_text())
    values = [h["value"] for h in summary["history"]]
    assert any(math.isnan(v) for v in values)  # scored, as NaN
    best = summary["best"]
    assert best is None or math.isfinite(best["value"])


def test_evaluate_refuses_a_checkpoint_with_non_finite_weights_by_name(tmp_path):
    train(compose(["debug=smoke", "iterations=2", "eval=null"], run_dir=str(tmp_path)))
    checkpoint = _load(tmp_path / "checkpoints" / "last.ckpt")
    checkpoint["state_dict"]["generator.unet.conv_in.weight"][0] = float("nan")
    broken = tmp_path / "broken.ckpt"
    torch.save(checkpoint, broken)
    with pytest.raises(ValueError, match=r"non-finite weights in generator.unet.conv_in.weight"):
        load_checkpoint(broken)
