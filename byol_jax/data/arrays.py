"""Source 'arrays': numpy images passed in memory, `arrays={split: {'images': uint8
[N, H, W, C], 'labels': int [N] (optional)}}`. No TensorFlow: host crops are NumPy's."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from byol_jax.data import config, np_ops, ordering
from byol_jax.data.source import PLAIN, VIEWS, EvalPart, Source, info_dict


class Examples(NamedTuple):
    """One split in memory: images uint8 [N, H, W, C], labels int32 [N] or None."""

    images: np.ndarray
    labels: np.ndarray | None

    def labels_or_unlabelled(self, rows: np.ndarray) -> np.ndarray:
        """int32 [len(rows)]: the rows' labels, -1 without labels."""
        if self.labels is None:
            return np.full(len(rows), -1, np.int32)
        return self.labels[rows]


class ArraysSource(Source):
    """Examples held in numpy arrays, read by index (the ordering contract's sources)."""

    def describe(self) -> str:
        return "the arrays passed in"

    def splits(self, image_size: int | None) -> dict[str, Examples]:
        """Every split, validated. `image_size` is for sources that make their images
        (digits); arrays are served as they are."""
        arrays = self.arrays
        if not isinstance(arrays, Mapping) or not arrays:
            raise TypeError(
                "data.source='arrays' needs arrays={split: {'images': uint8 [N, H, W, C], "
                f"'labels': int [N]}}}}, got {type(arrays).__name__}."
            )
        return {split: _checked(split, value) for split, value in arrays.items()}

    def split(self, split: str, image_size: int | None) -> Examples:
        splits = self.splits(image_size)
        if split not in splits:
            raise ValueError(
                f"split {split!r} is not in {self.describe()}: it has {sorted(splits)}."
            )
        return splits[split]

    def info(self) -> dict:
        splits = self.splits(image_size=None)
        counts = {name: len(s.images) for name, s in splits.items()}
        labels = [s.labels for s in splits.values() if s.labels is not None]
        num_classes = int(max(label.max() for label in labels)) + 1 if labels else None
        shapes = {s.images.shape[1:] for s in splits.values()}
        return info_dict(
            counts, num_classes, None, tuple(shapes.pop()) if len(shapes) == 1 else None
        )

    def has_labels(self, split: str) -> bool:
        labels = self.split(split, image_size=None).labels
        return labels is not None and bool(np.any(labels >= 0))

    def train_batches(
        self, mode, split, *, batch, image_size, seed, start_step, process_index, process_count
    ):
        examples = self.split(split, image_size)

        def batches():
            for step in itertools.count(start_step):
                positions = ordering.stream_positions(step, batch, process_index, process_count)
                rows = ordering.example_indices(seed, positions, len(examples.images))
                images = self._train_images(
                    examples.images[rows], positions, mode, image_size, seed
                )
                labels = examples.labels_or_unlabelled(rows)
                if mode == VIEWS:
                    yield {"views": np.ascontiguousarray(images.swapaxes(0, 1)), "labels": labels}
                else:
                    yield {"images": images, "labels": labels}

        return batches()

    def _train_images(self, images, positions, mode, image_size, seed) -> np.ndarray:
        """uint8 [B, S, S, 3] (or [B, 2, S, S, 3] for views) of the rows at `positions`."""
        if mode == PLAIN and images.shape[1:3] == (image_size, image_size):
            return np_ops.rgb(images)
        make = lambda x, g: np_ops.train_image(x, mode, image_size, self.data, seed, int(g))
        return np_ops.rgb(np.stack([make(x, g) for x, g in zip(images, positions, strict=True)]))

    def eval_batches(self, split, *, batch_size, image_size, process_index, process_count):
        examples = self.split(split, image_size)
        rows = ordering.eval_rows(len(examples.images), process_index, process_count)
        fraction, method = self.data.eval_crop_fraction, config.resize_method(self.data)

        def batches():
            for start in range(0, len(rows), batch_size):
                part = rows[start : start + batch_size]
                crop = lambda i: np_ops.centre_crop(
                    examples.images[i], image_size, fraction, method
                )
                images = np_ops.rgb(np.stack([crop(i) for i in part]))
                yield {"images": images, "labels": examples.labels_or_unlabelled(part)}

        return EvalPart(batches(), len(examples.images), file_names=False)


def _checked(split: str, value) -> Examples:
    if not isinstance(value, Mapping) or "images" not in value:
        raise TypeError(f"arrays[{split!r}] must be a mapping with 'images' (and 'labels').")
    images, labels = np.asarray(value["images"]), value.get("labels")
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise TypeError(
            f"arrays[{split!r}]['images'] must be uint8 [N, H, W, 1 or 3], got "
            f"{images.dtype} {images.shape}."
        )
    if labels is not None:
        labels = np.asarray(labels).astype(np.int32)
        if labels.shape != images.shape[:1]:
            raise TypeError(
                f"arrays[{split!r}]['labels'] must be [{len(images)}], got {labels.shape}."
            )
    return Examples(images, labels)
