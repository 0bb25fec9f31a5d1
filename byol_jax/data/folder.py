"""Source 'folder': image files under `data.folder`, read by index.

Layouts: `split/label/*.jpg` (the layout tfds.ImageFolder reads), `split/*.jpg` (an unlabelled
split), or a flat folder of unlabelled images, which every split name reads whole. Labels are
the sorted class-folder names over all splits, as in ImageFolder; files lying directly in a
split that has class folders are ignored, as there.

Read by index rather than with tfds.ImageFolder: ImageFolder shuffles without a seed, has no
sub-splits for processes and no flat layout; reading by index keeps the ordering contract
(`byol_jax.data.ordering`) and makes resume free.
"""

from __future__ import annotations

import functools
import itertools
import os
from typing import NamedTuple

import numpy as np

from byol_jax.data import ordering, tf_ops, tf_pipeline
from byol_jax.data.source import EvalPart, Source, info_dict

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


class Listing(NamedTuple):
    """A folder's images: class names, and per split (paths bytes [N] relative to the root,
    labels int32 [N] or None when unlabelled). Bytes keep ImageNet's 1.3 M paths ~50 MB.
    A flat folder has the one split '*'."""

    class_names: tuple[str, ...]
    splits: dict[str, tuple[np.ndarray, np.ndarray | None]]


class FolderSource(Source):
    def describe(self) -> str:
        return f"folder {self.data.folder!r}"

    def info(self) -> dict:
        listing = list_folder(self.data.folder)
        names = list(listing.class_names) or None
        counts = {split: len(paths) for split, (paths, _) in listing.splits.items()}
        if "*" in counts:  # a flat folder: every split name reads all its images
            counts = dict.fromkeys((self.data.train_split, self.data.eval_split), counts["*"])
        return info_dict(counts, len(names) if names else None, names, None)

    def has_labels(self, split: str) -> bool:
        self.split(split)  # an unknown split is an error of its own
        splits = list_folder(self.data.folder).splits
        return "*" not in splits and splits[split][1] is not None

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(paths bytes [N], labels int32 [N], -1 when unlabelled) of `split`."""
        listing = list_folder(self.data.folder)
        if "*" in listing.splits:
            split = "*"
        if split not in listing.splits:
            raise ValueError(
                f"split {split!r} is not in data.folder={self.data.folder!r}: it has "
                f"{sorted(listing.splits)}."
            )
        paths, labels = listing.splits[split]
        return paths, np.full(len(paths), -1, np.int32) if labels is None else labels

    def train_batches(
        self, mode, split, *, batch, image_size, seed, start_step, process_index, process_count
    ):
        t = tf_ops.tf()
        paths, labels = self.split(split)

        def step_records(step):
            positions = ordering.stream_positions(step, batch, process_index, process_count)
            rows = ordering.example_indices(seed, positions, len(paths))
            return {"position": positions, "path": paths[rows], "label": labels[rows]}

        spec = {
            "position": t.TensorSpec([batch], t.int64),
            "path": t.TensorSpec([batch], t.string),
            "label": t.TensorSpec([batch], t.int32),
        }
        steps = lambda: map(step_records, itertools.count(start_step))
        ds = t.data.Dataset.from_generator(steps, output_signature=spec).unbatch()
        ds = ds.map(self._reader(), num_parallel_calls=self.data.num_parallel)
        ds = tf_pipeline.train_tail(ds, self.data, mode, batch, image_size, seed, stream=0)
        files = lambda i: self._full_paths(step_records(start_step + i)["path"])
        return tf_pipeline.numpy_batches(ds, files)

    def eval_batches(self, split, *, batch_size, image_size, process_index, process_count):
        t = tf_ops.tf()
        paths, labels = self.split(split)
        rows = ordering.eval_rows(len(paths), process_index, process_count)
        records = {"path": paths[rows], "label": labels[rows], "file_name": paths[rows]}
        ds = t.data.Dataset.from_tensor_slices(records)
        ds = ds.map(self._reader(), num_parallel_calls=self.data.num_parallel)
        ds = tf_pipeline.eval_tail(ds, self.data, batch_size, image_size)
        files = lambda i: self._full_paths(paths[rows[i * batch_size : (i + 1) * batch_size]])
        return EvalPart(tf_pipeline.numpy_batches(ds, files), len(paths), file_names=True)

    def _reader(self):
        """A tf.data map reading record['path'] (relative to the root) into record['encoded']."""
        t, prefix = tf_ops.tf(), os.path.join(self.data.folder, "")
        return lambda record: {**record, "encoded": t.io.read_file(prefix + record["path"])}

    def _full_paths(self, paths: np.ndarray) -> list[str]:
        return [os.path.join(self.data.folder, os.fsdecode(p)) for p in paths]


@functools.lru_cache(maxsize=8)
def list_folder(root: str) -> Listing:
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
    return Listing(class_names, splits)


def _layout(root: str) -> dict[str, dict[str | None, list[str]]]:
    """{split: {label (None: unlabelled): relative paths}}; a flat folder is split '*'."""
    layout = {}
    for split in _subfolders(root):
        labels = _subfolders(os.path.join(root, split))
        groups = {label: os.path.join(split, label) for label in labels} or {None: split}
        layout[split] = {
            label: [os.path.join(sub, f) for f in _image_files(os.path.join(root, sub))]
            for label, sub in groups.items()
        }
    return layout or {"*": {None: _image_files(root)}}


def _image_files(directory: str) -> list[str]:
    with os.scandir(directory) as entries:
        names = (e.name for e in entries if e.is_file())
        return sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS))


def _subfolders(directory: str) -> list[str]:
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
