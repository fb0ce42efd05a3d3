"""The quickstart's metric: a Fréchet distance in the 64-d feature space of a small CNN classifier
trained on the digits themselves (Inception features mean nothing at 8x8 grayscale).

The classifier is trained from a fixed seed on the training split (about 6 s on a CPU core) the first
time it is needed, and kept: in the process (a multirun's jobs one after another, `evaluate` after
`train` in a notebook get a copy of the same weights) and on disk, in
`$ACT_LIGHTNING_CACHE` (default `$XDG_CACHE_HOME/act_lightning`, i.e. `~/.cache/act_lightning`), under
a name that holds a hash of this file, of the digits and of the torch version: another process (the next
`make train`, a DDP rank, `evaluate`) reads the weights instead of training them again, and any change
to what training depends on trains anew. The file is read with `torch.load(weights_only=True)`; an
unreadable one is trained over; a cache folder that cannot be written is only a slower start. Its
reference values, the distance of held-out real digits and of pure noise, give the number its scale.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)
CACHE_ENV = "ACT_LIGHTNING_CACHE"

FEATURE_DIM = 64


class DigitsClassifier(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),  # (B, 32, 8, 8)
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),  # (B, 64, 4, 4)
            nn.Flatten(),
            nn.Linear(64 * 16, FEATURE_DIM),  # (B, 64): the metric's feature space
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(FEATURE_DIM, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def train_digits_classifier(
    images: Tensor, labels: Tensor, epochs: int = 30, batch_size: int = 128, seed: int = 0
) -> DigitsClassifier:
    """A deterministic CNN on (N, 1, 8, 8) images in [-1, 1]; returned frozen, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    # One thread: the result must not depend on the thread count, which differs between a lone process and
    # DDP ranks sharing the cores (and for a network this small one thread is also the fastest).
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():  # do not disturb the training run's random stream
            torch.manual_seed(seed)
            model = DigitsClassifier()
            opt = torch.optim.Adam(model.parameters(), lr=2e-3)
            for _ in range(epochs):
                order = torch.randperm(len(images), generator=generator)
                for start in range(0, len(images), batch_size):
                    idx = order[start : start + batch_size]
                    loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
    finally:
        torch.set_num_threads(threads)  # the run's own thread count, also after an error
    return model.eval().requires_grad_(False)


_TRAINED: dict[int, dict[str, Tensor]] = {}  # seed -> the trained weights, once per process


def cache_dir() -> Path:
    """Where trained weights are kept between processes: $ACT_LIGHTNING_CACHE, else
    $XDG_CACHE_HOME/act_lightning (~/.cache/act_lightning)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "act_lightning"


def cache_path(seed: int, images: Tensor, labels: Tensor) -> Path:
    """The classifier's file: named by what its training depends on (this module's code, the data, the
    torch version, the seed), so that a change to any of them is not served stale weights."""
    key = hashlib.sha256()
    key.update(Path(__file__).read_bytes())
    key.update(images.numpy().tobytes())
    key.update(labels.numpy().tobytes())
    key.update(torch.__version__.encode())
    return cache_dir() / f"digits_classifier_seed{seed}_{key.hexdigest()[:16]}.pt"


def _read_cached(path: Path) -> dict[str, Tensor] | None:
    """The weights in `path` if it holds exactly the classifier's tensors (no unpickling), else None."""
    if not path.is_file():
        return None
    with torch.random.fork_rng(devices=[]):  # its shapes only: no draw from the run's random stream
        expected = DigitsClassifier().state_dict()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign, tampered: train anew and write over it
        log.warning(
            "%s: unreadable (%s: %s); training the digits classifier again", path, type(e).__name__, e
        )
        return None
    if not isinstance(state, dict) or set(state) != set(expected):
        log.warning("%s: not the digits classifier's weights; training it again", path)
        return None
    if any(not isinstance(state[k], Tensor) or state[k].shape != v.shape for k, v in expected.items()):
        log.warning("%s: weights of other shapes; training the digits classifier again", path)
        return None
    return state


def _write_cached(path: Path, state: dict[str, Tensor]) -> None:
    from act_lightning.atomic import atomic_write

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            torch.save(state, f)
    except OSError as e:  # a read-only home, a full disk: the next process trains again, nothing breaks
        log.warning(
            "could not keep the digits classifier in %s (%s); set %s to a writable folder", path, e, CACHE_ENV
        )


class DigitsFeatures(nn.Module):
    """Feature extractor callable: (B, 1, 8, 8) in [-1, 1] -> (B, 64) penultimate pre-activations."""

    num_features = FEATURE_DIM

    def __init__(self, classifier: DigitsClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        # the weights' digest among cached reference statistics' facts: the classifier is trained on each
        # machine, and another processor's float rounding gives other weights, so other features
        digest = hashlib.sha256()
        for name, tensor in classifier.state_dict().items():
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
        self.cache_key = f"digits classifier {digest.hexdigest()[:16]}"

    @classmethod
    def trained(cls, seed: int = 0) -> DigitsFeatures:
        """The classifier trained on the embedded digits from `seed`: trained on the first call (or read
        from the disk cache, see the module's doc), a fresh copy of the same weights on later calls in this
        process (training is deterministic: one thread, its own random streams, so the copy equals what
        training again would give)."""
        state = _TRAINED.get(seed)
        if state is None:
            from act_lightning.data.digits import load_digits_split

            x, y, _, _ = load_digits_split()
            path = cache_path(seed, x, y)
            state = _read_cached(path)
            if state is None:
                trained = train_digits_classifier(x, y, seed=seed)
                state = {k: v.detach().clone() for k, v in trained.state_dict().items()}
                _write_cached(path, state)
            _TRAINED[seed] = state
        with torch.random.fork_rng(devices=[]):  # its initial weights: not drawn from the run's stream
            model = DigitsClassifier()
        model.load_state_dict(state)
        return cls(model.eval().requires_grad_(False))

    @torch.no_grad()
    def forward(self, images: Tensor, real: bool = False) -> Tensor:
        """Real or generated alike: the classifier reads floats (`real` is the Inception features')."""
        return self.classifier.features(images.float())
