"""The quickstart's metric: a Fréchet distance in the 64-d feature space of a small CNN classifier
trained on the digits themselves (Inception features mean nothing at 8x8 grayscale).

The classifier is trained at start-up from a fixed seed on the training split (a few seconds on a CPU),
once per process: later runs in the same process (a multirun's jobs one after another, `evaluate` after
`train` in a notebook) get a copy of the same weights. Its reference values, the distance of held-out
real digits and of pure noise, give the number its scale.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

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
    torch.set_num_threads(threads)
    return model.eval().requires_grad_(False)


_TRAINED: dict[int, dict[str, Tensor]] = {}  # seed -> the trained weights, once per process


class DigitsFeatures(nn.Module):
    """Feature extractor callable: (B, 1, 8, 8) in [-1, 1] -> (B, 64) penultimate pre-activations."""

    num_features = FEATURE_DIM

    def __init__(self, classifier: DigitsClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    @classmethod
    def trained(cls, seed: int = 0) -> DigitsFeatures:
        """The classifier trained on the embedded digits from `seed`: trained on the first call, a fresh
        copy of the same weights on later calls in this process (training is deterministic: one thread,
        its own random streams, so the copy equals what training again would give)."""
        state = _TRAINED.get(seed)
        if state is None:
            from act_lightning.data.digits import load_digits_split

            x, y, _, _ = load_digits_split()
            trained = train_digits_classifier(x, y, seed=seed)
            state = _TRAINED[seed] = {k: v.detach().clone() for k, v in trained.state_dict().items()}
        with torch.random.fork_rng(devices=[]):  # its initial weights: not drawn from the run's stream
            model = DigitsClassifier()
        model.load_state_dict(state)
        return cls(model.eval().requires_grad_(False))

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.classifier.features(images.float())
