"""tf.data tails shared by the sources that decode files (folder, tfds), and their iteration
as numpy batches."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from byol_jax.data import config, tf_ops
from byol_jax.data.source import VIEWS


def options(data):
    t = tf_ops.tf()
    opts = t.data.Options()
    opts.deterministic = True  # the order is part of exact resume
    opts.threading.max_intra_op_parallelism = 1
    if data.num_threads > 0:
        opts.threading.private_threadpool_size = data.num_threads
    return opts


def train_tail(ds, data, mode: str, batch: int, image_size: int, seed: int, stream: int):
    """{'position', 'encoded', 'label'} records -> batches of training inputs, prefetched.

    An example's key is fold_in([seed, stream], position): stateless, so a resumed run
    crops what an uninterrupted one crops.
    """
    t = tf_ops.tf()
    base_key = t.constant([seed, stream], t.int64)

    def example(record):
        key = t.random.fold_in(base_key, record["position"])
        image = tf_ops.train_image(record["encoded"], key, mode, image_size, data)
        return image, record["label"]

    def to_dict(images, labels):
        if mode == VIEWS:  # [B, 2, S, S, 3] -> [2, B, S, S, 3]
            return {"views": t.transpose(images, [1, 0, 2, 3, 4]), "labels": labels}
        return {"images": images, "labels": labels}

    ds = ds.map(example, num_parallel_calls=data.num_parallel)
    ds = ds.batch(batch, drop_remainder=True).map(to_dict)
    return ds.with_options(options(data)).prefetch(data.prefetch)


def eval_tail(ds, data, batch_size: int, image_size: int):
    """{'encoded', 'label'[, 'file_name']} records -> eval batches (the last one short)."""
    fraction, method = data.eval_crop_fraction, config.resize_method(data)

    def example(record):
        image = tf_ops.eval_image(record["encoded"], image_size, fraction, method)
        out = {"images": image, "labels": record["label"]}
        if "file_name" in record:
            out["file_names"] = record["file_name"]
        return out

    ds = ds.map(example, num_parallel_calls=data.num_parallel).batch(batch_size)
    return ds.with_options(options(data)).prefetch(data.prefetch)


def numpy_batches(ds, batch_files: Callable[[int], Sequence[str]] | None = None):
    """Iterates a tf.data pipeline as numpy; names the file when a folder image fails to decode.

    `batch_files(i)` lists the files of batch i.
    """
    errors = _decode_errors()
    iterator = ds.as_numpy_iterator()
    for i in itertools.count():
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except errors as error:
            if batch_files is None:
                raise
            _raise_bad_file(batch_files, i, error)
        yield batch


def _decode_errors() -> tuple[type[Exception], ...]:
    t = tf_ops.tf()
    return t.errors.InvalidArgumentError, t.errors.NotFoundError


def _raise_bad_file(batch_files, failed_batch: int, error) -> None:
    """Decodes the failed batch's files (and the next ones, for safety) to name the culprit."""
    t = tf_ops.tf()
    for i in range(failed_batch, failed_batch + 3):
        for path in batch_files(i):
            try:
                tf_ops.eval_image(t.io.read_file(path), 1, 1.0, "bilinear")
            except _decode_errors() as bad:
                raise ValueError(
                    f"cannot read image file {path}: {bad.message.strip()}. Remove or replace "
                    "the file (no image is silently skipped)."
                ) from error
    raise error
