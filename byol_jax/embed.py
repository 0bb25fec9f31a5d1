"""Embeddings of a trained BYOL encoder, a file per split (one row per example, in order):

    python -m byol_jax.embed --workdir workdirs/cifar10 --out test.npz [--split test]
        [--projections] [--use_target] [--folder PATH | --data.source=folder --data.folder=PATH]

The .npz holds ``representations`` float32 [N, D], ``labels`` int32 [N] (-1: unlabelled),
``projections`` [N, P] with ``--projections``, and ``file_names`` [N] when the source has
them (folders, imagenet2012). With ``--out FILE.npy`` the representations go to FILE.npy
and each other array to FILE.<name>.npy. The data defaults to the run's own ``config.data``;
``--data.*`` overrides any of its fields and ``--folder PATH`` reads a folder of images
(``split/label/*.jpg``, ``split/*.jpg`` or a flat folder), centre-cropped to the run's size.
From Python: ``byol_jax.features.embed_dataset``.
"""

import sys

from absl import app, flags

from byol_jax import cli

_RUN = cli.define_run_flags("The .npz (or .npy) file to write.")
_PROJECTIONS = flags.DEFINE_bool("projections", False, "Also write the projections.")
flags.mark_flags_as_required(["out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from byol_jax import features  # noqa: PLC0415 (after flags: JAX reads its flags at import)

    try:
        learner, state, config, data = cli.load_run(_RUN)
        split = _RUN["split"].value or data.eval_split
        arrays = features.embed_dataset(
            learner,
            state,
            data,
            split,
            batch_size=_RUN["batch_size"].value,
            image_size=config.image_size,
            return_projection=_PROJECTIONS.value,
            use_target=_RUN["use_target"].value,
        )
        written = features.save_embeddings(_RUN["out"].value, arrays)
    except cli.USER_ERRORS as error:
        cli.exit_with("embed", error)
    shape = arrays["representations"].shape
    print(f"Embedded {shape[0]} examples of split {split!r} ({shape[1]}-d): {', '.join(written)}")


if __name__ == "__main__":
    sys.exit(app.run(main))
