"""The `data` settings: their defaults and their checks."""

from __future__ import annotations

import ml_collections

from byol_jax import image_ops
from byol_jax.data import registry


def default_data_config() -> ml_collections.ConfigDict:
    """The `data` settings, with their defaults (the digits quick start).

    There is no cache setting: TFDS caches small datasets (under 250 MiB, e.g. CIFAR-10) in
    memory by itself, and folders are read by index, which the OS page cache serves.
    """
    data = ml_collections.ConfigDict()
    data.source = "digits"  # 'tfds' | 'folder' | 'arrays' | 'digits' | a registered source
    data.name = "cifar10"  # tfds: dataset name, e.g. 'imagenet2012', 'stl10', 'imagenette'
    data.data_dir = ""  # tfds: data directory ('' = TFDS's default, ~/tensorflow_datasets)
    data.download = True  # tfds: download and prepare the dataset when it is not prepared
    data.folder = ""  # folder: root holding split/label/*.jpg, split/*.jpg or *.jpg
    data.train_split = "train"  # pre-training split (stl10: 'unlabelled')
    data.eval_split = "test"  # evaluation split (imagenet2012: 'validation')
    data.probe_split = ""  # labelled split the linear probe trains on ('' = train_split)
    data.image_key = "image"  # tfds: image feature
    data.label_key = "label"  # tfds: label feature ('' = unlabelled)
    data.host_crop = False  # pre-training: two random-resized crops per image on the host
    data.crop_area = (0.08, 1.0)  # random-resized crop: fraction of the image area
    data.crop_ratio = (3 / 4, 4 / 3)  # random-resized crop: aspect ratio range (log-uniform)
    data.resize_method = "bicubic"  # host crops and resizes: 'bicubic' | 'bilinear'
    data.flip_p = 0.5  # linear evaluation's training input: horizontal flip probability
    data.eval_crop_fraction = 0.875  # eval: centre square of this fraction of the short side
    data.shuffle_buffer = 10_000  # tfds: records in the per-epoch shuffle buffer
    data.shuffle_chunks = 16  # tfds: chunks per process interleaved in a per-epoch order
    data.num_parallel = -1  # tf.data parallel decode calls (-1 = AUTOTUNE)
    data.num_threads = 0  # tf.data private thread pool size (0 = TensorFlow's shared pool)
    data.prefetch = 2  # batches prepared ahead
    return data


def resize_method(data: ml_collections.ConfigDict) -> str:
    """`data.resize_method`; 'bicubic' in the configs of runs made before the field existed."""
    return data.get("resize_method", "bicubic")


def probe_split(data: ml_collections.ConfigDict) -> str:
    """The labelled split the linear probe trains on: `data.probe_split` or `data.train_split`."""
    return data.probe_split or data.train_split


def check_data_config(data: ml_collections.ConfigDict) -> None:
    """Clear errors for data settings out of range (ranges, probabilities, the source)."""
    registry.check_name(data.source)
    low, high = data.crop_area
    if not 0 < low <= high <= 1:
        raise ValueError(
            f"data.crop_area must satisfy 0 < low <= high <= 1, got {tuple(data.crop_area)}."
        )
    low, high = data.crop_ratio
    if not 0 < low <= high:
        raise ValueError(
            f"data.crop_ratio must satisfy 0 < low <= high, got {tuple(data.crop_ratio)}."
        )
    if resize_method(data) not in image_ops.RESIZE_METHODS:
        raise ValueError(
            f"data.resize_method must be one of {tuple(image_ops.RESIZE_METHODS)}, got "
            f"{resize_method(data)!r}."
        )
    if not 0 <= data.flip_p <= 1:
        raise ValueError(f"data.flip_p must be a probability in [0, 1], got {data.flip_p}.")
    if not 0 < data.eval_crop_fraction <= 1:
        raise ValueError(
            f"data.eval_crop_fraction must be in (0, 1], got {data.eval_crop_fraction}."
        )
