"""Every failure says what to do, in one line, before work is spent: a second Ctrl-C, a damaged
last.ckpt, a full disk during a save, a file that is no checkpoint, a diverged run, a global batch the
devices cannot share, W&B without a network, and CIFAR-10 that could not be downloaded."""

from __future__ import annotations

import contextlib
import errno
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
import torch

from act_lightning import loggers
from act_lightning.callbacks import LastCheckpoint
from act_lightning.callbacks.guard import what_to_do
from act_lightning.loggers import unreachable
from act_lightning.train import train
from tests.conftest import COMMAND_ENV, compose, refusal, run_cli, run_module
from tests.helpers_data import write_image_folder

QUIET = ["debug=smoke", "data=synthetic", "eval=null"]


def _iteration(path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["state_dict"]["iteration"])


def test_a_second_ctrl_c_exits_130_and_says_that_no_checkpoint_was_written(tmp_path, capfd):
    twice = [  # two Ctrl-C in iteration 3, before its checkpoint callback runs
        f"+callbacks.{name}.{key}={value}"
        for name in ("first", "second")
        for key, value in (("_target_", "tests.helpers_signals.SendSignalAt"), ("signum", 2), ("at", 3))
    ]
    every = "callbacks.checkpoint.every_n_iterations=2"

    def before(signum, frame):  # whatever was installed before the run is installed after it
        raise AssertionError("not called")

    previous = signal.signal(signal.SIGINT, before)
    try:
        with pytest.raises(SystemExit) as stop:
            train(compose([*QUIET, "iterations=50", every, *twice], run_dir=str(tmp_path)))
        after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stop.value.code == 128 + signal.SIGINT
    last = tmp_path / "checkpoints" / "last.ckpt"
    said = f"no checkpoint was written for this stop; the last one, {last} (iteration 2), continues with"
    assert said + " resume=auto" in capfd.readouterr().err
    assert _iteration(last) == 2 and after is before


def test_a_ctrl_c_before_training_starts_is_not_called_a_second_one(tmp_path, capfd):
    """One Ctrl-C during the set-up (the data's download, before the stop signals are taken) was reported
    as "stopped at once by a second Ctrl-C"."""
    early = [
        f"+callbacks.early.{k}={v}"
        for k, v in (("_target_", "tests.helpers_signals.SendSignalAt"), ("signum", 2), ("at", -1))
    ]
    with pytest.raises(SystemExit) as stop:
        train(compose([*QUIET, "iterations=4", *early], run_dir=str(tmp_path)))
    assert stop.value.code == 128 + signal.SIGINT
    err = capfd.readouterr().err
    assert (
        "[act] stopped by Ctrl-C before training started: no checkpoint was written for this stop; there is "
        "none" in err
    )
    assert "second Ctrl-C" not in err and not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_a_ctrl_c_during_the_set_up_ends_in_one_line_not_a_traceback(tmp_path, capfd, monkeypatch):
    """A Ctrl-C while the networks are built (before Lightning takes the signals) raised Python's
    KeyboardInterrupt through the command: a 60-line traceback, where the docs promise one line and 130."""
    from act_lightning import train as train_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "build", interrupted)
    with pytest.raises(SystemExit) as stop:
        train(compose([*QUIET, "iterations=4"], run_dir=str(tmp_path)))
    assert stop.value.code == 128 + signal.SIGINT
    err = capfd.readouterr().err
    assert "[act] stopped by Ctrl-C before training started: no checkpoint was written" in err
    assert "Traceback" not in err and not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_a_damaged_last_checkpoint_is_named_with_what_to_do(tmp_path):
    common = [*QUIET, "iterations=4", "callbacks.checkpoint.keep_snapshots=true"]
    train(compose([*common, "stop_after=2"], run_dir=str(tmp_path)))
    last = tmp_path / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    # the third: a web server's error page saved in its place. Not random bytes: one in 256 starts with
    # pickle's protocol byte, which reads as a damaged legacy checkpoint (CI failed on one such draw)
    page = b"<!DOCTYPE html>\n<title>404 Not Found</title>\n" * 20
    for content, what in ((b"", "empty"), (data[:-100], "damaged"), (page, "not a checkpoint")):
        last.write_bytes(content)
        with pytest.raises(ValueError) as refused:
            train(compose(common, run_dir=str(tmp_path)))
        message = str(refused.value)
        assert message.startswith(f"resume=auto continues from {last}, which is {what} ("), message
        assert (
            "Move it aside: resume=auto then continues from the newest of this run's other checkpoints "
            "(iter_0000002.ckpt), or from the one ckpt_path=CHECKPOINT names among them" in message
        )
        assert "hydra.run.dir=NEW_FOLDER resume=never" in message and "weights_only" not in message
    line = refusal(run_cli(common, tmp_path))  # the command says it in one line
    assert line.startswith(f"error: resume=auto continues from {last}, which is not a checkpoint (")


def test_cifar10_that_cannot_be_downloaded_is_refused_in_one_line_naming_the_files(tmp_path, monkeypatch):
    """data.download=true (the default) lets a run start without the files; the download, as Lightning
    prepares the data, fails offline: the command says what to put where in one line, exit status 2."""

    def offline(request, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root, run = tmp_path / "data", tmp_path / "run"
    result = run_cli(["experiment=cifar10", "debug=smoke", f"data.root={root}"], run)
    line = refusal(result)
    assert line.startswith(f"error: CIFAR-10 not found: {root}/cifar-10-batches-py/data_batch_1 is missing")
    assert "The download failed: URLError" in line and not root.exists()
    assert "data.download=true" not in line  # ... not where it is on and just failed
    # no W&B run and no hparams.yaml for a run that never started: the lock and the launch's record only
    assert sorted(p.name for p in run.iterdir()) == [".hydra", ".lock"]


class FullDisk:
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def test_a_full_disk_during_a_save_says_so_with_the_space_the_checkpoint_needs(tmp_path, monkeypatch):
    save, saves = torch.save, []

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        saves.append(f)
        return save(obj, f if len(saves) == 1 else FullDisk(f, room=4096), *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    cfg = compose(
        [*QUIET, "iterations=4", "callbacks.checkpoint.every_n_iterations=2"], run_dir=str(tmp_path)
    )
    with pytest.raises(OSError) as full:
        train(cfg)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert full.value.errno == errno.ENOSPC and len(saves) == 2
    assert str(full.value).startswith(
        f"[Errno 28] no space left on device writing {last}: the checkpoint needs about "
    )
    assert "KB, " in str(full.value) and "the previous checkpoint is intact" in str(full.value)
    monkeypatch.undo()
    assert _iteration(last) == 2 and [p.name for p in last.parent.iterdir()] == ["last.ckpt"]  # no temp file


def test_the_command_says_in_one_line_that_the_disk_filled_up_and_exits_1(tmp_path):
    full = ["+callbacks.full._target_=tests.helpers_disk.DiskFullAfter", "+callbacks.full.at=3"]
    args = [*QUIET, "iterations=4", "callbacks.checkpoint.every_n_iterations=2", *full]
    result = run_cli(args, tmp_path / "run")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    said = result.stderr.splitlines()[-1]
    assert said.startswith(f"error: [Errno 28] no space left on device writing {last}: the checkpoint needs")
    assert said.endswith("continue with resume=auto") and _iteration(last) == 2


def test_a_diverged_run_stops_with_one_line_and_status_1_and_a_diverged_sweep_job_fails_as_a_job(tmp_path):
    """Learning rates of 1e30 make every update non-finite: the guard stops the run after two bad
    iterations. Alone: the guard's message in one line, exit status 1. In a multirun the error reaches
    Hydra's sweeper as the job's failure (Optuna counts it against hydra.sweeper.max_failure_rate)."""
    args = [*QUIET, "iterations=8", "model.optimizer.lr=1e30", "model.d_optimizer.lr=1e30"]
    args += ["guard.max_bad_iterations=2"]
    result = run_cli(args, tmp_path / "run")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    said = result.stderr.splitlines()[-1]
    assert said.startswith("error: training diverged: 2 bad iterations in a row since iteration 1")
    assert said.endswith("start again with a lower learning rate (model.optimizer.lr, model.d_optimizer.lr).")
    sweep = run_module("train", ["-m", *args, f"hydra.sweep.dir={tmp_path / 'sweep'}"], env=COMMAND_ENV)
    assert sweep.returncode == 1 and "DivergenceError: training diverged" in sweep.stderr, sweep.stderr[
        -3000:
    ]


def test_sample_refuses_a_file_that_is_no_checkpoint_in_one_line_without_unsafe_advice(tmp_path):
    bad = tmp_path / "samples.json"
    bad.write_text('{"a": 1}')
    args = [f"ckpt={bad}", f"out={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    result = run_module("sample", args, timeout=300)
    line = refusal(result)
    said = "not a checkpoint (torch.save writes a zip archive; this file starts with b'{\"a\": 1}')"
    assert line == f"error: ckpt={bad}: {said}"
    assert "weights_only" not in result.stdout + result.stderr and not (tmp_path / "out").exists()


def test_a_diverged_run_says_which_checkpoints_exist_and_which_to_continue_from(tmp_path):
    folder = tmp_path / "checkpoints"
    trainer = SimpleNamespace(callbacks=[LastCheckpoint(str(folder))])
    assert what_to_do(trainer, since=5).startswith("No checkpoint was written: start again with a lower")
    folder.mkdir()
    for name, k in (("last.ckpt", 7), ("best.ckpt", 4), ("iter_0000004.ckpt", 4), ("iter_0000006.ckpt", 6)):
        torch.save({"state_dict": {"iteration": torch.tensor(k)}}, folder / name)
    advice = what_to_do(trainer, since=5)
    assert advice.startswith(
        "On disk: best.ckpt (iteration 4), iter_0000004.ckpt (iteration 4), iter_0000006.ckpt (iteration 6), "
        "last.ckpt (iteration 7). Continue from best.ckpt, written before iteration 6, in a new folder "
        f"(hydra.run.dir=NEW ckpt_path={folder / 'best.ckpt'}) with other random draws (seed=OTHER "
        "resume_changes=[seed]) or lower learning rates (model.optimizer.lr=LR model.d_optimizer.lr=LR "
        "resume_changes=[model.optimizer.lr,model.d_optimizer.lr]): as it is, resume is exact and repeats "
        "the same iterations. Or start again with a lower learning rate"
    )
    assert "none from before iteration 4: start again" in what_to_do(trainer, since=3)


def test_a_global_batch_the_devices_cannot_share_is_refused_before_any_process_starts(tmp_path):
    ddp = ["trainer=ddp", "trainer.accelerator=cpu"]
    cases = (
        (
            ["trainer.devices=3", "data.global_batch_size=4"],
            r"shared by 3 devices \(trainer.devices x trainer.num_nodes\) in even",
        ),
        (
            ["trainer.devices=2", "data.global_batch_size=12", "data.batch_size=4"],
            "data.batch_size=4 do not divide",
        ),
    )
    for i, (overrides, said) in enumerate(cases):
        with pytest.raises(ValueError, match=said):
            train(compose([*QUIET, *ddp, *overrides], run_dir=str(tmp_path / str(i))))
        assert [p.name for p in (tmp_path / str(i)).iterdir()] == [
            ".lock"
        ]  # nothing written, nothing spawned


@contextlib.contextmanager
def _closed_port():
    """A port that refuses connections while the block runs: bound, never listening, so that no other
    process (the other test worker's DDP or W&B) can take it and answer in the meantime."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_wandb_with_a_key_but_no_network_goes_offline_at_once_with_a_note(tmp_path):
    key = "0123456789abcdef" * 2 + "fake-key"
    args = [*QUIET, "logger=wandb", f"hydra.run.dir={tmp_path}"]
    start = time.monotonic()
    with _closed_port() as port:
        env = {
            "WANDB_MODE": None,  # removed
            "WANDB_SILENT": None,
            "WANDB_API_KEY": key,
            "WANDB_BASE_URL": f"http://127.0.0.1:{port}",
            "PYTHONWARNINGS": "ignore",
        }
        result = run_module("train", args, env=env, timeout=300)  # W&B set up anew for these variables
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.monotonic() - start < 120  # W&B's own retries took minutes
    note = [line for line in result.stdout.splitlines() if "cannot be reached" in line]
    assert len(note) == 1 and "logging offline; upload it later with `wandb sync" in note[0], result.stdout[
        -2000:
    ]
    assert list(tmp_path.glob("wandb/offline-run-*"))
    assert key not in result.stdout + result.stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]


def test_wandb_goes_offline_when_asked_without_a_key_or_a_server_and_is_not_probed_behind_a_proxy(
    tmp_path, monkeypatch, caplog
):
    probed, answer = [], []
    monkeypatch.setattr(loggers, "unreachable", lambda host, port: probed.append((host, port)) or answer[0])
    for name in (
        *loggers.PROXIES,
        "WANDB_MODE",
        "WANDB_API_KEY",
        "WANDB_BASE_URL",
        "WANDB_CONFIG_DIR",
        "NETRC",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no key
    assert loggers.wandb_offline({"offline": True})
    with caplog.at_level("WARNING", logger="act_lightning.loggers"):
        assert loggers.wandb_offline({"save_dir": "/runs/a"}) and probed == []
    assert "No W&B API key configured: logging offline; upload it later with `wandb sync /runs/a/wandb/" in (
        caplog.text
    )
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine api.wandb.ai login user password not-a-key\n")  # `wandb login`
    netrc.chmod(0o600)
    answer.append(None)
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # W&B's older word for offline
    assert loggers.wandb_offline({}) and probed == []
    monkeypatch.delenv("WANDB_MODE")
    cloud = loggers.wandb_host()  # the installed wandb's default: api.wandb.ai, or Forge's from 0.31 on
    assert cloud[0] in loggers.WANDB_CLOUD
    assert not loggers.wandb_offline({}) and probed == [cloud]
    answer[0] = "Connection refused"
    with caplog.at_level("WARNING", logger="act_lightning.loggers"):
        assert loggers.wandb_offline({})
    said = f"W&B's server {cloud[0]}:{cloud[1]} cannot be reached (Connection refused): logging offline"
    assert said in caplog.text
    # `wandb login` with wandb 0.31 writes Forge's name, which serves W&B's cloud: a key (it was taken for
    # none, and every run went offline); so is one in the netrc that NETRC names, as wandb reads it
    netrc.write_text("machine api.forge.coreweave.com login user password not-a-key\n")
    assert loggers.wandb_key_configured()
    netrc.rename(tmp_path / "elsewhere")
    assert not loggers.wandb_key_configured()
    monkeypatch.setenv("NETRC", str(tmp_path / "elsewhere"))
    assert loggers.wandb_key_configured()
    # `wandb login --host=URL` keeps the server in wandb's settings: a key for the cloud is not its key
    settings = tmp_path / ".config" / "wandb" / "settings"
    settings.parent.mkdir(parents=True)
    settings.write_text("[default]\nbase_url = https://wandb.corp.example\n")
    assert loggers.wandb_host() == ("wandb.corp.example", 443) and not loggers.wandb_key_configured()
    settings.unlink()
    monkeypatch.setenv("WANDB_MODE", "disabled")  # W&B off: no offline run either, and no probe
    probed.clear()
    assert not loggers.wandb_offline({}) and probed == []
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("https_proxy", "http://proxy:3128")  # the proxy decides: no probe
    probed.clear()
    assert not loggers.wandb_offline({}) and probed == []
    monkeypatch.setenv("WANDB_BASE_URL", "http://wandb.example")  # a server of one's own: its key
    assert loggers.wandb_host() == ("wandb.example", 80) and not loggers.wandb_key_configured()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example:8443")
    assert loggers.wandb_host() == ("wandb.example", 8443)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example")
    assert loggers.wandb_host() == ("wandb.example", 443)


def test_a_wandb_project_name_is_checked_by_wandbs_own_rule_before_the_run_is_set_up(tmp_path):
    """W&B refused such a name in on_fit_start, after the data and networks, with a traceback: the check
    agrees with wandb's settings on every name here, and the command refuses in one line."""
    from wandb.errors import UsageError
    from wandb.sdk.wandb_settings import Settings

    for name in (
        "act-lightning",
        "",
        "a b_c.d",
        "team/project",
        "x:y",
        "what?",
        "100%",
        "#1",
        "a" * 128,
        "a" * 129,
    ):
        try:
            Settings(project=name)
            wandb_accepts = True
        except UsageError:
            wandb_accepts = False
        ours_accepts = True
        try:
            loggers.check_wandb_names({"project": name})
        except ValueError as err:
            ours_accepts = False
            assert f"logger.wandb.project={name!r}" in str(err)
        assert ours_accepts == wandb_accepts, name
    result = run_cli(["logger=wandb", "logger.wandb.project='team/cifar'", "iterations=2"], tmp_path / "run")
    line = refusal(result)
    assert "logger.wandb.project='team/cifar'" in line and "holds /" in line and "logger.wandb.entity" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_truncated_inception_weights_file_is_refused_at_start_up_in_one_line(tmp_path):
    """It was first read in the evaluation's setup, inside fit, after the data were prepared: a
    traceback and exit status 1, where the README promises one line before any data is read."""
    junk = tmp_path / "pt_inception.pth"
    junk.write_bytes(b"junk\n")
    args = ["experiment=cifar10", "debug=smoke", "data=synthetic", f"eval.inception_weights={junk}"]
    line = refusal(run_cli([*args, "eval.inception_resize=null"], tmp_path / "run"))
    assert f"{junk}: not a readable weights file" in line and "weights-inception-2015-12-05" in line


def test_unreachable_says_why_a_connection_fails_or_that_no_answer_came(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert unreachable("127.0.0.1", server.getsockname()[1]) is None
    with _closed_port() as port:
        assert unreachable("127.0.0.1", port) == "Connection refused"
    hung = threading.Event()

    def no_answer(*args, **kwargs):  # a name lookup that hangs (it ignores the socket's timeout)
        hung.wait(5)
        raise OSError("given up")

    monkeypatch.setattr(socket, "create_connection", no_answer)
    try:
        assert unreachable("127.0.0.1", 1, timeout=0.01) == "no answer within 0.01 s"
    finally:
        hung.set()


def test_a_training_set_smaller_than_one_global_batch_is_refused_before_anything_is_written(tmp_path):
    """Synthetic and folder sources count their images (a folder's walk stops at one global batch) at
    start-up: the refusal comes before the run folder gets anything but its lock, as every start-up
    check's does."""
    folder = write_image_folder(tmp_path / "images", classes=("only",), per_class=3)  # 3 images
    cases = {
        "synthetic": ["data.length=3"],  # smoke runs train on 2 + 2 images
        "folder": ["experiment=cifar10", "data=folder", f"data.root={folder}", "data.verify=false"],
    }
    for name, overrides in cases.items():
        with pytest.raises(ValueError, match="the training set holds 3 images, fewer than one global batch"):
            train(compose([*QUIET, *overrides], run_dir=str(tmp_path / name)))
        assert [p.name for p in (tmp_path / name).iterdir()] == [".lock"], name


def test_a_diverged_run_is_told_to_continue_from_the_latest_checkpoint_up_to_the_first_bad_iteration(
    tmp_path,
):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name, k in (("iter_0000002.ckpt", 2), ("iter_0000004.ckpt", 4), ("last.ckpt", 7)):
        torch.save({"state_dict": {"iteration": torch.tensor(k)}}, folder / name)
    (folder / "broken.ckpt").write_bytes(b"not a checkpoint")  # unreadable: left out
    trainer = SimpleNamespace(callbacks=[LastCheckpoint(str(folder))])
    assert "Continue from iter_0000004.ckpt, written before iteration 7" in what_to_do(trainer, since=6)
    assert "Continue from iter_0000004.ckpt, written before iteration 5" in what_to_do(trainer, since=4)
    assert "Continue from iter_0000002.ckpt, written before iteration 4" in what_to_do(trainer, since=3)
    assert "broken.ckpt" not in what_to_do(trainer, since=6)


def test_a_refused_job_of_a_multirun_fails_as_a_job_and_the_sweep_runs_the_others(tmp_path):
    """A refusal used to exit the process (SystemExit, which Hydra's launchers do not catch): the first
    refused job ended the whole sweep, and an Optuna study with it, whatever max_failure_rate said."""
    sweep = tmp_path / "sweep"
    args = ["-m", *QUIET, "iterations=-1,2", f"hydra.sweep.dir={sweep}"]
    result = run_module("train", args, env=COMMAND_ENV)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "iterations must be a positive integer (ACT iterations K), got -1" in result.stderr
    assert _iteration(sweep / "1" / "checkpoints" / "last.ckpt") == 2  # the second job ran
    assert not (sweep / "0" / "checkpoints").exists()


def test_a_local_multirun_on_several_devices_is_refused_before_any_rank_starts(tmp_path):
    """Lightning would start rank 1 with this command line, -m and the sweep included: a second sweep."""
    sweep = tmp_path / "sweep"
    args = ["-m", *QUIET, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "seed=0,1"]
    result = run_module("train", [*args, f"hydra.sweep.dir={sweep}"], env=COMMAND_ENV)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "a multirun (-m) launched here with trainer.devices=2 on each node" in result.stderr
    assert not list(sweep.glob("*/checkpoints"))  # neither job trained
    single = run_module(
        "train", ["-m", *QUIET, "iterations=1", f"hydra.sweep.dir={tmp_path / 'one'}"], env=COMMAND_ENV
    )
    assert single.returncode == 0, single.stderr[-3000:]  # one device per job: allowed
