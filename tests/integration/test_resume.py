"""Resume is exact: stopping at iteration k and resuming gives the same weights, EMAs, discriminator,
optimiser states and augmentation state as an uninterrupted run."""

import pytest
import torch

from tests.conftest import run_cli


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize(
    "data",
    [
        ["data=synthetic", "data.length=12"],  # 3 batches an epoch: the run crosses epochs
        [],  # the digits: the stop falls mid-epoch
    ],
    ids=["synthetic-multi-epoch", "digits-mid-epoch"],
)
def test_resume_from_a_mid_run_checkpoint_is_exact(tmp_path, data):
    common = [
        "debug=smoke",
        *data,
        "iterations=8",
        "model.r1_threshold=0",
        "model.ada_length=100",
        "callbacks.samples.every_n_iterations=100",
        "eval.every=100",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = run_cli(
        [*common, "callbacks.checkpoint.every_n_iterations=4", "callbacks.checkpoint.keep_snapshots=true"],
        straight,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    snapshot = straight / "checkpoints" / "iter_0000004.ckpt"
    assert int(_load(snapshot)["state_dict"]["iteration"]) == 4

    result = run_cli([*common, f"ckpt_path={snapshot}"], resumed)
    assert result.returncode == 0, result.stderr[-3000:]

    a, b = _load(straight / "checkpoints" / "last.ckpt"), _load(resumed / "checkpoints" / "last.ckpt")
    assert int(a["state_dict"]["iteration"]) == int(b["state_dict"]["iteration"]) == 8
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert float(a["state_dict"]["aug_p"]) > 0  # the controller moved, so its state is compared too
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=0, msg=key)
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"]):
        for pa, pb in zip(opt_a["state"].values(), opt_b["state"].values()):
            for name in pa:
                torch.testing.assert_close(pa[name], pb[name], rtol=0, atol=0)
