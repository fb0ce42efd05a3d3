"""A callback that sends this process a signal at a given ACT iteration, as a scheduler or a user would, and
a logger that records which checkpoint a kill -9 would leave at each row."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import Logger

HANDLERS_AT_START: list = []  # the handler of the signal in place when SendSignalAt's on_train_start ran


class SendSignalAt(L.Callback):
    def __init__(self, signum: int, at: int) -> None:
        self.signum, self.at = signum, at

    def setup(self, trainer, pl_module, stage: str) -> None:  # at=-1: before training starts
        if self.at == -1:
            os.kill(os.getpid(), self.signum)

    def on_train_start(self, trainer, pl_module) -> None:  # at=0: while the callbacks start
        HANDLERS_AT_START.append(signal.getsignal(self.signum))
        if self.at == 0:
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.k == self.at:
            os.kill(os.getpid(), self.signum)


class CheckpointAtEachRow(Logger):
    """A logger that writes to `out`, for every training row it is handed, the row's step and the iteration
    of the checkpoint on disk at that moment (-1: none yet): what a kill -9 at that moment would leave."""

    def __init__(self, checkpoint: str, out: str) -> None:
        super().__init__()
        self.checkpoint, self.out = Path(checkpoint), Path(out)

    @property
    def name(self) -> str:
        return "checkpoint_at_each_row"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        if "train/loss_ct" in metrics:
            on_disk = self.checkpoint.is_file()
            k = torch.load(self.checkpoint, weights_only=True)["state_dict"]["iteration"] if on_disk else -1
            with open(self.out, "a") as f:
                f.write(f"{step} {int(k)}\n")
