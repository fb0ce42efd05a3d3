"""What the commands (`python -m act_lightning.<command>`) share: the config folder, the device option,
the npz files they write and how they refuse bad input."""

from __future__ import annotations

import io
import os
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
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={spec}: this machine has no CUDA device; use device=cpu or device=auto")
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"device={spec}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
    return device


def check_out_folder(folder: object, key: str = "out") -> Path:
    """A folder the command will write into: it, or its nearest existing ancestor, is a writable folder.
    Checked before the work, so a bad path costs no sampling."""
    from act_lightning.launch import check_writable_folder  # here: launch imports Hydra, export must not

    check_writable_folder(Path(str(folder)), key)
    return Path(str(folder))


def write_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """`np.savez(path, **arrays)`, written atomically (a stopped command leaves no truncated file)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with atomic_write(path) as f:
        f.write(buffer.getvalue())


def refuse(err: Exception) -> NoReturn:
    """A command refused by its checks, before it wrote anything: the message alone, in one line, and exit
    status 2 (with HYDRA_FULL_ERROR=1: the traceback, as Hydra shows it)."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import MissingMandatoryValue

    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    while isinstance(err, InstantiationException) and isinstance(err.__cause__, Exception):
        err = err.__cause__  # the constructor's own message, which names the key
    if isinstance(err, MissingMandatoryValue):  # omegaconf's message spans three lines
        err = ValueError(f"{err.full_key} is required: give {err.full_key}=... (--help lists the options)")
    print(f"error: {err}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


# what `refuse` reports: a bad option, a missing or unusable file or folder
REFUSED = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
