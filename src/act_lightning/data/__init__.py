"""LightningDataModules: one per data source, all built on `ImageDataModule`."""

from act_lightning.data.base import DataError, DataUnavailable, HalfBatch, ImageDataModule, split_halves
from act_lightning.data.cifar10 import CIFAR10DataModule
from act_lightning.data.digits import DigitsDataModule
from act_lightning.data.folder import FolderDataModule
from act_lightning.data.imagenet64 import ImageNet64DataModule
from act_lightning.data.lsun import LSUNDataModule
from act_lightning.data.synthetic import SyntheticDataModule

__all__ = [
    "DataError",
    "DataUnavailable",
    "HalfBatch",
    "ImageDataModule",
    "split_halves",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "FolderDataModule",
    "ImageNet64DataModule",
    "LSUNDataModule",
    "SyntheticDataModule",
]
