"""A launch's start-up without training (act_lightning.train and act_lightning.start): the run folder's
lock, which checkpoint a launch resumes from, a finished run launched again, the loggers of a resumed run,
the W&B run's name and end."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import OmegaConf

from act_lightning.checkpoints import UnreadableCheckpoint, checkpoint_iteration
from act_lightning.loggers import ResumableCSVLogger
from act_lightning.start import RunLock, StartPoint, resolve_resume
from act_lightning.train import (
    _init_gone_on_resume,
    build,
    build_loggers,
    check_config,
    finish_wandb,
    finished,
    prepare,
    run_name,
    stopped_at_once,
)
from tests.conftest import compose


def test_a_live_runs_folder_is_locked_naming_its_process_and_freed_when_it_ends(tmp_path):
    (tmp_path / ".lock").write_text("4000000000")  # a former owner's longer process id
    lock = RunLock(tmp_path)
    lock.claim()
    assert (tmp_path / ".lock").read_text() == str(os.getpid())
    with pytest.raises(RuntimeError, match=rf"in use by another live run \(process {os.getpid()}\)"):
        RunLock(tmp_path)
    lock.release()
    RunLock(tmp_path).release()  # free again


def _smoke(tmp_path, *overrides):
    return compose(["debug=smoke", *overrides], run_dir=str(tmp_path))


def _last(tmp_path, iteration: int) -> Path:
    folder = tmp_path / "checkpoints"
    folder.mkdir(exist_ok=True)
    torch.save({"state_dict": {"iteration": torch.tensor(iteration)}}, folder / "last.ckpt")
    return folder / "last.ckpt"


def test_resume_auto_takes_the_runs_own_checkpoint_and_resume_never_refuses_it(tmp_path):
    assert resolve_resume(_smoke(tmp_path)) == (None, None)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"iteration": torch.tensor(2)}}, other)
    path, checkpoint = resolve_resume(_smoke(tmp_path, f"ckpt_path={other}"))
    assert path == other and checkpoint_iteration(checkpoint) == 2
    last = _last(tmp_path, 3)
    path, checkpoint = resolve_resume(_smoke(tmp_path, f"ckpt_path={tmp_path / 'elsewhere.ckpt'}"))
    assert path == last and checkpoint_iteration(checkpoint) == 3  # its own, before ckpt_path
    with pytest.raises(
        FileExistsError, match=r"already holds checkpoints \(last.ckpt in .*\); pass resume=auto"
    ):
        resolve_resume(_smoke(tmp_path, "resume=never"))


def test_a_ckpt_path_the_runs_own_checkpoint_overrides_is_said_a_warning_unless_the_run_started_from_it(
    tmp_path, caplog
):
    start = tmp_path / "start.ckpt"
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    history = [{"iteration": 0, "overrides": ["experiment=quickstart", f"ckpt_path={start}"]}]
    torch.save({"state_dict": {"iteration": torch.tensor(5)}, "act_history": history}, folder / "last.ckpt")
    with caplog.at_level(logging.INFO, logger="act_lightning.start"):
        path, _ = resolve_resume(_smoke(tmp_path, f"ckpt_path={start}"))  # a requeued job's command line
        assert path == folder / "last.ckpt"
        assert [r.levelno for r in caplog.records] == [logging.INFO]
        assert "is not read (the run started from it)" in caplog.text
        caplog.clear()
        path, _ = resolve_resume(_smoke(tmp_path, f"ckpt_path={tmp_path / 'another.ckpt'}"))
        assert path == folder / "last.ckpt"
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
        assert "is not read (a new run from it needs another hydra.run.dir)" in caplog.text
        # a run started from another run's checkpoint: that run's history comes first, its own launch later
        base = {"iteration": 0, "overrides": ["experiment=quickstart"], "new_run": True}
        history = [base, {**history[0], "iteration": 8, "new_run": True}]
        torch.save(
            {"state_dict": {"iteration": torch.tensor(9)}, "act_history": history}, folder / "last.ckpt"
        )
        caplog.clear()
        resolve_resume(_smoke(tmp_path, f"ckpt_path={start}"))
        assert [r.levelno for r in caplog.records] == [logging.INFO], caplog.text


def test_a_folder_with_checkpoints_but_no_last_one_continues_from_the_newest_or_the_one_named(
    tmp_path, caplog
):
    # a launch killed after its first best.ckpt and before its first last.ckpt (a joblib sweep's Ctrl-C),
    # or a damaged last.ckpt moved aside: its relaunch continues, where it was refused
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    snapshot = folder / "iter_0000004.ckpt"
    torch.save({"state_dict": {"iteration": torch.tensor(4)}}, snapshot)
    torch.save({"state_dict": {"iteration": torch.tensor(6)}}, folder / "best.ckpt")
    (folder / ".last.ckpt.0123abcd.tmp").write_bytes(b"")  # a save's temporary is no checkpoint
    with caplog.at_level(logging.INFO, logger="act_lightning.start"):
        path, checkpoint = resolve_resume(_smoke(tmp_path))
    assert path == folder / "best.ckpt" and checkpoint_iteration(checkpoint) == 6  # the newest
    assert "holds no last.ckpt" in caplog.text and "best.ckpt (iteration 6)" in caplog.text
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"iteration": torch.tensor(7)}}, other)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="act_lightning.start"):  # another run's: not read
        path, _ = resolve_resume(_smoke(tmp_path, f"ckpt_path={other}"))
    assert path == folder / "best.ckpt" and "ckpt_path=" + str(other) + " is not read" in caplog.text
    with pytest.raises(FileExistsError, match=r"already holds checkpoints \(best.ckpt, iter_0000004.ckpt"):
        resolve_resume(_smoke(tmp_path, "resume=never", f"ckpt_path={snapshot}"))
    path, checkpoint = resolve_resume(_smoke(tmp_path, f"ckpt_path={snapshot}"))  # named: that one
    assert path == snapshot and checkpoint_iteration(checkpoint) == 4
    snapshot.write_bytes(b"")
    with pytest.raises(UnreadableCheckpoint, match=r"holds no last.ckpt, .*; iter_0000004.ckpt is empty"):
        resolve_resume(_smoke(tmp_path))
    snapshot.unlink(), (folder / "best.ckpt").unlink()
    assert resolve_resume(_smoke(tmp_path)) == (None, None)  # only the temporary left: a fresh start


def test_a_damaged_last_checkpoint_names_the_runs_other_checkpoints(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"")
    with pytest.raises(UnreadableCheckpoint, match="this run has no other checkpoint"):
        resolve_resume(_smoke(tmp_path))
    torch.save({"state_dict": {"iteration": torch.tensor(4)}}, folder / "iter_0000004.ckpt")
    with pytest.raises(UnreadableCheckpoint, match=r"of this run's other checkpoints \(iter_0000004.ckpt\)"):
        resolve_resume(_smoke(tmp_path))


def test_a_second_ctrl_c_names_the_checkpoint_written_before_it_if_any(tmp_path):
    assert stopped_at_once(_smoke(tmp_path)).endswith("; there is none from before")
    last = _last(tmp_path, 6)
    assert stopped_at_once(_smoke(tmp_path)).endswith(
        f"; the last one, {last} (iteration 6), continues with resume=auto"
    )


def test_a_finished_run_launched_again_returns_its_best_from_its_summary(tmp_path):
    start = StartPoint(ckpt_path=tmp_path / "last.ckpt", iteration=8)
    assert finished(_smoke(tmp_path), start)["best"] is None  # no summary (eval=null)
    (tmp_path / "metric_summary.json").write_text(json.dumps({"best": {"iteration": 4, "value": 2.5}}))
    summary = finished(_smoke(tmp_path), start)
    assert summary == {"iteration": 8, "run_dir": str(tmp_path), "best": 2.5, "finished": True, "metrics": {}}


def test_a_resumed_run_continues_its_csv_rows_and_its_wandb_run(tmp_path):
    (csv,) = build_loggers(_smoke(tmp_path), 4)
    assert isinstance(csv, ResumableCSVLogger) and csv._resume_step == 4
    assert build_loggers(_smoke(tmp_path), None)[0]._resume_step is None
    loggers = build_loggers(_smoke(tmp_path, "logger=wandb"), 4, "abc123")
    wandb = next(x for x in loggers if isinstance(x, WandbLogger))
    assert wandb._wandb_init["id"] == "abc123" and wandb._wandb_init["resume"] == "allow"
    assert wandb._wandb_init["name"] == "quickstart" and wandb._offline  # WANDB_MODE=offline
    fresh = next(
        x for x in build_loggers(_smoke(tmp_path, "logger=wandb"), None) if isinstance(x, WandbLogger)
    )
    assert fresh._wandb_init["id"] is None  # a W&B run of its own
    # Lightning passes anonymous=None, which wandb warns about on every run; one given stays
    assert "anonymous" not in wandb._wandb_init and "anonymous" not in fresh._wandb_init
    given = build_loggers(_smoke(tmp_path, "logger=wandb", "+logger.wandb.anonymous=true"), None)
    assert next(x for x in given if isinstance(x, WandbLogger))._wandb_init["anonymous"] == "allow"
    # TensorBoard drops the events after the checkpoint that a killed launch wrote: each step once (they
    # were there twice after a kill -9, where metrics.csv keeps each row once)
    (_, board) = build_loggers(_smoke(tmp_path, "logger=tensorboard"), 4)
    assert board._kwargs["purge_step"] == 5  # SummaryWriter's: from step 5 on, what the file held goes
    (_, fresh_board) = build_loggers(_smoke(tmp_path, "logger=tensorboard"), None)
    assert "purge_step" not in fresh_board._kwargs


def test_a_new_run_from_another_runs_checkpoint_is_a_w_and_b_run_of_its_own(tmp_path):
    # its W&B id was the source run's: the sweep's fine-tunes wrote into the run they started from; and a
    # launch without the W&B logger kept no id, so the next launch with it started another W&B run
    from act_lightning.start import start_point

    source = tmp_path / "source" / "last.ckpt"
    source.parent.mkdir()
    history = [{"iteration": 0, "overrides": ["experiment=quickstart"], "new_run": True}]
    state = {"state_dict": {"iteration": torch.tensor(2)}, "act_wandb_id": "w1", "act_history": history}
    torch.save(state, source)
    cfg = _smoke(tmp_path, f"ckpt_path={source}", "resume_changes=[iterations]")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    monkey = {"check_resume": lambda *a, **k: {}}
    import act_lightning.start as start_module

    with pytest.MonkeyPatch.context() as patch:
        for name, value in monkey.items():
            patch.setattr(start_module, name, value)
        assert start_point(cfg, resolved).wandb_id is None  # a new run: W&B gives it its own id
        own = tmp_path / "checkpoints" / "last.ckpt"
        own.parent.mkdir(exist_ok=True)
        torch.save(state, own)
        assert start_point(cfg, resolved).wandb_id == "w1"  # its own run continues its W&B run
        # a roll-back to its own snapshot named by a relative path (docs/long_runs.md) is the same run
        own.unlink()
        torch.save(state, own.parent / "iter_0000002.ckpt")
        patch.chdir(tmp_path)
        relative = _smoke(tmp_path, "ckpt_path=checkpoints/iter_0000002.ckpt", "resume_changes=[iterations]")
        start = start_point(relative, OmegaConf.to_container(relative, resolve=True))
        assert start.wandb_id == "w1" and not start.history[-1].get("new_run")
        torch.save(state, own)
    _, model, _, _ = build(cfg, StartPoint(own, 2, "w1"), resolved)
    checkpoint = {"state_dict": {}}
    model.on_save_checkpoint(checkpoint)  # no W&B logger in this launch: the run's id is kept
    assert checkpoint["act_wandb_id"] == "w1"


def test_only_a_run_lightning_resumes_keeps_its_csv_rows_a_weights_only_start_begins_anew(tmp_path):
    cfg = _smoke(tmp_path, "data=synthetic", "eval=null")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for start, kept in ((StartPoint(tmp_path / "last.ckpt", 4), 4), (StartPoint(None, 4, weights={}), None)):
        _, model, _, trainer = build(cfg, start, resolved)
        assert trainer.loggers[0]._resume_step == kept
    assert model.k == 4  # the weights' iteration


def test_a_gone_init_from_file_is_skipped_only_when_resume_auto_continues_the_runs_checkpoint(tmp_path):
    gone = f"init_from={tmp_path / 'gone.ckpt'}"
    assert not _init_gone_on_resume(_smoke(tmp_path, gone))  # no checkpoint of the run's own
    _last(tmp_path, 3)
    assert _init_gone_on_resume(_smoke(tmp_path, gone))
    assert not _init_gone_on_resume(_smoke(tmp_path, gone, "resume=never"))  # refused by its own check


def test_init_from_is_said_to_start_the_run_only_once_its_weights_fit(tmp_path, caplog):
    """The launch logged "a new run from its generator weights" and then refused the same file."""
    own = instantiate(_smoke(tmp_path).model).generator.state_dict()
    key = next(k for k, v in own.items() if v.ndim == 4)
    for name, fits in (("shaped", False), ("good", True)):
        state = {f"generator.{k}": v[:1] if k == key and not fits else v for k, v in own.items()}
        torch.save({"state_dict": state}, tmp_path / f"{name}.ckpt")
        cfg = _smoke(tmp_path / name, "data=synthetic", "eval=null", f"init_from={tmp_path / name}.ckpt")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="act_lightning"):
            if fits:
                prepare(cfg).lock.release()
            else:
                with pytest.raises(ValueError, match=f"mis-shaped: {key}"):
                    prepare(cfg)
        said = [m for m in caplog.messages if "a new run from its generator weights" in m]
        assert len(said) == fits and all(
            m.startswith(f"init_from={tmp_path / name}.ckpt (generator.*") for m in said
        )


def test_the_wandb_run_ends_with_the_jobs_outcome_and_is_named_by_the_experiment_and_overrides(
    tmp_path, monkeypatch
):
    ended = []
    wandb = SimpleNamespace(run=object(), finish=lambda exit_code: ended.append(exit_code))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    finish_wandb(failed=True)
    finish_wandb(failed=False)
    wandb.run = None  # no run open: nothing to end
    finish_wandb(failed=True)
    assert ended == [1, 0]
    assert run_name(_smoke(tmp_path)) == "quickstart"  # composed without a Hydra run
    job = SimpleNamespace(job=SimpleNamespace(override_dirname="model.schedule.gan_ratio=0.1,seed=1"))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: job))
    assert run_name(_smoke(tmp_path)) == "quickstart[model.schedule.gan_ratio=0.1,seed=1]"


def test_a_multiruns_job_on_another_config_is_told_to_take_another_sweep_folder(tmp_path, monkeypatch):
    """In a multirun hydra.run.dir is not read: the refusal of a job whose folder holds a run of another
    config names the key that gives another folder there, hydra.sweep.dir."""
    from hydra.types import RunMode

    from act_lightning.start import start_point

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    saved = OmegaConf.to_container(_smoke(tmp_path), resolve=True)
    torch.save({"state_dict": {"iteration": torch.tensor(2)}, "act_config": saved}, folder / "last.ckpt")
    cfg = _smoke(tmp_path, "seed=1")
    for mode, key in (
        (RunMode.MULTIRUN, "hydra.sweep.dir (each job's folder is in it)"),
        (RunMode.RUN, "hydra.run.dir"),
    ):
        monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
        job = SimpleNamespace(mode=mode, overrides=SimpleNamespace(task=["debug=smoke", "seed=1"]))
        monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda job=job: job))
        with pytest.raises(
            ValueError, match=r"seed=0 \(now 1\).* start a new run in another " + re.escape(key)
        ):
            start_point(cfg, OmegaConf.to_container(cfg, resolve=True))


def test_a_batch_size_above_the_experiments_global_batch_is_refused_not_dropped(tmp_path):
    """data.batch_size=128 on the quickstart (global 64) trained 64 per half without a word."""
    with pytest.raises(
        ValueError,
        match=r"data.batch_size=128 exceeds data.global_batch_size=64.* set data.global_batch_size=128",
    ):
        check_config(compose(["data.batch_size=128"], run_dir=str(tmp_path)))
    check_config(compose(["data.batch_size=128", "data.global_batch_size=128"], run_dir=str(tmp_path)))
    check_config(compose(["data.batch_size=32"], run_dir=str(tmp_path)))  # micro-batches of 32: a cap


def test_a_last_checkpoint_corrupted_inside_a_tensor_is_refused_by_its_checksums(tmp_path):
    """torch's loader checks no checksums: zeros written over a tensor's bytes load as other numbers, and
    the run would have resumed from them without a word."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    last = folder / "last.ckpt"
    torch.save({"state_dict": {"iteration": torch.tensor(3), "w": torch.randn(100_000)}}, last)
    raw = bytearray(last.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 4096] = bytes(4096)
    last.write_bytes(bytes(raw))
    assert torch.load(last, weights_only=True)["state_dict"]["w"].shape == (100_000,)  # silently changed
    with pytest.raises(UnreadableCheckpoint) as err:
        resolve_resume(_smoke(tmp_path))
    assert re.search(
        r"which is damaged \(last/data/\d+ does not match the checksum the archive", str(err.value)
    )
    assert "Move it aside (this run has no other checkpoint)" in str(err.value)


def test_a_w_and_b_run_that_cannot_finish_is_said_not_raised(monkeypatch, caplog):
    # a scheduler's SIGTERM reaches wandb's service too: wandb.finish raised ConnectionResetError from
    # fit's cleanup, and the stopped run exited 1 with a traceback instead of 128 + 15 (and no requeue)
    from types import SimpleNamespace

    from act_lightning.train import finish_wandb

    def finish(exit_code):
        raise ConnectionResetError("Connection lost")

    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(run=object(), finish=finish))
    with caplog.at_level(logging.WARNING, logger="act_lightning.train"):
        finish_wandb(failed=False)
    assert "W&B's run did not finish cleanly (ConnectionResetError: Connection lost)" in caplog.text
