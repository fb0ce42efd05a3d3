"""The private internals of other libraries this library relies on (act_lightning.compat): each test fails
when the library underneath changes what the shim relies on."""

import csv

import pytest
import torch
from torch import nn

from act_lightning.compat import ResumableExperimentWriter, eager_forward, set_last_lr


class Scaled(nn.Module):
    """A network of its own, as the library's are: Dynamo (torch 2.11) does not trace a bare `nn.Linear`
    compiled on its own (torch's modules are on its skip list there), so no graph would be made."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def forward(self, x):
        return self.linear(x) * 2


def test_eager_forward_runs_a_module_compiled_in_place_without_its_compiled_forward():
    compilations = []

    def backend(graph_module, example_inputs):
        compilations.append(len(example_inputs))
        return graph_module.forward

    net = Scaled()
    net.compile(backend=backend)
    assert net._compiled_call_impl is not None  # where torch keeps the forward that `compile()` made
    net(torch.ones(1, 2))
    assert len(compilations) == 1
    with eager_forward(net):
        assert net._compiled_call_impl is None
        out = net(torch.ones(3, 2))  # a new shape: a compiled forward would compile again here
    assert len(compilations) == 1 and out.shape == (3, 2)
    assert net._compiled_call_impl is not None  # restored


def _write_rows(path, steps):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "train/loss_g"])
        writer.writeheader()
        writer.writerows({"step": k, "train/loss_g": 0.5 * k} for k in steps)


def test_the_csv_writer_keeps_the_rows_up_to_the_resumed_iteration(tmp_path):
    # Lightning's ExperimentWriter calls `_check_log_dir_exists` from its constructor and deletes the file
    # there; the override must be the one that runs
    _write_rows(tmp_path / "metrics.csv", range(1, 6))
    writer = ResumableExperimentWriter(str(tmp_path), resume_step=3)
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3]
    assert writer.metrics_keys == ["step", "train/loss_g"]
    writer.log_metrics({"train/loss_g": 2.0}, step=4)
    writer.save()
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]


def test_a_resume_stopped_while_it_rewrites_the_csv_leaves_the_runs_rows_as_they_were(tmp_path, monkeypatch):
    """The rows are rewritten through a temporary file renamed over metrics.csv: a write that fails (a
    full disk, a kill) leaves every row of the run, never a file cut short."""
    import act_lightning.atomic

    _write_rows(tmp_path / "metrics.csv", range(1, 6))
    before = (tmp_path / "metrics.csv").read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(act_lightning.atomic.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ResumableExperimentWriter(str(tmp_path), resume_step=3)
    assert (tmp_path / "metrics.csv").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temporary left behind


def test_a_fresh_run_starts_a_new_csv_file(tmp_path):
    _write_rows(tmp_path / "metrics.csv", range(1, 6))
    ResumableExperimentWriter(str(tmp_path), resume_step=None)
    assert not (tmp_path / "metrics.csv").exists()


def test_the_handlers_lightning_installs_are_told_apart_from_a_launchers():
    # Lightning's trainer installs its own SIGTERM handler through its private _SignalConnector; after our
    # checkpointing handler ran, that one must not be called (it would end the run with status 0)
    import signal

    from lightning.pytorch import Trainer
    from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

    from act_lightning.compat import is_lightning_handler

    def launcher(signum, frame):  # e.g. submitit's requeue handler
        pass

    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, launcher)
        trainer = Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
        )
        connector = _SignalConnector(trainer)
        connector.register_signal_handlers()
        installed = signal.getsignal(signal.SIGTERM)
        assert installed is not launcher and is_lightning_handler(installed)
        assert not is_lightning_handler(launcher) and not is_lightning_handler(signal.SIG_DFL)
        connector.teardown()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_exactly_lightnings_unresumable_loader_warning_is_ignored():
    # the filter matches Lightning's message by its text: the message must still be the one its training
    # loop emits (an implicitly joined string literal in `_TrainingEpochLoop.reset`)
    import ast
    import inspect
    import textwrap
    import warnings

    from lightning.fabric.utilities.warnings import PossibleUserWarning
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    from act_lightning.compat import UNRESUMABLE_LOADER_WARNING, ignore_unresumable_loader_warning

    tree = ast.parse(textwrap.dedent(inspect.getsource(_TrainingEpochLoop.reset)))
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    lightnings = [s for s in strings if s.startswith(UNRESUMABLE_LOADER_WARNING)]
    assert len(lightnings) == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ignore_unresumable_loader_warning()
        warnings.warn(lightnings[0], PossibleUserWarning, stacklevel=1)
        warnings.warn("Your dataloader has few workers", PossibleUserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["Your dataloader has few workers"]


def test_the_csv_logger_gives_its_writer_the_resumed_iteration(tmp_path):
    from act_lightning.loggers import ResumableCSVLogger

    _write_rows(tmp_path / "metrics.csv", range(1, 6))
    logger = ResumableCSVLogger(str(tmp_path), name="", version="", resume_step=2)
    logger.log_metrics({"train/loss_g": 9.0}, step=3)
    logger.save()
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [(int(r["step"]), float(r["train/loss_g"])) for r in csv.DictReader(f)] == [
            (1, 0.5),
            (2, 1.0),
            (3, 9.0),
        ]


def test_rows_without_a_step_are_dropped_when_a_resume_rewrites_the_csv(tmp_path):
    with open(tmp_path / "metrics.csv", "w", newline="") as f:
        f.write("step,train/loss_g\n1,0.5\n,0.7\n2,1.0\n")  # a row with no step (hand-edited, or foreign)
    ResumableExperimentWriter(str(tmp_path), resume_step=3)
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1", "2"]


def test_the_few_batches_warning_is_lightnings_and_the_rows_still_come_every_log_every_n_steps(tmp_path):
    """Lightning warns when an epoch has fewer batches than log_every_n_steps, as if the rows were per
    epoch; they are counted over all batches. The filter matches Lightning's message (read from its source)
    and nothing else, and a run of 4-batch epochs logging every 6 iterations writes rows at 6 and 12."""
    import csv
    import inspect
    import warnings

    from lightning.fabric.utilities.warnings import PossibleUserWarning
    from lightning.pytorch.loops.fit_loop import _FitLoop

    from act_lightning.compat import FEW_BATCHES_WARNING, ignore_few_batches_warning
    from act_lightning.train import train
    from tests.conftest import compose

    source = inspect.getsource(_FitLoop.setup_data)
    lightnings = 'f"The number of training batches ({self.max_batches}) is smaller than the logging interval"'
    assert lightnings in source
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ignore_few_batches_warning()
        warnings.warn(
            "The number of training batches (11) is smaller than the logging interval Trainer("
            "log_every_n_steps=20). Set a lower value for log_every_n_steps if you want to see logs for the "
            "training epoch.",
            PossibleUserWarning,
            stacklevel=1,
        )
        warnings.warn("The number of training batches is large", PossibleUserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["The number of training batches is large"]
    assert FEW_BATCHES_WARNING.startswith("The number of training batches")
    overrides = ["debug=smoke", "data=synthetic", "data.length=32", "data.batch_size=4", "iterations=12"]
    overrides += ["trainer.log_every_n_steps=6", "eval=null"]  # 32 images: 4 batches of 4 + 4 per epoch
    train(compose(overrides, run_dir=str(tmp_path)))
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss_g")]
    assert [int(r["step"]) for r in rows] == [6, 12]


def test_set_last_lr_is_what_a_schedulers_get_last_lr_returns_until_its_next_step():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)
    set_last_lr(scheduler, [0.5])
    assert scheduler.get_last_lr() == [0.5]
    optimizer.step()
    scheduler.step()  # the next step computes its own again
    assert scheduler.get_last_lr() == [0.1]


def test_lightnings_litlogger_tip_is_dropped_and_its_other_lines_are_kept(tmp_path, caplog):
    """Lightning's logger connector advertises LitLogger at every Trainer's start (read from its source);
    after quiet_litlogger_tip that line, and only that line, no longer reaches any handler."""
    import inspect
    import logging

    import lightning as L
    from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector

    from act_lightning.compat import LITLOGGER_TIP, RANK_ZERO_LOGGER, quiet_litlogger_tip

    assert LITLOGGER_TIP in inspect.getsource(_LoggerConnector.configure_logger)
    log = logging.getLogger(RANK_ZERO_LOGGER)
    before = list(log.filters)

    def trainer_lines() -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=RANK_ZERO_LOGGER):
            L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, accelerator="cpu")
        return [r.getMessage() for r in caplog.records if r.name == RANK_ZERO_LOGGER]

    try:
        log.filters = [f for f in before if type(f).__name__ != "_WithoutLitLoggerTip"]
        said = trainer_lines()
        assert any(line.startswith(LITLOGGER_TIP) for line in said)
        quiet_litlogger_tip()
        quiet_litlogger_tip()  # once per process
        assert [type(f).__name__ for f in log.filters].count("_WithoutLitLoggerTip") == 1
        quiet = trainer_lines()
        assert not any(line.startswith(LITLOGGER_TIP) for line in quiet)
        assert [line for line in said if not line.startswith(LITLOGGER_TIP)] == quiet  # the rest kept
    finally:
        log.filters = before


def test_lightnings_eval_mode_warning_is_silenced_only_when_the_frozen_distance_is_all_there_is():
    """Lightning warns when submodules are in eval mode as training starts (its message read from its
    source). LPIPS' network (`distance`) is frozen in eval mode on purpose: that alone silences the warning
    for exactly its count; another module in eval mode keeps it."""
    import inspect
    import warnings

    from lightning.fabric.utilities.warnings import PossibleUserWarning
    from lightning.pytorch.loops.fit_loop import _FitLoop
    from torch import nn

    from act_lightning.compat import EVAL_MODULES_WARNING, ignore_frozen_modules_warning

    source = inspect.getsource(_FitLoop._warn_if_modules_in_eval_mode)
    assert 'f"Found {len(eval_modules)} module(s) in eval mode at the start of training."' in source
    assert EVAL_MODULES_WARNING.format("{len(eval_modules)}") in source

    def said(module: nn.Module) -> list[str]:
        count = sum(not m.training for m in module.modules())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ignore_frozen_modules_warning(module)
            message = (
                f"{EVAL_MODULES_WARNING.format(count)}. This may lead to unexpected behavior during training."
            )
            warnings.warn(message, PossibleUserWarning, stacklevel=1)
        return [str(w.message) for w in caught]

    frozen = nn.Module()
    frozen.generator = nn.Linear(2, 2)
    frozen.distance = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).eval()  # three modules in eval mode
    assert said(frozen) == []
    also = nn.Module()
    also.generator = nn.Linear(2, 2).eval()  # by mistake: the warning stays
    also.distance = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.Dropout()).eval()
    assert said(also) == [
        f"{EVAL_MODULES_WARNING.format(5)}. This may lead to unexpected behavior during training."
    ]


def test_torchs_leafspec_deprecation_is_silenced_where_lightnings_loop_raises_it_only(tmp_path):
    """torch deprecated LeafSpec; Lightning's pytree helper builds one every iteration, and every run
    printed the FutureWarning, which no user of this library can act on. Raised elsewhere, it stays."""
    import warnings

    from torch.utils._pytree import LeafSpec

    from act_lightning.train import train
    from tests.conftest import compose

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(compose(["debug=smoke", "data=synthetic", "eval=null", "iterations=2"], run_dir=str(tmp_path)))
        assert not [w for w in caught if "LeafSpec" in str(w.message)]
        LeafSpec()  # this test's own use: not Lightning's
    assert [w.category for w in caught if "LeafSpec" in str(w.message)] == [FutureWarning]
