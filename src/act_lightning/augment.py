"""Differentiable, non-leaking augmentation and its probability controller (docs/algorithm.md,
section 5).

`AugmentPipe` is the StyleGAN2-ADA pipeline (Karras et al. 2020, the 'bgc' set of operations):

1. pixel blitting: x-flip, 90-degree rotations, integer translation. These map pixel centres onto
   pixel centres, so they are executed *exactly*, as one gather per example with reflection at the
   border (as ADA's original TensorFlow code does): an x-flipped image is the flipped image, bit for bit.
2. general geometry: isotropic scaling, pre-rotation, anisotropic scaling, post-rotation, fractional
   translation, composed into ONE 3x3 matrix per example and executed by ADA's resampler (see
   `AugmentPipe._resample`).
3. colour: brightness, contrast, luma flip, hue rotation, saturation, composed into ONE 4x4 matrix.

Every operation is applied to each example independently with probability `p` (times the operation's
multiplier). With p < 1 the identity stays in the mixture, so the discriminator cannot make the
generator produce augmented-looking images: the augmentation does not leak.

The pipeline never synchronises with the host: `p` may be a tensor on the images' device, every
decision is a per-example mask (`rand(B) < p`) consumed by `torch.where`, and every shape depends on
the image size only. Examples whose sampled transforms are all exactly the identity are returned
untouched (bit for bit), so p == 0 is an exact no-op even when p is a tensor.

The controller at the bottom moves p from the R1 statistic (the ACT reference's controller; ADA's own
r_t = E[sign(D(real))] controller is not implemented); it is a pure tensor function, safe inside a
training step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# 'sym6' wavelet low-pass filter: ADA's choice for the geometric resampler. It is orthogonal, so
# upsampling then downsampling with it reconstructs the input (to float precision), and its 12 taps
# suppress the aliasing that plain bilinear sampling of a rotated / scaled image produces.
_SYM6 = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)  # fmt: skip

# The grey diagonal of RGB space: luma flip, hue rotation and saturation act around it.
_LUMA_AXIS = (1 / math.sqrt(3),) * 3


# ----------------------------------------------------------------------------------------------------
# Batched homogeneous matrices. Every entry is a (B,) tensor or a number; the result is (B, R, R).


class _Constants:
    """(B,) tensors of one value each, filled once per forward pass and shared by every matrix that has
    the value as an entry (a 3x3 scaling alone has seven constant entries: seven fills, each a kernel
    launch, if every matrix made its own)."""

    def __init__(self, like: Tensor) -> None:
        self.like = like  # (B,)
        self._filled: dict[tuple[float, float], Tensor] = {}

    def __call__(self, value: float) -> Tensor:
        key = (float(value), math.copysign(1.0, value))  # 0.0 and -0.0 compare equal but are not
        if key not in self._filled:
            self._filled[key] = torch.full_like(self.like, value)
        return self._filled[key]


def _matrix(rows: list[list[Tensor | float]], fill: _Constants) -> Tensor:
    entries = [e if isinstance(e, Tensor) else fill(e) for row in rows for e in row]
    return torch.stack(entries, dim=-1).reshape(*fill.like.shape, len(rows), len(rows[0]))


def _translate2d(tx: Tensor | float, ty: Tensor | float, fill: _Constants) -> Tensor:
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], fill)


def _scale2d(sx: Tensor | float, sy: Tensor | float, fill: _Constants) -> Tensor:
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], fill)


def _rotate2d(cos: Tensor | float, sin: Tensor | float, fill: _Constants) -> Tensor:
    return _matrix([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]], fill)


def _translate3d(t: Tensor, fill: _Constants) -> Tensor:
    return _matrix([[1, 0, 0, t], [0, 1, 0, t], [0, 0, 1, t], [0, 0, 0, 1]], fill)


def _scale3d(s: Tensor, fill: _Constants) -> Tensor:
    return _matrix([[s, 0, 0, 0], [0, s, 0, 0], [0, 0, s, 0], [0, 0, 0, 1]], fill)


def _rotate3d(axis: tuple[float, float, float], theta: Tensor, fill: _Constants) -> Tensor:
    """Homogeneous rotation by theta (B,) around the unit vector `axis`: Rodrigues' formula."""
    vx, vy, vz = axis
    s, c = theta.sin(), theta.cos()
    cc = 1 - c
    return _matrix(
        [
            [vx * vx * cc + c, vx * vy * cc - vz * s, vx * vz * cc + vy * s, 0],
            [vy * vx * cc + vz * s, vy * vy * cc + c, vy * vz * cc - vx * s, 0],
            [vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + c, 0],
            [0, 0, 0, 1],
        ],
        fill,
    )


def _compose(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """a @ b for (B, R, R) batches, as an elementwise product and sum; None stands for the identity, so
    the first operation of a chain costs no product.

    Not `@`: where TF32 matmuls are enabled (`torch.set_float32_matmul_precision('high')`) a matmul keeps
    10 mantissa bits, which misplaces a 256-pixel image by about a pixel. Elementwise float32 is exact
    enough, and exact for identities.
    """
    if a is None or b is None:
        return b if a is None else a
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(dim=-2)


def _identity(chain: Tensor | None, size: int, fill: _Constants) -> Tensor:
    """The composed (B, size, size) matrices of a chain; the identity where no operation is enabled."""
    if chain is not None:
        return chain
    return _matrix([[float(i == j) for j in range(size)] for i in range(size)], fill)


def _is_identity(m: Tensor) -> Tensor:
    """(B, R, R) -> (B,) bool: the matrix is exactly the identity (no op was sampled for this example)."""
    eye = torch.eye(m.shape[-1], device=m.device, dtype=m.dtype)
    return (m == eye).flatten(1).all(dim=1)


def _reflect_index(i: Tensor, size: int) -> Tensor:
    """Fold integer coordinates into [0, size) by mirror reflection about the border pixel centres.

    The extension of `F.pad(mode='reflect')` (no repeated edge pixel), but of unbounded extent: it is
    periodic with period 2 (size - 1).
    """
    period = 2 * (size - 1)
    i = torch.remainder(i, period)
    return torch.where(i >= size, period - i, i)


class _Draws:
    """The random numbers of one forward pass (`draw`: two kernel launches), handed out a (B,) row at a
    time."""

    NUM_UNIFORM, NUM_NORMAL = 21, 7  # what all operations together consume

    def __init__(self, uniform: Tensor, normal: Tensor) -> None:
        self.fill = _Constants(torch.zeros(uniform.shape[1], device=uniform.device))  # (B,) constants
        self._uniform, self._normal = iter(uniform), iter(normal)

    @classmethod
    def draw(
        cls, batch: int, device: torch.device, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """(uniform (21, B), normal (7, B)): all the random numbers of one forward pass."""
        uniform = torch.rand(cls.NUM_UNIFORM, batch, device=device, generator=generator)
        return uniform, torch.randn(cls.NUM_NORMAL, batch, device=device, generator=generator)

    def uniform(self) -> Tensor:
        return next(self._uniform)

    def normal(self) -> Tensor:
        return next(self._normal)

    def coin(self, prob: Tensor) -> Tensor:
        """(B,) bool: which examples get the operation applied with probability `prob`."""
        return self.uniform() < prob


# ----------------------------------------------------------------------------------------------------
# ADA's resampling filters as matrices along one axis. Both depend on the image size only: the pipeline
# builds them once per size and device (`AugmentPipe.filters`; a few hundred KB at 256x256), not in
# each call (some 40 operator calls per axis and matrix).


def _upsample_matrix(size: int, f: Tensor) -> Tensor:
    """(2P + 1, size), P = 2 (size - 1): reflect-extend `size` samples, then upsample 2x with f (gain 2).

    Row k is upsampled sample k, at input coordinate k / 2, for k = 0 .. 2P: one full period of the
    (periodic) reflect extension plus one sample, so that any coordinate can be wrapped into it.
    """
    taps = f.numel()
    period = 2 * (size - 1)
    k = torch.arange(2 * period + 1, device=f.device)  # upsampled samples
    i = torch.arange(-(taps // 2), period + taps // 2 + 1, device=f.device)  # unfolded input samples
    tap = (taps // 2 - 1) + k[:, None] - 2 * i[None, :]  # (K, I): the tap of f linking the two
    # gain 2: zero insertion halves the mean along the axis
    weights = torch.where((tap >= 0) & (tap < taps), 2 * f.double()[tap.clamp(0, taps - 1)], 0.0)
    fold = _reflect_index(i, size)[:, None] == torch.arange(size, device=f.device)  # (I, size) one-hot
    return (weights @ fold.double()).float()  # float64 here: no TF32, and the fold sums are exact


def _downsample_matrix(size: int, f: Tensor) -> Tensor:
    """(size, 2 size + taps - 2): output n = sum_j f[j] y[2n + j], y the 2x grid of `_resample`.

    Correlation with f, the time reverse of the upsampling convolution: down(up(x)) = x for an
    orthogonal filter. Grid sample m sits at output coordinate (m - (taps // 2 - 1)) / 2, so the filter
    peak (tap taps // 2 - 1) of output n falls on its own position.
    """
    taps = f.numel()
    n = torch.arange(size, device=f.device)
    m = torch.arange(2 * size + taps - 2, device=f.device)
    tap = m[None, :] - 2 * n[:, None]  # (size, M)
    return torch.where((tap >= 0) & (tap < taps), f[tap.clamp(0, taps - 1)], 0.0)


class _Filters(NamedTuple):
    """The resampler's four filter matrices for one image size (`_upsample_matrix`, `_downsample_matrix`)."""

    up_h: Tensor  # (2 Ph + 1, H)
    up_w: Tensor  # (2 Pw + 1, W)
    down_h: Tensor  # (H, M_h)
    down_w: Tensor  # (W, M_w)

    @classmethod
    def build(cls, height: int, width: int, lowpass: Tensor) -> _Filters:
        f = lowpass.float()
        up_h, down_h = _upsample_matrix(height, f), _downsample_matrix(height, f)
        if width == height:  # square images: one pair serves both axes
            return cls(up_h, up_h, down_h, down_h)
        return cls(up_h, _upsample_matrix(width, f), down_h, _downsample_matrix(width, f))


# ----------------------------------------------------------------------------------------------------


class AugmentPipe(nn.Module):
    """StyleGAN2-ADA augmentation: `pipe(images (B, C, H, W), p) -> (B, C, H, W)`, differentiable in images.

    The multipliers (`xflip` ... `saturation`) scale p per operation; 0 disables an operation. The
    strengths default to ADA's. C must be 1 or 3; for C == 1 the operations that need colour (luma
    flip, hue, saturation) are skipped and brightness / contrast act on the grey level.
    Images are expected in [-1, 1] (contrast and luma flip act around 0, as in ADA).
    """

    def __init__(
        self,
        xflip: float = 1,
        rotate90: float = 1,
        xint: float = 1,
        scale: float = 1,
        rotate: float = 1,
        aniso: float = 1,
        xfrac: float = 1,
        brightness: float = 1,
        contrast: float = 1,
        lumaflip: float = 1,
        hue: float = 1,
        saturation: float = 1,
        xint_max: float = 0.125,  # integer translation range, relative to the image size
        scale_std: float = 0.2,  # log2 std of isotropic scaling
        rotate_max: float = 1.0,  # rotation range, 1 = full circle
        aniso_std: float = 0.2,  # log2 std of anisotropic scaling
        xfrac_std: float = 0.125,  # std of fractional translation, relative to the image size
        brightness_std: float = 0.2,
        contrast_std: float = 0.5,  # log2 std
        hue_max: float = 1.0,  # hue rotation range, 1 = full circle
        saturation_std: float = 1.0,  # log2 std
        rotate90_turns: tuple[int, ...] | list[int] = (0, 3),  # quarter turns drawn from; ADA: (0, 1, 2, 3)
    ) -> None:
        super().__init__()
        self.xflip, self.rotate90, self.xint = float(xflip), float(rotate90), float(xint)
        self.scale, self.rotate, self.aniso = float(scale), float(rotate), float(aniso)
        self.xfrac = float(xfrac)
        self.brightness, self.contrast, self.lumaflip = float(brightness), float(contrast), float(lumaflip)
        self.hue, self.saturation = float(hue), float(saturation)
        self.xint_max, self.scale_std, self.rotate_max = float(xint_max), float(scale_std), float(rotate_max)
        self.aniso_std, self.xfrac_std = float(aniso_std), float(xfrac_std)
        self.brightness_std, self.contrast_std = float(brightness_std), float(contrast_std)
        self.hue_max, self.saturation_std = float(hue_max), float(saturation_std)

        turns = [int(t) for t in rotate90_turns]
        if not turns or any(t not in (0, 1, 2, 3) for t in turns):
            raise ValueError(
                f"model.augment.rotate90_turns must list quarter turns in 0..3, got {list(rotate90_turns)}"
            )
        self.rotate90_turns = tuple(turns)

        # Not persistent: constants, not state, so they stay out of (and cannot break) checkpoints.
        lowpass = torch.tensor(_SYM6, dtype=torch.float64)
        self.register_buffer("lowpass", (lowpass / lowpass.sum()).float(), persistent=False)
        self.register_buffer("turns", torch.tensor(turns, dtype=torch.float32), persistent=False)
        self._compiled: Callable[..., Tensor] | None = None  # compile_transform: `transform` compiled
        self._filters: dict[tuple[int, int, torch.device], _Filters] = {}  # filters(): built once per size

    def extra_repr(self) -> str:
        names = ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac")
        names += ("brightness", "contrast", "lumaflip", "hue", "saturation")
        return (
            ", ".join(f"{n}={getattr(self, n):g}" for n in names) + f", rotate90_turns={self.rotate90_turns}"
        )

    def forward(self, images: Tensor, p: Tensor | float, generator: torch.Generator | None = None) -> Tensor:
        """Augment each example with probability p per operation. `generator` must live on images.device."""
        return self.together(images, p=p, generator=generator)[0]

    def together(
        self,
        *batches: Tensor,
        p: Tensor | float,
        generator: torch.Generator | None = None,
        draws: list[tuple[Tensor, Tensor]] | None = None,
    ) -> tuple[Tensor, ...]:
        """Several batches of images through one pass of the pipeline: what `self(batch, p, generator)` for
        each batch in turn returns, each example with the random numbers its own call would draw from
        `generator` (so the generator ends where those calls leave it), in one set of kernel launches
        instead of one per batch. Batches of different image shapes, dtypes or devices run one by one.
        `draws`: each batch's random numbers drawn beforehand, (uniform (21, B), normal (7, B)), instead
        of from `generator` (`draw_augmentation`)."""
        for images in batches:
            self._check(images)
        if draws is not None and [u.shape[1] for u, _ in draws] != [x.shape[0] for x in batches]:
            raise ValueError(
                f"augmentation draws for {[u.shape[1] for u, _ in draws]} examples, "
                f"batches of {[x.shape[0] for x in batches]}"
            )
        if not batches:
            return ()
        if len({(x.shape[1:], x.dtype, x.device) for x in batches}) > 1:
            if draws is not None:
                return tuple(self.together(x, p=p, draws=[d])[0] for x, d in zip(batches, draws))
            return tuple(self.together(x, p=p, generator=generator)[0] for x in batches)
        if isinstance(p, (int, float)) and p == 0:
            return batches  # a Python zero is known on the host: nothing to draw, nothing to compute
        device, (height, width) = batches[0].device, batches[0].shape[-2:]
        p = _as_float_tensors(p, device=device)[0]
        if draws is None:
            draws = [_Draws.draw(x.shape[0], device, generator) for x in batches]  # in the calls' order
        uniform, normal = (torch.cat(d, dim=1) if len(d) > 1 else d[0] for d in zip(*draws))
        images = torch.cat(batches) if len(batches) > 1 else batches[0]
        filters = self.filters(height, width, device) if self._resamples else None
        out = (self._compiled or self.transform)(images, p, uniform, normal, filters)
        return out.split([x.shape[0] for x in batches]) if len(batches) > 1 else (out,)

    def _check(self, images: Tensor) -> None:
        if images.ndim != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(images.shape)}")
        _, channels, height, width = images.shape
        if channels not in (1, 3):
            raise ValueError(f"AugmentPipe supports 1 (grey) or 3 (RGB) channels, got {channels}")
        if self.rotate90 > 0 and height != width:
            raise ValueError(f"90-degree rotations need square images, got {height}x{width}")

    @property
    def _resamples(self) -> bool:
        """Any of the general geometric operations is enabled: the images go through `_resample`."""
        return self.scale > 0 or self.rotate > 0 or self.aniso > 0 or self.xfrac > 0

    def filters(self, height: int, width: int, device: torch.device) -> _Filters:
        """The resampler's filter matrices for images of this size on `device`, built on the first call."""
        device = torch.device(device)
        key = (height, width, device)
        if key not in self._filters:
            # Ordinary tensors even when the first call comes under inference mode: a later call with
            # gradients saves them for its backward, which an inference tensor cannot be. In float32
            # whatever the caller's autocast, as the rest of the pipeline.
            no_autocast = torch.autocast(device.type, enabled=False)
            with torch.inference_mode(False), torch.no_grad(), no_autocast:
                self._filters[key] = _Filters.build(height, width, self.lowpass.to(device))
        return self._filters[key]

    def compile_transform(self, **options) -> None:
        """Runs `transform` compiled by `torch.compile(**options)` from now on (model.speed.compile_augment):
        everything but the two random draws, which stay eager (a generator cannot be traced)."""
        self._compiled = torch.compile(self.transform, **options)

    def transform(
        self, images: Tensor, p: Tensor, uniform: Tensor, normal: Tensor, filters: _Filters | None = None
    ) -> Tensor:
        """The augmentation of `images` with probability p per operation, given all its random numbers
        (`_Draws.draw`) and the resampler's filters (`filters`; built here if None): a fixed function of
        its inputs, which torch.compile traces as one graph."""
        batch, channels, height, width = images.shape
        # Everything runs in float32 whatever the autocast state: half-precision coordinates would
        # misplace pixels of a 256x256 image, and untouched examples must stay exact.
        with torch.autocast(images.device.type, enabled=False):
            draws = _Draws(uniform, normal)
            x = images.float()  # (B, C, H, W)

            blit = self._sample_blit(draws, p, height, width)  # (B, 3, 3)
            x = self._execute_blit(x, blit)

            geom = self._sample_geometry(draws, p, height, width)  # (B, 3, 3)
            geom_identity = _is_identity(geom)  # (B,)
            if self._resamples:
                # Every example is resampled (choosing a subset would need its size on the host);
                # those with an identity transform keep their exact pixels.
                x = torch.where(geom_identity.view(-1, 1, 1, 1), x, self._resample(x, geom, filters))

            color = self._sample_color(draws, p, channels)  # (B, 4, 4)
            color_identity = _is_identity(color)  # (B,)
            x = torch.where(color_identity.view(-1, 1, 1, 1), x, self._execute_color(x, color))

        # Untouched examples are handed back as they came, so p == 0 (and every example whose draws all
        # came up "no") is exact even for half-precision inputs.
        untouched = _is_identity(blit) & geom_identity & color_identity  # (B,)
        return torch.where(untouched.view(-1, 1, 1, 1), images, x.to(images.dtype))

    # -- 1. pixel blitting ------------------------------------------------------------------------
    # Transforms are built as their inverses, g_inv: output pixel -> input pixel, in pixel units
    # centred on the image. Appending an op on the right applies it after the ones before it.

    def _sample_blit(self, draws: _Draws, p: Tensor, height: int, width: int) -> Tensor:
        fill, g_inv = draws.fill, None

        if self.xflip > 0:
            i = torch.floor(draws.uniform() * 2)  # flip or not, as in ADA
            i = torch.where(draws.coin(self.xflip * p), i, 0.0)
            g_inv = _compose(g_inv, _scale2d(1 - 2 * i, 1, fill))  # a flip is its own inverse

        if self.rotate90 > 0:
            # Quarter turns drawn uniformly from `rotate90_turns`: {0, 3} (0 or 270 degrees) as the ACT
            # reference's port of ADA draws them, or ADA's own {0, 1, 2, 3}.
            choice = torch.floor(draws.uniform() * len(self.rotate90_turns)).long()
            i = self.turns.to(choice.device)[choice]
            i = torch.where(draws.coin(self.rotate90 * p), i, 0.0)
            # Rounded so the matrix is exactly integer (cos(pi/2) is not 0 in floating point). ADA's
            # inverse, rotate2d_inv(-pi/2 i) = rotate2d(pi/2 i): i = 3 turns the image clockwise
            # (torch.rot90's k = -1), as the reference's inverse of rotate_mat(-pi/2 i) does.
            angle = math.pi / 2 * i
            g_inv = _compose(g_inv, _rotate2d(angle.cos().round(), angle.sin().round(), fill))

        if self.xint > 0:
            tx = torch.round((draws.uniform() * 2 - 1) * self.xint_max * width)  # whole pixels
            ty = torch.round((draws.uniform() * 2 - 1) * self.xint_max * height)
            apply = draws.coin(self.xint * p)
            tx, ty = torch.where(apply, tx, 0.0), torch.where(apply, ty, 0.0)
            g_inv = _compose(g_inv, _translate2d(-tx, -ty, fill))
        return _identity(g_inv, 3, fill)

    @staticmethod
    def _execute_blit(x: Tensor, g_inv: Tensor) -> Tensor:
        """Exact integer warp: each output pixel copies one input pixel (reflected at the border)."""
        batch, channels, height, width = x.shape
        cx, cy = (width - 1) / 2, (height - 1) / 2
        ys, xs = torch.meshgrid(
            torch.arange(height, device=x.device, dtype=torch.float32) - cy,
            torch.arange(width, device=x.device, dtype=torch.float32) - cx,
            indexing="ij",
        )
        xs, ys = xs.flatten(), ys.flatten()  # (H*W,) centred output coordinates
        g = g_inv.unsqueeze(-1)  # (B, 3, 3, 1): entries broadcast over pixels
        src_x = g[:, 0, 0] * xs + g[:, 0, 1] * ys + g[:, 0, 2] + cx  # (B, H*W), integer-valued
        src_y = g[:, 1, 0] * xs + g[:, 1, 1] * ys + g[:, 1, 2] + cy
        src_x = _reflect_index(torch.round(src_x).long(), width)
        src_y = _reflect_index(torch.round(src_y).long(), height)
        index = (src_y * width + src_x).unsqueeze(1).expand(batch, channels, height * width)
        return x.flatten(2).gather(2, index).view(batch, channels, height, width)

    # -- 2. general geometric transformations -------------------------------------------------------

    def _sample_geometry(self, draws: _Draws, p: Tensor, height: int, width: int) -> Tensor:
        fill, g_inv = draws.fill, None

        if self.scale > 0:
            s = torch.exp2(draws.normal() * self.scale_std)
            s = torch.where(draws.coin(self.scale * p), s, 1.0)
            g_inv = _compose(g_inv, _scale2d(1 / s, 1 / s, fill))

        # Two independent rotations, each with probability p_rot, so that P(pre OR post) = rotate * p.
        p_rot = 1 - torch.sqrt((1 - self.rotate * p).clamp(0, 1))
        for rotation in ("pre", "post"):  # around the anisotropic scaling
            if self.rotate > 0:
                theta = (draws.uniform() * 2 - 1) * math.pi * self.rotate_max
                theta = torch.where(draws.coin(p_rot), theta, 0.0)
                g_inv = _compose(g_inv, _rotate2d((-theta).cos(), (-theta).sin(), fill))
            if rotation == "pre" and self.aniso > 0:
                s = torch.exp2(draws.normal() * self.aniso_std)
                s = torch.where(draws.coin(self.aniso * p), s, 1.0)
                g_inv = _compose(g_inv, _scale2d(1 / s, s, fill))

        if self.xfrac > 0:
            tx = draws.normal() * self.xfrac_std * width  # pixels
            ty = draws.normal() * self.xfrac_std * height
            apply = draws.coin(self.xfrac * p)
            tx, ty = torch.where(apply, tx, 0.0), torch.where(apply, ty, 0.0)
            g_inv = _compose(g_inv, _translate2d(-tx, -ty, fill))
        return _identity(g_inv, 3, fill)

    def _resample(self, x: Tensor, g_inv: Tensor, filters: _Filters | None = None) -> Tensor:
        """Warp (B, C, H, W) by g_inv (B, 3, 3), ADA's way: reflect-extend, upsample 2x with the sym6
        low-pass, sample bilinearly on a 2x grid, low-pass and downsample 2x.

        Why not one bilinear `grid_sample` at the image resolution: it blurs by an amount that depends
        on the sub-pixel offset and aliases under rotation and down-scaling, both of which the
        discriminator can pick up; the 2x-oversampled route is the one ADA's non-leaking analysis used.

        ADA reflect-pads by a margin computed from the batch's transforms, a device -> host copy. Here
        the reflect extension is periodic (period 2 (size - 1)), so one period is upsampled and the
        sampling coordinates are wrapped into it: no data-dependent shape, no margin to run out of
        (where ADA reads zeros), and 2.25x less memory than padding by ADA's largest margin.

        The filtering is four small matmuls (fast on CPU too, unlike 1-channel convolutions), so it
        follows torch's float32 matmul precision: with TF32 allowed it is accurate to ~1e-3, as ADA's
        convolutions are under cuDNN's default TF32. The sampling coordinates are always float32.
        """
        batch, channels, height, width = x.shape
        if filters is None:
            filters = _Filters.build(height, width, self.lowpass.to(x.device))
        up_h, up_w, down_h, down_w = filters
        peak = self.lowpass.numel() // 2 - 1  # the filter's centre tap

        x = up_h @ (x @ up_w.T)  # (B, C, 2Ph + 1, 2Pw + 1): one period of the extension, 2x finer

        # Where each sample of the 2x output grid reads the upsampled input, elementwise (see _compose).
        cx, cy = (width - 1) / 2, (height - 1) / 2
        ox = (torch.arange(down_w.shape[1], device=x.device) - peak) / 2 - cx  # (M_w,) centred output x
        oy = (torch.arange(down_h.shape[1], device=x.device) - peak) / 2 - cy
        g = g_inv[:, :2].reshape(batch, 2, 3, 1, 1)  # entries broadcast over (M_h, M_w)
        ox, oy = ox.view(1, -1), oy.view(-1, 1)
        src_x = g[:, 0, 0] * ox + g[:, 0, 1] * oy + g[:, 0, 2] + cx  # (B, M_h, M_w), input pixels
        src_y = g[:, 1, 0] * ox + g[:, 1, 1] * oy + g[:, 1, 2] + cy
        period_w, period_h = 4 * (width - 1), 4 * (height - 1)  # in upsampled samples
        u = torch.remainder(2 * src_x, period_w).clamp(0, period_w)  # upsampled sample index, wrapped
        v = torch.remainder(2 * src_y, period_h).clamp(0, period_h)
        # align_corners=True: -1 and +1 are the first and last samples 0 and 2P of the period.
        grid = torch.stack([2 * u / period_w - 1, 2 * v / period_h - 1], dim=-1)  # (B, M_h, M_w, 2)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)

        return down_h @ x @ down_w.T  # (B, C, H, W)

    # -- 3. colour --------------------------------------------------------------------------------

    def _sample_color(self, draws: _Draws, p: Tensor, channels: int) -> Tensor:
        """Colour transform (B, 4, 4) acting on homogeneous RGB: c_out = C @ c_in."""
        fill, color = draws.fill, None

        if self.brightness > 0:
            b = draws.normal() * self.brightness_std
            b = torch.where(draws.coin(self.brightness * p), b, 0.0)
            color = _compose(_translate3d(b, fill), color)

        if self.contrast > 0:
            c = torch.exp2(draws.normal() * self.contrast_std)
            c = torch.where(draws.coin(self.contrast * p), c, 1.0)
            color = _compose(_scale3d(c, fill), color)

        if channels == 1:
            return _identity(color, 4, fill)  # luma flip, hue and saturation need colour

        eye = torch.eye(4, device=fill.like.device)
        # v v^T for v = (1, 1, 1, 0) / sqrt(3): the projector onto the luma axis. A fill on the device and a
        # pad: no host -> device copy, and (unlike an assignment into a slice) no host tensor in a graph
        vvt = F.pad(torch.full((3, 3), 1 / 3, device=fill.like.device), (0, 1, 0, 1))

        if self.lumaflip > 0:
            i = torch.floor(draws.uniform() * 2)
            i = torch.where(draws.coin(self.lumaflip * p), i, 0.0)
            color = _compose(eye - 2 * vvt * i.view(-1, 1, 1), color)  # Householder reflection of the luma

        if self.hue > 0:
            theta = (draws.uniform() * 2 - 1) * math.pi * self.hue_max
            theta = torch.where(draws.coin(self.hue * p), theta, 0.0)
            color = _compose(_rotate3d(_LUMA_AXIS, theta, fill), color)  # rotate chroma around the grey axis

        if self.saturation > 0:
            s = torch.exp2(draws.normal() * self.saturation_std)
            s = torch.where(draws.coin(self.saturation * p), s, 1.0)
            # I + (s - 1)(I - vv^T) scales the chroma by s; written so that s == 1 gives exactly I.
            color = _compose(eye + (eye - vvt) * (s - 1).view(-1, 1, 1), color)
        return _identity(color, 4, fill)

    @staticmethod
    def _execute_color(x: Tensor, color: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        flat = x.reshape(batch, channels, 1, height * width)  # (B, C_in, 1, H*W)
        if channels == 3:
            # sum over c_in of C[c_out, c_in] * x[c_in], elementwise (see _compose)
            flat = (color[:, :3, :3, None] * flat.transpose(1, 2)).sum(dim=2) + color[:, :3, 3:]
        else:
            # Grey = mean of R, G, B: the transform of a grey pixel (g, g, g) averaged over channels.
            gain = color[:, :3, :3].sum(dim=2).mean(dim=1).view(-1, 1, 1)  # (B, 1, 1)
            offset = color[:, :3, 3].mean(dim=1).view(-1, 1, 1)
            flat = flat.squeeze(2) * gain + offset
        return flat.view(batch, channels, height, width)


def draw_augmentation(
    count: int, device: torch.device, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """The random numbers of `count` examples' augmentation, (uniform (21, count), normal (7, count)):
    drawn for a whole global batch, of which each device and micro-batch takes its examples' columns."""
    return _Draws.draw(count, device, generator)


class DrawnAugmentation:
    """The pipeline at one iteration's p with its random numbers drawn beforehand: one (uniform, normal)
    pair per call, taken in the order the calls come (`__call__`: one batch, `together`: several in one
    pass). The module draws them for the global batch (`draw_augmentation`), so each example's come from
    its position in it, and one device, several, or micro-batches augment every example alike."""

    def __init__(self, pipe: AugmentPipe, p: Tensor | float, draws: list[tuple[Tensor, Tensor]]) -> None:
        self.pipe, self.p, self._draws = pipe, p, list(draws)

    def _take(self, count: int) -> list[tuple[Tensor, Tensor]]:
        if count > len(self._draws):
            raise RuntimeError(f"{count} augmentation calls, but {len(self._draws)} were drawn for")
        taken, self._draws = self._draws[:count], self._draws[count:]
        return taken

    def __call__(self, images: Tensor) -> Tensor:
        return self.pipe.together(images, p=self.p, draws=self._take(1))[0]

    def together(self, *batches: Tensor) -> tuple[Tensor, ...]:
        return self.pipe.together(*batches, p=self.p, draws=self._take(len(batches)))


# ----------------------------------------------------------------------------------------------------
# The controller of p (docs/algorithm.md, section 5). Pure tensor arithmetic: no .item(), no branches
# on values.


def _as_float_tensors(*values: Tensor | float, device: torch.device | None = None) -> list[Tensor]:
    """Detached 0-dim float32 tensors on `device`, by default that of the first tensor among `values`."""
    if device is None:
        device = next((v.device for v in values if isinstance(v, Tensor)), None)
    # torch.full rather than torch.as_tensor for numbers: a fill kernel, not a host -> device copy
    # (which CUDA's sync debug mode reports as synchronising).
    return [
        v.detach().to(device, torch.float32)
        if isinstance(v, Tensor)
        else torch.full((), float(v), device=device)
        for v in values
    ]


def r1_controller_update(
    p: Tensor | float,
    r1_ema: Tensor | float,
    r1: Tensor | float,
    *,
    beta: float = 0.93,
    threshold: Tensor | float,
    batch_size: Tensor | int,
    interval: Tensor | int,
    ada_length: Tensor | float,
) -> tuple[Tensor, Tensor]:
    """ACT's controller, called each time R1 is computed: returns (p_new, r1_ema_new).

    r1_ema <- beta * r1_ema + (1 - beta) * r1;  p <- clip(p + s * batch_size * interval / ada_length, 0, 1)
    with s = +1 if the *updated* r1_ema > threshold (the discriminator is over-fitting) else -1.
    `batch_size` is the global batch (both halves, all devices); `interval` the R1 interval in iterations.
    A non-finite R1 (an update the divergence guard skips) leaves both as they are: an infinite one held
    r1_ema near 1e37, above any threshold, and p at its maximum for some 17,000 CIFAR-10 iterations.
    """
    p, r1_ema, r1 = _as_float_tensors(p, r1_ema, r1)
    finite = r1.isfinite()
    new_ema = beta * r1_ema + (1 - beta) * torch.where(finite, r1, 0.0)
    sign = torch.where(new_ema > threshold, 1.0, -1.0)
    new_p = (p + sign * (batch_size * interval / ada_length)).clamp(0, 1)
    return torch.where(finite, new_p, p), torch.where(finite, new_ema, r1_ema)
