"""PerNetworkDDP (act_lightning.distributed): which networks get a DDP wrapper of their own, what the target
replicas receive from rank 0, and which wrapper skips the all-reduce of a micro-batch. DDP and the process
group are stand-ins here: tests/integration/test_scale_out.py trains with real ones."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch import nn

import act_lightning.distributed as distributed
from act_lightning.distributed import PerNetworkDDP


class FakeDDP:
    """Records what DistributedDataParallel was given and which no_sync contexts were entered."""

    def __init__(self, module, device_ids=None, find_unused_parameters=False):
        self.module, self.device_ids, self.find_unused_parameters = module, device_ids, find_unused_parameters
        self.no_syncs = 0

    @contextmanager
    def no_sync(self):
        self.no_syncs += 1
        yield


@pytest.fixture
def broadcasts(monkeypatch):
    sent = []
    monkeypatch.setattr(distributed, "DistributedDataParallel", FakeDDP)
    monkeypatch.setattr(distributed.dist, "is_available", lambda: True)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "broadcast", lambda tensor, src: sent.append((tensor, src)))
    return sent


def _replica() -> nn.Module:
    return nn.BatchNorm1d(3)  # parameters and buffers


def test_each_network_gets_its_own_wrapper_and_the_replicas_rank_zeros_state(broadcasts):
    G, D, ema = nn.Linear(2, 2), nn.Linear(2, 1), _replica()
    ddp = PerNetworkDDP()
    ddp.setup(
        FakeDDP(nn.Linear(1, 1)), 2, torch.device("cuda", 1), {"generator": G, "discriminator": D}, [ema]
    )
    for name, net in (("generator", G), ("discriminator", D)):
        wrapper = ddp.network(name, net)
        assert isinstance(wrapper, FakeDDP) and wrapper.module is net and wrapper.device_ids == [1]
    expected = [*ema.parameters(), *ema.buffers()]
    assert len(broadcasts) == len(expected) == 5
    assert [t.data_ptr() for t, _ in broadcasts] == [e.data_ptr() for e in expected]
    assert {src for _, src in broadcasts} == {0}


def test_on_the_cpu_wrappers_get_no_device_ids_and_absent_networks_none(broadcasts):
    G = nn.Linear(2, 2)
    ddp = PerNetworkDDP()
    ddp.setup(FakeDDP(nn.Linear(1, 1)), 2, torch.device("cpu"), {"generator": G, "discriminator": None}, [])
    assert ddp.network("generator", G).device_ids is None
    assert ddp.network("discriminator", G) is G


def test_one_process_or_an_outer_wrapper_that_reduces_leaves_the_networks_unwrapped(broadcasts):
    G, ema = nn.Linear(2, 2), _replica()
    ddp = PerNetworkDDP()
    ddp.setup(FakeDDP(nn.Linear(1, 1)), 1, torch.device("cpu"), {"generator": G}, [ema])
    assert ddp.network("generator", G) is G and broadcasts == []
    outer = FakeDDP(nn.Linear(1, 1), find_unused_parameters=True)  # ddp_find_unused_parameters_true
    ddp.setup(outer, 2, torch.device("cpu"), {"generator": G}, [ema])
    assert ddp.network("generator", G) is G and broadcasts == []
    with ddp.sync("generator", last=False):
        pass
    assert outer.no_syncs == 1  # accumulating: no reduction yet
    with ddp.sync("generator", last=True):
        pass
    assert outer.no_syncs == 1  # the last micro-batch: the outer wrapper reduces


def test_only_the_last_micro_batch_reduces_and_only_through_the_trained_networks_wrapper(broadcasts):
    G = nn.Linear(2, 2)
    outer = FakeDDP(nn.Linear(1, 1))
    ddp = PerNetworkDDP()
    ddp.setup(outer, 2, torch.device("cpu"), {"generator": G}, [])
    inner = ddp.network("generator", G)
    with ddp.sync("generator", last=False):
        pass
    assert (outer.no_syncs, inner.no_syncs) == (1, 1)
    with ddp.sync("generator", last=True):
        pass
    assert (outer.no_syncs, inner.no_syncs) == (2, 1)
