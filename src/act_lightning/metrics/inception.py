"""FID's feature extractor: the field's TF-Inception v3 ("pt_inception-2015-12-05"), 2048-d pool features.

The network and its TensorFlow-exact resize come from torch-fidelity (whose network torchmetrics wraps;
torchmetrics' FID resizes with torch's antialiased bilinear by default, not this resize); we only decide
where the weights come from. They are never fetched behind the user's back: an explicit path, the
torch hub cache, or (with `download`) the official release URL, checked by torch hub's SHA-256 prefix.
A missing file fails at start-up with its name, where to put it and where to get it.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import Tensor, nn

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
RANDOM = "random"  # eval.inception_weights=random: untrained network, for smoke tests only
SIZE = 299  # FID's protocol: every image resized to 299 x 299 (TensorFlow's bilinear) before the network
MIN_SIZE = 75  # the smallest input Inception v3's stride-2 stem and reductions take


class WeightsError(FileNotFoundError):
    """A pretrained weights file is missing or unreadable; the message says what to put where."""


def hub_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def resolve_inception_weights(weights: str | None, download: bool = False) -> str:
    """The weights file to use: `weights` if given, else the torch hub cache (downloaded there first
    when `download`). Returns RANDOM unchanged. Raises WeightsError naming the file, place and URL."""
    if weights == RANDOM:
        return RANDOM
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"eval.inception_weights={weights}: no such file. It should be the TF-Inception weights "
                f"{WEIGHTS_FILE} from {WEIGHTS_URL}"
            )
        return str(path)
    path = hub_weights_path()
    if not path.is_file() and download:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(WEIGHTS_URL, str(path), hash_prefix="6726825d", progress=True)
        except Exception as e:  # offline, proxy, truncated: say what to do instead
            raise WeightsError(
                f"Could not download the FID Inception weights ({type(e).__name__}: {e}). Put "
                f"{WEIGHTS_FILE} (from {WEIGHTS_URL}) at {path}, or pass eval.inception_weights=PATH."
            ) from e
    if not path.is_file():
        raise WeightsError(
            f"FID needs the TF-Inception weights {WEIGHTS_FILE}, which are not in the torch hub cache. "
            f"Download {WEIGHTS_URL} on a machine that is online and put it at {path} "
            f"(or anywhere, and pass eval.inception_weights=PATH; or set eval.download=true when online)."
        )
    return str(path)


def load_inception_state(path: str) -> dict[str, Tensor]:
    """The state dict, read with the safe loader (torch-fidelity itself would unpickle the file)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # in words, never with torch's advice to load it with weights_only=False
        from act_lightning.checkpoints import damage

        why = damage(Path(path), e) or "it holds pickled Python objects besides tensors"
        raise WeightsError(
            f"{path}: not a readable weights file ({why}); expected {WEIGHTS_FILE} from {WEIGHTS_URL}"
        ) from None
    if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise WeightsError(f"{path}: not the TF-Inception state dict of {WEIGHTS_FILE} ({WEIGHTS_URL})")
    fc = state.get("fc.weight")
    if not isinstance(fc, Tensor) or tuple(fc.shape) != (1008, 2048):
        # torchvision's inception_v3_google-*.pth, beside it in the hub cache, has the same layers but 1000
        # classes: its features are not the TF-Inception's, and the load failed with a traceback
        shape = tuple(fc.shape) if isinstance(fc, Tensor) else None
        raise WeightsError(
            f"{path}: an Inception v3 with fc.weight of shape {shape}, not the TF-Inception's (1008, 2048) "
            f"(torchvision's inception_v3_google-*.pth is another network); expected {WEIGHTS_FILE} from "
            f"{WEIGHTS_URL}"
        )
    return state


QUANTIZE = ("round", "truncate")


def check_inception_resize(resize, weights: str | None) -> None:
    """eval.inception_resize: None (299), or an int >= 75 with eval.inception_weights=random only."""
    if resize is None:
        return
    if isinstance(resize, bool) or not isinstance(resize, int) or resize < MIN_SIZE:
        raise ValueError(
            f"eval.inception_resize must be null (the protocol's {SIZE}) or an integer >= {MIN_SIZE} "
            f"(Inception v3's smallest input); got {resize!r}"
        )
    if weights != RANDOM and resize != SIZE:
        raise ValueError(
            f"eval.inception_resize={resize} needs eval.inception_weights=random (smoke runs): FID is "
            f"defined on the TF-Inception features of images resized to {SIZE}; set it to null"
        )


def check_quantize(quantize: object) -> str:
    """`eval.quantize`: round or truncate, refused by its key otherwise."""
    if quantize not in QUANTIZE:
        raise ValueError(f"eval.quantize must be one of {', '.join(QUANTIZE)}; got {quantize!r}")
    return quantize


def to_uint8(images: Tensor, quantize: str = "round") -> Tensor:
    """[-1, 1] floats -> uint8. `round`: to the nearest level, as images saved to PNG are (EDM, the
    default). `truncate`: towards zero, `((x + 1) / 2 * 255).byte()`, as the ACT reference and the ADM
    evaluator convert generated images; FIDs from the two differ slightly. A data set's images are
    always rounded (`InceptionFeatures.features_and_logits`)."""
    scaled = (images.float() + 1) * 127.5
    if quantize == "round":
        scaled = scaled.round_()
    else:
        check_quantize(quantize)
    return scaled.clamp_(0, 255).to(torch.uint8)


def not_finite_as_nan(images: Tensor, *outputs: Tensor) -> tuple[Tensor, ...]:
    """`outputs` with the rows of the images that hold a NaN or an infinity set to NaN: quantising to uint8
    turned a diverged network's NaN samples into black images, which scored a finite FID."""
    bad = ~images.flatten(1).isfinite().all(dim=1)  # masked always: asking whether any is would sync
    return tuple(out.masked_fill(bad.view(-1, *[1] * (out.ndim - 1)), float("nan")) for out in outputs)


class InceptionFeatures(nn.Module):
    """(B, C, H, W) images in [-1, 1] -> (B, 2048) TF-Inception pool features. Images are quantised to
    uint8 first (FID is defined on 8-bit images; see `to_uint8`); one channel is repeated to three.

    `resize` (eval.inception_resize): the side the images are resized to before the network; None: 299,
    the protocol's. Another size (at least 75) is for the untrained network of smoke runs only (as
    model.lpips_resize is for LPIPS): the same resize and the same 94 layers run, 16x cheaper at 75; the
    numbers mean nothing there either way. With real weights it is refused: FID is defined at 299."""

    num_features = 2048

    def __init__(
        self,
        weights: str | None = None,
        download: bool = False,
        quantize: str = "round",
        resize: int | None = None,
    ) -> None:
        super().__init__()
        check_quantize(quantize)
        check_inception_resize(resize, weights)
        self.quantize = quantize
        path = resolve_inception_weights(weights, download)
        state = None if path == RANDOM else load_inception_state(path)
        self.net = _fidelity_inception(state)
        self.net.INPUT_IMAGE_SIZE = SIZE if resize is None else int(resize)  # read by its forward
        self.pretrained = state is not None
        # what the features depend on besides the images, for caches of statistics (metrics.fid)
        self.cache_key = f"{'pretrained' if self.pretrained else 'random'} at {self.net.INPUT_IMAGE_SIZE}"

    @torch.no_grad()
    def forward(self, images: Tensor, real: bool = False) -> Tensor:
        return self.features_and_logits(images, real)[0]

    @torch.no_grad()
    def features_and_logits(self, images: Tensor, real: bool = False) -> tuple[Tensor, Tensor]:
        """(B, 2048) pool features and (B, 1008) class logits from one pass (the Inception Score's).
        `real`: the images are a data set's, 8-bit levels already, which rounding recovers exactly
        whatever `quantize` says of generated ones (truncating would darken levels 1-63 by one, as
        float rounding leaves (v / 127.5 - 1 + 1) * 127.5 just below v); the ADM evaluator reads its
        reference's uint8 as they are."""
        x = to_uint8(images, "round" if real else self.quantize)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        features, logits = self.net(x)
        return not_finite_as_nan(images, features, logits)


def _fidelity_inception(state: dict[str, Tensor] | None) -> nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 loaded with `state` (None: its random init).

    Its constructor reads a weights file with `weights_only=False`; we hand it an in-memory file that
    holds an empty dict we wrote ourselves, skip that load, and load the safely read tensors after."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Inception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            if not state_dict:  # the constructor's own load of our empty placeholder
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the random network is the same in every process (DDP ranks, reruns)
        net = _Inception(  # the logits come from the same pass, for the Inception Score
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=empty
        )
        if state is None:  # He init keeps activations O(1) through the 94 layers (the default
            for m in net.modules():  # init shrinks them to ~1e-8, which makes every distance ~0)
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    if state is not None:
        net.load_state_dict(state)
    return net.eval().requires_grad_(False)
