"""act_lightning: Adversarial Consistency Training (Kong et al., arXiv 2311.14097) with Lightning + Hydra."""

__version__ = "0.1.0"
