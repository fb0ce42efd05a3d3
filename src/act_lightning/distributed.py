"""Data parallelism per network: each update of an ACT iteration trains one network, so each network
gets its own DDP wrapper (as EDM's and StyleGAN2's `ddp_sync`). Its gradient all-reduce then expects
exactly the parameters that receive gradients, and no search for unused parameters is needed.

The step asks two things: `network(name)`, the module to run while it trains, and
`sync(name, last)`, the context of one micro-batch's forward and backward (gradients are reduced on the
last micro-batch only).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class PerNetworkDDP:
    """The networks by name, wrapped in DDP once `setup` finds a multi-process run."""

    def __init__(self) -> None:
        self._wrappers: dict[str, DistributedDataParallel] = {}
        self._outer: DistributedDataParallel | None = None
        self._outer_reduces = False

    def setup(
        self,
        outer: nn.Module,
        world_size: int,
        device: torch.device,
        nets: dict[str, nn.Module | None],
        replicas: list[nn.Module],
    ) -> None:
        """At the start of training. `outer` is the strategy's model: Lightning's DDP wrapper of the whole
        LightningModule under strategy `ddp`. With `ddp_find_unused_parameters_true` that wrapper reduces
        the gradients itself, searching each backward's graph for the parameters it used (the classic way,
        slower); otherwise each network in `nets` gets its own wrapper. `replicas` (the target EMA) are no
        DDP modules: they are made equal across ranks once here and then follow identical generators."""
        self._outer = outer if isinstance(outer, DistributedDataParallel) else None
        self._outer_reduces = self._outer is not None and self._outer.find_unused_parameters
        self._wrappers = {}
        if world_size <= 1 or not (dist.is_available() and dist.is_initialized()) or self._outer_reduces:
            return
        device_ids = [device.index] if device.type == "cuda" else None
        self._wrappers = {
            name: DistributedDataParallel(net, device_ids=device_ids)
            for name, net in nets.items()
            if net is not None
        }
        for net in replicas:
            for tensor in [*net.parameters(), *net.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def network(self, name: str, net: nn.Module) -> nn.Module:
        """The module to run while `net` (named `name`) trains: its DDP wrapper under DDP, else itself."""
        return self._wrappers.get(name) or net

    @contextmanager
    def sync(self, name: str, last: bool) -> Iterator[None]:
        """Around a micro-batch's forward and backward: gradients are all-reduced on the `last` micro-batch
        only. Lightning's wrapper of the whole module would reduce every parameter and wait for those of
        the network that did not train: it is kept out of the way, and the trained network's own wrapper
        reduces its gradients."""
        with ExitStack() as stack:
            if self._outer is not None and (not self._outer_reduces or not last):
                stack.enter_context(self._outer.no_sync())
            inner = self._wrappers.get(name)
            if inner is not None and not last:
                stack.enter_context(inner.no_sync())
            yield
