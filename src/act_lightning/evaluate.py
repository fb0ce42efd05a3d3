"""Evaluation entry point: `python -m act_lightning.evaluate ckpt=PATH [num_samples=50000 ...]`.

FID of `num_samples` samples of the checkpoint's target network for each sampler (1-step and 2-step by
default), against the reference statistics of its training config. Printed, and written as JSON next to
the checkpoint. `evaluate(cfg)` is a plain function (tests call it); `main()` is the thin Hydra shell.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from act_lightning.metrics.fid import (
    build_feature_extractor,
    check_reference_spec,
    reference_statistics,
    sample_statistics,
)
from act_lightning.metrics.frechet import frechet_distance
from act_lightning.module import nonfinite_tensors

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"


def load_checkpoint(path: str | Path) -> tuple[dict, DictConfig]:
    """The checkpoint (safe loader) and the training config stored in it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt={path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"ckpt={path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"ckpt={path}: not a checkpoint written by act_lightning.train (no state_dict)")
    if "act_config" not in checkpoint:
        raise ValueError(
            f"ckpt={path}: holds no training config (act_config); it was not written by act_lightning.train"
        )
    nonfinite = nonfinite_tensors(checkpoint["state_dict"])
    if nonfinite:
        raise ValueError(
            f"ckpt={path}: non-finite weights in {nonfinite}: the run diverged before this checkpoint; "
            "evaluate an earlier one"
        )
    return checkpoint, OmegaConf.create(checkpoint["act_config"])


def build_model(checkpoint: dict, run: DictConfig, device: torch.device | str = "cpu"):
    """The checkpoint's generator and target network (an ACTModule in eval mode on `device`), built from
    its training config. No discriminator and no consistency distance are built: sampling needs neither
    (and LPIPS' VGG weights need not be present)."""
    from hydra.utils import instantiate

    # Standard memory format, eager: the images do not depend on how the run trained (export's too).
    model = instantiate(
        run.model, distance="l2", discriminator=None, gan_ratio=0.0, channels_last=False, compile=False
    )
    state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("discriminator.")}
    model.load_state_dict(state)
    return model.to(device).eval()


def load_model(path: str | Path, device: torch.device | str = "cpu"):
    """(model, run config, checkpoint) of the checkpoint at `path` (see `build_model`)."""
    checkpoint, run = load_checkpoint(path)
    return build_model(checkpoint, run, device), run, checkpoint


EVAL_DEFAULTS = {  # a run trained without an evaluation callback (eval: null) is scored with these
    "features": "inception",
    "key": "val/fid",
    "inception_weights": None,
    "download": True,
    "reference": "train",
    "reference_cache": None,
    "reference_max_images": None,
    "quantize": "round",
}


def _apply_overrides(run: DictConfig, cfg: DictConfig) -> DictConfig:
    """The run's evaluation settings (its FrechetEvaluation arguments) and data, with the non-null keys
    of `cfg.eval` and `cfg.data` put over them."""
    ev = OmegaConf.merge(EVAL_DEFAULTS, run.get("eval") or {})
    for key, value in (cfg.get("eval") or {}).items():
        if value is not None:
            ev[key] = value
    for key, value in (cfg.get("data") or {}).items():
        if value is not None:
            run.data[key] = value
    return ev


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluates `cfg.ckpt`; returns (and writes) the results."""
    from hydra.utils import instantiate

    from act_lightning.metrics.inception import resolve_inception_weights

    ckpt = Path(cfg.ckpt)
    checkpoint, run = load_checkpoint(ckpt)
    ev = _apply_overrides(run, cfg)
    unknown = [name for name in cfg.samplers if name not in cfg.taus]
    if unknown:
        raise ValueError(
            f"samplers={list(cfg.samplers)}: {', '.join(unknown)} not in taus ({', '.join(cfg.taus)}); "
            "add one with '+taus.NAME=[t_2,...]'"
        )
    if cfg.num_samples < 2 or cfg.batch_size < 1:
        raise ValueError(
            f"num_samples must be >= 2 and batch_size >= 1; got {cfg.num_samples}, {cfg.batch_size}"
        )
    if cfg.net not in ("target", "generator"):
        raise ValueError(f"net must be target or generator, got {cfg.net!r}")
    # Everything that can be missing is checked before the networks are built.
    weights = (
        resolve_inception_weights(ev.inception_weights, ev.download) if ev.features == "inception" else None
    )
    check_reference_spec(ev.reference)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )

    model = build_model(checkpoint, run, device)
    net = model.target if cfg.net == "target" else model.generator
    h = model.hparams

    extractor = (
        build_feature_extractor(ev.features, inception_weights=weights, quantize=ev.quantize)
        .to(device)
        .eval()
    )
    datamodule = instantiate(run.data) if str(ev.reference) == "train" else None
    reference = reference_statistics(
        extractor,
        ev.reference,
        datamodule=datamodule,
        features=ev.features,
        cache=ev.reference_cache,
        max_images=ev.reference_max_images,
        batch_size=cfg.batch_size,
        device=device,
    )

    name = ev.key.split("/")[-1]  # fid (Inception features) or fd (the quickstart's)
    shape = (run.data.channels, run.data.image_size, run.data.image_size)
    results: dict[str, Any] = {}
    for sampler in cfg.samplers:
        taus = [float(h.sigma_max), *(float(t) for t in cfg.taus[sampler])]

        def sample(noise, labels, chunk, taus=taus):
            g = None
            if len(taus) > 1:  # the fresh noise of later steps, also fixed per chunk
                g = torch.Generator(noise.device).manual_seed(cfg.seed * 1_000_003 + chunk + 7919)
            return model.sample(noise, labels, net=net, taus=taus, generator=g)

        start = time.perf_counter()
        with tqdm(total=cfg.num_samples, desc=f"{sampler} {name.upper()}", unit="img") as bar:
            stats = sample_statistics(
                sample,
                extractor,
                cfg.num_samples,
                cfg.batch_size,
                shape,
                h.num_classes,
                cfg.seed,
                device,
                progress=bar.update,
            )
        value = frechet_distance(*stats, *reference)
        results[sampler] = {name: value, "taus": taus, "seconds": round(time.perf_counter() - start, 1)}
        log.info("%s %s = %.4f (%d samples)", sampler, name.upper(), value, cfg.num_samples)

    summary = {
        "checkpoint": str(ckpt.resolve()),
        "iteration": int(checkpoint["state_dict"]["iteration"]),
        "experiment": run.get("experiment_name"),
        "net": cfg.net,
        "num_samples": cfg.num_samples,
        "seed": cfg.seed,
        "features": ev.features,
        "reference": str(ev.reference),
        "quantize": ev.quantize,
        "device": str(device),
        "results": results,
    }
    output = Path(cfg.output) if cfg.output else ckpt.with_name(ckpt.name + ".eval.json")
    output.write_text(json.dumps(summary, indent=2))
    summary["output"] = str(output)
    return summary


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    summary = evaluate(cfg)
    for sampler, result in summary["results"].items():
        value = next(iter(result.values()))
        print(f"{sampler}: {value:.4f}")
    print(f"written to {summary['output']}")


if __name__ == "__main__":
    main()
