"""The callbacks (act_lightning.callbacks) with stand-ins for the trainer and the module: when a sample grid
is drawn and what it shows; what the progress bar counts and reads out; when the evaluation runs, what it
logs and keeps as best; when the last checkpoint is saved, and how signals stop and requeue a run."""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
from itertools import count
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from act_lightning.atomic import intended_name
from act_lightning.callbacks import (
    FrechetEvaluation,
    IterationProgressBar,
    LastCheckpoint,
    SampleGrid,
    evaluation,
)
from act_lightning.callbacks.evaluation import advance, check_eval_arguments


def _module(k: int, iterations: int = 10, num_classes: int | None = None, sample=None):
    datamodule = SimpleNamespace(channels=1, image_size=4)
    return SimpleNamespace(
        k=k,
        device=torch.device("cpu"),
        hparams=SimpleNamespace(iterations=iterations, num_classes=num_classes),
        trainer=SimpleNamespace(datamodule=datamodule),
        sample=sample,
    )


def test_grids_are_drawn_at_the_start_every_n_iterations_and_at_the_end_of_a_finished_run(tmp_path):
    grid = SampleGrid(str(tmp_path), every_n_iterations=4)
    drawn = []
    grid.write = lambda trainer, module: drawn.append(module.k)
    grid.on_train_epoch_start(None, _module(0))  # training begins (not in a launch stopped before it)
    for k in range(1, 11):
        grid.on_train_batch_end(None, _module(k), None, None, 0)
    grid.on_train_end(None, _module(10))
    assert drawn == [0, 4, 8, 10]
    drawn.clear()
    grid.on_train_epoch_start(None, _module(5))  # resumed: no grid of the start
    grid.on_train_end(None, _module(6))  # stopped early, to be resumed
    grid.on_train_end(None, _module(8, iterations=8))  # finished on a grid's iteration: drawn already
    assert drawn == []
    grid.on_train_start(None, _module(10))  # a launch at the run's end (the last evaluation left to it)
    grid.on_train_end(None, _module(10))  # trained nothing: the launch before drew the last grid
    assert drawn == []


def test_a_grid_shows_the_fixed_noises_samples_in_zero_one_enlarged_in_a_square(tmp_path):
    seen = []

    def sample(noise, labels):
        seen.append((noise, labels))
        return torch.full_like(noise, 0.5)  # (0.5 + 1) / 2 = 0.75 in the grid

    grid = SampleGrid(str(tmp_path), num_samples=6, upscale=2, seed=3)
    module = _module(12, num_classes=4, sample=sample)
    grid.write(SimpleNamespace(loggers=[]), module)
    grid.write(SimpleNamespace(loggers=[]), module)
    assert grid.last_path == tmp_path / "iter_0000012.png"
    (noise, labels), (again, _) = seen
    assert torch.equal(noise, torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(again, noise) and labels.tolist() == [0, 1, 2, 3, 0, 1]
    pixels = np.asarray(Image.open(grid.last_path).convert("L"))
    assert pixels.shape == (3 * (8 + 2) + 2, 2 * (8 + 2) + 2)  # 2 per row (int(sqrt(6))), 8x8 each
    assert pixels[2:10, 2:10].tolist() == [[191] * 8] * 8  # round(0.75 * 255), the whole enlarged image
    assert (tmp_path / "last.png").read_bytes() == grid.last_path.read_bytes()


def test_the_progress_bar_counts_act_iterations_and_reads_out_losses_and_evaluations():
    bar = IterationProgressBar(refresh=0)
    assert bar.refresh == 1
    bar = IterationProgressBar(refresh=3)
    metrics = {"train/loss_ct": torch.tensor(0.123456), "val/fd": torch.tensor(12.5), "train/lr": 1.0}
    trainer = SimpleNamespace(callback_metrics=metrics)
    bar.on_train_start(trainer, _module(5, iterations=20))
    assert (bar.bar.n, bar.bar.total) == (5, 20)  # a resumed run starts at its iteration
    bar.on_train_batch_end(trainer, _module(7, iterations=20), None, None, 0)
    assert bar.bar.n == 7 and bar.bar.postfix is None  # no read-out between refreshes
    bar.on_train_batch_end(trainer, _module(9, iterations=20), None, None, 0)
    assert bar.bar.postfix == "loss_ct=0.1235, fd=12.5"
    tqdm_bar = bar.bar
    bar.on_train_end(trainer, _module(9, iterations=20))
    assert bar.bar is None and tqdm_bar.disable  # closed


# -- the evaluation callback (FrechetEvaluation) with its metric stubbed ------------------------------


def test_the_evaluations_numeric_options_are_refused_by_name():
    check_eval_arguments(1, "truncate", 2, 1, 2)  # a subset may be the whole set
    check_eval_arguments(5, "round", 10, 4, 10)
    for subset in (1, 11):
        with pytest.raises(
            ValueError, match=r"eval.subset_size must be null or in \[2, eval.num_samples=10\]"
        ):
            check_eval_arguments(5, "round", 10, 4, subset)
    with pytest.raises(ValueError, match="eval.num_samples must be an integer >= 2, got 1"):
        check_eval_arguments(5, "round", 1, 4, None)
    with pytest.raises(ValueError, match="eval.quantize must be one of round, truncate; got 'floor'"):
        check_eval_arguments(5, "floor", 10, 4, None)


class _Loggers:
    """What the loggers are given: (step, metrics) rows, and how often they were flushed."""

    def __init__(self):
        self.rows, self.saves = [], 0

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    def save(self):
        self.saves += 1


def _evaluation(tmp_path, values, **kwargs):
    """A FrechetEvaluation whose metric at iteration k is values[k] (and its extra metrics none)."""
    cb = FrechetEvaluation(run_dir=str(tmp_path), features="digits", **kwargs)
    cb.extractor = torch.nn.Identity()
    cb._reference_statistics = lambda *a: (np.zeros(2), np.eye(2))
    cb._extra_references = lambda *a: None
    cb.evaluate = lambda trainer, module, stop=None: values[module.k]
    logger = _Loggers()
    saved = []

    def save_checkpoint(path, weights_only):  # the name it stands for (it is written under a temporary one)
        saved.append((intended_name(path).name, len(cb.history)))
        Path(path).write_text(f"iteration {len(cb.history)}")

    trainer = SimpleNamespace(
        loggers=[logger],
        callback_metrics={},
        datamodule=SimpleNamespace(),
        is_global_zero=True,
        save_checkpoint=save_checkpoint,
        callbacks=[],
        world_size=1,
    )
    return cb, trainer, logger, saved


def test_the_best_is_the_lowest_value_after_iteration_0_and_only_an_improvement_saves_best_ckpt(tmp_path):
    values = {0: 1.0, 2: 9.0, 4: 5.0, 6: 5.0, 8: 7.0}
    cb, trainer, logger, saved = _evaluation(tmp_path, values, best_checkpoint=str(tmp_path / "best.ckpt"))
    assert cb.summary() == {"best": None}  # nothing evaluated yet
    for k in values:
        cb._evaluate_and_record(trainer, _module(k), k, float(k))
    assert cb.best == (4, 5.0) and cb.summary() == {"best": 5.0}  # the tie at 6 keeps 4
    assert saved == [("best.ckpt", 2), ("best.ckpt", 3)]  # at 2 and 4, each after its history entry
    # put in place once the loggers hold its iteration's rows: at the next iteration's start (or the
    # epoch's end, training's end), after a flush; until then the previous best is on disk
    assert (tmp_path / "best.ckpt").read_text() == "iteration 2"
    saves = logger.saves
    cb.on_train_batch_start(trainer, _module(9), None, 0)
    assert (tmp_path / "best.ckpt").read_text() == "iteration 3" and logger.saves == saves + 1
    assert not list(tmp_path.glob(".*.tmp"))
    assert trainer.callback_metrics["val/fid"] == torch.tensor(7.0)  # the last one
    assert [row for row in logger.rows] == [(k, {"val/fid": v}) for k, v in values.items()]
    summary = json.loads((tmp_path / "metric_summary.json").read_text())
    assert summary["best"] == {"iteration": 4, "value": 5.0}
    assert [h["iteration"] for h in summary["history"]] == list(values)
    first, _, _, _ = _evaluation(tmp_path / "first", {0: 3.0, 2: 4.0})
    for k in (0, 2):
        first._evaluate_and_record(trainer, _module(k), k, 0.0)
    assert first.best == (2, 4.0) and first.summary() == {"best": 4.0}  # never iteration 0's
    only, _, _, _ = _evaluation(tmp_path / "only", {0: 3.0, 2: 4.0})
    only._evaluate_and_record(trainer, _module(0), 0, 0.0)
    only.history.append((1, 8.0, 0.0))
    assert only.best is None and only.summary() == {"best": 8.0}  # no best: the last value


def test_extra_metrics_are_logged_beside_the_key_and_the_summary_counts_the_samples_drawn(tmp_path):
    cb, trainer, logger, _ = _evaluation(
        tmp_path, {4: 12.0}, key="val/fd", num_samples=10, subset_size=4, batch_size=2
    )
    cb._last_extra = {"kid": 0.5}
    cb.references = {"real": 2.0, "noise": 52.0}
    cb._evaluate_and_record(trainer, _module(4), 4, 1.0)
    assert logger.rows == [(4, {"val/fd": 12.0, "val/kid": 0.5})]
    assert cb.extra_history == [{"iteration": 4, "kid": 0.5}]
    summary = json.loads((tmp_path / "metric_summary.json").read_text())
    assert summary["num_samples"] == 8 and summary["subset_size"] == 4  # two whole subsets of 4
    assert summary["normalised"] == 0.2 and summary["extra"] == cb.extra_history  # (12 - 2) / (52 - 2)
    assert summary["best"] == {"iteration": 4, "value": 12.0, "normalised": 0.2}


def test_evaluations_come_every_n_iterations_and_at_the_last_one_once(tmp_path):
    cb, trainer, logger, _ = _evaluation(tmp_path, {k: float(k) for k in range(12)}, every=4)
    for k in range(1, 11):
        cb.on_train_batch_end(trainer, _module(k, iterations=10), None, None, 0)
    assert [h[0] for h in cb.history] == [4, 8, 10]  # the last one too, before its checkpoint is saved
    cb.on_train_end(trainer, _module(10, iterations=10))
    assert [h[0] for h in cb.history] == [4, 8, 10] and logger.saves == 1
    cb.on_train_end(trainer, _module(11, iterations=10))  # a run started at its end: scored at the end
    cb.on_train_end(trainer, _module(11, iterations=12))  # stopped early: resumed later, not scored
    assert [h[0] for h in cb.history] == [4, 8, 10, 11]


def test_at_the_last_iteration_a_signal_leaves_the_evaluation_to_the_continuation_and_stop_after_does_not(
    tmp_path,
):
    values = {10: 5.0}
    for stop, left in (("signal", True), ("stop_after", False)):
        cb, trainer, _, _ = _evaluation(tmp_path / stop, values, every=4)
        checkpoint = LastCheckpoint(str(tmp_path / stop / "checkpoints"), every_n_iterations=100)
        checkpoint.stop_after = 10 if stop == "stop_after" else None
        if stop == "signal":
            checkpoint._signal = signal.SIGTERM  # arrives in the last iteration
        trainer.callbacks = [cb, checkpoint]
        cb.on_train_batch_end(trainer, _module(10), None, None, 0)
        assert checkpoint.stopping(trainer, _module(10))
        assert (cb.state_dict()["deferred"] == 10) is left and (checkpoint._left == 10) is left
        assert [h[0] for h in cb.history] == ([] if left else [10])
        cb.on_train_end(trainer, _module(10))  # not scored at the end either: the continuation scores it
        assert [h[0] for h in cb.history] == ([] if left else [10])


def test_a_stop_at_an_evaluations_iteration_leaves_it_to_the_continuation_which_scores_it_first(tmp_path):
    values = {0: 9.0, 4: 3.0, 9: 2.0}
    cb, trainer, logger, _ = _evaluation(tmp_path, values, every=4)
    checkpoint = LastCheckpoint(str(tmp_path / "checkpoints"), every_n_iterations=100)
    trainer.callbacks = [cb, checkpoint]
    cb.on_train_start(trainer, _module(0))
    for k in range(1, 4):
        cb.on_train_batch_end(trainer, _module(k), None, None, 0)
    checkpoint._signal = signal.SIGTERM  # arrives in iteration 4: the checkpoint is saved unscored
    cb.on_train_batch_end(trainer, _module(4), None, None, 0)
    assert [h[0] for h in cb.history] == [0] and checkpoint.stopping(trainer, _module(4))
    state = cb.state_dict()

    assert state["deferred"] == 4  # in the checkpoint the stop saves
    # the continuation, even at another cadence (eval.every may change on resume): 4 scored first
    resumed, trainer, logger, _ = _evaluation(tmp_path, values, every=3)
    resumed.load_state_dict(state)
    resumed.on_train_start(trainer, _module(4))
    assert [(k, v) for k, v, _ in resumed.history] == [(0, 9.0), (4, 3.0)] and logger.rows == [
        (4, {"val/fid": 3.0})
    ]
    assert resumed.history[-1][2] == state["train_seconds"]  # at the training seconds of the stop
    resumed.on_train_start(trainer, _module(4))  # scored once
    assert len(resumed.history) == 2 and resumed.state_dict()["deferred"] is None
    # without a stop, the evaluation comes at its iteration (the decision is the checkpoint's, once each)
    trainer.callbacks = [resumed, LastCheckpoint(str(tmp_path / "checkpoints"), every_n_iterations=100)]
    resumed.on_train_batch_end(trainer, _module(9), None, None, 0)
    assert [h[0] for h in resumed.history] == [0, 4, 9]


def test_a_signal_on_one_rank_stops_every_rank_which_all_name_it(tmp_path, monkeypatch):
    # rank 1 got SIGTERM, this rank (0) none: the all-reduce (max) gives every rank the signal, so each
    # stops at this iteration and exits, or requeues, with the same status
    checkpoint = LastCheckpoint(str(tmp_path), every_n_iterations=100)
    reduced = []

    def reduce(tensor, reduce_op):
        reduced.append(reduce_op)
        return torch.maximum(tensor, torch.tensor(int(signal.SIGTERM)))

    trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce=reduce), is_global_zero=True)
    trainer.should_stop = False
    monkeypatch.setattr(checkpoint, "_save", lambda trainer, k: None)
    checkpoint.on_train_batch_end(trainer, _module(3), None, None, 0)
    assert trainer.should_stop and checkpoint.stopped_by == signal.SIGTERM and reduced == ["max"]
    assert checkpoint._signal is None  # this rank received nothing itself
    checkpoint.stop_here(3)  # decided once per iteration: no second all-reduce for it
    assert checkpoint.stopping(trainer, _module(3)) and reduced == ["max"]


def test_a_resumed_evaluation_keeps_its_history_and_takes_the_best_anew_without_its_checkpoint(tmp_path):
    cb, trainer, logger, _ = _evaluation(tmp_path, {0: 9.0, 4: 3.0}, best_checkpoint=str(tmp_path / "b.ckpt"))
    cb.references = {"real": 1.0}
    cb.on_train_start(trainer, _module(0))
    # the scale's ends with the untrained network's value, after it (a launch stopped during it logs neither)
    assert logger.rows == [(0, {"val/fid": 9.0}), (0, {"val/fid_real": 1.0})]
    assert [h[0] for h in cb.history] == [0]
    cb._evaluate_and_record(trainer, _module(4), 4, 2.0)
    cb.extra_history = [{"iteration": 4, "kid": 0.5}]
    state = cb.state_dict()
    resumed, trainer, logger, _ = _evaluation(tmp_path, {}, best_checkpoint=str(tmp_path / "b.ckpt"))
    resumed.load_state_dict(state)
    assert resumed.best == (4, 3.0) and resumed.references == {"real": 1.0}
    assert resumed.extra_history == [{"iteration": 4, "kid": 0.5}] and resumed.history == cb.history
    (tmp_path / "b.ckpt").write_bytes(b"kept")
    resumed.on_train_start(trainer, _module(4))  # resumed: no references logged, no evaluation
    assert logger.rows == [] and resumed.best == (4, 3.0) and len(resumed.history) == 2
    moved, trainer, _, _ = _evaluation(tmp_path / "other", {}, best_checkpoint=str(tmp_path / "none.ckpt"))
    moved.load_state_dict(state)
    moved.on_train_start(trainer, _module(4))  # another folder: its best.ckpt is not there
    assert moved.best is None


def test_a_continuation_at_another_count_measures_the_scales_references_anew_and_logs_them(tmp_path, caplog):
    """The scale's two ends are measured at the metric's count (eval.subset_size or eval.num_samples): a
    continuation that changes it (resume_changes) measures them again, at its first iteration, where it kept
    those of the old count; at the same count, and from checkpoints that did not record it, they are kept."""
    cb, _, _, _ = _evaluation(tmp_path, {}, num_samples=12)
    cb.references = {"real": 1.0, "noise": 50.0}
    cb.best = (2, 30.0)
    state = cb.state_dict()
    assert state["references_count"] == [12, 12]
    same, _, _, _ = _evaluation(tmp_path, {}, num_samples=12)
    same.load_state_dict(state)
    old, _, _, _ = _evaluation(tmp_path, {}, num_samples=12, subset_size=4)
    old.load_state_dict({k: v for k, v in state.items() if k != "references_count"})  # before 0.3.3
    assert same.references == old.references == {"real": 1.0, "noise": 50.0}
    for kwargs in ({"num_samples": 12, "subset_size": 4}, {"num_samples": 8}):
        other, trainer, logger, _ = _evaluation(tmp_path, {}, **kwargs)
        with caplog.at_level("INFO"):
            other.load_state_dict(state)
        assert other.references == {} and other.best is None
        assert "its references and its best are measured anew" in caplog.text
        trainer.datamodule = SimpleNamespace(build_held_out_dataset=lambda: None)
        other._reference_values = lambda dm, device, cb=other: {"real": float(cb._references_count()[0])}
        other.on_train_start(trainer, _module(4))
        expected = {"real": float(kwargs.get("subset_size") or kwargs["num_samples"])}
        assert other.references == expected and logger.rows == [(4, {"val/fid_real": expected["real"]})]
    resumed, trainer, logger, _ = _evaluation(tmp_path, {}, num_samples=12)
    resumed.load_state_dict(state)
    trainer.datamodule = SimpleNamespace(build_held_out_dataset=lambda: None)
    resumed.on_train_start(trainer, _module(4))  # the same count: nothing measured, nothing logged
    assert resumed.references == {"real": 1.0, "noise": 50.0} and logger.rows == []
    assert resumed.best == (2, 30.0)


def test_a_continuation_at_another_count_takes_its_best_anew_and_keeps_the_old_best_checkpoint(tmp_path):
    """A Frechet distance's bias depends on its count: the best measured at the old count stayed the best
    and the run's last line normalised it by references measured at the new one. It is taken anew, and the
    old best.ckpt is kept as best_before_<k>.ckpt, where the next evaluation would have overwritten it."""
    best = tmp_path / "best.ckpt"
    cb, _, _, _ = _evaluation(tmp_path, {}, num_samples=12, best_checkpoint=str(best))
    cb.best = (2, 30.0)
    cb.history = [(0, 90.0, 0.0), (2, 30.0, 1.0)]
    state = cb.state_dict()
    best.write_bytes(b"iteration 2")
    values = {4: 45.0, 6: 40.0}
    other, trainer, _, saved = _evaluation(tmp_path, values, num_samples=8, best_checkpoint=str(best))
    other.load_state_dict(state)
    other.on_train_start(trainer, _module(4))
    assert not best.exists() and (tmp_path / "best_before_4.ckpt").read_bytes() == b"iteration 2"
    for k in values:
        other._evaluate_and_record(trainer, _module(k), k, 1.0)
    assert other.best == (6, 40.0) and [name for name, _ in saved] == ["best.ckpt", "best.ckpt"]
    assert [h[0] for h in other.history] == [0, 2, 4, 6]  # the history before stays


def test_the_evaluations_own_time_is_not_training_time(tmp_path, monkeypatch):
    ticks = count()
    monkeypatch.setattr(evaluation.time, "perf_counter", lambda: float(next(ticks)))
    cb, trainer, _, _ = _evaluation(tmp_path, {4: 1.0})
    cb._clock = float(next(ticks))  # 0: training started
    cb._evaluate_and_log(trainer, _module(4))  # reads the clock at 1 (seconds), 2 (start) and 3 (end)
    assert cb.history == [(4, 1.0, 1.0)]
    assert cb.train_seconds() == 4.0 - 1.0  # four ticks in all, one of them the evaluation's


def test_wandb_gets_the_metrics_definition_and_the_best_value_with_its_iteration_in_its_summary(tmp_path):
    class Wandb(WandbLogger):  # what the callback uses of a W&B run: its summary and define_metric
        def __init__(self):
            self.summary, self.defined = {}, []

        @property
        def experiment(self):
            return SimpleNamespace(
                summary=self.summary, define_metric=lambda *a, **k: self.defined.append((a, k))
            )

        def log_metrics(self, metrics, step=None):
            pass

    cb, trainer, _, _ = _evaluation(tmp_path, {0: 9.0, 2: 4.0, 4: 6.0})
    wandb = Wandb()
    trainer.loggers = [wandb]
    cb._define_wandb_metrics(trainer)
    assert wandb.defined == [(("val/fid",), {"step_metric": "trainer/global_step"})]  # summary: its last
    cb._evaluate_and_record(trainer, _module(0), 0, 0.0)
    assert wandb.summary == {}  # no best yet
    for k in (2, 4):
        cb._evaluate_and_record(trainer, _module(k), k, 0.0)
    assert wandb.summary == {"val/fid_best": 4.0, "val/fid_best_iteration": 2}
    other = Wandb()
    trainer.loggers, trainer.is_global_zero = [other], False
    cb._define_wandb_metrics(trainer)
    cb._update_wandb_summary(trainer)
    assert other.summary == {} and other.defined == []  # rank 0's run only


# -- the last checkpoint, stopping and signals (LastCheckpoint) -----------------------------------------


def _trainer(events: list, world_size: int = 1, is_global_zero: bool = True):
    """A stand-in trainer that records the loggers' flushes and the checkpoints it is asked to save (a
    temporary name `.NAME.<8 hex>.tmp` recorded as `NAME.tmp`), and writes them as rank 0 would."""

    def save(path, weights_only):
        path = Path(path)
        events.append(re.sub(r"^\.(.+)\.[0-9a-f]{8}\.tmp$", r"\1.tmp", path.name))
        if is_global_zero:
            path.write_bytes(b"state")

    logger = SimpleNamespace(save=lambda: events.append("logger.save"))
    return SimpleNamespace(
        loggers=[logger],
        save_checkpoint=save,
        is_global_zero=is_global_zero,
        world_size=world_size,
        should_stop=False,
    )


def test_stop_after_counts_the_iterations_of_this_process_and_saves_once_where_it_stops(tmp_path):
    events: list = []
    trainer = _trainer(events)
    callback = LastCheckpoint(str(tmp_path), every_n_iterations=10, stop_after=3)
    callback.on_train_start(trainer, _module(5, iterations=20))  # a resumed run: three iterations from 5 on
    try:
        for k in (6, 7):
            callback.on_train_batch_end(trainer, _module(k, iterations=20), None, None, 0)
        assert events == [] and not trainer.should_stop
        callback.on_train_batch_end(trainer, _module(8, iterations=20), None, None, 0)
        assert events == ["logger.save", "last.ckpt.tmp"]  # the rows so far are on disk before it is written
        assert not (tmp_path / "last.ckpt").exists()  # and it is in place only once the iteration's row is
        assert trainer.should_stop and callback.stopped_early and callback.summary() == {"stopped_by": None}
        callback.on_train_end(trainer, _module(8, iterations=20))  # that iteration is saved already
        assert events == ["logger.save", "last.ckpt.tmp", "logger.save"]
        assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    finally:
        callback.on_exception(trainer, _module(8, iterations=20), RuntimeError())


def test_a_checkpoint_is_put_in_place_after_its_iterations_row_and_before_the_next_iteration(tmp_path):
    """Lightning hands iteration k's row to the loggers after on_train_batch_end, where checkpoint k is
    written: it is renamed into place at the next iteration's start, at the epoch's end, when training
    ends, or on an exception (the state is k's whatever failed after it)."""
    events: list = []
    trainer = _trainer(events)
    callback = LastCheckpoint(str(tmp_path), every_n_iterations=2, keep_snapshots=1)
    last = tmp_path / "last.ckpt"
    callback.on_train_batch_end(trainer, _module(2), None, None, 0)
    assert events == ["logger.save", "last.ckpt.tmp", "iter_0000002.ckpt.tmp"] and not last.exists()
    callback.on_train_batch_start(trainer, _module(2), None, 1)
    assert events[-1] == "logger.save" and last.is_file() and (tmp_path / "iter_0000002.ckpt").is_file()
    callback.on_train_batch_start(trainer, _module(2), None, 1)  # nothing pending: nothing done
    assert len(events) == 4
    for hook in ("on_train_epoch_end", "on_exception"):
        last.unlink()
        callback.on_train_batch_end(trainer, _module(callback._saved_at + 2), None, None, 0)
        assert not last.exists()
        getattr(callback, hook)(
            trainer, _module(callback._saved_at), *([RuntimeError()] * (hook == "on_exception"))
        )
        assert last.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000006.ckpt", "last.ckpt"]  # the newest one


def test_the_csv_rows_are_synced_to_disk_before_a_checkpoint_is_put_in_place(tmp_path, monkeypatch):
    """The checkpoint's bytes are synced, the CSV writer's rows only flushed: after a lost node the
    checkpoint could survive without them."""
    from act_lightning.callbacks import checkpoint as checkpoint_module

    events: list = []
    trainer = _trainer(events)
    rows = tmp_path / "metrics.csv"
    rows.write_text("step,val\n2,1.0\n")
    csv = SimpleNamespace(save=lambda: None, _experiment=SimpleNamespace(metrics_file_path=str(rows)))
    trainer.loggers.append(csv)
    opened, real_open, real_replace = {}, checkpoint_module.os.open, checkpoint_module.os.replace

    def record_open(path, flags):
        fd = real_open(path, flags)
        opened[fd] = Path(path).name
        return fd

    monkeypatch.setattr(checkpoint_module.os, "open", record_open)
    monkeypatch.setattr(checkpoint_module.os, "fsync", lambda fd: events.append(f"fsync {opened[fd]}"))
    monkeypatch.setattr(
        checkpoint_module.os,
        "replace",
        lambda a, b: (events.append(f"rename {Path(b).name}"), real_replace(a, b)),
    )
    callback = LastCheckpoint(str(tmp_path / "checkpoints"), every_n_iterations=2)
    (tmp_path / "checkpoints").mkdir()
    callback.on_train_batch_end(trainer, _module(2), None, None, 0)
    callback.on_train_batch_start(trainer, _module(2), None, 1)
    assert events[-3:] == ["logger.save", "fsync metrics.csv", "rename last.ckpt"]


def test_a_failed_save_leaves_no_temporary_and_keeps_the_previous_checkpoint(tmp_path):
    events: list = []
    trainer = _trainer(events)
    callback = LastCheckpoint(str(tmp_path), every_n_iterations=2, keep_snapshots=True)
    callback.on_train_batch_end(trainer, _module(2), None, None, 0)
    callback.on_train_batch_start(trainer, _module(2), None, 1)
    written = trainer.save_checkpoint

    def full_disk_at_the_snapshot(path, weights_only):
        written(path, weights_only)
        if "iter_" in Path(path).name:
            raise OSError(28, "No space left on device")

    trainer.save_checkpoint = full_disk_at_the_snapshot
    with pytest.raises(OSError, match="No space left"):
        callback.on_train_batch_end(trainer, _module(4), None, None, 0)
    callback.on_exception(trainer, _module(4), OSError())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002.ckpt", "last.ckpt"]


def test_a_stop_in_the_last_iteration_finishes_the_run_and_saves_on_the_interval_only(tmp_path):
    events: list = []
    trainer = _trainer(events)
    callback = LastCheckpoint(str(tmp_path), every_n_iterations=4, stop_after=1)
    callback._start = 3
    callback.on_train_batch_end(trainer, _module(4, iterations=4), None, None, 0)
    assert (
        events == ["logger.save", "last.ckpt.tmp"] and not callback.stopped_early and not trainer.should_stop
    )
    callback = LastCheckpoint(str(tmp_path), every_n_iterations=4, stop_after=1)
    callback._start = 4
    events.clear()
    callback.on_train_batch_end(trainer, _module(5, iterations=6), None, None, 0)  # off the interval: saved
    assert events == ["logger.save", "last.ckpt.tmp"] and callback.stopped_early
    with pytest.raises(ValueError, match="stop_after must be a positive number of iterations or null, got 0"):
        LastCheckpoint(str(tmp_path), stop_after=0)


def test_a_signal_stops_after_its_iteration_and_only_a_second_ctrl_c_stops_at_once(tmp_path):
    events: list = []
    trainer = _trainer(events)
    callback = LastCheckpoint(str(tmp_path), every_n_iterations=10)
    callback._on_signal(signal.SIGTERM, None)
    callback._on_signal(signal.SIGINT, None)  # a Ctrl-C after another signal: no stop at once
    callback.on_train_batch_end(trainer, _module(3, iterations=20), None, None, 0)
    assert callback.stopped_by == signal.SIGINT and trainer.should_stop and events[-1] == "last.ckpt.tmp"
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            callback._on_signal(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_handlers_are_put_back_lightnings_as_the_default_and_the_launchers_requeue_is_called(
    tmp_path, monkeypatch, caplog
):
    def lightnings(signum, frame):  # what Lightning's signal connector installs
        raise AssertionError("never called")

    lightnings.__module__ = "lightning.pytorch.trainer.connectors.signal_connector"
    calls = []
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2)}
    monkeypatch.setattr("subprocess.call", lambda cmd: calls.append(cmd) or 0)
    tools = {"scontrol": "/usr/bin/scontrol"}  # a SLURM node's
    monkeypatch.setattr("act_lightning.callbacks.checkpoint.shutil.which", tools.get)
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "120")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    try:
        signal.signal(signal.SIGUSR1, lightnings)
        signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(("launcher", signum, frame)))
        callback = LastCheckpoint(str(tmp_path))
        callback.on_train_start(_trainer([]), _module(0, iterations=20))
        assert signal.getsignal(signal.SIGUSR2) == callback._on_signal
        callback._restore_handlers()
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
        callback.stopped_by = signal.SIGUSR2
        callback.requeue(is_global_zero=True)
        assert calls == [("launcher", signal.SIGUSR2, None)]  # the launcher requeues, not scontrol
        callback.stopped_by = signal.SIGUSR1  # Lightning's handler was there: scontrol, as Lightning would
        callback.requeue(is_global_zero=False)
        assert len(calls) == 1  # rank 0 only
        callback.requeue(is_global_zero=True)
        assert calls[1] == ["scontrol", "requeue", "120_3"]  # the array job's task
        callback.stopped_by = signal.SIGTERM  # preempted: the scheduler requeues it, or not
        callback.requeue(is_global_zero=True)
        assert len(calls) == 2
        # SLURM's variables without its tools (a container inside a job): said, where it raised
        # FileNotFoundError after the checkpoint and ended with status 1, not 138
        tools.clear()
        callback.stopped_by = signal.SIGUSR1
        with caplog.at_level(logging.WARNING, logger="act_lightning.callbacks.checkpoint"):
            callback.requeue(is_global_zero=True)
        assert len(calls) == 2 and "no scontrol here: the job is not requeued; relaunch it" in caplog.text
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_only_rank_0_deletes_old_snapshots_and_handlers_are_left_alone_off_the_main_thread(tmp_path):
    saved = []
    trainer = _trainer(saved, world_size=2, is_global_zero=False)
    for name in ("iter_0000002.ckpt", "iter_0000004.ckpt"):  # what rank 0 wrote (the folder is shared)
        (tmp_path / name).write_bytes(b"state")
    callback = LastCheckpoint(str(tmp_path), every_n_iterations=2, keep_snapshots=1)
    for iteration in (2, 4):
        callback._save(trainer, iteration)
    callback._commit(trainer)
    assert len(list(tmp_path.glob("iter_*.ckpt"))) == 2  # rank 0 renames and deletes, no other rank
    assert saved == ["logger.save", "last.ckpt.tmp", "iter_0000002.ckpt.tmp"] + ["logger.save"] * 2 + [
        "last.ckpt.tmp",
        "iter_0000004.ckpt.tmp",
        "logger.save",
    ]
    before, errors = signal.getsignal(signal.SIGTERM), []

    def start():
        try:
            callback.on_train_start(trainer, _module(0, iterations=20))
        except Exception as err:
            errors.append(err)

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    assert errors == [] and signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("world_size", [2, 3])
def test_gathered_features_are_in_the_samples_order_on_any_device_count(monkeypatch, world_size):
    """Rank r draws chunks r, r + W, ...: its rows are put back chunk by chunk, so IS's splits and KID's
    subsets, which read the rows in order, see what one device would (in rank order they did not)."""
    import torch.distributed as dist

    from act_lightning.callbacks.evaluation import _gathered
    from act_lightning.metrics.fid import sample_chunks

    num_samples, batch_size = 23, 4  # the last chunk is short
    one_device = torch.arange(float(num_samples)).view(-1, 1)
    per_rank = []
    for rank in range(world_size):
        chunks = sample_chunks(num_samples, batch_size, rank, world_size)
        per_rank.append(torch.cat([one_device[c * batch_size : c * batch_size + s] for c, s in chunks]))
    monkeypatch.setattr(
        dist, "all_gather_object", lambda parts, mine: parts.__setitem__(slice(None), per_rank)
    )
    trainer = SimpleNamespace(world_size=world_size)
    assert torch.equal(_gathered(trainer, num_samples, batch_size, per_rank[0]), one_device)
    assert torch.equal(
        _gathered(SimpleNamespace(world_size=1), num_samples, batch_size, one_device), one_device
    )


def test_the_real_reference_is_the_mean_over_sets_of_the_generated_count_and_fewer_held_out_are_said(
    tmp_path, caplog
):
    """The scale's real end is at the generated images' count, as its noise end and the metric are: the mean
    over as many whole sets of that count as the held-out images fill (the quickstart's 297 at its 297: one
    set, the whole of them), and all of them, said in the log, when they are fewer than that count."""
    from act_lightning.metrics.fid import feature_statistics
    from act_lightning.metrics.frechet import frechet_distance
    from tests.helpers_ddp import TinyFeatures

    held = torch.rand(13, 1, 4, 4, generator=torch.Generator().manual_seed(5)) * 2 - 1

    class Held:
        def build_held_out_dataset(self):
            return [(x, 0) for x in held]

    def fd(images) -> float:
        stats = feature_statistics(TinyFeatures(16), images.split(4), "cpu", sync=False, real=True)
        return frechet_distance(*stats, np.zeros(32), np.eye(32))

    def references(num_samples: int, subset_size: int | None = None) -> dict[str, float]:
        cb = FrechetEvaluation(
            run_dir=str(tmp_path), features="digits", num_samples=num_samples, batch_size=4
        )
        cb.subset_size = subset_size
        cb.extractor, cb.reference, cb._reference_root = TinyFeatures(16), (np.zeros(32), np.eye(32)), None
        caplog.clear()
        with caplog.at_level("WARNING"):
            return cb._reference_values(Held(), "cpu")

    four = references(12, subset_size=4)  # 13 held out: three sets of 4, the last one left
    assert four["real"] == pytest.approx(np.mean([fd(held[i : i + 4]) for i in (0, 4, 8)]), rel=1e-12)
    assert four["real"] != pytest.approx(fd(held), rel=1e-3) and not caplog.records  # a count of its own
    assert references(13)["real"] == pytest.approx(fd(held), rel=1e-12) and not caplog.records  # one set
    assert references(20)["real"] == pytest.approx(fd(held), rel=1e-12)  # fewer held out: all, and said
    assert "the held-out real images (13, data.held_out) are fewer than the generated images" in caplog.text
    assert "set eval.subset_size=13 or lower" in caplog.text


def test_the_evaluations_bar_counts_all_ranks_images_and_never_past_its_total():
    # rank 0 moves it by its own images times the world size: ranks with a smaller or no chunk in the last
    # round made it show 1000 of 891 images
    import io

    from tqdm.auto import tqdm

    with tqdm(total=891, file=io.StringIO()) as bar:
        for _ in range(2):
            advance(bar, 500 * 2)
        assert bar.n == 891
    with tqdm(total=None, file=io.StringIO()) as open_ended:
        advance(open_ended, 1000)
        assert open_ended.n == 1000
