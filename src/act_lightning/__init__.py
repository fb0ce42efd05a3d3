"""act_lightning: Adversarial Consistency Training (Kong et al., arXiv 2311.14097) with Lightning + Hydra."""

from act_lightning.resolvers import register_resolvers

__version__ = "0.3.8"

register_resolvers()  # before any config in conf/ is composed


def __getattr__(name: str):
    """`act_lightning.checkpoints`, `act_lightning.seeds`, ...: a submodule imported on first use, so that
    `import act_lightning` alone reaches what the README names (and stays as light as it is)."""
    import importlib
    import importlib.util

    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_generator(path, device="cpu"):
    """An exported generator (`python -m act_lightning.export`): see `act_lightning.export`."""
    from act_lightning.export import load_generator as load

    return load(path, device)
