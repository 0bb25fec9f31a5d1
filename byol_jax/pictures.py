"""Pictures of a trained BYOL representation, as PNG files:

    python -m byol_jax.pictures --workdir workdirs/cifar10 [--out DIR] [--split test]
        [--pictures=retrieval,map,curves] [--method=pca|tsne] [--folder PATH | --data.*=...]

writes to DIR (default the workdir) ``retrieval.png`` (queries of the evaluation split and
their nearest training images), ``embedding_map.png`` (a 2-D map of the representations by
label) and ``training_curves.png`` (loss, probe and kNN top-1 against step). The drawing
functions, for notebooks, are in ``byol_jax.plots``.
"""

import sys

from absl import app, flags

from byol_jax import cli

PICTURES = ("retrieval", "map", "curves")  # byol_jax.plots.PICTURES, without importing it
_RUN = cli.define_run_flags("Folder for the PNG files (default: the workdir).")
_PICTURES = flags.DEFINE_list("pictures", list(PICTURES), "Pictures to draw.")
_METHOD = flags.DEFINE_enum("method", "pca", ["pca", "tsne"], "The 2-D map's method.")
_QUERIES = flags.DEFINE_integer("num_queries", 6, "Query images in the grid.")
_K = flags.DEFINE_integer("k", 5, "Neighbours shown per query.")
_BANK = flags.DEFINE_integer(
    "bank_size", 10_000, "Training images searched for neighbours (the first ones)."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from byol_jax import plots  # noqa: PLC0415 (after flags: JAX reads its flags at import)

    workdir = _RUN["workdir"].value  # None for imported weights: no training curves
    try:
        if not (_RUN["out"].value or workdir):
            raise ValueError("pictures of imported weights (--pretrained) need --out DIR.")
        learner, state, _, data = cli.load_run(_RUN)
        written = plots.save_pictures(
            learner,
            state,
            data,
            _RUN["out"].value or workdir,
            workdir=workdir,
            split=_RUN["split"].value,
            pictures=_PICTURES.value,
            method=_METHOD.value,
            num_queries=_QUERIES.value,
            k=_K.value,
            bank_size=_BANK.value,
            batch_size=_RUN["batch_size"].value,
        )
    except cli.USER_ERRORS as error:
        cli.exit_with("pictures", error)
    for name, path in written.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    sys.exit(app.run(main))
