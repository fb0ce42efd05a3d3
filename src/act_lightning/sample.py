"""Sampling entry point: `python -m act_lightning.sample ckpt=PATH [num_samples=64 seed=0 out=DIR ...]`.

Draws `num_samples` images from a checkpoint's target network (or its generator), in one step or, with
`taus`, in several (Song et al. 2023, Algorithm 1), and writes `out/samples.npz` in the layout the ADM and
EDM evaluators read (`arr_0`: uint8 N x H x W x C; `arr_1`: int64 labels of a class-conditional model)
and `out/grid.png` (the first 64 images). The noise of image i (and its label, when drawn at random) comes
from a generator seeded by (seed, i): the same seed gives the same noise (and images, up to float
rounding) whatever the batch size and however many images are drawn. `sample(cfg)` is a plain function
(tests call it); `main()` is the thin Hydra shell.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig
from omegaconf.errors import MissingMandatoryValue
from torch import Tensor
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from act_lightning.checkpoints import load_model, trained_iteration
from act_lightning.checks import check_count
from act_lightning.commands import (
    CONFIG_DIR,
    REFUSED,
    check_net,
    check_out_folder,
    refuse,
    resolve_device,
    write_npz,
)
from act_lightning.seeds import LABEL, check_seed, image_noise, mix_seed

log = logging.getLogger(__name__)

GRID_IMAGES = 64
# The second step's noise level of the two-step sampler when the run's config names none (a checkpoint
# from before `two_step_tau`): t_22 of the 40-level Karras grid from 80 to 0.002, openai/consistency_models'.
TWO_STEP_TAU = 1.3824


def two_step_tau(run: DictConfig) -> float:
    """The run's two-step sampler: its second step's noise level (`two_step_tau`, per experiment)."""
    value = run.get("two_step_tau")
    return TWO_STEP_TAU if value is None else float(value)


def enlarged(images: Tensor, side: int = 64) -> Tensor:
    """Images under `side` pixels enlarged (nearest neighbour, a whole factor) to `side` or more, for the
    figures (`sample`'s grid, `edit`'s panels): tiny images otherwise make a figure of a few dozen pixels."""
    size = images.shape[-1]
    return (
        images if size >= side else F.interpolate(images, scale_factor=math.ceil(side / size), mode="nearest")
    )


def check_taus(taus: Any, sigma_min: float, sigma_max: float) -> list[float]:
    """The noise levels of the steps after the first (which is at sigma_max): a list of numbers,
    decreasing, in (sigma_min, sigma_max)."""
    numbers = isinstance(taus, Sequence) and not isinstance(taus, str)
    if not numbers or any(isinstance(t, bool) or not isinstance(t, (int, float)) for t in taus):
        raise ValueError(f"taus={taus}: a list of noise levels, e.g. taus=[0.821] (or [] for one step)")
    taus = [float(t) for t in taus]
    levels = [sigma_max, *taus]
    if any(a <= b for a, b in zip(levels, levels[1:])) or (taus and taus[-1] <= sigma_min):
        again = (
            " (sigma_max itself is not listed, as sample.json records it)" if taus[:1] == [sigma_max] else ""
        )
        raise ValueError(
            f"taus={taus}: the noise levels after the first step (at sigma_max={sigma_max:g}) must decrease "
            f"and stay above sigma_min={sigma_min:g}{again}, e.g. taus=[0.821]"
        )
    return taus


def class_labels(
    spec: Any, num_samples: int, num_classes: int | None, seed: int, names: list[str] | None = None
) -> Tensor | None:
    """One label per image: `random` (uniform, image i's from (seed, i)), one class, or a list repeated
    over the images; None for an unconditional model. A class is its index, or its name where the run's
    data named their classes (`names`, a folder's class sub-folders: the checkpoint's act_label_names)."""
    if not num_classes:
        if spec not in (None, "random"):
            raise ValueError(f"class_labels={spec}: this model is unconditional (it takes no class labels)")
        return None
    if spec is None or spec == "random":
        draws = [
            torch.randint(num_classes, (), generator=torch.Generator().manual_seed(mix_seed(seed, i, LABEL)))
            for i in range(num_samples)
        ]
        return torch.stack(draws)
    values = given_indices(spec, names)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"class_labels must be random, a class index or a list of them; got {spec}")
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise ValueError(
            f"class_labels={spec}: {bad} out of range for {num_classes} classes (0..{num_classes - 1})"
        )
    return torch.tensor(values).repeat(math.ceil(num_samples / len(values)))[:num_samples]


def named_class(name: str, spec: Any, names: list[str] | None, key: str = "class_labels") -> int:
    """The index of the class called `name` (`names`: the checkpoint's class names, or None), given as
    `key`=`spec`."""
    if names is None:
        example = "[0,3]" if key == "class_labels" else "3"
        raise ValueError(
            f"{key}={spec}: {name!r} is no class index, and this model's classes have no names (only "
            f"a run on a folder of class sub-folders records them); give indices, e.g. {key}={example}"
        )
    if name not in names:
        shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
        raise ValueError(f"{key}={spec}: no class is called {name!r}; this model's classes: {shown}")
    return names.index(name)


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8, rounded (as images are saved)."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Draws the samples of `cfg` and writes them to `cfg.out`; returns a summary."""
    check_count(cfg.num_samples, "num_samples")
    check_count(cfg.batch_size, "batch_size")
    check_net(cfg.net)
    check_seed(cfg.seed)
    out = check_out_folder(cfg.out, result="samples.npz", overwrite=cfg.get("overwrite", False))
    device = resolve_device(cfg.device)
    model, run, checkpoint = load_model(cfg.ckpt, device)
    s = model.schedule
    taus = [float(s.sigma_max), *model.check_later_levels(check_taus(cfg.taus, s.sigma_min, s.sigma_max))]
    names = checkpoint.get("act_label_names")
    labels = class_labels(cfg.class_labels, cfg.num_samples, model.hparams.num_classes, cfg.seed, names)
    net = model.target if cfg.net == "target" else model.generator
    shape = (run.data.channels, run.data.image_size, run.data.image_size)

    out.mkdir(parents=True, exist_ok=True)
    arrays, first = [], []
    with tqdm(total=cfg.num_samples, desc="sampling", unit="img") as bar:
        for start in range(0, cfg.num_samples, cfg.batch_size):
            indices = range(start, min(start + cfg.batch_size, cfg.num_samples))
            images = sample_images(model, net, indices, shape, taus, labels, cfg.seed, device)
            arrays.append(to_uint8(images.cpu()))
            if sum(len(x) for x in first) < GRID_IMAGES:
                first.append(images.cpu())
            bar.update(len(indices))
    images = np.concatenate(arrays)
    payload = {"arr_0": images}
    if labels is not None:
        payload["arr_1"] = labels.numpy().astype(np.int64)
    write_npz(out / "samples.npz", **payload)
    grid = torch.cat(first)[:GRID_IMAGES]
    grid = enlarged(grid)  # 64 quickstart digits made an 82 px image
    grid = make_grid((grid + 1) / 2, nrow=int(math.ceil(len(grid) ** 0.5)), padding=2, pad_value=1.0)
    save_image(grid, out / "grid.png")
    summary = {
        "checkpoint": str(Path(cfg.ckpt).resolve()),
        "iteration": trained_iteration(checkpoint),
        "net": cfg.net,
        "num_samples": int(cfg.num_samples),
        "seed": int(cfg.seed),
        **(heun_record(model) or {"taus": taus}),  # a diffusion model's sampler has no taus
        "class_labels": labels_record(cfg.class_labels, labels, names),  # names as their indices
        "shape": list(images.shape),
        "samples": str(out / "samples.npz"),
        "grid": str(out / "grid.png"),
    }
    (out / "sample.json").write_text(json.dumps(summary, indent=2))
    return summary


def labels_record(spec: Any, labels: Tensor | None, names: list[str] | None = None) -> str | list[int] | None:
    """What `class_labels` drew, for sample.json: `random`, or the classes given (one, or the list repeated
    over the images); None for an unconditional model. Each image's label is in samples.npz (`arr_1`)."""
    if labels is None:
        return None
    if spec is None or spec == "random":
        return "random"
    return [int(v) for v in given_indices(spec, names)]


def given_indices(spec: Any, names: list[str] | None) -> list:
    """`class_labels` given as classes, each name as its index (`names`; unchecked otherwise)."""
    return [named_class(v, spec, names) if isinstance(v, str) else v for v in given_classes(spec)]


def given_classes(spec: Any) -> list:
    """`class_labels` given as one class or a list of them, as a list (unchecked)."""
    return list(spec) if isinstance(spec, (list, tuple, ListConfig)) else [spec]


@torch.no_grad()
def heun_record(model) -> dict[str, Any]:
    """What sampled a diffusion model (model.objective=diffusion): EDM's Heun sampler, not the taus."""
    if model.hparams.get("objective", "consistency") != "diffusion":
        return {}
    return {"sampler": "heun", "heun_steps": int(model.hparams.heun_steps)}


def sample_images(model, net, indices: range, shape, taus, labels, seed: int, device) -> Tensor:
    """Images `indices` in [-1, 1]: one step at taus[0] = sigma_max, then one per later tau, each image's
    noise its own (see `image_noise`)."""
    noise = image_noise(seed, indices, shape).to(device)
    y = None if labels is None else labels[indices.start : indices.stop].to(device)
    step_noise = lambda step: image_noise(seed, indices, shape, stream=step)  # noqa: E731
    return model.sample(noise, y, net=net, taus=taus[1:], step_noise=step_noise)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="sample")
def main(cfg: DictConfig) -> None:
    try:
        summary = sample(cfg)
    except (
        *REFUSED,
        MissingMandatoryValue,
    ) as err:  # a bad or missing option or checkpoint, named by its key
        refuse(err)
    print(f"{summary['num_samples']} samples written to {summary['samples']} (grid: {summary['grid']})")


if __name__ == "__main__":
    main()
