"""Representations of a dataset: every example of a split embedded in input order, and
saved as .npz / .npy files. What ``python -m byol_jax.embed``, the pictures, the kNN monitor
and notebooks use.

    learner, state = byol_jax.pretrained.load("workdirs/cifar10")
    arrays = features.embed_dataset(learner, state, data_config, "test")
    arrays["representations"]  # float32 [N, D], one row per example, in order
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import ml_collections
import numpy as np

from byol_jax import byol
from byol_jax import data as datasets


def embed_dataset(
    learner: byol.BYOL,
    state: byol.ByolState,
    data_config: ml_collections.ConfigDict,
    split: str,
    *,
    batch_size: int = 256,
    image_size: int | None = None,
    return_projection: bool = False,
    use_target: bool = False,
    keep_images: bool = False,
    limit: int | None = None,
    arrays: Mapping | None = None,
) -> dict[str, np.ndarray]:
    """Embeds the examples of ``split`` in input order (BatchNorm in inference mode).

    Images are read by ``datasets.eval_batches`` at ``image_size`` (default the
    learner's), centre-cropped when their size differs. Returns
    {'representations': float32 [N, D], 'labels': int32 [N] (-1: unlabelled)}, plus
    'projections' float32 [N, P] with ``return_projection``, 'file_names' str [N] when the
    source has them, and 'images' uint8 [N, S, S, 3] with ``keep_images``. ``limit`` stops
    after the first ``limit`` examples.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of examples or None, got {limit}.")
    batches = datasets.eval_batches(
        data_config,
        split=split,
        batch_size=batch_size,
        image_size=image_size or learner.image_size,
        arrays=arrays,
    )
    parts: dict[str, list[np.ndarray]] = {}
    count = 0
    for batch in batches:
        out = learner.embed(
            state, batch["images"], return_projection=return_projection, use_target=use_target
        )
        rows = {"representations": out[1] if return_projection else out}
        if return_projection:
            rows["projections"] = out[0]
        rows["labels"] = batch["labels"]
        for key in ("file_names", "images") if keep_images else ("file_names",):
            if key in batch:
                rows[key] = batch[key]
        keep = np.asarray(batch["mask"])  # padding rows of the last batch are dropped
        for key, value in rows.items():
            parts.setdefault(key, []).append(np.asarray(value)[keep])
        count += int(keep.sum())
        if limit is not None and count >= limit:
            break
    if not parts:
        raise ValueError(f"split {split!r} has no examples to embed.")
    result = {key: np.concatenate(value)[:limit] for key, value in parts.items()}
    result["representations"] = result["representations"].astype(np.float32)
    if "projections" in result:
        result["projections"] = result["projections"].astype(np.float32)
    return result


def data_config_for(
    run_data: ml_collections.ConfigDict,
    overrides: Mapping[str, object] | None = None,
    folder: str | None = None,
) -> ml_collections.ConfigDict:
    """The run's data settings with ``--data.*`` overrides ({'source': 'folder', ...}) and,
    with ``folder``, a folder of images as the source."""
    data = datasets.default_data_config()
    data.update({k: v for k, v in run_data.items() if k in data})  # a run's config.json
    data.update_from_flattened_dict(dict(overrides or {}))
    if folder:
        data.source, data.folder = "folder", os.fspath(folder)
    return data


def save_embeddings(path: str, arrays: Mapping[str, np.ndarray]) -> list[str]:
    """Writes ``arrays`` to ``path``: one .npz, or with a .npy path the representations there
    and every other array to ``<path stem>.<name>.npy``. Returns the files written."""
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    if path.endswith(".npz"):
        np.savez(path, **arrays)
        return [path]
    if not path.endswith(".npy"):
        raise ValueError(f"--out must end with .npz or .npy, got {path!r}.")
    stem = path[: -len(".npy")]
    written = []
    for name, value in arrays.items():
        target = path if name == "representations" else f"{stem}.{name}.npy"
        np.save(target, value)
        written.append(target)
    return written
