"""Training entry point: `python -m act_lightning.train experiment=cifar10 [key=value ...]`.

`train(cfg)` is a plain function (tests call it); `main()` is the thin Hydra shell.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from act_lightning.callbacks import AtomicCheckpointIO

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"


def wandb_key_configured() -> bool:
    """True when W&B can authenticate without prompting: WANDB_API_KEY or a `wandb login` netrc entry.
    The key itself is never read into logs."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def check_config(cfg: DictConfig) -> None:
    """Configuration errors that can be seen before anything is built, named by their keys."""
    if not isinstance(cfg.iterations, int) or cfg.iterations < 1:
        raise ValueError(f"iterations must be a positive integer (ACT iterations K), got {cfg.iterations!r}")
    gen = cfg.model.generator
    classes = cfg.data.get("num_classes")
    if gen.get("num_class_embeds") and not classes:
        raise ValueError(
            f"model.generator.num_class_embeds={gen.num_class_embeds}: a class-conditional network needs "
            "labels, but data.num_classes is null. Use a labelled data source or set num_class_embeds: null."
        )
    for name in ("generator", "discriminator"):
        net = cfg.model.get(name)
        if net is not None and "image_size" in net and net.image_size != cfg.data.image_size:
            raise ValueError(
                f"model.{name}.image_size={net.image_size} differs from data.image_size={cfg.data.image_size}"
            )


def run_name(cfg: DictConfig) -> str:
    """`<experiment>[<overrides>]`, e.g. `cifar10[model.gan_ratio=0.1,seed=1]`: tells sweep jobs apart."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().job.override_dirname
    except ValueError:  # composed without a Hydra run (tests, notebooks)
        overrides = ""
    return f"{cfg.experiment_name}[{overrides}]" if overrides else str(cfg.experiment_name)


def build_loggers(cfg: DictConfig) -> list:
    loggers = []
    for logger_cfg in (cfg.get("logger") or {}).values():
        if logger_cfg is None:
            continue
        if "WandbLogger" in logger_cfg.get("_target_", ""):
            offline = bool(logger_cfg.get("offline")) or os.environ.get("WANDB_MODE") in ("offline", "dryrun")
            if not offline and not wandb_key_configured():
                log.warning("No W&B API key configured: logging offline. Upload later with `wandb sync`.")
                offline = True
            name = logger_cfg.get("name") or run_name(cfg)
            loggers.append(hydra.utils.instantiate(logger_cfg, offline=offline, name=name))
        else:
            loggers.append(hydra.utils.instantiate(logger_cfg))
    return loggers


def train(cfg: DictConfig) -> dict[str, Any]:
    """Builds data, module, loggers, callbacks and trainer from `cfg`, then fits. Returns a summary."""
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    model: L.LightningModule = hydra.utils.instantiate(cfg.model)
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = build_loggers(cfg)
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    model.run_config = resolved
    for logger in loggers:
        logger.log_hyperparams(resolved)
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    return {
        "iteration": model._k,
        "run_dir": cfg.run_dir,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    summary = train(cfg)
    log.info("finished %d iterations; outputs in %s", summary["iteration"], summary["run_dir"])


if __name__ == "__main__":
    main()
