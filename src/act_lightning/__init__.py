"""act_lightning: Adversarial Consistency Training (Kong et al., arXiv 2311.14097) with Lightning + Hydra."""

from act_lightning.resolvers import register_resolvers

__version__ = "0.3.5"

register_resolvers()  # before any config in conf/ is composed


def load_generator(path, device="cpu"):
    """An exported generator (`python -m act_lightning.export`): see `act_lightning.export`."""
    from act_lightning.export import load_generator as load

    return load(path, device)
