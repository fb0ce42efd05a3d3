"""A CSV logger that a resumed run appends to: `metrics.csv` holds every logged row once."""

from __future__ import annotations

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from act_lightning.compat import ResumableExperimentWriter


class ResumableCSVLogger(CSVLogger):
    """`lightning.pytorch.loggers.CSVLogger` that continues a resumed run's metrics.csv (`resume_step`:
    the checkpoint's iteration, or None for a fresh run)."""

    def __init__(self, *args, resume_step: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:  # as CSVLogger.experiment, with the writer that keeps the rows
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ResumableExperimentWriter(self.log_dir, self._resume_step)
        return self._experiment
