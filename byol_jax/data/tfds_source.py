"""Source 'tfds': any TFDS image dataset `data.name` (imagenet2012, cifar10, stl10, ...).

Order. TFDS reads records in sequence, so this source keeps the ordering contract's first
two points (`byol_jax.data.ordering`: batch k depends only on (seed, k); processes read
disjoint parts) with an epoch order of its own. Each process reads its part of the split
(`tfds.split_for_jax_process`). An epoch interleaves the part's `data.shuffle_chunks`
contiguous chunks in an order drawn from (seed, epoch), then shuffles through a
`data.shuffle_buffer` seeded by (seed, epoch). Resuming starts at the right epoch directly,
then reads and drops, undecoded, the records before step k in that epoch: at most one epoch
of this process's part (ImageNet's 140 GB on one host, a few minutes; every extra host
divides it). Host crops are keyed by (seed, 1 + process, stream position), as the contract's.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from byol_jax.data import tf_ops, tf_pipeline
from byol_jax.data.source import EvalPart, Source, info_dict

_INT64_MAX = np.iinfo(np.int64).max
_LABEL_PEEK = 512  # records read (images undecoded) to tell a labelled split


class TfdsSource(Source):
    def describe(self) -> str:
        return f"tfds dataset {self.data.name!r}"

    @functools.cached_property
    def builder(self):
        """The prepared TFDS builder of `data.name`, with clear errors for what users can fix."""
        tfds, data = tf_ops.tfds(), self.data
        try:
            builder = tfds.builder(data.name, data_dir=data.data_dir or None)
        except tfds.core.registered.DatasetNotFoundError:
            raise ValueError(
                f"unknown TFDS dataset data.name={data.name!r}: check the name in the TFDS "
                "catalog (https://www.tensorflow.org/datasets/catalog), or use source='folder' "
                "for a folder of images."
            ) from None
        if not builder.is_prepared():
            _prepare(builder, data)
        features = builder.info.features
        image = features[data.image_key] if data.image_key in features else None
        if not isinstance(image, tfds.features.Image):
            raise ValueError(
                f"data.image_key={data.image_key!r} is not an image feature of {data.name!r}: "
                f"its features are {sorted(features.keys())}."
            )
        return builder

    @property
    def label_key(self) -> str | None:
        """The label feature, or None without one. Unlabelled rows (STL-10's 'unlabelled'
        split) carry label -1 in TFDS: they reach the batches as -1, which the probe skips."""
        key = self.data.label_key
        return key if key and key in self.builder.info.features else None

    def info(self) -> dict:
        tfds, data, features = tf_ops.tfds(), self.data, self.builder.info.features
        counts = {name: info.num_examples for name, info in self.builder.info.splits.items()}
        if not counts:  # e.g. under tfds.testing.mock_data: count what as_dataset yields
            splits = [s for s in (data.train_split, data.eval_split, data.probe_split) if s]
            counts = {
                s: self._count(self.builder.as_dataset(split=s), s) for s in dict.fromkeys(splits)
            }
        label = features[data.label_key] if data.label_key in features else None
        labelled = isinstance(label, tfds.features.ClassLabel)
        shape = tuple(features[data.image_key].shape)
        return info_dict(
            counts,
            label.num_classes if labelled else None,
            list(label.names) if labelled else None,
            shape if None not in shape else None,
        )

    def has_labels(self, split: str) -> bool:
        """Whether the label feature exists and one of the first records carries a label
        (STL-10's 'unlabelled' split stores -1 everywhere)."""
        if self.label_key is None:
            return False
        records = self.records(split, self.label_key).take(_LABEL_PEEK)
        return any(r["label"] >= 0 for r in records.as_numpy_iterator())

    def records(self, split, label_key, names_key=None):
        """{'encoded', 'label' int32 (-1 without label_key)[, 'file_name']} of `split`, in order."""
        tfds, t, data = tf_ops.tfds(), tf_ops.tf(), self.data
        try:
            ds = self.builder.as_dataset(
                split=split,
                shuffle_files=False,
                decoders={data.image_key: tfds.decode.SkipDecoding()},
            )
        except (KeyError, ValueError) as error:
            known = sorted(self.builder.info.splits.keys())
            raise ValueError(
                f"cannot read split {split!r} of {data.name!r} ({known}): {error}"
            ) from None

        def record(example):
            label = t.constant(-1) if label_key is None else example[label_key]
            out = {"encoded": example[data.image_key], "label": t.cast(label, t.int32)}
            if names_key:
                out["file_name"] = example[names_key]
            return out

        return ds.map(record)

    def train_batches(
        self, mode, split, *, batch, image_size, seed, start_step, process_index, process_count
    ):
        t = tf_ops.tf()
        epoch, epoch_size = self._epochs(split, seed, process_index, process_count)
        start = start_step * batch
        ds = t.data.Dataset.range(start // epoch_size, _INT64_MAX).flat_map(epoch)
        ds = ds.skip(start % epoch_size)  # the resume cost: reads, never decodes, up to an epoch
        ds = ds.enumerate(start).map(lambda g, r: {**r, "position": g})
        stream = 1 + process_index
        ds = tf_pipeline.train_tail(ds, self.data, mode, batch, image_size, seed, stream)
        return tf_pipeline.numpy_batches(ds)

    def _epochs(self, split, seed, process_index, process_count):
        """(epoch(e) -> this process's part in epoch e's order, the part's size)."""
        tfds, t, data = tf_ops.tfds(), tf_ops.tf(), self.data
        part = tfds.split_for_jax_process(
            split, process_index=process_index, process_count=process_count, drop_remainder=True
        )
        chunk_splits = tfds.even_splits(part, data.shuffle_chunks)
        chunks = [self.records(c, self.label_key) for c in chunk_splits]
        sized = [(c, n) for c in chunks if (n := self._count(c, split))]  # drop empty chunks
        if not sized:
            raise ValueError(f"split {split!r} of {data.name!r} has no examples for this process.")
        chunks, sizes = zip(*sized, strict=True)
        epoch_size, ends = sum(sizes), t.constant(np.cumsum(sizes), t.int64)

        def epoch(e):
            """The chunks interleaved in an order drawn from (seed, e), then shuffled."""
            key = t.stack([t.constant(seed, t.int64), e])
            slot = lambda i: t.random.experimental.index_shuffle(i, key, epoch_size - 1)
            chunk = lambda i: t.searchsorted(ends, [slot(i)], side="right", out_type=t.int64)[0]
            choices = t.data.Dataset.range(epoch_size).map(chunk)
            shuffle_seed = t.random.stateless_uniform(
                [], key, minval=None, maxval=None, dtype=t.int64
            )
            ds = t.data.Dataset.choose_from_datasets(list(chunks), choices)
            return ds.shuffle(min(data.shuffle_buffer, epoch_size), seed=shuffle_seed)

        return epoch, epoch_size

    def eval_batches(self, split, *, batch_size, image_size, process_index, process_count):
        tfds = tf_ops.tfds()
        total = self._count(self.records(split, None), split)
        if process_count > 1:  # parts of sizes differing by one, the larger first
            split = tfds.split_for_jax_process(
                split, process_index=process_index, process_count=process_count
            )
        features = self.builder.info.features
        names_key = next((k for k in ("file_name", "image/filename") if k in features), None)
        ds = self.records(split, self.label_key, names_key)
        ds = tf_pipeline.eval_tail(ds, self.data, batch_size, image_size)
        return EvalPart(tf_pipeline.numpy_batches(ds), total, file_names=bool(names_key))

    def _count(self, ds, split: str) -> int:
        count = int(ds.cardinality())
        if count < 0:
            raise ValueError(
                f"TFDS does not know the number of examples of {self.data.name} {split}."
            )
        return count


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
