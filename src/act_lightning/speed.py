"""How the networks run, not what they compute: the speed options of `model.speed` (docs/performance.md).
`perf=baseline` turns them all off (the reference's straightforward path)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SpeedOptions:
    channels_last: bool = True  # NHWC weights and activations for every convolution
    compile: bool | str = False  # torch.compile the networks: true (inductor) or a backend name
    fast_attention: bool = True  # D's attention in the fused kernel, except in the R1 pass (double backward)
    foreach_ema: bool = True  # the target EMA in one fused op over all tensors (false: a Python loop)
    joint_d_pass: bool = True  # D sees the fake and the real half in one pass (two on R1 iterations)
    lazy_augment: bool = True  # skip the augmentation pipeline while p == 0 (an exact no-op then)
    sync_logs: bool = False  # read every logged value off the device each iteration (the baseline's way)

    def __post_init__(self) -> None:
        if not isinstance(self.compile, (bool, str)) or self.compile == "":
            raise ValueError(
                f"model.speed.compile must be true, false or a backend name; got {self.compile!r}"
            )

    def apply(self, nets: Iterable[nn.Module | None], discriminator: nn.Module | None) -> None:
        """Puts the networks in the chosen memory format, attention kernel and compiled form."""
        nets = [n for n in nets if isinstance(n, nn.Module)]
        if self.channels_last:  # NHWC weights: cuDNN's and oneDNN's convolutions then run NHWC throughout
            for net in nets:
                net.to(memory_format=torch.channels_last)
        if self.fast_attention and hasattr(discriminator, "use_fast_attention"):
            discriminator.use_fast_attention(True)
        if self.compile:  # in place, so state-dict keys stay as they are; a string names the backend
            backend = "inductor" if self.compile is True else str(self.compile)
            for net in nets:
                net.compile(backend=backend)
