"""Worker of the two-process (gloo, CPU) FID test: each rank draws its chunks of samples, the feature
statistics are all-reduced, rank 0 writes (mu, sigma, FID) to a file. Each rank is this file run as a
script (`python tests/helpers_ddp.py RANK SPEC`, SPEC a JSON of ddp_worker's other arguments): a child of
the tests' warm interpreter (tests.helpers_warm), which has torch imported; torch.multiprocessing.spawn's
new interpreters spent 12 of the test's 15 s importing it."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


def run_two_ranks(spec: dict, timeout: int = 120) -> None:
    """Runs this file as rank 0 and rank 1 (`spec`: the worker's arguments, `mode` picking it) and waits
    for both, each with this process's environment (its threads: the same float sums); a rank that fails
    fails the caller with its output."""
    import json
    import os

    from tests.conftest import ROOT, start_module

    ranks = [
        start_module(ROOT / "tests" / "helpers_ddp.py", [rank, json.dumps(spec)], env=dict(os.environ))
        for rank in (0, 1)
    ]
    try:
        for rank in ranks:
            _, err = rank.communicate(timeout=timeout)
            assert rank.returncode == 0, err[-3000:]
    finally:
        for rank in ranks:
            rank.kill()


class TinyFeatures(nn.Module):
    """A fixed random projection of the image: 32-d features, cheap on the CPU."""

    num_features = 32

    def __init__(self, in_features: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.register_buffer("weight", torch.randn(in_features, 32, generator=g) / in_features**0.5)

    def forward(self, x, real=False):
        return torch.tanh(x.flatten(1) @ self.weight)


def tiny_sampler(noise, labels, indices):
    """A deterministic 'generator': a fixed nonlinearity of the noise."""
    return torch.tanh(0.5 * noise + 0.1 * noise.roll(1, dims=-1))


def fid_of_samples(rank: int, world_size: int, num_samples: int, batch_size: int, shape, reference):
    from act_lightning.metrics.fid import sample_statistics
    from act_lightning.metrics.frechet import frechet_distance

    extractor = TinyFeatures(int(np.prod(shape)))
    mu, sigma = sample_statistics(
        tiny_sampler, extractor, num_samples, batch_size, shape, seed=3, rank=rank, world_size=world_size
    )
    return mu, sigma, frechet_distance(mu, sigma, *reference)


def ddp_worker(rank: int, world_size: int, store: str, out: str, num_samples, batch_size, shape, reference):
    # A file store: no TCP store server in rank 0 to outlive its peer, and no free port to race for.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        mu, sigma, fid = fid_of_samples(rank, world_size, num_samples, batch_size, shape, reference)
        if rank == 0:
            np.savez(out, mu=mu, sigma=sigma, fid=fid)
        # Both ranks past their last collective before either tears down: with a TCP store in rank 0,
        # rank 0 once aborted in teardown ("terminate called without an active exception") in a fresh
        # clone's suite (two test workers) while rank 1 was still leaving.
        dist.barrier()
    finally:
        dist.destroy_process_group()


class RankData:
    """What reference_statistics reads of a datamodule: 12 fixed 4x4 images, each rank its share."""

    image_size, channels = 4, 1

    def __init__(self) -> None:
        self.images = torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def build_reference_dataset(self):
        return self.images

    def reference_dataloader(self, batch_size, rank, world_size, dataset, max_images):
        return [(self.images[rank::world_size], None)]


def reference_worker(rank: int, world_size: int, store: str, out: str, caches: list[str]):
    """Each rank's reference statistics of RankData with its own cache file (a node-local folder)."""
    from act_lightning.metrics.fid import reference_statistics

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        mu, sigma = reference_statistics(
            TinyFeatures(16),
            "train",
            RankData(),
            "tiny",
            cache=caches[rank],
            rank=rank,
            world_size=world_size,
        )
        np.savez(f"{out}.{rank}.npz", mu=mu, sigma=sigma)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def guard_worker(rank: int, world_size: int, store: str, out: str):
    """Each rank's guard mask when rank 1's L_ct alone went bad (an fp16 overflow on one rank)."""
    from act_lightning.divergence import guard_mask

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        bad = {"train/loss_ct": torch.tensor(rank == 1), "train/loss_adv": torch.tensor(False)}
        with open(f"{out}.{rank}", "w") as f:
            f.write(str(int(guard_mask(bad, world_size))))
        dist.barrier()
    finally:
        dist.destroy_process_group()


class SaveRankState:
    """A callback (for the CLI, as `+callbacks.rank_state._target_=tests.helpers_ddp.SaveRankState`) that
    saves each rank's module state and optimiser states when training ends: the checkpoint holds rank
    0's only, and DDP must leave every rank with the same weights."""

    def __new__(cls, dirpath: str):
        import lightning as L

        class _Save(L.Callback):
            def on_train_end(self, trainer, pl_module):
                state = {
                    "state_dict": {k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
                    "optimizers": [o.state_dict() for o in trainer.optimizers],
                }
                torch.save(state, f"{dirpath}/rank{trainer.global_rank}.pt")

        return _Save()


if __name__ == "__main__":
    import json
    import sys

    spec = json.loads(sys.argv[2])
    mode = spec.pop("mode", None)
    if mode == "reference":
        reference_worker(int(sys.argv[1]), **spec)
    elif mode == "guard":
        guard_worker(int(sys.argv[1]), **spec)
    else:
        spec["shape"], spec["reference"] = (
            tuple(spec["shape"]),
            tuple(np.asarray(a) for a in spec["reference"]),
        )
        ddp_worker(int(sys.argv[1]), **spec)
