"""Host input pipeline: numpy batches of images and labels, one process's share.

The only module of byol_jax that imports TensorFlow and TFDS. It imports them on first use
(hiding GPUs from TensorFlow), so `import byol_jax` stays free of TensorFlow, and the 'arrays'
and 'digits' sources never import it at all.

Sources (`data.source`, see `default_data_config`):
  'tfds'    any TFDS image dataset `data.name` (imagenet2012, cifar10, stl10, imagenette, ...).
  'folder'  image files under `data.folder`: `split/label/*.jpg` (the layout tfds.ImageFolder
            reads), `split/*.jpg` (an unlabelled split), or a flat folder of unlabelled images,
            which every split name reads whole.
  'arrays'  numpy arrays passed as `arrays={split: {'images': uint8 [N, H, W, C],
            'labels': int [N] (optional)}}`.
  'digits'  scikit-learn's bundled 8x8 digits (1797 images, 10 classes) upsampled to
            `image_size`: needs no download; 'train' / 'test' are a stratified 80/20 split.

Every batch holds B = global_batch_size // process_count rows: this process's share of the
global batch. Images are RGB uint8 (grayscale is repeated to 3 channels); labels are int32,
-1 where the data has none.

Order and exact resume: the batch yielded for step k depends only on (seed, k), so a run
resumed with `start_step=k` reads exactly what an uninterrupted run reads, host crops included
(their randomness is stateless, keyed by (seed, stream position, view)).
  - arrays, digits, folder: the global stream position of row r of process p at step k is
    g = (k * process_count + p) * B + r; epoch g // N visits the examples in the order
    `numpy.random.default_rng([seed, epoch]).permutation(N)`. Processes read disjoint rows
    whose union is the global batch, and resuming costs nothing.
  - tfds: each process reads its own part of the split (`tfds.even_splits`). An epoch
    interleaves the part's `shuffle_chunks` contiguous chunks in an order drawn from
    (seed, epoch), then shuffles through a `shuffle_buffer` seeded by (seed, epoch).
    Resuming starts at the right epoch directly, then reads and drops, undecoded, the records
    before step k in that epoch: at most one epoch of this process's part (ImageNet's 140 GB
    on one host, a few minutes of reading; every extra host divides it).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import ml_collections
import numpy as np

SOURCES = ("tfds", "folder", "arrays", "digits")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before its fallback
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0
_INT64_MAX = np.iinfo(np.int64).max
_LABEL_PEEK = 512  # records read (images undecoded) to tell a labelled TFDS split


def default_data_config() -> ml_collections.ConfigDict:
    """The `data` settings, with their defaults (the digits quick start).

    There is no cache setting: TFDS caches small datasets (under 250 MiB, e.g. CIFAR-10) in
    memory by itself, and folders are read by index, which the OS page cache serves.
    """
    data = ml_collections.ConfigDict()
    data.source = "digits"  # 'tfds' | 'folder' | 'arrays' | 'digits'
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
    data.flip_p = 0.5  # linear evaluation's training input: horizontal flip probability
    data.eval_crop_fraction = 0.875  # eval: centre square of this fraction of the short side
    data.shuffle_buffer = 10_000  # tfds: records in the per-epoch shuffle buffer
    data.shuffle_chunks = 16  # tfds: chunks per process interleaved in a per-epoch order
    data.num_parallel = -1  # tf.data parallel decode calls (-1 = AUTOTUNE)
    data.num_threads = 0  # tf.data private thread pool size (0 = TensorFlow's shared pool)
    data.prefetch = 2  # batches prepared ahead
    return data


# ----------------------------------------------------------------------------- public API


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
    mode = "views" if data.host_crop else "plain"
    return _train_batches(
        data,
        mode,
        split or data.train_split,
        global_batch_size,
        image_size,
        seed,
        start_step,
        process_index,
        process_count,
        arrays,
    )


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
        data,
        "crop_flip",
        split,
        global_batch_size,
        image_size,
        seed,
        start_step,
        process_index,
        process_count,
        arrays,
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
    _check_positive(batch_size=batch_size, image_size=image_size)
    _check_process(process_index, process_count)
    reader = {"tfds": _tfds_eval, "folder": _folder_eval}.get(_source(data))
    if reader is None:
        reader = functools.partial(_arrays_eval, arrays=arrays)
    batches, total, file_names = reader(
        data, split, batch_size, image_size, process_index, process_count
    )
    num_batches = math.ceil(math.ceil(total / process_count) / batch_size)
    return _padded(batches, batch_size, num_batches, image_size, file_names)


def dataset_info(data: ml_collections.ConfigDict, arrays: Mapping | None = None) -> dict:
    """What is known without reading the images.

    Returns {'num_examples': {split: int}, 'num_classes': int | None (None when unlabelled),
    'class_names': list[str] | None, 'image_shape': (H, W, C) of the stored images when all
    share one shape, else None}. Digits report their stored (8, 8, 1).
    """
    source = _source(data)
    if source == "tfds":
        return _tfds_info(data)
    if source == "folder":
        folder = _list_folder(data.folder)
        names = list(folder.class_names) or None
        counts = {split: len(paths) for split, (paths, _) in folder.splits.items()}
        if "*" in counts:  # a flat folder: every split name reads all its images
            counts = dict.fromkeys((data.train_split, data.eval_split), counts["*"])
        return _info(counts, len(names) if names else None, names, None)
    splits = _arrays_splits(data, arrays, image_size=None)
    counts = {split: len(s["images"]) for split, s in splits.items()}
    labels = [s["labels"] for s in splits.values() if s["labels"] is not None]
    num_classes = int(max(label.max() for label in labels)) + 1 if labels else None
    shapes = {s["images"].shape[1:] for s in splits.values()}
    shape = tuple(shapes.pop()) if len(shapes) == 1 else None
    return _info(counts, num_classes, None, (8, 8, 1) if source == "digits" else shape)


def check_data_config(data: ml_collections.ConfigDict) -> None:
    """Clear errors for data settings out of range (ranges, probabilities, the source)."""
    _source(data)
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
    if not 0 <= data.flip_p <= 1:
        raise ValueError(f"data.flip_p must be a probability in [0, 1], got {data.flip_p}.")
    if not 0 < data.eval_crop_fraction <= 1:
        raise ValueError(
            f"data.eval_crop_fraction must be in (0, 1], got {data.eval_crop_fraction}."
        )


def probe_split(data: ml_collections.ConfigDict) -> str:
    """The labelled split the linear probe trains on: `data.probe_split` or `data.train_split`."""
    return data.probe_split or data.train_split


def split_has_labels(
    data: ml_collections.ConfigDict, split: str, arrays: Mapping | None = None
) -> bool:
    """Whether `split` has labels: for TFDS, whether the label feature exists and one of the
    first records carries a label (STL-10's 'unlabelled' split stores -1 everywhere)."""
    source = _source(data)
    if source == "tfds":
        builder = _tfds_builder(data)
        if _tfds_label_key(builder, data) is None:
            return False
        records = _tfds_records(builder, data, split, data.label_key).take(_LABEL_PEEK)
        return any(r["label"] >= 0 for r in records.as_numpy_iterator())
    if source == "folder":
        _folder_split(data.folder, split)  # an unknown split is an error of its own
        return _list_folder(data.folder).splits.get(split, (None, None))[1] is not None
    labels = _arrays_split(data, split, arrays, image_size=None)["labels"]
    return labels is not None and bool(np.any(labels >= 0))


def require_labels(
    data: ml_collections.ConfigDict, split: str, arrays: Mapping | None = None
) -> int:
    """Returns the number of classes; ValueError when `split` has no labels."""
    info = dataset_info(data, arrays)
    if not info["num_classes"] or not split_has_labels(data, split, arrays):
        raise ValueError(
            f"split {split!r} of {_describe(data)} has no labels, but the linear-evaluation "
            "protocol needs them: set data.probe_split (and data.eval_split) to labelled splits "
            "(STL-10: 'train' and 'test'), or use labelled data."
        )
    return info["num_classes"]


# ----------------------------------------------------------------------------- shared helpers


@functools.cache
def _tf():
    """TensorFlow, imported on first use, with GPUs hidden: the accelerators belong to JAX."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow's devices were already initialised by someone else
        logging.warning("input_pipeline: could not hide GPUs from TensorFlow")
    return tf


@functools.cache
def _tfds():
    _tf()
    import tensorflow_datasets as tfds

    return tfds


def _source(data) -> str:
    if data.source not in SOURCES:
        raise ValueError(f"data.source={data.source!r} is not one of {SOURCES}.")
    return data.source


def _describe(data) -> str:
    return {
        "tfds": f"tfds dataset {data.name!r}",
        "folder": f"folder {data.folder!r}",
        "arrays": "the arrays passed in",
        "digits": "the digits dataset",
    }[_source(data)]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}.")


def _check_process(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")


def _per_process_batch(global_batch_size: int, process_count: int) -> int:
    _check_positive(global_batch_size=global_batch_size, process_count=process_count)
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by the number of processes "
            f"({process_count}): choose a multiple of {process_count}."
        )
    return global_batch_size // process_count


def _info(counts, num_classes, class_names, image_shape) -> dict:
    return {
        "num_examples": dict(counts),
        "num_classes": num_classes,
        "class_names": class_names,
        "image_shape": image_shape,
    }


def _stream_positions(step: int, batch: int, process_index: int, process_count: int):
    """Global stream positions int64 [B] of this process's rows of the global batch at `step`."""
    start = (step * process_count + process_index) * batch
    return np.arange(start, start + batch, dtype=np.int64)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def _example_indices(seed: int, positions: np.ndarray, num_examples: int) -> np.ndarray:
    """Example index of each stream position: epoch pos // N is a permutation of (seed, epoch)."""
    epochs, offsets = np.divmod(positions, num_examples)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
        rows = epochs == epoch
        indices[rows] = _epoch_permutation(seed, int(epoch), num_examples)[offsets[rows]]
    return indices


def _seed(seed: int) -> int:
    return int(seed) % 2**63  # numpy seeds must be non-negative, TensorFlow's must fit int64


def _crop_box_np(u: np.ndarray, height: int, width: int, area_range, ratio_range):
    """torchvision's RandomResizedCrop box from uniforms u [4, attempts]: (top, left, h, w).

    Attempts draw an area fraction (uniform) and an aspect ratio (log-uniform); the first box
    that fits wins; when none fits, a centre crop with the ratio clamped to the range.
    `_crop_box_tf` is the same computation in TensorFlow (float32 in both).
    """
    h, w = np.float32(height), np.float32(width)
    area = h * w * (area_range[0] + (area_range[1] - area_range[0]) * u[0])
    log_lo, log_hi = np.log(np.float32(ratio_range[0])), np.log(np.float32(ratio_range[1]))
    ratio = np.exp(log_lo + (log_hi - log_lo) * u[1])
    cw, ch = np.round(np.sqrt(area * ratio)), np.round(np.sqrt(area / ratio))
    fits = (cw >= 1) & (cw <= w) & (ch >= 1) & (ch <= h)
    if fits.any():
        i = int(np.argmax(fits))
        cw, ch = cw[i], ch[i]
        top, left = np.floor(u[2, i] * (h - ch + 1)), np.floor(u[3, i] * (w - cw + 1))
    else:
        ch, cw = _fallback_box(h, w, np.float32(ratio_range[0]), np.float32(ratio_range[1]))
        top, left = np.floor((h - ch) / 2), np.floor((w - cw) / 2)
    return int(top), int(left), int(ch), int(cw)


def _fallback_box(h, w, ratio_lo, ratio_hi):
    """The whole image, its aspect ratio (w / h) clamped to [ratio_lo, ratio_hi]: (h, w)."""
    if w / h < ratio_lo:
        return np.round(w / ratio_lo), w
    if w / h > ratio_hi:
        return h, np.round(h * ratio_hi)
    return h, w


def _padded(batches, batch_size: int, num_batches: int, image_size: int, file_names: bool):
    """Pads batches to `batch_size` rows (mask False) and their number to `num_batches`."""
    empty = {
        "images": np.zeros((0, image_size, image_size, 3), np.uint8),
        "labels": np.zeros((0,), np.int32),
    }
    if file_names:
        empty["file_names"] = np.zeros((0,), str)
    more = itertools.repeat(empty, num_batches)  # this process's part may be shorter than others'
    for batch in itertools.islice(itertools.chain(batches, more), num_batches):
        rows = len(batch["labels"])
        out = {"mask": np.arange(batch_size) < rows}
        for key, value in batch.items():
            if key == "file_names":  # TensorFlow strings come back as bytes
                value = np.array([os.fsdecode(v) for v in value], str)
            fill = {"labels": -1, "file_names": ""}.get(key, 0)
            pad = np.full((batch_size - rows, *value.shape[1:]), fill, value.dtype)
            out[key] = np.concatenate([value, pad])
        yield out


def _train_batches(
    data,
    mode,
    split,
    global_batch_size,
    image_size,
    seed,
    start_step,
    process_index,
    process_count,
    arrays,
):
    batch = _per_process_batch(global_batch_size, process_count)
    _check_process(process_index, process_count)
    _check_positive(image_size=image_size)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    kwargs = dict(
        mode=mode,
        split=split,
        batch=batch,
        image_size=image_size,
        seed=_seed(seed),
        start_step=start_step,
        process_index=process_index,
        process_count=process_count,
    )
    source = _source(data)
    if source == "tfds":
        return _tfds_train(data, **kwargs)
    if source == "folder":
        return _folder_train(data, **kwargs)
    return _arrays_train(data, arrays=arrays, **kwargs)


# ----------------------------------------------------------------------------- arrays, digits
# No TensorFlow here: crops and resizes are PIL's (bicubic), per image.


@functools.lru_cache(maxsize=4)
def _digits(image_size: int | None) -> dict[str, dict[str, np.ndarray]]:
    """scikit-learn's digits as uint8 [N, S, S, 3] (bilinear upsampling of the 0..16 values).

    image_size=None keeps the stored 8x8 single channel. The split is stratified 80/20 with a
    fixed seed; each split keeps the dataset's order.
    """
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    pixels, labels = load_digits(return_X_y=True)
    values = pixels.reshape(-1, 8, 8).astype(np.float32)  # 0..16
    if image_size is not None:
        size = (image_size, image_size)
        values = np.stack(
            [np.asarray(Image.fromarray(v).resize(size, Image.BILINEAR)) for v in values]
        )
    images = np.clip(np.round(values * (255 / 16)), 0, 255).astype(np.uint8)[..., None]
    if image_size is not None:
        images = np.repeat(images, 3, axis=-1)
    train, test = train_test_split(
        np.arange(len(labels)),
        test_size=_DIGITS_TEST_FRACTION,
        stratify=labels,
        random_state=_DIGITS_SPLIT_SEED,
    )
    return {
        name: {"images": images[np.sort(rows)], "labels": labels[np.sort(rows)].astype(np.int32)}
        for name, rows in (("train", train), ("test", test))
    }


def _arrays_splits(data, arrays, image_size) -> dict[str, dict[str, Any]]:
    """{split: {'images': uint8 [N, H, W, C], 'labels': int32 [N] | None}}, validated."""
    if _source(data) == "digits":
        return _digits(image_size)
    if not isinstance(arrays, Mapping) or not arrays:
        raise TypeError(
            "data.source='arrays' needs arrays={split: {'images': uint8 [N, H, W, C], "
            f"'labels': int [N]}}}}, got {type(arrays).__name__}."
        )
    return {split: _checked_arrays(split, value) for split, value in arrays.items()}


def _checked_arrays(split: str, value) -> dict[str, Any]:
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
    return {"images": images, "labels": labels}


def _arrays_split(data, split, arrays, image_size) -> dict[str, Any]:
    splits = _arrays_splits(data, arrays, image_size)
    if split not in splits:
        raise ValueError(f"split {split!r} is not in {_describe(data)}: it has {sorted(splits)}.")
    return splits[split]


def _np_rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def _pil_resize(image: np.ndarray, size: int, box) -> np.ndarray:
    """Bicubic resize of image[box] ((left, top, right, bottom)) to [size, size, C]."""
    from PIL import Image

    squeeze = image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    out = np.asarray(pil.resize((size, size), Image.BICUBIC, box=box))
    return out[..., None] if squeeze else out


def _np_centre_crop(image: np.ndarray, size: int, fraction: float) -> np.ndarray:
    """The image as it is when already [size, size]; else its centre square, resized."""
    h, w = image.shape[:2]
    if h == w == size:
        return image
    side = max(1, round(fraction * min(h, w)))
    top, left = (h - side) // 2, (w - side) // 2
    return _pil_resize(image, size, (left, top, left + side, top + side))


def _np_random_resized_crop(image, rng, size, area_range, ratio_range) -> np.ndarray:
    u = rng.random((4, _CROP_ATTEMPTS), dtype=np.float32)
    top, left, ch, cw = _crop_box_np(u, image.shape[0], image.shape[1], area_range, ratio_range)
    return _pil_resize(image, size, (left, top, left + cw, top + ch))


def _np_example(image, mode, size, data, seed, position):
    """One training example's image(s) for `mode`; randomness keyed by (seed, position, view)."""
    if mode == "plain":
        return _np_centre_crop(image, size, 1.0)
    crop = lambda view: _np_random_resized_crop(
        image, np.random.default_rng([seed, position, view]), size, data.crop_area, data.crop_ratio
    )
    if mode == "views":
        return np.stack([crop(0), crop(1)])
    flip = np.random.default_rng([seed, position, 2]).random() < data.flip_p
    return crop(0)[:, ::-1] if flip else crop(0)


def _arrays_train(
    data, *, arrays, mode, split, batch, image_size, seed, start_step, process_index, process_count
):
    chosen = _arrays_split(data, split, arrays, image_size)
    images, labels = chosen["images"], chosen["labels"]
    as_is = mode == "plain" and images.shape[1:3] == (image_size, image_size)

    def batches():
        for step in itertools.count(start_step):
            positions = _stream_positions(step, batch, process_index, process_count)
            rows = _example_indices(seed, positions, len(images))
            if as_is:
                out = images[rows]
            else:
                examples = zip(images[rows], positions, strict=True)
                out = np.stack(
                    [_np_example(x, mode, image_size, data, seed, int(g)) for x, g in examples]
                )
            out = _np_rgb(out)
            labels_out = labels[rows] if labels is not None else np.full(batch, -1, np.int32)
            if mode == "views":
                yield {"views": np.ascontiguousarray(out.swapaxes(0, 1)), "labels": labels_out}
            else:
                yield {"images": out, "labels": labels_out}

    return batches()


def _arrays_eval(data, split, batch_size, image_size, process_index, process_count, *, arrays):
    chosen = _arrays_split(data, split, arrays, image_size)
    images, labels = chosen["images"], chosen["labels"]
    rows = np.array_split(np.arange(len(images)), process_count)[process_index]

    def batches():
        for start in range(0, len(rows), batch_size):
            part = rows[start : start + batch_size]
            out = np.stack(
                [_np_centre_crop(images[i], image_size, data.eval_crop_fraction) for i in part]
            )
            part_labels = labels[part] if labels is not None else np.full(len(part), -1, np.int32)
            yield {"images": _np_rgb(out), "labels": part_labels}

    return batches(), len(images), False


# ----------------------------------------------------------------------------- TensorFlow ops


def _tf_decode(encoded):
    """Encoded JPEG / PNG / BMP / GIF bytes -> uint8 [H, W, 3]."""
    tf = _tf()
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _tf_resize(image, size: int):
    """Bicubic resize to uint8 [size, size, 3] (no antialiasing, as in BYOL's own pipeline)."""
    tf = _tf()
    image = tf.image.resize(image, [size, size], method="bicubic")
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _tf_centre_crop(image, size: int, fraction: float):
    """The image as it is when already [size, size]; else its centre square, resized."""
    tf = _tf()
    h, w = tf.shape(image)[0], tf.shape(image)[1]

    def crop():
        short = tf.cast(tf.minimum(h, w), tf.float32)
        side = tf.maximum(1, tf.cast(tf.round(fraction * short), tf.int32))
        top, left = (h - side) // 2, (w - side) // 2
        return _tf_resize(image[top : top + side, left : left + side], size)

    return tf.cond((h == size) & (w == size), lambda: image, crop)


def _crop_box_tf(u, height, width, area_range, ratio_range):
    """`_crop_box_np` in TensorFlow: u float32 [4, attempts] -> int32 (top, left, h, w)."""
    tf = _tf()
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    area = h * w * (area_range[0] + (area_range[1] - area_range[0]) * u[0])
    log_lo, log_hi = math.log(ratio_range[0]), math.log(ratio_range[1])
    ratio = tf.exp(log_lo + (log_hi - log_lo) * u[1])
    cw, ch = tf.round(tf.sqrt(area * ratio)), tf.round(tf.sqrt(area / ratio))
    fits = (cw >= 1) & (cw <= w) & (ch >= 1) & (ch <= h)
    i = tf.argmax(tf.cast(fits, tf.int32))  # the first box that fits
    lo, hi = tf.constant(ratio_range[0], tf.float32), tf.constant(ratio_range[1], tf.float32)
    fall_h = tf.where(w / h < lo, tf.round(w / lo), h)
    fall_w = tf.where(w / h > hi, tf.round(h * hi), w)
    any_fits = tf.reduce_any(fits)
    ch, cw = tf.where(any_fits, ch[i], fall_h), tf.where(any_fits, cw[i], fall_w)
    top = tf.where(any_fits, tf.floor(u[2, i] * (h - ch + 1)), tf.floor((h - ch) / 2))
    left = tf.where(any_fits, tf.floor(u[3, i] * (w - cw + 1)), tf.floor((w - cw) / 2))
    return tuple(tf.cast(v, tf.int32) for v in (top, left, ch, cw))


def _tf_random_resized_crop(image, key, size, area_range, ratio_range):
    tf = _tf()
    u = tf.random.stateless_uniform([4, _CROP_ATTEMPTS], key)
    top, left, ch, cw = _crop_box_tf(
        u, tf.shape(image)[0], tf.shape(image)[1], area_range, ratio_range
    )
    return _tf_resize(image[top : top + ch, left : left + cw], size)


def _tf_example(encoded, key, mode, size, data):
    """Decodes one image and makes its training input for `mode`; `key` int64 [2]."""
    tf = _tf()
    image = _tf_decode(encoded)
    if mode == "plain":
        return _tf_centre_crop(image, size, 1.0)
    crop = lambda view: _tf_random_resized_crop(
        image, tf.random.fold_in(key, view), size, data.crop_area, data.crop_ratio
    )
    if mode == "views":
        return tf.stack([crop(0), crop(1)])
    image = crop(0)
    flip = tf.random.stateless_uniform([], tf.random.fold_in(key, 2)) < data.flip_p
    return tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)


def _tf_options(data):
    tf = _tf()
    options = tf.data.Options()
    options.deterministic = True  # the order is part of exact resume
    options.threading.max_intra_op_parallelism = 1
    if data.num_threads > 0:
        options.threading.private_threadpool_size = data.num_threads
    return options


def _tf_train_tail(ds, data, mode, batch, image_size, seed, stream):
    """{'position', 'encoded', 'label'} records -> batches of training inputs, prefetched."""
    tf = _tf()
    base_key = tf.constant([seed, stream], tf.int64)

    def example(record):
        key = tf.random.fold_in(base_key, record["position"])
        return _tf_example(record["encoded"], key, mode, image_size, data), record["label"]

    def to_dict(images, labels):
        if mode == "views":  # [B, 2, S, S, 3] -> [2, B, S, S, 3]
            return {"views": tf.transpose(images, [1, 0, 2, 3, 4]), "labels": labels}
        return {"images": images, "labels": labels}

    ds = ds.map(example, num_parallel_calls=data.num_parallel)
    ds = ds.batch(batch, drop_remainder=True).map(to_dict)
    return ds.with_options(_tf_options(data)).prefetch(data.prefetch)


def _tf_eval_tail(ds, data, batch_size, image_size):
    """{'encoded', 'label'[, 'file_name']} records -> eval batches (the last one short)."""

    def example(record):
        image = _tf_centre_crop(_tf_decode(record["encoded"]), image_size, data.eval_crop_fraction)
        out = {"images": image, "labels": record["label"]}
        if "file_name" in record:
            out["file_names"] = record["file_name"]
        return out

    ds = ds.map(example, num_parallel_calls=data.num_parallel).batch(batch_size)
    return ds.with_options(_tf_options(data)).prefetch(data.prefetch)


def _numpy_batches(ds, batch_files: Callable[[int], Sequence[str]] | None = None):
    """Iterates a tf.data pipeline as numpy; names the file when a folder image fails to decode."""
    tf = _tf()
    iterator = ds.as_numpy_iterator()
    for i in itertools.count():
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as error:
            if batch_files is None:
                raise
            _raise_bad_file(batch_files, i, error)
        yield batch


def _raise_bad_file(batch_files, failed_batch: int, error) -> None:
    """Decodes the failed batch's files (and the next ones, for safety) to name the culprit."""
    tf = _tf()
    for i in range(failed_batch, failed_batch + 3):
        for path in batch_files(i):
            try:
                _tf_decode(tf.io.read_file(path))
            except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as bad:
                raise ValueError(
                    f"cannot read image file {path}: {bad.message.strip()}. Remove or replace "
                    "the file (no image is silently skipped)."
                ) from error
    raise error


# ----------------------------------------------------------------------------- folder
# Read by index rather than with tfds.ImageFolder: ImageFolder shuffles without a seed, has no
# sub-splits for processes and no flat layout, and reading by index makes resume free. The
# labels are the same: sorted class-folder names, over all splits.


class _Folder(NamedTuple):
    """A folder's images: class names, and per split (paths bytes [N] relative to the root,
    labels int32 [N] or None when unlabelled). Bytes keep ImageNet's 1.3 M paths ~50 MB."""

    class_names: tuple[str, ...]
    splits: dict[str, tuple[np.ndarray, np.ndarray | None]]


def _image_files(directory: str) -> list[str]:
    with os.scandir(directory) as entries:
        names = (e.name for e in entries if e.is_file())
        return sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS))


def _subfolders(directory: str) -> list[str]:
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _layout(root: str) -> dict[str, dict[str | None, list[str]]]:
    """{split: {label (None: unlabelled): relative paths}}; a flat folder is split '*'.

    As in tfds.ImageFolder, files lying directly in a split that has class folders are ignored.
    """
    layout = {}
    for split in _subfolders(root):
        labels = _subfolders(os.path.join(root, split))
        groups = {label: os.path.join(split, label) for label in labels} or {None: split}
        layout[split] = {
            label: [os.path.join(sub, f) for f in _image_files(os.path.join(root, sub))]
            for label, sub in groups.items()
        }
    return layout or {"*": {None: _image_files(root)}}


@functools.lru_cache(maxsize=8)
def _list_folder(root: str) -> _Folder:
    """Lists a folder once per process (files added later are not seen)."""
    if not root or not os.path.isdir(root):
        raise ValueError(f"data.folder={root!r} is not a directory (source='folder').")
    layout = _layout(root)
    class_names = tuple(sorted({label for g in layout.values() for label in g if label}))
    index = {name: i for i, name in enumerate(class_names)}
    splits = {}
    for split, groups in layout.items():
        paths = [os.fsencode(p) for files in groups.values() for p in files]
        if not paths:
            continue
        labels = None
        if None not in groups:  # labelled: the class index of each group, repeated
            sizes = [len(files) for files in groups.values()]
            labels = np.repeat([index[label] for label in groups], sizes).astype(np.int32)
        splits[split] = (np.array(paths), labels)
    if not splits:
        raise ValueError(
            f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under data.folder={root!r}: expected "
            "split/label/*.jpg, split/*.jpg or *.jpg."
        )
    return _Folder(class_names, splits)


def _folder_split(root: str, split: str):
    """(paths bytes [N], labels int32 [N]) of `split` (labels -1 when unlabelled).

    A flat folder serves all its images under every split name.
    """
    folder = _list_folder(root)
    if "*" in folder.splits:
        split = "*"
    if split not in folder.splits:
        raise ValueError(
            f"split {split!r} is not in data.folder={root!r}: it has {sorted(folder.splits)}."
        )
    paths, labels = folder.splits[split]
    return paths, np.full(len(paths), -1, np.int32) if labels is None else labels


def _reader(root: str):
    """A tf.data map reading record['path'] (relative to `root`) into record['encoded']."""
    tf, prefix = _tf(), os.path.join(root, "")
    return lambda record: {**record, "encoded": tf.io.read_file(prefix + record["path"])}


def _folder_train(
    data, *, mode, split, batch, image_size, seed, start_step, process_index, process_count
):
    tf = _tf()
    paths, labels = _folder_split(data.folder, split)

    def step_records(step):
        positions = _stream_positions(step, batch, process_index, process_count)
        rows = _example_indices(seed, positions, len(paths))
        return {"position": positions, "path": paths[rows], "label": labels[rows]}

    spec = {
        "position": tf.TensorSpec([batch], tf.int64),
        "path": tf.TensorSpec([batch], tf.string),
        "label": tf.TensorSpec([batch], tf.int32),
    }
    steps = lambda: map(step_records, itertools.count(start_step))
    ds = tf.data.Dataset.from_generator(steps, output_signature=spec).unbatch()
    ds = ds.map(_reader(data.folder), num_parallel_calls=data.num_parallel)
    ds = _tf_train_tail(ds, data, mode, batch, image_size, seed, stream=0)
    files = lambda i: _full_paths(data.folder, step_records(start_step + i)["path"])
    return _numpy_batches(ds, files)


def _folder_eval(data, split, batch_size, image_size, process_index, process_count):
    tf = _tf()
    paths, labels = _folder_split(data.folder, split)
    rows = np.array_split(np.arange(len(paths)), process_count)[process_index]
    records = {"path": paths[rows], "label": labels[rows], "file_name": paths[rows]}
    ds = tf.data.Dataset.from_tensor_slices(records)
    ds = ds.map(_reader(data.folder), num_parallel_calls=data.num_parallel)
    ds = _tf_eval_tail(ds, data, batch_size, image_size)
    files = lambda i: _full_paths(data.folder, paths[rows[i * batch_size : (i + 1) * batch_size]])
    return _numpy_batches(ds, files), len(paths), True


def _full_paths(root: str, paths: np.ndarray) -> list[str]:
    return [os.path.join(root, os.fsdecode(p)) for p in paths]


# ----------------------------------------------------------------------------- tfds


def _tfds_builder(data):
    """The prepared TFDS builder of `data.name`, with clear errors for what users can fix."""
    tfds = _tfds()
    try:
        builder = tfds.builder(data.name, data_dir=data.data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"unknown TFDS dataset data.name={data.name!r}: check the name in the TFDS catalog "
            "(https://www.tensorflow.org/datasets/catalog), or use source='folder' for a folder "
            "of images."
        ) from None
    if not builder.is_prepared():
        _prepare(builder, data)
    features = builder.info.features
    image = features[data.image_key] if data.image_key in features else None
    if not isinstance(image, tfds.features.Image):
        raise ValueError(
            f"data.image_key={data.image_key!r} is not an image feature of {data.name!r}: its "
            f"features are {sorted(features.keys())}."
        )
    return builder


def _prepare(builder, data) -> None:
    data_dir = os.fspath(data.data_dir or builder.data_dir_root)
    manual_dir = os.path.join(data_dir, "downloads", "manual")
    message = (
        f"TFDS dataset {data.name!r} needs a manual download: put its files (for imagenet2012, "
        f"ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar) in {manual_dir}/ and run again, "
        f"or prepare it with `tfds build {data.name} --data_dir={data_dir}`."
    )
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS and not (
        os.path.isdir(manual_dir) and os.listdir(manual_dir)
    ):
        raise ValueError(f"{message}\nTFDS says: {builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}")
    if not data.download:
        raise ValueError(
            f"TFDS dataset {data.name!r} is not prepared in {data_dir} and data.download is "
            f"False: set data.download=True or run `tfds build {data.name} --data_dir={data_dir}`."
        )
    try:
        builder.download_and_prepare()
    except AssertionError as error:  # TFDS asserts on a missing or empty manual_dir
        if "manual" in str(error).lower():
            raise ValueError(message) from error
        raise


def _tfds_label_key(builder, data) -> str | None:
    """The label feature, or None without one. Unlabelled rows (STL-10's 'unlabelled' split)
    carry label -1 in TFDS: they reach the batches as -1, which the probe and kNN skip."""
    has_key = bool(data.label_key) and data.label_key in builder.info.features
    return data.label_key if has_key else None


def _tfds_records(builder, data, split, label_key, names_key=None):
    """{'encoded', 'label' int32 (-1 without label_key)[, 'file_name']} of `split`, in order."""
    tfds, tf = _tfds(), _tf()
    try:
        ds = builder.as_dataset(
            split=split, shuffle_files=False, decoders={data.image_key: tfds.decode.SkipDecoding()}
        )
    except (KeyError, ValueError) as error:
        known = sorted(builder.info.splits.keys())
        raise ValueError(
            f"cannot read split {split!r} of {data.name!r} ({known}): {error}"
        ) from None

    def record(example):
        label = tf.constant(-1) if label_key is None else example[label_key]
        out = {"encoded": example[data.image_key], "label": tf.cast(label, tf.int32)}
        if names_key:
            out["file_name"] = example[names_key]
        return out

    return ds.map(record)


def _cardinality(ds, what: str) -> int:
    count = int(ds.cardinality())
    if count < 0:
        raise ValueError(f"TFDS does not know the number of examples of {what}.")
    return count


def _tfds_train(
    data, *, mode, split, batch, image_size, seed, start_step, process_index, process_count
):
    tfds, tf = _tfds(), _tf()
    builder = _tfds_builder(data)
    label_key = _tfds_label_key(builder, data)
    part = tfds.even_splits(split, process_count, drop_remainder=True)[process_index]
    chunks = tfds.even_splits(part, data.shuffle_chunks)
    chunks = [_tfds_records(builder, data, chunk, label_key) for chunk in chunks]
    sizes = [_cardinality(c, f"{data.name} {split}") for c in chunks]
    chunks, sizes = [c for c, n in zip(chunks, sizes, strict=True) if n], [n for n in sizes if n]
    if not chunks:
        raise ValueError(f"split {split!r} of {data.name!r} has no examples for this process.")
    epoch_size, ends = sum(sizes), tf.constant(np.cumsum(sizes), tf.int64)

    def epoch(e):
        """This process's part in epoch e's order: chunks interleaved at random, then shuffled."""
        key = tf.stack([tf.constant(seed, tf.int64), e])
        slot = lambda i: tf.random.experimental.index_shuffle(i, key, epoch_size - 1)
        chunk = lambda i: tf.searchsorted(ends, [slot(i)], side="right", out_type=tf.int64)[0]
        choices = tf.data.Dataset.range(epoch_size).map(chunk)
        shuffle_seed = tf.random.stateless_uniform(
            [], key, minval=None, maxval=None, dtype=tf.int64
        )
        ds = tf.data.Dataset.choose_from_datasets(chunks, choices)
        return ds.shuffle(min(data.shuffle_buffer, epoch_size), seed=shuffle_seed)

    start = start_step * batch
    ds = tf.data.Dataset.range(start // epoch_size, _INT64_MAX).flat_map(epoch)
    ds = ds.skip(start % epoch_size)  # the resume cost: reads, never decodes, up to one epoch
    ds = ds.enumerate(start).map(lambda g, r: {**r, "position": g})
    ds = _tf_train_tail(ds, data, mode, batch, image_size, seed, stream=1 + process_index)
    return _numpy_batches(ds)


def _tfds_eval(data, split, batch_size, image_size, process_index, process_count):
    tfds = _tfds()
    builder = _tfds_builder(data)
    label_key = _tfds_label_key(builder, data)
    total = _cardinality(_tfds_records(builder, data, split, None), f"{data.name} {split}")
    part = tfds.even_splits(split, process_count)[process_index] if process_count > 1 else split
    features = builder.info.features
    names_key = next((k for k in ("file_name", "image/filename") if k in features), None)
    ds = _tfds_records(builder, data, part, label_key, names_key)
    return _numpy_batches(_tf_eval_tail(ds, data, batch_size, image_size)), total, bool(names_key)


def _tfds_info(data) -> dict:
    tfds = _tfds()
    builder = _tfds_builder(data)
    features = builder.info.features
    counts = {name: info.num_examples for name, info in builder.info.splits.items()}
    if not counts:  # e.g. under tfds.testing.mock_data: count what as_dataset yields
        splits = [s for s in (data.train_split, data.eval_split, data.probe_split) if s]
        counts = {s: _cardinality(builder.as_dataset(split=s), s) for s in dict.fromkeys(splits)}
    label = features[data.label_key] if data.label_key in features else None
    labelled = isinstance(label, tfds.features.ClassLabel)
    shape = tuple(features[data.image_key].shape)
    return _info(
        counts,
        label.num_classes if labelled else None,
        list(label.names) if labelled else None,
        shape if None not in shape else None,
    )
