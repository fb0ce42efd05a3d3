"""Checks of configuration values shared by the commands, the module, the callbacks and the data modules,
each error naming the key (a string where a number belongs, e.g. `eval.every=abc` or `eval.every=1e3`,
would otherwise fail later as a TypeError without one)."""

from __future__ import annotations


def check_count(value: object, key: str, minimum: int | None = 1, maximum: int | None = None) -> int:
    """An integer option (a count, an interval, a batch size, a seed) in [minimum, maximum] (None: no
    bound on that side)."""
    integer = isinstance(value, int) and not isinstance(value, bool)
    if not integer or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if minimum is not None and maximum is not None:
            bounds = f" in [{minimum}, {maximum}]"
        elif minimum is not None:
            bounds = f" >= {minimum}"
        else:
            bounds = "" if maximum is None else f" <= {maximum}"
        raise ValueError(f"{key} must be an integer{bounds}, got {value!r}")
    return value


def check_class_indices(labels, classes: int, key: str, read: bool = True) -> None:
    """A tensor of class indices (`key`): integers (int64 or int32) in 0..classes - 1. `read=False` leaves
    the range unchecked (labels on a device, where reading them would wait for it)."""
    import torch

    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{key}: integer class indices (int64 or int32); got {labels.dtype}")
    if read and labels.numel() and not bool(((labels >= 0) & (labels < classes)).all()):
        raise ValueError(f"{key}: out of range for {classes} classes (0..{classes - 1})")


def class_labels_for(
    class_labels, num_classes: int | None, batch: int, device, key: str = "class_labels", read: bool = True
):
    """`class_labels` (named `key`) as a network takes them: one class index per image, on `device`. One
    class (an int or a 0-d tensor) is every image's; a list, a numpy array or a tensor of shape (B,) is
    each image's own. Missing labels of a class-conditional network, labels for an unconditional one, other
    shapes, non-integer dtypes and (with `read`) classes out of range are said by name, before diffusers'
    UNet would fail inside."""
    import numbers

    import torch

    if not num_classes:
        if class_labels is not None:
            raise ValueError(f"{key}: this model is unconditional (it takes no class labels)")
        return None
    if class_labels is None:
        raise ValueError(
            f"{key}: this model is class-conditional ({num_classes} classes); pass one class index per "
            f"image, e.g. {key}=torch.randint({num_classes}, ({batch},)), or one for all"
        )
    if hasattr(class_labels, "__array__") and not isinstance(class_labels, torch.Tensor):  # numpy's: arr_1
        class_labels = torch.as_tensor(class_labels)
    if isinstance(class_labels, torch.Tensor):
        check_class_indices(class_labels, num_classes, key, read=False)  # (the range below)
        labels = class_labels.to(device=device, dtype=torch.long)
    else:  # a Python int (or numpy's integer), or a list of them
        values = class_labels if isinstance(class_labels, (list, tuple)) else [class_labels]
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{key}: integer class indices; got {class_labels!r}")
        labels = torch.as_tensor([int(v) for v in values], dtype=torch.long, device=device)
        labels = labels if isinstance(class_labels, (list, tuple)) else labels[0]
    if labels.dim() == 0:
        labels = labels.expand(batch)
    if labels.shape != (batch,):
        raise ValueError(
            f"{key}: one class index per image, shape ({batch},), or one for all; got shape "
            f"{tuple(labels.shape)}"
        )
    check_class_indices(labels, num_classes, key, read=read)
    return labels


def check_noise(noise, net, image: tuple[int, int] | None = None, key: str = "noise"):
    """Sampling's noise z for the network `net`: a float tensor (B, C, H, W) of the network's channels and
    image size (`image`, else where the network records them: `in_channels`, `image_size`), in the dtype
    of its weights (a float64 z for a float32 network is taken in float32) and on their device. Another
    size would be sampled
    without a word (the UNet takes any multiple of its downsampling), another dtype fail inside the first
    convolution."""
    import torch

    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.dim() != 4:
        got = (
            f"a {noise.dim()}-d {noise.dtype} tensor"
            if isinstance(noise, torch.Tensor)
            else type(noise).__name__
        )
        raise ValueError(
            f"{key}: a float tensor of shape (B, C, H, W), e.g. torch.randn(16, C, H, W); got {got}"
        )
    channels, size = image or (getattr(net, "in_channels", None), getattr(net, "image_size", None))
    if size is not None and channels is not None and tuple(noise.shape[1:]) != (channels, size, size):
        raise ValueError(
            f"{key}: this model makes {channels} x {size} x {size} images; got noise of shape "
            f"{tuple(noise.shape)} (pass torch.randn(B, {channels}, {size}, {size}))"
        )
    weight = next((p for p in net.parameters() if p.is_floating_point()), None)
    if weight is not None and weight.dtype in (torch.float32, torch.float64) and noise.dtype != weight.dtype:
        noise = noise.to(weight.dtype)
    if weight is not None and noise.device != weight.device:  # torch.randn's CPU noise for a GPU network
        noise = noise.to(weight.device)
    return noise


def check_names(value: object, key: str, example: str) -> list[str]:
    """A list-of-names option (`samplers`, `metrics`, `resume_changes`): a list (or Hydra's ListConfig)
    of strings. A bare word, `metrics=fid`, is refused with `example` (Hydra reads it as a string, which
    would otherwise be taken letter by letter)."""
    from collections.abc import Sequence

    names = isinstance(value, Sequence) and not isinstance(value, str)
    if not names or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} is a list of names in brackets, e.g. {key}={example}; got {value!r}")
    return list(value)
