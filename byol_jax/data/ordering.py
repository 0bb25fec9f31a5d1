"""The order in which sources read examples: the contract that makes resume exact.

Training (`Source.train_batches`):
  * The batch of step k depends only on (seed, k): a run resumed with `start_step=k` reads
    exactly what an uninterrupted run reads, host crops included, whose randomness is
    keyed by (seed, stream position, view) (`example_rng` here, a folded TF key there).
  * Each of P processes reads B = global_batch_size // P rows of the global batch. Row r of
    process p at step k has the stream position g = (k * P + p) * B + r: processes read
    disjoint rows whose union is the global batch.
  * Sources that index their examples (arrays, digits, folder): position g of a split of N
    examples is epoch e = g // N, example `default_rng([seed, e]).permutation(N)[g % N]`.
    Every epoch visits every example once, in a new order; resuming costs nothing.
    TFDS reads records in sequence and keeps its own epoch order, described in
    `byol_jax.data.tfds_source`; the two points above hold for it too.

Evaluation (`Source.eval_batches`):
  * One pass over the split, in its order. Process p reads part p of P contiguous parts
    whose sizes differ by at most one, the larger first (numpy.array_split,
    tfds.even_splits).
  * Every process yields the same number of batches, ceil(ceil(N / P) / batch_size); rows
    past a process's part are padding, with mask False, label -1, zero pixels and file name
    '' (`padded_eval_batches`), so collective evaluation steps stay in step.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections.abc import Iterator

import numpy as np

from byol_jax.data.source import Batch, EvalPart


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}.")


def check_process(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")


def per_process_batch(global_batch_size: int, process_count: int) -> int:
    """B, this process's rows of the global batch."""
    check_positive(global_batch_size=global_batch_size, process_count=process_count)
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by the number of processes "
            f"({process_count}): choose a multiple of {process_count}."
        )
    return global_batch_size // process_count


def seed_int(seed: int) -> int:
    """numpy seeds must be non-negative, TensorFlow's must fit int64."""
    return int(seed) % 2**63


def stream_positions(step: int, batch: int, process_index: int, process_count: int):
    """int64 [B]: the stream positions of this process's rows of the global batch at `step`."""
    start = (step * process_count + process_index) * batch
    return np.arange(start, start + batch, dtype=np.int64)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def example_indices(seed: int, positions: np.ndarray, num_examples: int) -> np.ndarray:
    """int64 [B]: the example each stream position reads (epoch g // N, permuted)."""
    epochs, offsets = np.divmod(positions, num_examples)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
        rows = epochs == epoch
        indices[rows] = _epoch_permutation(seed, int(epoch), num_examples)[offsets[rows]]
    return indices


def example_rng(seed: int, position: int, view: int) -> np.random.Generator:
    """The generator of one host crop (or flip: view 2) of the example at `position`."""
    return np.random.default_rng([seed, position, view])


def eval_rows(num_examples: int, process_index: int, process_count: int) -> np.ndarray:
    """int64 [n]: the rows of a split that process `process_index` evaluates, in order."""
    return np.array_split(np.arange(num_examples), process_count)[process_index]


def padded_eval_batches(
    part: EvalPart, batch_size: int, image_size: int, process_count: int
) -> Iterator[Batch]:
    """Pads a process's eval batches to `batch_size` rows (mask False) and their number to
    ceil(ceil(N / P) / batch_size), the same on every process."""
    num_batches = math.ceil(math.ceil(part.num_examples / process_count) / batch_size)
    empty = {
        "images": np.zeros((0, image_size, image_size, 3), np.uint8),
        "labels": np.zeros((0,), np.int32),
    }
    if part.file_names:
        empty["file_names"] = np.zeros((0,), str)
    more = itertools.repeat(empty, num_batches)  # this process's part may be shorter than others'
    for batch in itertools.islice(itertools.chain(part.batches, more), num_batches):
        rows = len(batch["labels"])
        out = {"mask": np.arange(batch_size) < rows}
        for key, value in batch.items():
            if key == "file_names":  # TensorFlow strings come back as bytes
                value = np.array([os.fsdecode(v) for v in value], str)
            fill = {"labels": -1, "file_names": ""}.get(key, 0)
            pad = np.full((batch_size - rows, *value.shape[1:]), fill, value.dtype)
            out[key] = np.concatenate([value, pad])
        yield out
