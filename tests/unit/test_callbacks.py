"""The sample grid and the progress bar (act_lightning.callbacks) with stand-ins for the trainer and the
module: when a grid is drawn, what it shows, and what the bar counts and reads out."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from act_lightning.callbacks import IterationProgressBar, SampleGrid


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
    grid.on_train_start(None, _module(0))
    for k in range(1, 11):
        grid.on_train_batch_end(None, _module(k), None, None, 0)
    grid.on_train_end(None, _module(10))
    assert drawn == [0, 4, 8, 10]
    drawn.clear()
    grid.on_train_start(None, _module(5))  # resumed: no grid of the start
    grid.on_train_end(None, _module(6))  # stopped early, to be resumed
    grid.on_train_end(None, _module(8, iterations=8))  # finished on a grid's iteration: drawn already
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
