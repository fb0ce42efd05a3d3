"""What a resumed run may change: a launch's config against the one its checkpoint holds.

A run that continues from a checkpoint (its own `last.ckpt` with resume=auto, or another run's with
`ckpt_path=`) trains on with the config the checkpoint holds (`act_config`). Before anything is built or
written, the launch's config is compared with it. Keys that only change how the run is observed or where
it runs (`MAY_CHANGE`) may differ, and so may the devices as long as the global batch stays the same; any
other difference refuses the launch, naming each key with both values. `resume_changes=[KEY, ...]`
allows a deliberate change of those keys (a key allows every key under it); each such change is recorded
in the run's history (`act_history` in every later checkpoint, and the launch's log). The networks' shapes
and the optimisers' settings cannot change (`FIXED`), but for the learning rates (`LEARNING_RATES`), which
`set_learning_rates` puts into the restored optimisers.

A weights-only checkpoint (act_lightning.convert_reference) starts a new run from its networks: only the
keys that shape the networks must match.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from typing import Any

import torch

from act_lightning.checks import check_names
from act_lightning.compat import set_last_lr

log = logging.getLogger(__name__)

# Keys that may differ from the checkpoint's (with every key under them). What a run trains is fixed by
# the rest: the data and its order, the networks, the schedule, the losses, the optimisers, the
# precision, the seed and the number of iterations (the curriculum N(k) and mu(k) depend on it).
MAY_CHANGE = (
    # where the run, its data and its weights files live; how this launch ends
    "run_dir",
    "ckpt_path",
    "init_from",  # where a new run took its first weights; a resumed run continues from its own
    "resume",
    "resume_changes",
    "two_step_tau",  # how the trained model is sampled afterwards (evaluate's 2-step), not what it trains
    "stop_after",
    "paths",
    "data.root",
    "data.download",
    "data.verify",
    "model.lpips_weights",
    # the machine: threads, devices and nodes (with the same global batch, compared on its own), how data
    # are loaded and where they are held, and the speed options (they compute the same thing)
    "threads",
    "compile_cache",
    "model.optimizer.foreach",  # the optimisers' multi-tensor update: `set_foreach` puts the launch's in
    "model.d_optimizer.foreach",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.benchmark",
    "trainer.deterministic",
    "trainer.default_root_dir",
    "data.batch_size",
    "data.global_batch_size",
    "data.num_workers",
    "data.pin_memory",
    "data.persistent_workers",
    "data.in_memory",
    "model.speed",  # but for NUMERICS
    # how the run is observed: loggers, logging cadence, progress, sample grids, checkpoint cadence and
    # snapshots, the divergence guard, and the evaluation's cadence and resources (not what it measures:
    # its history and best checkpoint compare values measured one way)
    "logger",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "callbacks",  # callbacks.eval repeats eval, whose measuring keys are compared there
    "guard",
    "eval.every",
    "eval.batch_size",
    "eval.inception_weights",
    "eval.download",
    "eval.reference_cache",
    "eval.run_dir",
    "eval.best_checkpoint",
    "eval.label",
)
# The speed options that change the numerics (bf16): they are compared as what the run trains is.
NUMERICS = ("model.speed.bf16_lpips", "model.speed.bf16_target")
# What a weights-only checkpoint must match: the keys that shape the networks.
NETWORK_KEYS = (
    "model.generator",
    "model.discriminator",
    "data.image_size",
    "data.channels",
    "data.num_classes",
)
GLOBAL_BATCH = "data.global_batch_size"  # the name the global batch is compared (and allowed) under
ABSENT = object()
# Keys no resume can change: the networks' shapes (the weights have them) and the optimisers' settings
# (their restored state keeps its own betas and moments), but for their learning rates: `resume_changes`
# may name those, and `set_learning_rates` puts the launch's into the restored optimisers.
FIXED = (*NETWORK_KEYS, "model.optimizer", "model.d_optimizer")
LEARNING_RATES = ("model.optimizer.lr", "model.d_optimizer.lr")
FEW = 6  # more differences than this: another experiment (not offered as resume_changes)


def differences(old: Any, new: Any, key: str = "") -> dict[str, tuple[Any, Any]]:
    """Every key whose value differs between two plain configs, with (old, new); a subtree present on
    one side only is one difference (ABSENT on the other side)."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = {}
        for name in sorted(old.keys() | new.keys(), key=str):
            sub = f"{key}.{name}" if key else str(name)
            found.update(differences(old.get(name, ABSENT), new.get(name, ABSENT), sub))
        return found
    return {} if old == new else {key: (old, new)}


def covered(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in patterns)


def world_size(trainer: dict) -> int | None:
    """The processes a Trainer built from this config trains on (devices x nodes), counted as Lightning
    counts them; None when that cannot be told before the Trainer is built."""
    devices, accelerator = trainer.get("devices", 1), str(trainer.get("accelerator", "auto"))
    if isinstance(devices, str) and devices not in ("auto", "-1"):
        parts = [d for d in devices.split(",") if d.strip()]
        devices = len(parts) if "," in devices else int(devices) if devices.strip().isdigit() else None
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    if devices in ("auto", "-1", -1):
        gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        devices = torch.cuda.device_count() if gpu else (os.cpu_count() if devices != "auto" else 1)
    if not isinstance(devices, int) or devices < 1:
        return None
    return devices * int(trainer.get("num_nodes", 1) or 1)


def global_batch(config: dict, world: int | None) -> int | None:
    """Images per half-batch over all devices: data.global_batch_size, else data.batch_size on each."""
    data = config.get("data") or {}
    if data.get("global_batch_size"):
        return int(data["global_batch_size"])
    return None if world is None or "batch_size" not in data else int(data["batch_size"]) * world


def _show(value: Any) -> str:
    if value is ABSENT:
        return "<not set>"
    # as the command line writes it: true, false, null (json's), lists and dicts in json
    text = (
        json.dumps(value, default=str)
        if isinstance(value, (dict, list, bool)) or value is None
        else str(value)
    )
    return text if len(text) <= 60 else text[:57] + "..."


def refused(changes: dict[str, tuple[Any, Any]], limit: int = 12) -> str:
    """`key=old (now new), ...`, at most `limit` keys (and how many more)."""
    shown = [
        f"the global batch of {a} images per half-batch (now {b}; {GLOBAL_BATCH}={a} keeps it on any devices)"
        if k == GLOBAL_BATCH
        else f"{k}={_show(a)} (now {_show(b)})"
        for k, (a, b) in list(changes.items())[:limit]
    ]
    more = f" and {len(changes) - limit} more" if len(changes) > limit else ""
    return ", ".join(shown) + more


def has_key(config: dict, key: str) -> bool:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def referenced(raw: dict, key: str) -> str | None:
    """The key that `key` repeats by a plain interpolation in the unresolved config: `model.iterations`
    (`${iterations}`) repeats `iterations`; `callbacks.eval.every` (under `${eval}`) repeats `eval.every`."""
    node: Any = raw
    parts = key.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, str):
            match = re.fullmatch(r"\$\{([\w.]+)\}", node)
            return ".".join([match.group(1), *parts[i:]]) if match else None
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    match = re.fullmatch(r"\$\{([\w.]+)\}", node) if isinstance(node, str) else None
    return match.group(1) if match else None


def added_keys(overrides: Iterable[str]) -> list[str]:
    """The keys a launch's command line adds to the config (`+key=value`, `++key=value`)."""
    return [o.lstrip("+").split("=", 1)[0] for o in overrides if o.startswith("+")]


def compare(
    saved: dict,
    launch: dict,
    raw: dict,
    weights_only: bool,
    saved_world: int | None,
    added: Iterable[str] = (),
) -> dict:
    """The differences between the checkpoint's config and the launch's (`raw`: unresolved) that change
    what the run trains (for a weights-only checkpoint: the networks' shapes), with the global batch as
    `GLOBAL_BATCH`. A key that repeats another (an interpolation) is named once, by the key it repeats;
    keys the checkpoint's config predates (an earlier version wrote it) take the launch's values, but for
    those the command line adds (`added`: `+data.hflip=true` changes what the run trains)."""
    added = list(added)
    found = {k: v for k, v in differences(saved, launch).items() if v[0] is not ABSENT or covered(k, added)}
    found = {k: v for k, v in found.items() if found.get(referenced(raw, k) or "", ABSENT) != v}
    if weights_only:
        adversarial = float(launch["model"]["schedule"].get("gan_ratio", 0)) > 0
        keys = [k for k in NETWORK_KEYS if adversarial or k != "model.discriminator"]
        return {k: v for k, v in found.items() if covered(k, keys)}
    found = {k: v for k, v in found.items() if covered(k, NUMERICS) or not covered(k, MAY_CHANGE)}
    if "lpips" not in {(c.get("model") or {}).get("distance", "lpips") for c in (saved, launch)}:
        found.pop("model.speed.bf16_lpips", None)  # LPIPS's precision, where the loss has no LPIPS
    # where the Inception weights lie may change, not whether they are the random network of smoke runs:
    # its FIDs and the real network's are not one history
    weights = [(c.get("eval") or {}).get("inception_weights", ABSENT) for c in (saved, launch)]
    if (weights[0] == "random") != (weights[1] == "random"):
        found["eval.inception_weights"] = tuple(weights)
    was = global_batch(saved, saved_world or world_size(saved.get("trainer") or {}))
    now = global_batch(launch, world_size(launch.get("trainer") or {}))
    if None not in (was, now) and was != now:
        found[GLOBAL_BATCH] = (was, now)
    return found


def what_to_do(rest: dict, fixed: list[str], fresh: str) -> str:
    """The advice of a refused resume: resume_changes for a few keys it can change, else its own config."""
    if len(rest) > FEW:  # another experiment, not a change of one run
        return f"Resume it with its own config, or {fresh}"
    if fixed:
        follows = (  # set by the resolver act.lazy_beta2, so a change of r1_interval named it
            " (model.d_optimizer.betas follows model.r1_interval: lazy R1 corrects D's beta2 by it)"
            if "model.d_optimizer.betas" in fixed
            else ""
        )
        return (
            f"{', '.join(fixed)} cannot change on resume{follows} (the checkpoint's networks and "
            "optimiser state keep theirs; of the optimisers' settings only the learning rates can, with "
            f"resume_changes): resume with the checkpoint's values, or {fresh}"
        )
    return (
        "Resume with the checkpoint's values, change them deliberately with "
        f"resume_changes=[{','.join(rest)}] (recorded in the run's history), or {fresh}"
    )


def check_resume(
    checkpoint: dict, launch: dict, raw: dict, where: str, fresh: str, overrides: Iterable[str] = ()
) -> dict[str, list]:
    """The deliberate changes (`resume_changes`) this launch makes to the run it continues, as
    {key: [old, new]} (a side without the key: None); any other difference of what the run trains is
    refused, by name (ValueError), `where` naming the checkpoint and `fresh` how to start a new run
    instead. `launch` is the launch's resolved config, `raw` the same unresolved, `overrides` its
    command line's."""
    from omegaconf import OmegaConf

    from act_lightning.checkpoints import upgrade_run_config

    if "act_config" not in checkpoint:  # not written by act_lightning.train: nothing to compare with
        return {}
    saved = OmegaConf.to_container(upgrade_run_config(OmegaConf.create(checkpoint["act_config"])))
    allowed = check_names(launch.get("resume_changes") or [], "resume_changes", "[iterations]")
    unknown = [k for k in allowed if k != GLOBAL_BATCH and not (has_key(saved, k) or has_key(launch, k))]
    if unknown:
        raise ValueError(f"resume_changes lists {', '.join(unknown)}: not a key of the config")
    weights_only = bool(checkpoint.get("act_weights_only"))
    history = checkpoint.get("act_history") or [{}]
    world = history[-1].get("world_size")
    changes = compare(saved, launch, raw, weights_only, world, added_keys(overrides))
    if weights_only and changes:
        raise ValueError(
            f"{where} holds networks of another shape: {refused(changes)}; pass the experiment it was "
            "converted for (experiment=NAME) and leave its networks' keys as they are"
        )
    fixed = [k for k in changes if covered(k, FIXED) and k not in LEARNING_RATES]
    rest = {k: v for k, v in changes.items() if k in fixed or not covered(k, allowed)}
    if rest:
        raise ValueError(
            f"{where} was trained with another config: {refused(rest)}. {what_to_do(rest, fixed, fresh)}"
        )
    plain = lambda value: None if value is ABSENT else value  # noqa: E731 - a key not set is kept as null
    return {k: [plain(a), plain(b)] for k, (a, b) in changes.items()}


def set_learning_rates(optimizers, schedulers, factories, nets) -> list[tuple[float, float]]:
    """Puts the launch's base learning rates into optimisers restored from a checkpoint (whose state keeps
    the rates it was saved with) and into their `LambdaLR` warm-ups, at the warm-up factor of the
    iteration they are at. `optimizers` and `schedulers` as the module's `optimizers()` and
    `lr_schedulers()` give them (one, or a list), `factories` and `nets` those the module built them with
    (the launch's rates are those a fresh optimiser gets). Returns (old, new) for each rate that changed;
    the resume check lets a change through only where `resume_changes` names it (`LEARNING_RATES`)."""
    optimizers = _plain(optimizers)
    schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
    changed = []
    for key, optimizer, scheduler, make, net in zip(LEARNING_RATES, optimizers, schedulers, factories, nets):
        rate = make(net.parameters()).defaults["lr"]
        for i, group in enumerate(optimizer.param_groups):
            old = scheduler.base_lrs[i]
            if old == rate:
                continue
            scheduler.base_lrs[i] = group["initial_lr"] = rate
            group["lr"] = rate * scheduler.lr_lambdas[i](scheduler.last_epoch)
            changed.append((old, rate))
            log.info("%s %g (the checkpoint's) is now %g (the launch's)", key, old, rate)  # G's, then D's
        set_last_lr(scheduler, [group["lr"] for group in optimizer.param_groups])
    return changed


def _plain(optimizers) -> list:
    """The torch optimisers of the module's `optimizers()` (one, or a list, of Lightning's wrappers)."""
    listed = optimizers if isinstance(optimizers, list) else [optimizers]
    return [getattr(o, "optimizer", o) for o in listed]


def set_foreach(optimizers, factories, nets) -> None:
    """Puts the launch's `foreach` (model.optimizer.foreach, model.d_optimizer.foreach) into optimisers
    restored from a checkpoint, whose param groups bring back the saved run's: how the update runs (one
    multi-tensor kernel or a loop over the tensors), not what it computes, so it may change on any resume
    (`perf=baseline` continuing a run of the defaults, and the other way round)."""
    for optimizer, make, net in zip(_plain(optimizers), factories, nets):
        foreach = make(net.parameters()).defaults.get("foreach")
        for group in optimizer.param_groups:
            group["foreach"] = foreach
