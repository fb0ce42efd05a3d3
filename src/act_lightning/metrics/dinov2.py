"""FD-DINOv2 (Stein et al. 2023; EDM2's `fd_dinov2`): the Fréchet distance in the features of DINOv2
ViT-L/14, the CLS token after the final LayerNorm (1024 values per image).

The network is written here with facebookresearch/dinov2's module names, so its released weights file
`dinov2_vitl14_pretrain.pth` (a plain state dict) loads strictly, with the safe loader, and computes what
`torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')` computes: patch embedding, class token,
positional embeddings interpolated from the 37 x 37 grid of 518-pixel training by dinov2's own
`interpolate_pos_encoding` (bicubic with a scale factor of (16 + 0.1) / 37, not a resize to 16 x 16, which
is where other ports differ), 24 blocks of pre-norm attention and MLP with layer scale, the final norm.

Images are prepared as EDM2's `DINOv2Detector` does (NVlabs/edm2 `calculate_metrics.py`, its default
resize mode): uint8 values resized to 224 x 224 (bicubic, antialiased, in float32), divided by 255, and
normalised with ImageNet's mean and standard deviation. One-channel images are repeated to three.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from act_lightning.metrics.inception import WeightsError, not_finite_as_nan, to_uint8

WEIGHTS_FILE = "dinov2_vitl14_pretrain.pth"
WEIGHTS_URL = f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/{WEIGHTS_FILE}"
HEAD_DIM = 64  # every DINOv2 model's attention heads are 64 wide (ViT-S/14: 6 heads, B: 12, L: 16, g: 24)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RESOLUTION = 224


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn, self.ls1 = (
            nn.LayerNorm(dim, eps=1e-6),
            _Attention(dim, heads),
            _LayerScale(dim),
        )
        self.norm2, self.mlp, self.ls2 = nn.LayerNorm(dim, eps=1e-6), _Mlp(dim), _LayerScale(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, patches, dim)


class DinoVisionTransformer(nn.Module):
    """DINOv2's ViT (no registers), its forward the normalised CLS token (B, dim). `grid` is the side of
    the positional-embedding grid it was trained with (37 = 518 / 14)."""

    def __init__(self, dim: int = 1024, depth: int = 24, patch: int = 14, grid: int = 37) -> None:
        super().__init__()
        self.patch, self.num_features = patch, dim
        self.patch_embed = _PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # training only; kept so the file loads strictly
        self.blocks = nn.ModuleList(_Block(dim, dim // HEAD_DIM) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def interpolate_pos_encoding(self, patches_w: int, patches_h: int) -> Tensor:
        """dinov2's `interpolate_pos_encoding` (interpolate_offset 0.1, no antialiasing): the grid scaled
        by ((w0 + 0.1) / M, (h0 + 0.1) / M) with bicubic interpolation, in float32."""
        pos = self.pos_embed.float()
        n = pos.shape[1] - 1
        m = int(math.sqrt(n))
        if n == patches_w * patches_h and patches_w == patches_h:
            return self.pos_embed
        grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        scale = ((patches_w + 0.1) / m, (patches_h + 0.1) / m)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
        if grid.shape[-2:] != (patches_w, patches_h):
            raise ValueError(
                f"DINOv2 positional grid {tuple(grid.shape[-2:])} for {patches_w}x{patches_h} patches"
            )
        grid = grid.permute(0, 2, 3, 1).reshape(1, patches_w * patches_h, -1)
        return torch.cat([pos[:, :1], grid], dim=1).to(self.pos_embed.dtype)

    def forward(self, x: Tensor) -> Tensor:
        _, _, w, h = x.shape
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(w // self.patch, h // self.patch)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


def architecture(state: dict[str, Tensor]) -> dict[str, int]:
    """The width, depth, patch and grid of a DINOv2 state dict (ViT-S/B/L/g; the metric uses ViT-L/14)."""
    try:
        dim = state["cls_token"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        patch = state["patch_embed.proj.weight"].shape[-1]
        grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    except (KeyError, ValueError, IndexError) as e:
        raise WeightsError(
            f"not a DINOv2 state dict (expected {WEIGHTS_FILE} from {WEIGHTS_URL}): {e!r}"
        ) from None
    return {"dim": dim, "depth": depth, "patch": patch, "grid": grid}


def resolve_dinov2_weights(weights: str | None, download: bool = False, key: str = "dinov2_weights") -> Path:
    """The weights file: `weights` if given, else the torch hub cache (where torch.hub.load puts it),
    downloaded there first when `download`. Raises WeightsError naming the file, the place and the URL."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"{key}={weights}: no such file; expected {WEIGHTS_FILE} from {WEIGHTS_URL}")
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE
    if not path.is_file() and download:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(WEIGHTS_URL, str(path), progress=True)
        except Exception as e:  # offline: say what to do instead
            raise WeightsError(
                f"Could not download the DINOv2 weights ({type(e).__name__}: {e}). Put {WEIGHTS_FILE} (from "
                f"{WEIGHTS_URL}) at {path}, or pass {key}=PATH."
            ) from e
    if not path.is_file():
        raise WeightsError(
            f"FD-DINOv2 needs the DINOv2 ViT-L/14 weights {WEIGHTS_FILE}, which are not in the torch hub "
            f"cache. Download {WEIGHTS_URL} on a machine that is online and put it at {path} (or anywhere, "
            f"and pass {key}=PATH)."
        )
    return path


class DINOv2Features(nn.Module):
    """Images in [-1, 1] (B, C, H, W) -> DINOv2 features (B, dim), prepared as EDM2 does; `quantize` as the
    Inception features' (`round` | `truncate`) turns them into the uint8 values EDM2 reads."""

    def __init__(self, network: DinoVisionTransformer, quantize: str = "round") -> None:
        super().__init__()
        if quantize not in ("round", "truncate"):
            raise ValueError(f"eval.quantize must be round or truncate, got {quantize!r}")
        self.network, self.quantize = network.eval().requires_grad_(False), quantize
        self.num_features = network.num_features
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: Tensor, real: bool = False) -> Tensor:
        """`real`: a data set's images, rounded back to their 8-bit levels whatever `quantize` says of
        generated ones (see InceptionFeatures.features_and_logits)."""
        x = to_uint8(images, "round" if real else self.quantize).float()  # the images' uint8 values
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bicubic", antialias=True)
        x = (x / 255 - self.mean) / self.std
        return not_finite_as_nan(images, self.network(x).float())[0]


def check_dinov2_weights(weights: str | Path) -> None:
    """The file reads as DINOv2's weights (memory-mapped: cheap for its 1.2 GB), at start-up."""
    load_dinov2_state(weights, mmap=True)


def load_dinov2_state(weights: str | Path, mmap: bool = False) -> dict[str, Tensor]:
    """The state dict, read with torch's safe loader, and the architecture it gives (WeightsError)."""
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True, mmap=mmap)
        architecture(state)
        return state
    except WeightsError:  # read, but not DINOv2's (architecture names what is missing)
        raise
    except Exception as e:
        raise WeightsError(
            f"{weights}: not a readable DINOv2 weights file ({type(e).__name__}; a truncated download?); "
            f"expected {WEIGHTS_FILE} from {WEIGHTS_URL}"
        ) from None


def load_dinov2(weights: str | Path, quantize: str = "round") -> DINOv2Features:
    """The feature extractor from a DINOv2 weights file (read with torch's safe loader, loaded strictly)."""
    state = load_dinov2_state(weights)
    network = DinoVisionTransformer(**architecture(state))
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{weights}: not DINOv2's weights ({str(e).splitlines()[0]})") from None
    return DINOv2Features(network, quantize)
