"""What the commands (`python -m act_lightning.<command>`) share: the config folder, the device option,
the npz files they write and how they refuse bad input."""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from act_lightning.atomic import atomic_write


def _config_dir() -> Path:
    """The Hydra configs of the commands: inside the package when it was installed from a wheel
    (pyproject.toml ships conf/ as act_lightning/conf), else the checkout's conf/ (an editable install)."""
    here = Path(__file__).resolve().parent
    installed = here / "conf"
    return installed if (installed / "train.yaml").is_file() else here.parents[1] / "conf"


CONFIG_DIR = _config_dir()


def check_net(net: str) -> None:
    """The `net` option of sample, edit and evaluate: which of the checkpoint's networks samples."""
    if net not in ("target", "generator"):
        raise ValueError(f"net must be target or generator, got {net!r}")


def resolve_device(spec: str) -> torch.device:
    """`device=auto` (CUDA when present) | cpu | cuda | cuda:1 ...: refused by name when torch does not
    know it or this machine has no such CUDA device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {spec!r}") from None
    usable = device.type in ("cpu", "cuda") or (device.type == "mps" and torch.backends.mps.is_available())
    if not usable:  # mps without Apple's GPU, meta, xla ...: torch's own error came as a traceback
        raise ValueError(f"device={spec}: not a device here; device must be auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={spec}: this machine has no CUDA device; use device=cpu or device=auto")
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"device={spec}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
    return device


def check_out_folder(
    folder: object, key: str = "out", result: str | None = None, overwrite: bool = True
) -> Path:
    """A folder the command will write into: it, or its nearest existing ancestor, is a writable folder,
    and it holds no `result` of an earlier call unless `overwrite` (a multirun's jobs given one `out`, or a
    quick test into the folder of a 50k draw, replaced the earlier files without a word). Checked before
    the work, so a bad path costs no sampling."""
    from act_lightning.launch import check_writable_folder  # here: launch imports Hydra, export must not

    if folder is None or str(folder) == "":  # out=null would write into a folder named None
        raise ValueError(f"{key}=null: give {key}=FOLDER, the folder to write into")
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite must be true or false; got {overwrite!r}")
    path = Path(str(folder))
    if path.suffix.lower() in (".npz", ".png", ".json", ".jpg") and not path.is_dir():
        raise ValueError(f"{key}={path}: {key} is the folder the results go into, not a file; name a folder")
    if result is not None and not overwrite and (path / result).exists():
        raise ValueError(
            f"{key}={path} already holds {result} of an earlier call: give another {key}=, or overwrite=true "
            "to replace it (in a multirun, leave out= unset: each job writes into its own folder)"
        )
    check_writable_folder(path, key)
    return path


def check_output_file(out: Path, key: str, force: bool = True) -> Path:
    """A file a command writes at its end: not a folder, an existing one replaced only with `force`
    (--force), its folder writable. Checked before the work, so a bad path costs no sampling."""
    if out.is_dir():
        raise ValueError(f"{key}={out} is a folder: name the file to write")
    if out.exists() and not force:
        raise ValueError(f"{key}={out} already exists: pass --force to replace it")
    check_out_folder(out.parent, f"{key}'s folder")
    return out


def write_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """`np.savez(path, **arrays)`, written atomically (a stopped command leaves no truncated file)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with atomic_write(path) as f:
        f.write(buffer.getvalue())


def refuse(err: Exception, status: int = 2) -> NoReturn:
    """A command refused by its checks, before it wrote anything: the message alone, in one line, and exit
    status 2 (with HYDRA_FULL_ERROR=1: the traceback, as Hydra shows it). `status`: another exit status
    for a failure the message explains as well (train's diverged run: 1)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    print(f"error: {refusal(err)}", file=sys.stderr, flush=True)
    raise SystemExit(status) from None


def refusal(err: Exception) -> Exception:
    """The error whose message `refuse` says: an instantiation's own cause (the constructor's message,
    which names the key), a key the class does not take said as such, a missing value in one line."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import MissingMandatoryValue

    full_key = None
    while isinstance(err, InstantiationException) and isinstance(err.__cause__, Exception):
        found = re.search(r"^full_key: (\S+)$", str(err), flags=re.M)
        full_key = found.group(1) if found else full_key
        err = err.__cause__  # the constructor's own message, which names the key
    unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(err))
    if isinstance(err, TypeError) and unexpected and full_key:  # a key the class does not take
        err = ValueError(unknown_key(full_key, unexpected.group(1), str(err)))
    if isinstance(err, MissingMandatoryValue):  # omegaconf's message spans three lines
        err = ValueError(f"{err.full_key} is required: give {err.full_key}=... (--help lists the options)")
    worker = re.match(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback", str(err))
    if worker:  # torch re-raises a worker's error with the worker's traceback as its message: its last line
        last = str(err).rstrip().splitlines()[-1]
        err = ValueError(last.split(": ", 1)[1] if ": " in last else last)
    return err


def unknown_key(node: str, name: str, said: str) -> str:
    """What to say of `node.name`, a key the class built at `node` does not take (`said`: its TypeError):
    where a key of that name lives now (model.X -> model.schedule.X or model.speed.X), or how to list the
    keys there are."""
    from act_lightning.checkpoints import GROUPS

    moved = [f"{node}.{group}.{name}" for group, cls in GROUPS.items() if name in cls.__dataclass_fields__]
    if node == "model" and moved:
        return f"{node}.{name} is not a key of {node}: it is {moved[0]} ({said})"
    return f"{node}.{name} is not a key of {node} ({said}); `--cfg job` prints the config's keys"


# what `refuse` reports: a bad option, a missing or unusable file or folder
REFUSED = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
