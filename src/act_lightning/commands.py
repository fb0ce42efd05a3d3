"""What the commands (`python -m act_lightning.<command>`) share: the config folder, the device option
and the npz files they write."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from act_lightning.atomic import atomic_write

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"  # the Hydra configs of the commands


def resolve_device(spec: str) -> torch.device:
    """`device=auto` (CUDA when present) | cpu | cuda | cuda:1 ..."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if spec == "auto" else spec)


def write_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """`np.savez(path, **arrays)`, written atomically (a stopped command leaves no truncated file)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with atomic_write(path) as f:
        f.write(buffer.getvalue())
