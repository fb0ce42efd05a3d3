"""Shared by the tests that fit an ACTModule directly (no train()): a bare CPU Trainer, a one-call fit, and
a fit that records the logged losses of every iteration."""

import lightning as L
from hydra.utils import instantiate

SMALL = ["debug=smoke", "data=synthetic", "data.batch_size=4"]  # the smallest config that trains
# the networks at a sixteenth of their widths (debug=smoke: an eighth), for the 256x256 ones on the CPU
THIN = ["model.generator.channel_divisor=16", "model.discriminator.channel_divisor=16"]


def params(module):
    """A detached copy of a module's parameters."""
    return [p.detach().clone() for p in module.parameters()]


def bare_trainer(accelerator: str = "cpu", **kwargs):
    """A one-device Trainer (the CPU unless told) with nothing attached: no logger, checkpoints, progress
    bar or validation."""
    return L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        **kwargs,
    )


def fit(cfg, model=None, **trainer_kwargs):
    """Fits `cfg.model` (or `model`) on `cfg.data` for `cfg.iterations` iterations; returns the model,
    the parameters of its networks before training, and the trainer."""
    L.seed_everything(0)
    dm = instantiate(cfg.data)
    model = instantiate(cfg.model) if model is None else model
    before = {
        "gen": params(model.generator),
        "target": params(model.target),
        "disc": params(model.discriminator) if model.discriminator is not None else None,
    }
    trainer = bare_trainer(**trainer_kwargs)
    trainer.fit(model, datamodule=dm)
    return model, before, trainer


LOGGED = ("train/loss_g", "train/loss_ct", "train/loss_adv", "train/loss_d", "train/aug_p")


class RecordLosses(L.Callback):
    """The logged values of LOGGED after each iteration, one dict per iteration."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.rows.append({k: float(metrics[k]) for k in LOGGED if k in metrics})


def fit_recording(cfg):
    """Fits `cfg.model` (seed 0) on `cfg.data`; returns the model and the rows of RecordLosses."""
    L.seed_everything(0)
    model = instantiate(cfg.model)
    record = RecordLosses()
    bare_trainer(callbacks=[record]).fit(model, datamodule=instantiate(cfg.data))
    return model, record.rows
