"""FD-DINOv2's network and image preparation (metrics.dinov2), with stand-in weights: the released
ViT-L/14 file cannot be downloaded here. The network was compared once against facebookresearch/dinov2's
own (a 3-block model of its code with random weights: identical outputs, 0.0 difference); the key list
below is that code's ViT-L/14 state dict."""

import argparse
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from act_lightning.metrics.dinov2 import (
    WEIGHTS_FILE,
    WEIGHTS_URL,
    DinoVisionTransformer,
    load_dinov2,
    resolve_dinov2_weights,
)
from act_lightning.metrics.inception import WeightsError

KEYS = Path(__file__).parents[1] / "fixtures" / "dinov2_vitl14_keys.txt"


def stand_in_weights(path: Path, dim: int = 64, depth: int = 2) -> Path:
    """A small DINOv2 state dict in the released file's format (random values, no zeros left)."""
    torch.manual_seed(0)
    network = DinoVisionTransformer(dim=dim, depth=depth)
    state = {k: torch.randn_like(v) * 0.05 for k, v in network.state_dict().items()}
    torch.save(state, path)
    return path


def test_the_network_has_the_released_vit_l14_keys_and_shapes():
    expected = {}
    for line in KEYS.read_text().splitlines():
        name, *shape = line.split()
        expected[name] = tuple(int(s) for s in shape)
    with torch.device("meta"):
        network = DinoVisionTransformer()
    assert {k: tuple(v.shape) for k, v in network.state_dict().items()} == expected
    assert len(expected) == 343 and network.num_features == 1024


def test_positions_are_interpolated_as_dinov2_does_not_resized():
    network = DinoVisionTransformer(dim=64, depth=1)
    torch.nn.init.normal_(network.pos_embed)
    pos = network.interpolate_pos_encoding(16, 16)  # 224 / 14
    assert pos.shape == (1, 1 + 16 * 16, 64)
    torch.testing.assert_close(pos[:, 0], network.pos_embed[:, 0])  # the class token's stays
    grid = network.pos_embed[:, 1:].reshape(1, 37, 37, 64).permute(0, 3, 1, 2)
    ours = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic")
    torch.testing.assert_close(pos[:, 1:], ours.permute(0, 2, 3, 1).reshape(1, 256, 64))
    resized = F.interpolate(grid, size=(16, 16), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 256, 64)
    assert (pos[:, 1:] - resized).abs().max() > 1e-3  # what a plain resize (other ports) would give
    assert network.interpolate_pos_encoding(37, 37) is network.pos_embed  # the training grid as it is


def test_images_are_prepared_as_edm2_does(tmp_path):
    features = load_dinov2(stand_in_weights(tmp_path / WEIGHTS_FILE))
    assert features.num_features == 64
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    uint8 = ((images + 1) * 127.5).round()
    x = F.interpolate(uint8, size=(224, 224), mode="bicubic", antialias=True) / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(features(images), features.network(x))
    grey = images[:, :1]
    torch.testing.assert_close(features(grey), features(grey.expand(-1, 3, -1, -1)))  # one channel: repeated
    truncating = load_dinov2(tmp_path / WEIGHTS_FILE, quantize="truncate")
    assert not torch.allclose(truncating(images), features(images))


def test_missing_or_foreign_weights_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsError) as err:
        resolve_dinov2_weights(None, download=False)
    message = str(err.value)
    assert (
        WEIGHTS_FILE in message
        and WEIGHTS_URL in message
        and str(tmp_path / "hub" / "checkpoints") in message
    )
    with pytest.raises(WeightsError, match="^dinov2_weights=.*nowhere.pth: no such file"):
        resolve_dinov2_weights(str(tmp_path / "nowhere.pth"))
    # training names its own key
    with pytest.raises(WeightsError, match="^eval.dinov2_weights=.*nowhere.pth: no such file"):
        resolve_dinov2_weights(str(tmp_path / "nowhere.pth"), key="eval.dinov2_weights")
    foreign = tmp_path / "foreign.pth"
    torch.save({"conv.weight": torch.zeros(1)}, foreign)
    with pytest.raises(WeightsError, match="not a DINOv2 state dict"):
        load_dinov2(foreign)
    pickled = tmp_path / "pickled.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 8), "extra": argparse.Namespace(a=1)}, pickled)
    with pytest.raises(WeightsError, match="not a readable weights file"):
        load_dinov2(pickled)
