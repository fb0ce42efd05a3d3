"""Networks: the generator backbone F_theta, the discriminator D and the consistency function around F."""

from act_lightning.nn.discriminator import Discriminator
from act_lightning.nn.generator import UNetGenerator
from act_lightning.nn.precond import consistency_function

__all__ = ["Discriminator", "UNetGenerator", "consistency_function"]
