"""Callbacks observe training (progress, samples, metrics, checkpoints, divergence); none changes its
dynamics."""

from act_lightning.callbacks.checkpoint import AtomicCheckpointIO, LastCheckpoint, TakeStopSignals
from act_lightning.callbacks.evaluation import FrechetEvaluation
from act_lightning.callbacks.guard import DivergenceError, DivergenceGuard
from act_lightning.callbacks.progress import IterationProgressBar
from act_lightning.callbacks.samples import SampleGrid

__all__ = [
    "AtomicCheckpointIO",
    "DivergenceError",
    "DivergenceGuard",
    "FrechetEvaluation",
    "IterationProgressBar",
    "LastCheckpoint",
    "SampleGrid",
    "TakeStopSignals",
]
