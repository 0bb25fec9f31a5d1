"""Embeddings of a trained BYOL encoder, for users: a file per split, or arrays in Python.

From the command line (one row per example of the split, in input order):

    python -m byol_jax.embed --workdir workdirs/cifar10 --out test.npz [--split test]
        [--projections] [--use_target] [--folder PATH | --data.source=folder --data.folder=PATH]

The .npz holds ``representations`` float32 [N, D], ``labels`` int32 [N] (-1: unlabelled),
``projections`` [N, P] with ``--projections``, and ``file_names`` [N] when the source has
them (folders, imagenet2012). With ``--out FILE.npy`` the representations go to FILE.npy
and each other array to FILE.<name>.npy. The data defaults to the run's own ``config.data``;
``--data.*`` overrides any of its fields and ``--folder PATH`` reads a folder of images
(``split/label/*.jpg``, ``split/*.jpg`` or a flat folder), centre-cropped to the run's size.

From Python, two lines load a trained encoder and embed a batch:

    learner, state = byol_jax.pretrained.load("workdirs/cifar10")
    representation = learner.embed(state, images)  # uint8 [N, H, W, 3] -> float32 [N, D]

``learner.embed(state, images, return_projection=True)`` gives (projection, representation);
``embed_dataset(learner, state, data_config, split)`` embeds a whole split.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import ml_collections
import numpy as np

from byol_jax import byol, checkpoint, input_pipeline

# What a wrong --workdir, --split or --data.* raises: a message, not a traceback.
USER_ERRORS = (checkpoint.CheckpointError, ValueError, TypeError)


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

    Images are read by ``input_pipeline.eval_batches`` at ``image_size`` (default the
    learner's), centre-cropped when their size differs. Returns
    {'representations': float32 [N, D], 'labels': int32 [N] (-1: unlabelled)}, plus
    'projections' float32 [N, P] with ``return_projection``, 'file_names' str [N] when the
    source has them, and 'images' uint8 [N, S, S, 3] with ``keep_images``. ``limit`` stops
    after the first ``limit`` examples.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of examples or None, got {limit}.")
    batches = input_pipeline.eval_batches(
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
    data = input_pipeline.default_data_config()
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


# ---------------------------------------------------------------------------------- program


def define_flags(out_help: str) -> dict:
    """The flags byol_jax.embed and byol_jax.pictures share. Defined when run as a program
    only: importing this module defines no absl flags."""
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    return {
        "workdir": flags.DEFINE_string("workdir", None, "The workdir of a byol_jax.train run."),
        "out": flags.DEFINE_string("out", None, out_help),
        "split": flags.DEFINE_string("split", None, "Split to read (default: data.eval_split)."),
        "folder": flags.DEFINE_string(
            "folder", None, "A folder of images to read instead of the run's data."
        ),
        "batch_size": flags.DEFINE_integer("batch_size", 256, "Images per embedding call."),
        "use_target": flags.DEFINE_bool(
            "use_target", False, "Embed with the target network instead of the online one."
        ),
        "data": config_flags.DEFINE_config_dict(
            "data", input_pipeline.default_data_config(), "Overrides of the run's config.data."
        ),
    }


def load_from_flags(flag_values: dict):
    """(learner, state, run config, data config) that the shared flags name."""
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    from byol_jax import pretrained  # noqa: PLC0415 (after flags: JAX reads its flags at import)

    workdir = flag_values["workdir"].value
    config, _ = pretrained.load_config(workdir)  # fails early, naming how to train
    learner, state = pretrained.load(workdir)
    overrides = config_flags.get_override_values(flags.FLAGS[flag_values["data"].name])
    data = data_config_for(config.data, overrides, flag_values["folder"].value)
    return learner, state, config, data


def main(argv, flag_values, projections_flag) -> None:
    from absl import app  # noqa: PLC0415

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        learner, state, config, data = load_from_flags(flag_values)
        split = flag_values["split"].value or data.eval_split
        arrays = embed_dataset(
            learner,
            state,
            data,
            split,
            batch_size=flag_values["batch_size"].value,
            image_size=config.image_size,
            return_projection=projections_flag.value,
            use_target=flag_values["use_target"].value,
        )
        written = save_embeddings(flag_values["out"].value, arrays)
    except USER_ERRORS as error:
        sys.exit(f"byol_jax.embed: {error}")
    shape = arrays["representations"].shape
    print(f"Embedded {shape[0]} examples of split {split!r} ({shape[1]}-d): {', '.join(written)}")


def _run() -> None:
    from absl import app, flags  # noqa: PLC0415

    flag_values = define_flags("The .npz (or .npy) file to write.")
    projections = flags.DEFINE_bool("projections", False, "Also write the projections.")
    flags.mark_flags_as_required(["workdir", "out"])
    app.run(lambda argv: main(argv, flag_values, projections))


if __name__ == "__main__":
    sys.exit(_run())
