"""A progress bar over ACT iterations (Lightning's counts epochs and optimiser steps)."""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from tqdm.auto import tqdm


class IterationProgressBar(L.Callback):
    """Shows k / K iterations; refreshes the loss read-out every `refresh` iterations only, since
    reading a loss off the device waits for it."""

    def __init__(self, refresh: int = 25) -> None:
        self.refresh = max(1, refresh)
        self.bar: tqdm | None = None

    @rank_zero_only
    def on_train_start(self, trainer, pl_module) -> None:
        self.bar = tqdm(
            total=pl_module.hparams.iterations,
            initial=pl_module.k,
            desc="ACT",
            unit="it",
            dynamic_ncols=True,
            file=sys.stderr,
            smoothing=0.05,
        )

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.bar is None:
            return
        self.bar.update(pl_module.k - self.bar.n)
        if pl_module.k % self.refresh == 0:
            self._show(trainer, refresh=False)

    def _show(self, trainer, refresh: bool) -> None:
        shown = {}
        for key, value in trainer.callback_metrics.items():
            if key.startswith(("train/loss", "val/")):
                shown[key.split("/", 1)[1]] = f"{float(value):.4g}"
        self.bar.set_postfix(shown, refresh=refresh)

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self._show(trainer, refresh=True)  # the final read-out: the last evaluation's value too
            self.bar.close()
            self.bar = None

    @rank_zero_only
    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.bar is not None:  # ends the bar's line: what the run says next starts on its own
            self.bar.close()
            self.bar = None
