"""Checks of configuration values shared by the commands, the module, the callbacks and the data modules,
each error naming the key (a string where a number belongs, e.g. `eval.every=abc` or `eval.every=1e3`,
would otherwise fail later as a TypeError without one)."""

from __future__ import annotations


def check_count(value: object, key: str, minimum: int = 1) -> int:
    """An integer option (a count, an interval, a batch size) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value
