"""The data sets: checking the files (`files`), serving batches from memory (`loader`),
and the Lightning DataModule that ties them together (`datamodule`), which configs
name as ``genlab.data.ImageDataModule``."""

from genlab.data.datamodule import (
    BINARIZE_SEED_EVAL,
    BINARIZE_SEED_TRAIN,
    CLASS_NAMES,
    DATASETS,
    ImageDataModule,
    binarize_sample,
)
from genlab.data.loader import BatchLoader

__all__ = [
    "BINARIZE_SEED_EVAL",
    "BINARIZE_SEED_TRAIN",
    "CLASS_NAMES",
    "DATASETS",
    "BatchLoader",
    "ImageDataModule",
    "binarize_sample",
]
