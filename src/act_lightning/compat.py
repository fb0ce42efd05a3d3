"""Every place this library relies on another library's private internals, in one module. Each has a
test in tests/unit/test_compat.py that fails when the library underneath changes it."""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from torch import nn

from act_lightning.atomic import atomic_write

# What Lightning's training loop says (TrainingEpochLoop.reset) on every resume within an epoch unless each
# training DataLoader implements its private `_Stateful` protocol.
UNRESUMABLE_LOADER_WARNING = (
    "You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable"
)

# What Lightning's fit loop says (_FitLoop.setup_data) when an epoch has fewer batches than
# log_every_n_steps. It counts logging intervals over all batches, across epochs, so the rows still come
# every log_every_n_steps ACT iterations: the quickstart's 11 batches per epoch log at 20, 40, ...
FEW_BATCHES_WARNING = r"The number of training batches \(\d+\) is smaller than the logging interval"

# What Lightning's fit loop says (_FitLoop._warn_if_modules_in_eval_mode) when any submodule is in eval
# mode as training starts, with their count. The consistency distance's network (`distance`: LPIPS' VGG
# and its linear heads, whose dropout must stay off) is frozen in eval mode on purpose.
EVAL_MODULES_WARNING = "Found {} module(s) in eval mode at the start of training"

# What Lightning's logger connector says (_LoggerConnector.configure_logger) at the start of every Trainer
# whose loggers include no LitLogger, through its rank-zero logger: a tip to install its cloud service's
# logger, nothing about the run. A run's console keeps Lightning's other lines (devices, precision).
LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"
RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"

# What torch (>= 2.10) says each time Lightning's own pytree helper (lightning.pytorch.utilities._pytree,
# which the training loop calls every iteration) builds a LeafSpec, which torch deprecated: printed by
# every run, and nothing a user of this library can change.
LEAFSPEC_WARNING = "`isinstance(treespec, LeafSpec)` is deprecated"
LIGHTNING_PYTREE = r"lightning\.pytorch\.utilities\._pytree"


@contextmanager
def eager_forward(module: nn.Module) -> Iterator[None]:
    """Within, a module compiled in place (`module.compile()`) runs its eager forward. torch keeps the
    compiled forward in the private `_compiled_call_impl` (torch >= 2.2); the R1 pass differentiates the
    discriminator twice, which compiled graphs do not support."""
    compiled = module._compiled_call_impl
    module._compiled_call_impl = None
    try:
        yield
    finally:
        module._compiled_call_impl = compiled


class ResumableExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv in its private `_check_log_dir_exists`,
    called from its constructor. This one keeps the rows up to `resume_step` (the resumed checkpoint's
    iteration; rows after it are logged again by the resumed run) and drops the rest; with
    `resume_step=None` (a fresh run) it starts a new file."""

    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        self._resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = self.metrics_file_path
        if not os.path.isfile(path):
            return
        if self._resume_step is None:
            os.remove(path)
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [row for row in reader if row.get("step") and int(float(row["step"])) <= self._resume_step]
        kept = io.StringIO(newline="")
        writer = csv.DictWriter(kept, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
        with atomic_write(path) as f:  # a kill mid-write must not cut the run's log short
            f.write(kept.getvalue().encode())
        self.metrics_keys = keys  # appending needs the header that is on disk


def is_lightning_handler(handler: Any) -> bool:
    """Whether a signal handler is one that Lightning's trainer installed (its private
    `_SignalConnector` registers `_HandlersCompose` objects for SIGTERM and, on SLURM, SIGUSR1): such a
    handler is not a launcher's and is not called again after our own checkpointing handler ran. Told
    apart by the module its class or function comes from."""
    module = getattr(type(handler), "__module__", "") or ""
    own = getattr(handler, "__module__", "") or ""
    return module.startswith("lightning") or own.startswith("lightning")


def take_lightning_sigterm(trainer: Any) -> bool:
    """Whether Lightning's own SIGTERM handler saw a SIGTERM; clears its flag. The trainer installs that
    handler just before training starts, and `LastCheckpoint` replaces it in its `on_train_start`, after
    the other callbacks' start-up work (the evaluation's reference statistics and first FID): a SIGTERM
    in between sets only Lightning's `received_sigterm` (in its private `_signal_connector`), on which
    Lightning's loops end the run after the next iteration with status 0 and no checkpoint."""
    connector = getattr(trainer, "_signal_connector", None)
    if connector is None or not getattr(connector, "received_sigterm", False):
        return False
    connector.received_sigterm = False
    return True


def set_last_lr(scheduler: Any, rates: list[float]) -> None:
    """Sets what a torch LR scheduler's `get_last_lr()` returns (its private `_last_lr`, which only `step`
    writes): `resume.set_learning_rates` changes a restored scheduler's rates between two steps."""
    scheduler._last_lr = list(rates)


def ignore_unresumable_loader_warning() -> None:
    """Silences exactly Lightning's warning that a resumed run's dataloader "is not resumable". It looks
    at the DataLoader only; our data modules restore the loader's position themselves (the batches of the
    epoch consumed and the shuffling generator: `ImageDataModule.state_dict`), so resume is exact and the
    warning, printed on every resume, would be wrong."""
    warnings.filterwarnings(
        "ignore", message=re.escape(UNRESUMABLE_LOADER_WARNING), category=PossibleUserWarning
    )


class _WithoutLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(LITLOGGER_TIP)


def quiet_litlogger_tip() -> None:
    """Drops exactly Lightning's tip to install LitLogger (LITLOGGER_TIP) from its rank-zero logger, once
    per process however often it is called."""
    log = logging.getLogger(RANK_ZERO_LOGGER)
    if not any(isinstance(f, _WithoutLitLoggerTip) for f in log.filters):
        log.addFilter(_WithoutLitLoggerTip())


def ignore_frozen_modules_warning(module: nn.Module, frozen: str = "distance") -> None:
    """Silences Lightning's warning about submodules in eval mode (EVAL_MODULES_WARNING) when those in eval
    mode are exactly `frozen` and the modules under it; with any other module among them it stays."""
    names = [name for name, m in module.named_modules() if not m.training]
    if names and all(name == frozen or name.startswith(f"{frozen}.") for name in names):
        message = re.escape(EVAL_MODULES_WARNING.format(len(names)))
        warnings.filterwarnings("ignore", message=message, category=PossibleUserWarning)


def ignore_lightning_leafspec_warning() -> None:
    """Silences exactly torch's deprecation of LeafSpec where Lightning's pytree helper builds one
    (LEAFSPEC_WARNING); raised from anywhere else, it stays."""
    warnings.filterwarnings(
        "ignore", message=re.escape(LEAFSPEC_WARNING), category=FutureWarning, module=LIGHTNING_PYTREE
    )


def without_wandb_anonymous(logger: Any) -> Any:
    """`logger` (Lightning's WandbLogger) without the `anonymous=None` it hands to `wandb.init` whenever
    the option was not given: wandb warns that the setting "has no effect" on every run that passes the key,
    whatever its value. An `anonymous` given stays."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and "anonymous" in init and init["anonymous"] is None:
        del init["anonymous"]
    return logger


def ignore_few_batches_warning() -> None:
    """Silences exactly Lightning's warning that an epoch has fewer batches than log_every_n_steps: a run
    here is counted in iterations, not epochs, and logs every log_every_n_steps of them whatever the
    epoch's length (FEW_BATCHES_WARNING)."""
    warnings.filterwarnings("ignore", message=FEW_BATCHES_WARNING, category=PossibleUserWarning)
