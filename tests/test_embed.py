"""byol_jax.embed: files with one row per input in input order, equal to the in-memory
model's embeddings, and clear errors for a workdir without a checkpoint or a missing split."""

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from byol_jax import checkpoint, features, pretrained
from byol_jax import data as datasets
from byol_jax.data.digits import digits_splits
from byol_jax.programs import pretraining

REPO = pathlib.Path(__file__).resolve().parent.parent


def tiny_quickstart(**overrides):
    """configs/quickstart.py shrunk to a tiny encoder, a few steps and small batches."""
    spec = importlib.util.spec_from_file_location("quickstart", REPO / "configs" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    values = dict(
        encoder="tiny",
        projection_hidden_size=32,
        projection_size=16,
        progress_bar=False,
        total_steps=3,
        batch_size=16,
        log_every=1,
        checkpoint_every=3,
        knn_at_end=False,
        eval_batch_size=64,
        warmup_fraction=0.0,
    )
    values.update(overrides)
    for key, value in values.items():
        config[key] = value
    return config


def train_tiny(workdir, **overrides):
    """Trains a tiny run in ``workdir``; returns (config, learner, the final in-memory state)."""
    config = tiny_quickstart(**overrides)
    captured = {}
    loop = pretraining._train

    def capturing_loop(run, *args):
        captured["learner"] = run.learner
        captured["state"] = loop(run, *args)
        return captured["state"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pretraining, "_train", capturing_loop)
        pretraining.train_and_evaluate(config, str(workdir))
    return config, captured["learner"], captured["state"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config, learner, state = train_tiny(workdir)
    return workdir, config, learner, state


def _env():
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = str(REPO / ".cache" / "jax")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    return env


def _embed_command(*args, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "byol_jax.embed", *map(str, args)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _eval_split(data, split, image_size):
    """(images, labels, file names or None) of a split as eval_batches yields them, unpadded."""
    batches = list(datasets.eval_batches(data, split=split, batch_size=1000, image_size=image_size))
    keep = np.concatenate([b["mask"] for b in batches])
    take = lambda key: np.concatenate([b[key] for b in batches])[keep]
    return (
        take("images"),
        take("labels"),
        take("file_names") if "file_names" in batches[0] else None,
    )


def test_command_writes_one_row_per_input_equal_to_the_in_memory_state(trained, tmp_path):
    workdir, config, learner, state = trained
    out = tmp_path / "train.npz"
    # --data.* overrides the run's data: eval_split=train is the split embedded by default.
    # 1437 training digits in batches of 100: the last batch has 63 padding rows to drop.
    result = _embed_command(
        "--workdir", workdir, "--out", out, "--projections", "--batch_size=100",
        "--data.eval_split=train",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Embedded 1437 examples of split 'train'" in result.stdout
    written = np.load(out)
    assert sorted(written.files) == ["labels", "projections", "representations"]

    images, labels, _ = _eval_split(config.data, "train", config.image_size)
    np.testing.assert_array_equal(written["labels"], labels)
    np.testing.assert_array_equal(labels, digits_splits(16)["train"]["labels"])
    # The in-memory state, on the whole split in one call (a batch shape the command never used).
    projections, representations = learner.embed(state, images, return_projection=True)
    assert written["representations"].shape == (1437, 2 * config.num_filters)  # tiny: 2 stages
    assert written["projections"].shape == (1437, config.projection_size)
    np.testing.assert_allclose(written["representations"], representations, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(written["projections"], projections, rtol=1e-5, atol=1e-6)
    assert np.std(written["representations"], axis=0).min() > 0  # rows differ: not one image


def test_restored_workdir_embeds_exactly_as_the_in_memory_state(trained):
    workdir, config, learner, state = trained
    restored_learner, restored = pretrained.load(str(workdir))
    assert int(restored.step) == 3
    images = digits_splits(16)["train"]["images"][:50]
    np.testing.assert_array_equal(
        np.asarray(restored_learner.embed(restored, images)),
        np.asarray(learner.embed(state, images)),
    )
    ours = features.embed_dataset(restored_learner, restored, config.data, "train", batch_size=64)
    np.testing.assert_allclose(
        ours["representations"][:50], learner.embed(state, images), rtol=1e-5, atol=1e-6
    )
    assert (
        ours["representations"].shape == (1437, 2 * config.num_filters) and "file_names" not in ours
    )


def _image_folder(root, images, labels):
    """root/test/<label>/<i>.png: a labelled folder in the layout byol_jax reads."""
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        target = root / "test" / f"class{label}"
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target / f"{i:02d}.png")


def test_folder_gives_file_names_in_input_order_and_npy_files(trained, tmp_path):
    workdir, config, learner, state = trained
    digits = digits_splits(16)["test"]
    _image_folder(tmp_path / "images", digits["images"][:7], [0, 1, 0, 1, 1, 0, 2])
    data = features.data_config_for(config.data, folder=tmp_path / "images")
    assert data.source == "folder" and data.image_key == config.data.image_key
    # 7 files in batches of 4: one padding row.
    arrays = features.embed_dataset(learner, state, data, "test", batch_size=4)
    out = tmp_path / "out" / "folder.npy"
    written = features.save_embeddings(str(out), arrays)
    assert sorted(os.path.basename(p) for p in written) == [
        "folder.file_names.npy",
        "folder.labels.npy",
        "folder.npy",
    ]
    names = np.load(tmp_path / "out" / "folder.file_names.npy")
    # Sorted class folders, then sorted files: the order eval_batches reads.
    expected = [
        "test/class0/00.png",
        "test/class0/02.png",
        "test/class0/05.png",
        "test/class1/01.png",
        "test/class1/03.png",
        "test/class1/04.png",
        "test/class2/06.png",
    ]
    assert names.tolist() == expected
    assert _eval_split(data, "test", config.image_size)[2].tolist() == expected
    np.testing.assert_array_equal(
        np.load(tmp_path / "out" / "folder.labels.npy"), [0, 0, 0, 1, 1, 1, 2]
    )
    # Row i is the embedding of file i alone (16 px PNGs: read as they are).
    representations = np.load(out)
    for row, name in enumerate(expected):
        image = np.asarray(Image.open(tmp_path / "images" / name).convert("RGB"))
        np.testing.assert_allclose(
            representations[row], learner.embed(state, image[None])[0], rtol=1e-5, atol=1e-6
        )


def test_workdir_without_checkpoint_is_a_clear_error(trained, tmp_path):
    result = _embed_command("--workdir", tmp_path / "empty", "--out", tmp_path / "x.npz")
    assert result.returncode != 0
    assert f"train first with: python -m byol_jax.train --workdir {tmp_path / 'empty'}" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr and not (tmp_path / "x.npz").exists()

    workdir = trained[0]
    no_checkpoints = tmp_path / "config_only"
    no_checkpoints.mkdir()
    shutil.copy(workdir / "config.json", no_checkpoints / "config.json")
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in .*train first with"):
        pretrained.load(str(no_checkpoints))


def test_missing_split_and_bad_output_are_clear_errors(trained, tmp_path):
    _, config, learner, state = trained
    with pytest.raises(ValueError, match=r"split 'validation' is not in the digits dataset"):
        features.embed_dataset(learner, state, config.data, "validation")
    with pytest.raises(ValueError, match="limit must be a positive"):
        features.embed_dataset(learner, state, config.data, "test", limit=0)
    with pytest.raises(ValueError, match="must end with .npz or .npy"):
        features.save_embeddings(str(tmp_path / "x.csv"), {"representations": np.zeros((2, 3))})


def test_limit_and_kept_images_follow_the_input_order(trained):
    _, config, learner, state = trained
    first = features.embed_dataset(
        learner, state, config.data, "test", batch_size=32, limit=40, keep_images=True
    )
    digits = digits_splits(16)["test"]
    assert first["representations"].shape == (40, 2 * config.num_filters)
    np.testing.assert_array_equal(first["images"], digits["images"][:40])
    np.testing.assert_array_equal(first["labels"], digits["labels"][:40])
