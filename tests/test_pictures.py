"""byol_jax.pictures: the PNG files the command promises, neighbours against scikit-learn,
PCA against an SVD, and training curves that never fail a run."""

import json
import os
import pathlib
import subprocess
import sys

import helpers
import jax
import numpy as np
import pytest
from PIL import Image

from byol_jax import builders, checkpoint, lifecycle, plots

REPO = pathlib.Path(__file__).resolve().parent.parent


def _png_size(path):
    """(width, height) of a valid PNG file."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        image.load()
        return image.size


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir as byol_jax.train leaves it (config.json, a checkpoint, metrics.jsonl) for a
    tiny untrained model: what pictures read, without compiling a train step."""
    workdir = tmp_path_factory.mktemp("run")
    config = helpers.load_config("quickstart")
    facts = {"total_steps": 40, "steps_per_epoch": 11, "num_classes": 10}
    learner = builders.build_learner(config, facts["total_steps"], facts["num_classes"])
    tx = builders.build_optimizer(config, facts["total_steps"], facts["steps_per_epoch"])
    state = learner.init(jax.random.key(0), np.zeros((2, 16, 16, 3), np.uint8), tx)
    with checkpoint.Checkpointer(str(workdir / "checkpoints")) as saver:
        saver.save(20, jax.device_get(state))
        saver.wait_until_finished()
    checkpoint.save_config(str(workdir), {**config.to_dict(), lifecycle.RUN_KEY: facts})
    rows = [{"step": s, "loss": 4.0 - 0.1 * s, "probe_top1": 0.02 * s} for s in range(1, 21)]
    rows.append({"step": 20, "knn_top1": 0.6, "knn_random_init_top1": 0.4})
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return workdir


def test_command_writes_every_promised_png(workdir, tmp_path):
    out = tmp_path / "pictures"
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(REPO / ".cache" / "jax"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "byol_jax.pictures",
            f"--workdir={workdir}",
            f"--out={out}",
            "--num_queries=4",
            "--k=3",
            "--bank_size=300",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(out)) == sorted(plots.FILE_NAMES.values())
    width, height = _png_size(out / "retrieval.png")
    # 4 rows of 1 query + 3 neighbours, 130 x 145 px per image at 100 dpi.
    assert (width, height) == (4 * 130, 4 * 145)
    assert _png_size(out / "embedding_map.png") == (650, 550)
    assert _png_size(out / "training_curves.png") == (1000, 360)
    for name in ("retrieval.png", "embedding_map.png"):
        with Image.open(out / name) as image:  # something was drawn: not a blank canvas
            assert np.asarray(image.convert("L")).std() > 10


def test_nearest_neighbours_match_scikit_learn():
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(0)
    bank, queries = rng.normal(size=(200, 12)), rng.normal(size=(9, 12))
    index, similarity = plots.nearest_neighbours(bank, queries, k=5)
    distance, expected = (
        NearestNeighbors(n_neighbors=5, metric="cosine").fit(bank).kneighbors(queries)
    )
    np.testing.assert_array_equal(index, expected)
    np.testing.assert_allclose(similarity, 1 - distance, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"k must be in \[1, 200\]"):
        plots.nearest_neighbours(bank, queries, k=201)


def test_pca_map_is_the_top_two_principal_components(tmp_path):
    rng = np.random.default_rng(1)
    features = rng.normal(size=(60, 5)) * np.array([5.0, 3.0, 1.0, 0.5, 0.1])
    points = plots.project_2d(features, "pca")
    centred = features - features.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(np.abs(points), np.abs(centred @ vt[:2].T), rtol=1e-4, atol=1e-4)
    labels = np.repeat([0, 1, 2, -1], 15)
    path = tmp_path / "tsne.png"
    plots.plot_embedding_map(
        features, labels, method="tsne", class_names=["a", "b", "c"], path=str(path)
    )
    assert _png_size(path) == (650, 550)
    with pytest.raises(ValueError, match="method must be 'pca' or 'tsne'"):
        plots.project_2d(features, "umap")


def test_training_curves_never_fail_and_skip_missing_metrics(tmp_path, caplog):
    assert plots.plot_training_curves(str(tmp_path)) is None  # no metrics.jsonl
    assert not list(tmp_path.iterdir())
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert plots.plot_training_curves(str(tmp_path)) is None  # a run killed mid-line
    assert "could not plot the training curves" in caplog.text
    assert not (tmp_path / "training_curves.png").exists()
    (tmp_path / "metrics.jsonl").write_text('{"step": 3, "knn_top1": 0.5}\n')
    assert plots.plot_training_curves(str(tmp_path)) is None  # no loss rows
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    path = plots.plot_training_curves(str(tmp_path))
    assert path == str(tmp_path / "training_curves.png")
    assert _png_size(path) == (500, 360)  # loss only: one panel


def test_retrieval_grid_titles_name_classes(tmp_path):
    images = np.random.default_rng(2).integers(0, 255, (10, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(10) % 3
    figure = plots.plot_retrieval(
        images[:2],
        labels[:2],
        images,
        labels,
        np.array([[0, 3, 1], [1, 4, 2]]),
        np.array([[1.0, 0.9, 0.2], [1.0, 0.8, 0.1]]),
        class_names=["zero", "one", "two"],
        path=str(tmp_path / "grid.png"),
    )
    titles = [axis.get_title() for axis in figure.axes]
    assert titles[:4] == ["query: zero", "zero\ncos 1.000", "zero\ncos 0.900", "one\ncos 0.200"]
    colours = [axis.title.get_color() for axis in figure.axes]
    assert colours[1:4] == ["green", "green", "red"]
    assert _png_size(tmp_path / "grid.png") == (4 * 130, 2 * 145)
