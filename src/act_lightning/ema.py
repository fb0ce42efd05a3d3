"""The target network theta^- and the other exponential moving averages of the generator: their copies and
their update, one fused op over all parameters."""

from __future__ import annotations

import copy

import torch
from torch import nn


@torch.no_grad()
def ema_update(net: nn.Module, source: nn.Module, decay: float, foreach: bool = True) -> None:
    """net <- decay * net + (1 - decay) * source over the parameters (buffers are copied): one fused op over
    all tensors (`foreach`), or the baseline's Python loop. decay = 0 copies the source exactly."""
    ema = list(net.parameters())
    online = [p.detach() for p in source.parameters()]
    if foreach:
        torch._foreach_lerp_(ema, online, 1.0 - decay)
    else:
        for t, o in zip(ema, online):
            t.mul_(decay).add_(o, alpha=1.0 - decay)
    for b_t, b in zip(net.buffers(), source.buffers()):
        b_t.copy_(b)


def ema_copies(generator: nn.Module, separate_teacher: bool) -> tuple[nn.Module, nn.Module | None]:
    """`target`, the network that samples and is evaluated (and exported): theta^-, the EMA teacher, as in
    the reference; with a sampling EMA (`sampling_ema`), an EMA of its own decay. An EMA teacher that no
    longer samples is then `teacher_ema` (`separate_teacher`); the online teacher is the generator."""
    target = copy.deepcopy(generator).requires_grad_(False)
    return target, copy.deepcopy(generator).requires_grad_(False) if separate_teacher else None
