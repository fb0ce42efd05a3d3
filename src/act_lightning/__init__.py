"""act_lightning: Adversarial Consistency Training (Kong et al., arXiv 2311.14097) with Lightning + Hydra."""

from act_lightning.config import register_resolvers

__version__ = "0.1.0"

register_resolvers()  # before any config in conf/ is composed
