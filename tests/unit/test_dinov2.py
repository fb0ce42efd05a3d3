"""FD-DINOv2's network and image preparation (metrics.dinov2), with stand-in weights: the released
ViT-L/14 file cannot be downloaded here. The key list below is facebookresearch/dinov2's ViT-L/14 state
dict, and fixtures/dinov2_stand_in_cls.npy holds what that code's own network (vision_transformer.py of
commit b8931f7: img_size 518, patch 14, init_values 1.0, block_chunks 0, no registers, as the hub's
dinov2_vitl14, here 128 wide: 2 heads, and 2 blocks deep) returns for the stand-in weights below, times 1
and times 6, on two random 224 x 224 inputs: this network returned the same, to 0.0."""

import argparse
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from act_lightning.metrics.dinov2 import (
    WEIGHTS_FILE,
    WEIGHTS_URL,
    DINOv2Features,
    DinoVisionTransformer,
    check_dinov2_weights,
    load_dinov2,
    resolve_dinov2_weights,
)
from act_lightning.metrics.inception import WeightsError

KEYS = Path(__file__).parents[1] / "fixtures" / "dinov2_vitl14_keys.txt"
REFERENCE_CLS = Path(__file__).parents[1] / "fixtures" / "dinov2_stand_in_cls.npy"


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


@pytest.mark.parametrize("scale", [1, 6])
def test_the_network_returns_what_dinov2s_own_code_returns_for_the_same_weights(scale, tmp_path):
    """Weights of sd 0.05 (the layer norms' eps matters) and of sd 0.3 (every GELU sees values near 1)."""
    import numpy as np

    network = DinoVisionTransformer(dim=128, depth=2).eval()  # two attention heads of 64
    state = torch.load(stand_in_weights(tmp_path / "w.pth", dim=128), weights_only=True)
    network.load_state_dict({k: v * scale for k, v in state.items()}, strict=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = network(x)
    reference = torch.from_numpy(np.load(REFERENCE_CLS, allow_pickle=False))[(1, 6).index(scale)]
    # float32 rounding: torch 2.9 differs from 2.14 (which wrote the reference) by up to 2.4e-7; a plain
    # resize of the positional embeddings, as other ports do, by more than 1e-3 (below)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


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
    beyond = images * 3  # outside [-1, 1]: clipped, as their uint8 values would be
    torch.testing.assert_close(features(beyond), features(beyond.clamp(-1, 1)))
    truncating = load_dinov2(tmp_path / WEIGHTS_FILE, quantize="truncate")
    assert not torch.allclose(truncating(images), features(images))
    # a data set's images (8-bit levels) are read at their levels whatever eval.quantize says
    real = torch.arange(256.0).view(1, 1, 16, 16).expand(-1, 3, -1, -1) / 127.5 - 1
    torch.testing.assert_close(truncating(real, real=True), features(real), rtol=0, atol=0)
    assert not torch.allclose(truncating(real), features(real))  # truncated, levels 1-63 fall by one
    # a diverged network's NaN samples: NaN features (as uint8 they were black images, scored finitely)
    broken = images.clone()
    broken[1, 0, 3, 3] = float("nan")
    out = features(broken)
    assert out[1].isnan().all() and torch.equal(out[0], features(images)[0])


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
    with pytest.raises(WeightsError, match="not a readable DINOv2 weights file"):
        load_dinov2(pickled)
    junk = tmp_path / "junk.pth"  # a truncated download: refused at start-up, before fit, in one message
    junk.write_bytes(b"junk\n")
    with pytest.raises(
        WeightsError, match=r"junk.pth: not a readable DINOv2 weights file .*a truncated download"
    ):
        check_dinov2_weights(junk)


def test_weights_in_the_hub_cache_are_not_downloaded_again_and_missing_ones_are(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = tmp_path / "hub" / "checkpoints" / WEIGHTS_FILE
    fetched = []

    def download(url, dst, progress=True):
        fetched.append(url)
        Path(dst).write_bytes(b"weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    assert resolve_dinov2_weights(None, download=True) == cached and fetched == [WEIGHTS_URL]
    assert resolve_dinov2_weights(None, download=True) == cached and len(fetched) == 1  # cached now
    assert resolve_dinov2_weights(None, download=False) == cached

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    cached.unlink()
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError, match=f"Could not download the DINOv2 weights .*Put {WEIGHTS_FILE}"):
        resolve_dinov2_weights(None, download=True)


def test_an_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="eval.quantize must be round or truncate, got 'floor'"):
        DINOv2Features(DinoVisionTransformer(dim=64, depth=1), quantize="floor")


def test_state_dicts_without_blocks_or_with_foreign_keys_are_named(tmp_path):
    state = torch.load(stand_in_weights(tmp_path / WEIGHTS_FILE), weights_only=True)
    no_blocks = tmp_path / "no_blocks.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("blocks.")}, no_blocks)
    with pytest.raises(WeightsError, match="not a DINOv2 state dict"):
        load_dinov2(no_blocks)
    extra = tmp_path / "extra.pth"
    torch.save(state | {"head.weight": torch.zeros(10, 64)}, extra)
    with pytest.raises(WeightsError, match=r"extra\.pth: not DINOv2's weights \(Error"):
        load_dinov2(extra)
