"""Sample grids from fixed noise: PNG files under `samples/` and images in the logger (W&B)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

from act_lightning.checks import check_count


class SampleGrid(L.Callback):
    """Every `every_n_iterations` (and at the start and end of training) draws one-step samples of the
    target network from the same noise, so grids from different iterations are comparable."""

    def __init__(
        self,
        dirpath: str,
        every_n_iterations: int = 1000,
        num_samples: int = 64,
        upscale: int = 1,
        seed: int = 1234,
    ) -> None:
        check_count(every_n_iterations, "callbacks.samples.every_n_iterations")
        self.dirpath = Path(dirpath)
        self.every = every_n_iterations
        self.num_samples = num_samples
        self.upscale = upscale  # nearest-neighbour enlargement for tiny images (8x8 digits)
        self.seed = seed
        self.last_path: Path | None = None
        self._start = 0  # the iteration this launch's training started at

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = pl_module.k

    def _noise(self, pl_module) -> tuple[torch.Tensor, torch.Tensor | None]:
        g = torch.Generator().manual_seed(self.seed)
        dm = pl_module.trainer.datamodule
        shape = (self.num_samples, dm.channels, dm.image_size, dm.image_size)
        noise = torch.randn(shape, generator=g)
        labels = None
        if pl_module.hparams.num_classes:
            labels = torch.arange(self.num_samples) % pl_module.hparams.num_classes
        return noise, labels

    @rank_zero_only
    def write(self, trainer, pl_module) -> None:
        noise, labels = self._noise(pl_module)
        dev = pl_module.device
        images = pl_module.sample(noise.to(dev), None if labels is None else labels.to(dev)).float().cpu()
        if self.upscale > 1:
            images = F.interpolate(images, scale_factor=self.upscale, mode="nearest")
        grid = make_grid((images + 1) / 2, nrow=int(self.num_samples**0.5), padding=2, pad_value=1.0)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"iter_{pl_module.k:07d}.png"
        save_image(grid, path)
        save_image(grid, self.dirpath / "last.png")
        self.last_path = path
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples/one_step", [grid], step=pl_module.k)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples/one_step", grid, global_step=pl_module.k)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # the untrained network's grid, once training begins: not in a launch that stops before its first
        # iteration (a signal during the first evaluation), whose continuation writes it
        if pl_module.k == 0:
            self.write(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.k % self.every == 0:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        # not when stopped early to be resumed, nor in a launch that trained nothing (the continuation of a
        # run whose last evaluation gave way to a stop: the launch before drew this grid)
        finished = pl_module.k >= pl_module.hparams.iterations and pl_module.k > self._start
        if finished and pl_module.k % self.every != 0:
            self.write(trainer, pl_module)
