"""The one interface every data source implements, and the shapes of what it returns."""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import ml_collections
import numpy as np

# What a training batch holds, the `mode` of `Source.train_batches`:
PLAIN = "plain"  # {'images'}: the images as they are (centre square resized when not S x S)
VIEWS = "views"  # {'views' [2, B, ...]}: two random-resized crops per image (BYOL's host crops)
CROP_FLIP = "crop_flip"  # {'images'}: one random-resized crop, flipped (the probe's input)
MODES = (PLAIN, VIEWS, CROP_FLIP)

Batch = dict[str, np.ndarray]


class EvalPart(NamedTuple):
    """This process's part of an evaluation split, as a source reads it.

    batches: {'images': uint8 [b, S, S, 3], 'labels': int32 [b][, 'file_names': [b]]} in
      order, b <= batch_size (the last one short); `byol_jax.data.ordering` pads them.
    num_examples: the size of the whole split (all processes).
    file_names: whether the batches carry 'file_names'.
    """

    batches: Iterator[Batch]
    num_examples: int
    file_names: bool


class Source(abc.ABC):
    """Where images come from: one subclass per kind of data, named in the registry.

    Built from the `data` ConfigDict (and `arrays`, for in-memory data) by each call of
    `byol_jax.data`'s functions, which check the arguments before calling it. A source
    keeps no reading position: `byol_jax.data.ordering` makes batch k a function of
    (seed, k), and every source keeps that contract.
    """

    def __init__(self, data: ml_collections.ConfigDict, arrays: Mapping | None = None):
        self.data = data
        self.arrays = arrays

    @abc.abstractmethod
    def describe(self) -> str:
        """What the data is, for messages: "folder '/data/images'"."""

    @abc.abstractmethod
    def info(self) -> dict:
        """What is known without reading the images (see `info_dict`)."""

    @abc.abstractmethod
    def has_labels(self, split: str) -> bool:
        """Whether `split` carries labels (unlabelled rows are -1)."""

    @abc.abstractmethod
    def train_batches(
        self,
        mode: str,
        split: str,
        *,
        batch: int,
        image_size: int,
        seed: int,
        start_step: int,
        process_index: int,
        process_count: int,
    ) -> Iterator[Batch]:
        """Endless batches of this process's `batch` rows from step `start_step` on.

        `mode` is one of MODES: {'images': uint8 [B, S, S, 3] or 'views': uint8
        [2, B, S, S, 3], 'labels': int32 [B]}, S = image_size. Errors in the arguments
        (an unknown split) are raised here, not at the first batch.
        """

    @abc.abstractmethod
    def eval_batches(
        self,
        split: str,
        *,
        batch_size: int,
        image_size: int,
        process_index: int,
        process_count: int,
    ) -> EvalPart:
        """One ordered pass over this process's part of `split`: centre crops of
        `data.eval_crop_fraction` of the short side resized to S (S x S images as they are)."""


def info_dict(counts, num_classes, class_names, image_shape) -> dict:
    """Source.info's result: {'num_examples': {split: int}, 'num_classes': int | None (None
    when unlabelled), 'class_names': list[str] | None, 'image_shape': (H, W, C) of the stored
    images when all share one shape, else None}."""
    return {
        "num_examples": dict(counts),
        "num_classes": num_classes,
        "class_names": class_names,
        "image_shape": image_shape,
    }
