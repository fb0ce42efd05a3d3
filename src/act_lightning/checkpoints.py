"""Reading checkpoints: one safe reader, and what the commands build on it.

Every checkpoint is read with torch's safe loader (`weights_only=True`: tensors and plain containers, no
pickled objects) onto the CPU. Errors name the config key (or argument) that points to the file.

- `read_checkpoint(path, key)`: any file (this library's, or the reference code's).
- `load_checkpoint(path)`: a checkpoint written by act_lightning.train, with its training config, refused
  when its weights hold NaN or inf.
- `build_model(checkpoint, run)`, `load_model(path)`: its networks, ready to sample.
"""

from __future__ import annotations

import dataclasses
import errno
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from act_lightning.atomic import intended_name
from act_lightning.consistency import ConsistencySchedule
from act_lightning.speed import SpeedOptions

UNREADABLE = "not a readable checkpoint of act_lightning.train ({kind}: {error})"
ZIP = b"PK\x03\x04"  # torch.save's format: a zip archive
PICKLE = b"\x80"  # torch.save's legacy format (and a plain pickle) starts with the protocol byte


class UnreadableCheckpoint(ValueError):
    """A file that is not the checkpoint it should be: the message names the key, the file and why
    (`reason`), and never repeats torch's advice to load with `weights_only=False` (which would run
    whatever the file holds)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def damage(path: Path, error: BaseException) -> str | None:
    """Why torch's safe loader failed on `path`, in words, when the file is empty, damaged or not a
    checkpoint at all; None when it is a readable pickle that holds Python objects besides tensors (the
    safe loader refused one of them)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "empty (a copy or a save that did not finish)"
    if not head.startswith((ZIP, PICKLE)):
        return f"not a checkpoint (torch.save writes a zip archive; this file starts with {head!r})"
    if isinstance(error, pickle.UnpicklingError) and re.search(r"GLOBAL [\w.]+", str(error)):
        return None
    other = zip_of_another_kind(path) if head.startswith(ZIP) else None
    if other is not None:
        return f"not a checkpoint ({other})"
    return "damaged (truncated or corrupted: torch's loader cannot read it)"


def zip_of_another_kind(path: Path) -> str | None:
    """What a readable zip archive without torch's `data.pkl` is (a numpy .npz: `sample`'s samples.npz,
    or another zip), in words; None for a torch archive or one that cannot be read (damaged)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any(name.endswith("data.pkl") for name in names):
        return None
    if names and all(name.endswith(".npy") for name in names):
        arrays = ", ".join(name.removesuffix(".npy") for name in names[:4])
        return f"a numpy .npz of arrays ({arrays})"
    return f"a zip archive of {len(names)} files without torch's data.pkl"


def failed_checksum(path: Path) -> str | None:
    """Why a zip-format checkpoint is damaged where torch's loader would not see it (it checks no
    checksums: a block of zeros inside a tensor loads as changed numbers), or None: every member is read
    and compared with the CRC-32 the archive records (about a second per GB)."""
    try:
        with zipfile.ZipFile(path) as archive:
            member = archive.testzip()
    except (zipfile.BadZipFile, OSError):
        return None  # truncated, unreadable: torch's loader fails on it and `damage` says so
    if member is None:
        return None
    return f"damaged ({member} does not match the checksum the archive records for it: corrupted on disk)"


def refused_global(error: BaseException) -> str:
    """The Python object a pickle holds that the safe loader refused, as torch names it."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    name = found.group(1) if found else "unknown"
    return f"it holds pickled Python objects besides tensors ({name}), which the safe loader does not load"


DIFFUSERS_FILES = (  # what a diffusers model's folder holds (a pipeline's, or a UNet's and its scheduler's)
    "unet",
    "scheduler",
    "model_index.json",
    "scheduler_config.json",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
)


def read_checkpoint(
    path: str | Path,
    key: str,
    *,
    mmap: bool = False,
    check: Callable[[Any], object] | None = None,
    unreadable: str = UNREADABLE,
    checksums: bool = False,
) -> Any:
    """The contents of `path`, read with the safe loader onto the CPU (memory-mapped with `mmap`: cheap
    for big files). Refused, as `{key}={path}: ` and why: a missing file (FileNotFoundError); an empty,
    damaged or foreign file (UnreadableCheckpoint, saying which); a file holding pickled objects or one
    whose contents `check` raises on, followed by `unreadable` (a format string given the error's type
    name as {kind} and what went wrong as {error}). With `checksums` (training state a run resumes from),
    a zip-format file whose members fail their CRC-32 is refused as damaged too."""
    if path is None or str(path) == "":  # ckpt=null, ckpt=
        raise ValueError(f"{key}=null: give {key}=PATH, a checkpoint file")
    path = Path(path)
    if path.is_dir():  # a run folder, most likely: name the checkpoints it holds
        found = sorted(path.glob("*.ckpt")) or sorted(path.glob("checkpoints/*.ckpt"))
        some = f": it holds {', '.join(str(f) for f in found[:4])}" if found else ""
        if not found and (path / "model.safetensors").is_file():  # act_lightning.export's folder
            some = ": an exported generator, which act_lightning.load_generator(folder) loads"
        elif not found and any((path / name).exists() for name in DIFFUSERS_FILES):
            then = (
                " (then init_from=OUT.ckpt)" if key == "init_from" else ", and train from it with init_from"
            )
            convert = f"python -m act_lightning.convert_diffusers {path} OUT.ckpt"
            some = f": a diffusers model? convert it first: {convert}{then}"
        raise IsADirectoryError(f"{key}={path}: a folder, not a checkpoint file{some}")
    if not path.is_file():
        raise FileNotFoundError(f"{key}={path}: no such checkpoint file")
    with open(path, "rb") as f:
        is_zip = f.read(4) == ZIP  # torch maps only its zip format
    corrupted = failed_checksum(path) if checksums and is_zip else None
    if corrupted:
        raise UnreadableCheckpoint(f"{key}={path}: {corrupted}", corrupted)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except Exception as err:
        reason = damage(path, err) or unreadable.format(kind=type(err).__name__, error=refused_global(err))
        raise UnreadableCheckpoint(f"{key}={path}: {reason}", reason) from None  # torch's text: unsafe advice
    try:
        if check is not None:
            check(checkpoint)
    except Exception as err:
        reason = unreadable.format(kind=type(err).__name__, error=err)
        raise UnreadableCheckpoint(f"{key}={path}: {reason}", reason) from err
    return checkpoint


def checkpoint_iteration(checkpoint: dict) -> int:
    """The ACT iteration a checkpoint of act_lightning.train was written at."""
    return int(checkpoint["state_dict"]["iteration"])


def trained_iteration(checkpoint: dict) -> int | None:
    """The ACT iterations that trained a checkpoint's weights, as `sample`, `edit`, `evaluate` and `export`
    report them: its iteration, or, for one of the paper's checkpoints that `convert_reference` wrote (at
    iteration 0, where `train ckpt_path=` starts the curriculum), the reference run's iteration: None where
    the released file did not record it (a bare state dict: no `global_step`)."""
    if "act_reference_iteration" in checkpoint:
        reference = checkpoint["act_reference_iteration"]
        return None if reference is None else int(reference)
    return checkpoint_iteration(checkpoint)


def reference_start(checkpoint: dict) -> dict | None:
    """The paper's released checkpoint that a checkpoint's weights come from, as
    `{"checkpoint": file name, "reference_iteration": the reference run's iteration, or None where the
    file did not record it}`: one that
    `convert_reference` wrote, or one trained on from it (`train ckpt_path=`, kept in the first launch of
    its history); None for weights this library trained from the start."""
    if "act_reference_iteration" in checkpoint:
        name, iteration = checkpoint.get("act_converted_from"), checkpoint["act_reference_iteration"]
        return {"checkpoint": name, "reference_iteration": None if iteration is None else int(iteration)}
    for launch in checkpoint.get("act_history") or ():
        if isinstance(launch, dict) and isinstance(launch.get("started_from"), dict):
            return dict(launch["started_from"])
    return None


def run_start(history: list | tuple | None) -> dict:
    """The launch that started a run, from its history (`act_history`): the last one marked `new_run` (a
    fresh start, or a new run from another run's checkpoint with `ckpt_path=`, whose history comes first);
    in a history written before launches were marked, its first launch."""
    launches = [h for h in history or () if isinstance(h, dict)] or [{}]
    marked = [h for h in launches if h.get("new_run")]
    return marked[-1] if marked else launches[0]


def nonfinite_tensors(state_dict: dict[str, Tensor]) -> str:
    """The names of a state dict's tensors that hold NaN or inf ('a, b, c and 4 more tensors'), or ''.
    Checkpoints are refused with it, when written (training) and when read (evaluate)."""
    names = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    more = f" and {len(names) - 5} more tensors" if len(names) > 5 else ""
    return ", ".join(names[:5]) + more


def plain(key: str) -> str:
    """`key` without the `_orig_mod.` that torch.compile's wrapper puts into its modules' names."""
    return ".".join(part for part in key.split(".") if part != "_orig_mod")


def holds_reference_weights(state: dict) -> bool:
    """Whether a state dict is laid out as the paper's reference code saves it (`model.unet.*`, compiled
    or not): a file that act_lightning.convert_reference converts."""
    return any(plain(str(k)).startswith("model.unet.") for k in state)


def load_checkpoint(path: str | Path, key: str = "ckpt") -> tuple[dict, DictConfig]:
    """A checkpoint written by act_lightning.train and the training config stored in it. Memory-mapped:
    what the commands do not use (the optimisers' states, more than half of a paper checkpoint) is never
    read from disk."""
    checkpoint = read_checkpoint(path, key, mmap=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{key}={path}: not a checkpoint written by act_lightning.train (no state_dict)")
    if "act_config" not in checkpoint:
        if holds_reference_weights(checkpoint["state_dict"]):  # the paper's released files' layout
            raise ValueError(
                f"{key}={path}: a checkpoint of the paper's reference code, which this library reads once "
                f"converted: python -m act_lightning.convert_reference {path} OUT.ckpt, then {key}=OUT.ckpt"
            )
        if "act_generator" in checkpoint:  # convert_diffusers' output: a denoiser to train from
            raise ValueError(
                f"{key}={path}: a diffusion model that convert_diffusers converted, to train from: "
                f"python -m act_lightning.train experiment=... init_from={path} (on data of its image size; "
                "README, Start from a diffusion model); this command reads what such a run writes"
            )
        raise ValueError(
            f"{key}={path}: holds no training config (act_config); it was not written by act_lightning.train"
        )
    # the commands sample the generators (the discriminator's weights, which none reads, may have diverged)
    used = {k: v for k, v in checkpoint["state_dict"].items() if not str(k).startswith("discriminator.")}
    nonfinite = nonfinite_tensors(used)
    if nonfinite:
        raise ValueError(
            f"{key}={path}: non-finite weights in {nonfinite}: the run diverged before this checkpoint; "
            "evaluate an earlier one"
        )
    return checkpoint, upgrade_run_config(OmegaConf.create(checkpoint["act_config"]))


def prepare_training_checkpoint(
    checkpoint: dict, run_config: dict | None, wandb_id: str | None, history: list[dict] | None = None
) -> None:
    """What a checkpoint of act_lightning.train holds besides Lightning's state: the resolved training
    config (`evaluate` and the other commands rebuild data and networks from it, a resumed run is compared
    with it), the run's history (`act_history`: per launch, the iteration it started at, its overrides and
    the changes it made with resume_changes), the W&B run a resumed run continues, and the global random
    state. The frozen LPIPS network (`distance.*`) is left out: it is
    rebuilt from its own weights file. Weights holding NaN or inf are refused (the divergence guard keeps
    them out; this is the last line of defence), so the last checkpoint on disk stays as it is."""
    state = checkpoint["state_dict"]
    for key in [k for k in state if k.startswith("distance.")]:
        del state[key]
    nonfinite = nonfinite_tensors(state)
    if nonfinite:
        raise RuntimeError(
            f"refusing to write a checkpoint with non-finite weights in {nonfinite}: the last "
            "checkpoint on disk stays as it is"
        )
    if run_config is not None:  # plain containers
        checkpoint["act_config"] = run_config
    if history is not None:
        checkpoint["act_history"] = history
    if wandb_id is not None:
        checkpoint["act_wandb_id"] = wandb_id
    # The iteration draws its noise from generators seeded by (seed, k); the global generators only
    # matter to what a backbone draws itself (dropout), and each iteration seeds them anew, per rank
    # (seeds.seed_global_generators). Their state is still kept, rank 0's, for what draws from them
    # between a launch's start and its first iteration: the CPU one and the one of the device it trains on
    # (not every visible device's: rank 0 never draws on the others, whose untouched states would have
    # been restored onto the ranks that train there).
    checkpoint["act_rng"] = {
        "cpu": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
    }


def tensor_bytes(tree: Any) -> int:
    """The bytes of every tensor in a checkpoint (about what torch.save writes)."""
    if isinstance(tree, Tensor):
        return tree.nelement() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def out_of_space(error: BaseException | None) -> bool:
    """Whether an error, or one it arose from, is a full disk or an exhausted quota (torch.save reports a
    failed write as its own 'unexpected pos' error, raised from the OSError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def no_space_error(checkpoint: dict, path: str | Path) -> OSError:
    """What a save that ran out of space says: how much the checkpoint needs, how much is free, and that
    the previous file is intact (writes are atomic)."""
    path = intended_name(path)  # a checkpoint is written under a temporary name first
    folder = path.parent
    free = human_bytes(shutil.disk_usage(folder).free) if folder.is_dir() else "unknown"
    return OSError(
        errno.ENOSPC,
        f"no space left on device writing {path}: the checkpoint needs about "
        f"{human_bytes(tensor_bytes(checkpoint))}, {free} are free in {folder}; the previous checkpoint is "
        "intact. Free some space (e.g. old iter_*.ckpt snapshots) and continue with resume=auto",
    )


def restore_rng(rng: dict | None) -> None:
    """The global random state a checkpoint holds (`act_rng`), when it holds one."""
    if rng is None:
        return
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] and torch.cuda.is_available():  # onto the device this rank trains on (an older
        torch.cuda.set_rng_state(rng["cuda"][0])  # checkpoint holds one per visible device, rank 0's first)


GROUPS = {  # the model keys that moved into a group, and the class Hydra builds the group as
    "schedule": ConsistencySchedule,
    "speed": SpeedOptions,
}


def upgrade_run_config(run: DictConfig) -> DictConfig:
    """A training config written before the schedule's and the speed options' keys moved from `model.*`
    into `model.schedule.*` and `model.speed.*` (act-lightning 0.1), in today's layout; a current one as
    it is. Checkpoints from either time then build the same networks."""
    model = run.get("model")
    if model is None:
        return run
    for group, cls in GROUPS.items():
        flat = [f.name for f in fields(cls) if f.name in model]
        if flat and group not in model:
            model[group] = {"_target_": f"{cls.__module__}.{cls.__qualname__}"}
            for name in flat:
                model[group][name] = model.pop(name)
    return run


def build_model(checkpoint: dict, run: DictConfig, device: torch.device | str = "cpu"):
    """The checkpoint's generator and target network (an ACTModule in eval mode on `device`, at the
    checkpoint's iteration), built from its training config. No discriminator and no consistency distance
    are built: sampling needs neither (and LPIPS' VGG weights need not be present), so the module's loss
    settings (`hparams.distance`, `schedule.gan_ratio`) are not the run's: read those in its config."""
    from hydra.utils import instantiate

    # Standard memory format, eager, every speed option at its default: the images do not depend on how
    # the run trained (export's too). Only `compile` off, over the run's compile_r1, flex_attention or
    # compile_mode, made an option set that SpeedOptions refuses: no command could open such a run.
    from act_lightning.speed import SpeedOptions

    defaults = {f.name: f.default for f in dataclasses.fields(SpeedOptions)}
    model = instantiate(
        run.model,
        distance="l2",
        discriminator=None,
        schedule={"gan_ratio": 0.0},
        speed={**defaults, "channels_last": False},
    )
    state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("discriminator.")}
    model.load_state_dict(state)
    model.k = checkpoint_iteration(checkpoint)  # the host's count, as a resumed run's (repr, the schedule)
    return model.to(device).eval()


def load_model(path: str | Path, device: torch.device | str = "cpu", key: str = "ckpt"):
    """(model, run config, checkpoint) of the checkpoint at `path` (see `build_model`)."""
    checkpoint, run = load_checkpoint(path, key)
    return build_model(checkpoint, run, device), run, checkpoint
