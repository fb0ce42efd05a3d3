"""`init_from=PATH`: a run that starts from another model's generator weights (docs/algorithm.md,
section 12): a diffusion model trained here (`model.objective=diffusion`), a converted diffusers model
(act_lightning.convert_diffusers), or any checkpoint of act_lightning.train.

Weights only: the generator, and its target (and EMA teacher) copies, take the file's generator weights;
the discriminator is the experiment's, newly initialised; optimisers, the iteration counter (0), the
curriculum, the augmentation and the EMAs' history start afresh. The file's generator is the network it
samples with (`target.*`: the EMA that was evaluated, as ECT transfers EDM's EMA), or `generator.*` when it
holds no target. A file that carries its generator's config (`act_generator`: a converted model) sets
`model.generator` to it, keeping the run's `model.generator.dropout` (a training setting: ECT's 0.2 on
CIFAR-10); otherwise the experiment's generator must have the file's shapes. The file is
read with torch's safe loader only (`weights_only=True`), never unpickling arbitrary objects.

A checkpoint of a run that started from a converted model sets `model.generator` the same way (its
history's first launch recorded that architecture), so such a run can start the next one.

A run that resumes from its own checkpoint (resume=auto) continues from it; `init_from` then only
supplies the generator's config, as at the first launch. When the file has gone since, or the launch does
not give it again, the run's history (`act_history`, which records a converted file's generator config and
the model it was converted from) supplies it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from act_lightning.checkpoints import read_checkpoint

log = logging.getLogger(__name__)
SOURCES = ("target.", "generator.")  # where a checkpoint keeps the generator it samples with, in order
MUST_MATCH = ("c_noise", "sigma_data")  # model keys outside model.generator that the function depends on


@dataclass(frozen=True)
class InitWeights:
    path: str
    weights: dict[str, Tensor]  # the generator's state dict (names relative to the generator)
    source: str  # the prefix they were read from
    generator: dict | None = None  # the file's own generator config (a converted model), as the file gives it
    converted_from: str | None = None  # the model a converted generator came from (convert_diffusers' folder)


def read_init(cfg: DictConfig) -> InitWeights | None:
    """The generator weights `cfg.init_from` names (None without it). Sets `cfg.model.generator` from
    the file when it carries its generator's config. Refused by name: a missing, unreadable or pickled
    file, one without generator weights, `ckpt_path` given too, and a file trained with another
    `model.c_noise` or `model.sigma_data` (the same weights would compute another function)."""
    path = cfg.get("init_from")
    if not path:
        return None
    if cfg.get("ckpt_path"):
        raise ValueError(
            f"init_from={path} and ckpt_path={cfg.ckpt_path}: give one (init_from starts a new run from a "
            "model's weights; ckpt_path continues a run)"
        )
    try:
        checkpoint = read_checkpoint(path, "init_from", mmap=True)
    except FileNotFoundError as err:
        if "init_sweep" not in str(OmegaConf.to_container(cfg, resolve=False).get("init_from")):
            raise
        # the path of the variants that tune ablation=init_pretrain's diffusion models (ect, ect_act, ...)
        raise FileNotFoundError(
            f"{err}: this variant tunes the diffusion model of the same seed that `python -m "
            "act_lightning.train -m ablation=init_pretrain` trains (init_sweep=its sweep folder, "
            "+init_sweep=... outside ablation=init); run that "
            "first, or give init_from=PATH (a checkpoint of experiment=quickstart_diffusion, or one that "
            "act_lightning.convert_diffusers wrote)"
        ) from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    state = state if isinstance(state, dict) else {}
    source = next((p for p in SOURCES if any(str(k).startswith(p) for k in state)), None)
    if source is None:
        raise ValueError(
            f"init_from={path}: holds no generator weights (state_dict with target.* or generator.*)"
        )
    weights = {k[len(source) :]: v for k, v in state.items() if k.startswith(source)}
    saved_model = (checkpoint.get("act_config") or {}).get("model") or {}
    for key in MUST_MATCH:
        if key in saved_model and saved_model[key] != cfg.model.get(key):
            raise ValueError(
                f"init_from={path} was trained with model.{key}={saved_model[key]}, this run has "
                f"model.{key}={cfg.model.get(key)}: set model.{key}={saved_model[key]}"
            )
    say_other_images(path, (checkpoint.get("act_config") or {}).get("data") or {}, cfg.data)
    # a converted model's architecture: the converted file's, or that of a run that started from one (its
    # history's first launch), so that a run tuned from a converted model can start the next run too
    started = (checkpoint.get("act_history") or [{}])[0]
    generator = checkpoint.get("act_generator") or started.get("init_generator")
    converted_from = checkpoint.get("act_converted_from") or started.get("init_converted_from")
    if generator is not None:
        use_generator(cfg, generator)
        say_outside_table(path, generator, cfg.model.get("schedule") or {})
    generator = None if generator is None else dict(generator)
    return InitWeights(
        str(path), weights, source, generator, None if converted_from is None else str(converted_from)
    )


def say_other_images(path, saved: dict, data: DictConfig) -> None:
    """A warning when the file's run trained on images of another size: a convolutional generator's
    weights load at any size, so a checkpoint of 32 x 32 images starts a 64 x 64 run without an error
    (deliberate for fine-tuning at a new resolution; a slip otherwise)."""
    size = saved.get("image_size")
    if size is not None and size != data.get("image_size"):
        log.warning(
            "init_from=%s was trained on %s x %s images (its data.image_size), this run trains on %s x %s: "
            "its weights load, but they learned another scale; make sure that is meant",
            path,
            size,
            size,
            data.get("image_size"),
            data.get("image_size"),
        )


def say_outside_table(path, generator: dict, schedule) -> None:
    """A warning where the run's sigma_max exceeds a converted DDPM's table (its timesteps' sigma_t): the
    network sees every level above as its last timestep. (Below the table's first level, 0.01 for
    linear betas from 1e-4, the images are all but clean, and the run's sigma_min 0.002 is common.)"""
    sigma_max = schedule.get("sigma_max")
    if sigma_max is None or not isinstance(generator.get("scheduler"), dict):
        return
    from act_lightning.nn.vp import vp_log_sigmas

    top = float(vp_log_sigmas(dict(generator["scheduler"]))[-1].exp())
    if float(sigma_max) > top:
        log.warning(
            "init_from=%s: the DDPM was trained on noise levels up to %.4g (its last timestep's sigma_t); "
            "this run's model.schedule.sigma_max=%g is above it, and the network sees every level above "
            "%.4g as that timestep",
            path,
            top,
            float(sigma_max),
            top,
        )


def use_generator(cfg: DictConfig, generator: dict) -> None:
    """Sets `model.generator` to a converted model's own architecture, not the experiment's, keeping the
    run's dropout (a training setting)."""
    generator = dict(generator)
    dropout = cfg.model.get("generator", {}).get("dropout")
    if dropout is not None and isinstance(generator.get("unet"), dict):
        generator["unet"] = {**generator["unet"], "dropout": float(dropout)}
    OmegaConf.update(cfg, "model.generator", generator, merge=False)


def load_init(model: nn.Module, init: InitWeights) -> None:
    """Loads the weights into the module's generator and its copies (target, EMA teacher), after
    checking every name and shape against `model.generator`."""
    own = model.generator.state_dict()
    missing = [k for k in own if k not in init.weights]
    unknown = [k for k in init.weights if k not in own]
    misshaped = [
        f"{k} {tuple(v.shape)} (model.generator builds {tuple(own[k].shape)})"
        for k, v in init.weights.items()
        if k in own and own[k].shape != v.shape
    ]
    problems = [
        f"{kind}: {', '.join(names[:6])}" + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        for kind, names in (("mis-shaped", misshaped), ("missing", missing), ("unknown", unknown))
        if names
    ]
    if problems:
        raise ValueError(
            f"init_from={init.path}: its generator ({init.source}*) does not match model.generator: "
            + "; ".join(problems)
            + ". Use the experiment the file was trained with, or its model.generator settings"
        )
    for net in (model.generator, getattr(model, "target", None), getattr(model, "teacher_ema", None)):
        if net is not None:
            net.load_state_dict(init.weights)


def describe(init: InitWeights) -> str:
    return f"{Path(init.path)} ({init.source}*, {len(init.weights)} tensors)"
