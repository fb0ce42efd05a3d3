"""Periodic Fréchet-distance evaluation of the target network's one-step samples.

The feature extractor is pluggable: the quickstart uses a small digit classifier; the paper's data sets
use Inception (FID). Each rank draws its share of the samples; the feature statistics are summed across
ranks, so the value is the same on one device or many. A callback observes: it never changes training.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from act_lightning.metrics.frechet import FeatureStatistics, frechet_distance


def build_feature_extractor(name: str, **kwargs) -> nn.Module:
    """Feature extractors by name: 'digits' (quickstart)."""
    if name == "digits":
        from act_lightning.metrics.digits import DigitsFeatures

        return DigitsFeatures.trained(seed=kwargs.get("seed", 0))
    raise ValueError(f"eval.features must be 'digits', got {name!r}")


class FrechetEvaluation(L.Callback):
    def __init__(
        self,
        run_dir: str,
        features: str | Callable[[], nn.Module] = "digits",
        every_n_iterations: int = 500,
        num_samples: int = 1000,
        batch_size: int = 500,
        key: str = "val/fd",
        label: str = "Fréchet distance",
        seed: int = 0,
    ) -> None:
        if every_n_iterations < 1 or num_samples < 2:
            raise ValueError("eval.every must be >= 1 and eval.num_samples >= 2")
        self.run_dir = Path(run_dir)
        self.features_spec = features
        self.every = every_n_iterations
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.key = key
        self.label = label
        self.seed = seed
        self.extractor: nn.Module | None = None
        self.reference: tuple | None = None
        self.references: dict[str, float] = {}  # FD of held-out real images and of noise
        self.history: list[tuple[int, float]] = []

    # -- set-up -----------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.extractor is not None:
            return
        spec = self.features_spec
        self.extractor = build_feature_extractor(spec, seed=self.seed) if isinstance(spec, str) else spec()
        self.extractor.to(pl_module.device).eval().requires_grad_(False)

    @torch.no_grad()
    def _statistics(self, batches, device) -> tuple:
        stats = FeatureStatistics(self.extractor.num_features).to(device)
        for images in batches:
            stats.update(self.extractor(images.to(device)))
        return stats.compute()

    def on_train_start(self, trainer, pl_module) -> None:
        device = pl_module.device
        dm = trainer.datamodule
        self.extractor.to(device)
        loader = dm.reference_dataloader(self.batch_size)
        self.reference = self._statistics((x for x, _ in loader), device)
        if not self.references:
            if hasattr(dm, "build_held_out_dataset"):
                held = torch.stack([x for x, _ in dm.build_held_out_dataset()])
                self.references["real"] = self._fd(self._statistics(held.split(self.batch_size), device))
            g = torch.Generator().manual_seed(self.seed + 99)
            noise = (
                torch.rand((self.num_samples, dm.channels, dm.image_size, dm.image_size), generator=g) * 2 - 1
            )
            self.references["noise"] = self._fd(self._statistics(noise.split(self.batch_size), device))
        self._log_direct(trainer, {f"{self.key}_{name}": v for name, v in self.references.items()})
        if pl_module._k == 0:
            self._log_direct(trainer, {self.key: self.evaluate(trainer, pl_module)})

    def _fd(self, stats) -> float:
        return frechet_distance(*stats, *self.reference)

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, trainer, pl_module) -> float:
        device = pl_module.device
        dm = trainer.datamodule
        world, rank = trainer.world_size, trainer.global_rank
        per_rank = math.ceil(self.num_samples / world)
        g = torch.Generator().manual_seed(self.seed * 7919 + rank)  # same noise at every evaluation
        stats = FeatureStatistics(self.extractor.num_features).to(device)
        for start in range(0, per_rank, self.batch_size):
            n = min(self.batch_size, per_rank - start)
            noise = torch.randn((n, dm.channels, dm.image_size, dm.image_size), generator=g).to(device)
            labels = None
            if pl_module.hparams.num_classes:
                labels = torch.randint(pl_module.hparams.num_classes, (n,), generator=g).to(device)
            stats.update(self.extractor(pl_module.sample(noise, labels)))
        value = self._fd(stats.compute())
        self.history.append((pl_module._k, value))
        self._write(pl_module)
        return value

    def _log_direct(self, trainer, metrics: dict[str, float]) -> None:
        """For hooks where LightningModule.log is not allowed (train start and end)."""
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module._k % self.every == 0:
            # through LightningModule.log, so the value also reaches callback_metrics (progress bar,
            # best-checkpoint monitors)
            pl_module.log(self.key, self.evaluate(trainer, pl_module), on_step=True, on_epoch=False)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.history or self.history[-1][0] != pl_module._k:
            self._log_direct(trainer, {self.key: self.evaluate(trainer, pl_module)})
            for logger in trainer.loggers:
                logger.save()

    # -- outputs ----------------------------------------------------------------------------------
    @rank_zero_only
    def _write(self, pl_module) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        summary = {
            "metric": self.key,
            "history": [{"iteration": k, "value": v} for k, v in self.history],
            "references": self.references,
        }
        if self.history and "real" in self.references and "noise" in self.references:
            fd, real, noise = self.history[-1][1], self.references["real"], self.references["noise"]
            summary["normalised"] = (fd - real) / (noise - real)  # 0 = as good as real data, 1 = noise
        (self.run_dir / "metric_summary.json").write_text(json.dumps(summary, indent=2))
        plot_curve(self.history, self.references, self.run_dir / "fid_curve.png", self.label)

    def state_dict(self) -> dict:
        return {"history": self.history, "references": self.references}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [tuple(x) for x in state_dict.get("history", [])]
        self.references = dict(state_dict.get("references", {}))


def plot_curve(history, references: dict[str, float], path: Path, label: str) -> None:
    """The metric against ACT iterations, with the reference values as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if history:
        ks, vs = zip(*history)
        ax.plot(ks, vs, marker="o", label="one-step samples (target network)")
    styles = {"real": ("tab:green", "held-out real images"), "noise": ("tab:red", "uniform noise")}
    for name, value in references.items():
        colour, text = styles.get(name, ("gray", name))
        ax.axhline(value, ls="--", color=colour, label=f"{text}: {value:.1f}")
    ax.set_yscale("log")
    ax.set_xlabel("ACT iteration")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
