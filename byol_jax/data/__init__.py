"""Host input pipeline: numpy batches of images and labels, one process's share.

Sources (`data.source`, see `default_data_config`), one module each behind `Source`:
  'tfds'    any TFDS image dataset `data.name` (imagenet2012, cifar10, stl10, imagenette, ...).
  'folder'  image files under `data.folder`: `split/label/*.jpg`, `split/*.jpg` (an unlabelled
            split), or a flat folder of unlabelled images, which every split name reads whole.
  'arrays'  numpy arrays passed as `arrays={split: {'images': uint8 [N, H, W, C],
            'labels': int [N] (optional)}}`.
  'digits'  scikit-learn's bundled 8x8 digits (1797 images, 10 classes) upsampled to
            `image_size`: needs no download; 'train' / 'test' are a stratified 80/20 split.
More with `register_source(name, cls)`.

Every batch holds B = global_batch_size // process_count rows: this process's share of the
global batch. Images are RGB uint8 (grayscale is repeated to 3 channels); labels are int32,
-1 where the data has none. Batch k depends only on (seed, k), so resuming is exact: the
contract is stated in `byol_jax.data.ordering`. Host crops and resizes are image_ops' (the
device's) box sampler and resize. Only 'tfds' and 'folder' import TensorFlow, on first use.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import ml_collections
import numpy as np

from byol_jax.data import ordering, registry
from byol_jax.data.config import check_data_config, default_data_config, probe_split
from byol_jax.data.registry import SOURCES, register_source
from byol_jax.data.source import CROP_FLIP, PLAIN, VIEWS, EvalPart, Source, info_dict

__all__ = [
    "SOURCES",
    "EvalPart",
    "Source",
    "check_data_config",
    "dataset_info",
    "default_data_config",
    "info_dict",
    "eval_batches",
    "linear_eval_batches",
    "pretrain_batches",
    "probe_split",
    "register_source",
    "require_labels",
    "split_has_labels",
]


def pretrain_batches(
    data: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    image_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    split: str | None = None,
    arrays: Mapping | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless pre-training batches of `split` (default `data.train_split`).

    Without `data.host_crop`: {'images': uint8 [B, S, S, 3], 'labels': int32 [B]}, images at
    S = image_size as they are, or centre-cropped to a square and resized when they are not.
    With `data.host_crop`: {'views': uint8 [2, B, S, S, 3], 'labels': int32 [B]}, two
    independent random-resized crops of each image. Deterministic in (seed, step).
    """
    mode = VIEWS if data.host_crop else PLAIN
    split = split or data.train_split
    return _train_batches(
        data, arrays, mode, split, global_batch_size, image_size, seed, start_step,
        process_index, process_count,
    )  # fmt: skip


def linear_eval_batches(
    data: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    image_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    split: str | None = None,
    arrays: Mapping | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless linear-probe training batches of a labelled split (default `probe_split(data)`).

    {'images': uint8 [B, S, S, 3], 'labels': int32 [B]}: a random-resized crop (data.crop_area,
    data.crop_ratio) and a horizontal flip with probability data.flip_p. Deterministic in (seed, step).
    """
    split = split or probe_split(data)
    require_labels(data, split, arrays)
    return _train_batches(
        data, arrays, CROP_FLIP, split, global_batch_size, image_size, seed, start_step,
        process_index, process_count,
    )  # fmt: skip


def _train_batches(
    data, arrays, mode, split, global_batch_size, image_size, seed, start_step, process_index,
    process_count,
):  # fmt: skip
    batch = ordering.per_process_batch(global_batch_size, process_count)
    ordering.check_process(process_index, process_count)
    ordering.check_positive(image_size=image_size)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    return registry.build(data, arrays).train_batches(
        mode,
        split,
        batch=batch,
        image_size=image_size,
        seed=ordering.seed_int(seed),
        start_step=start_step,
        process_index=process_index,
        process_count=process_count,
    )


def eval_batches(
    data: ml_collections.ConfigDict,
    *,
    split: str,
    batch_size: int,
    image_size: int,
    process_index: int = 0,
    process_count: int = 1,
    arrays: Mapping | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over this process's part of `split`, in order.

    Yields {'images': uint8 [B, S, S, 3], 'labels': int32 [B], 'mask': bool [B]} and, for
    sources with file names (folder, imagenet2012), 'file_names': str [B]. Images at
    S = image_size are kept as they are; others are centre-cropped (a square of
    `data.eval_crop_fraction` of the short side, the paper's 224/256) and resized to S. The
    last batches are padded with mask False; every process yields the same number of batches,
    so collective evaluation steps stay in step across processes.
    """
    ordering.check_positive(batch_size=batch_size, image_size=image_size)
    ordering.check_process(process_index, process_count)
    part = registry.build(data, arrays).eval_batches(
        split,
        batch_size=batch_size,
        image_size=image_size,
        process_index=process_index,
        process_count=process_count,
    )
    return ordering.padded_eval_batches(part, batch_size, image_size, process_count)


def dataset_info(data: ml_collections.ConfigDict, arrays: Mapping | None = None) -> dict:
    """What is known without reading the images.

    Returns {'num_examples': {split: int}, 'num_classes': int | None (None when unlabelled),
    'class_names': list[str] | None, 'image_shape': (H, W, C) of the stored images when all
    share one shape, else None}. Digits report their stored (8, 8, 1).
    """
    return registry.build(data, arrays).info()


def split_has_labels(
    data: ml_collections.ConfigDict, split: str, arrays: Mapping | None = None
) -> bool:
    """Whether `split` has labels: for TFDS, whether the label feature exists and one of the
    first records carries a label (STL-10's 'unlabelled' split stores -1 everywhere)."""
    return registry.build(data, arrays).has_labels(split)


def require_labels(
    data: ml_collections.ConfigDict, split: str, arrays: Mapping | None = None
) -> int:
    """Returns the number of classes; ValueError when `split` has no labels."""
    source = registry.build(data, arrays)
    num_classes = source.info()["num_classes"]
    if not num_classes or not source.has_labels(split):
        raise ValueError(
            f"split {split!r} of {source.describe()} has no labels, but the linear-evaluation "
            "protocol needs them: set data.probe_split (and data.eval_split) to labelled splits "
            "(STL-10: 'train' and 'test'), or use labelled data."
        )
    return num_classes
