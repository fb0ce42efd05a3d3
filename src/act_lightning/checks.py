"""Checks of configuration values shared by the commands, the module, the callbacks and the data modules,
each error naming the key (a string where a number belongs, e.g. `eval.every=abc` or `eval.every=1e3`,
would otherwise fail later as a TypeError without one)."""

from __future__ import annotations


def check_count(value: object, key: str, minimum: int | None = 1, maximum: int | None = None) -> int:
    """An integer option (a count, an interval, a batch size, a seed) in [minimum, maximum] (None: no
    bound on that side)."""
    integer = isinstance(value, int) and not isinstance(value, bool)
    if not integer or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if minimum is not None and maximum is not None:
            bounds = f" in [{minimum}, {maximum}]"
        elif minimum is not None:
            bounds = f" >= {minimum}"
        else:
            bounds = "" if maximum is None else f" <= {maximum}"
        raise ValueError(f"{key} must be an integer{bounds}, got {value!r}")
    return value


def check_class_indices(labels, classes: int, key: str, read: bool = True) -> None:
    """A tensor of class indices (`key`): integers (int64 or int32) in 0..classes - 1. `read=False` leaves
    the range unchecked (labels on a device, where reading them would wait for it)."""
    import torch

    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{key}: integer class indices (int64 or int32); got {labels.dtype}")
    if read and labels.numel() and not bool(((labels >= 0) & (labels < classes)).all()):
        raise ValueError(f"{key}: out of range for {classes} classes (0..{classes - 1})")


def check_names(value: object, key: str, example: str) -> list[str]:
    """A list-of-names option (`samplers`, `metrics`, `resume_changes`): a list (or Hydra's ListConfig)
    of strings. A bare word, `metrics=fid`, is refused with `example` (Hydra reads it as a string, which
    would otherwise be taken letter by letter)."""
    from collections.abc import Sequence

    names = isinstance(value, Sequence) and not isinstance(value, str)
    if not names or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} is a list of names in brackets, e.g. {key}={example}; got {value!r}")
    return list(value)
